//! Generates Rust for Weft's own protos. Envoy's protos are NOT compiled here: they come
//! from the `envoy-types` crate, so we never vendor or regenerate them.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure().compile_protos(
        &["weft/registry/v1/registry.proto", "weft/demo/v1/echo.proto"],
        &["."],
    )?;
    Ok(())
}
