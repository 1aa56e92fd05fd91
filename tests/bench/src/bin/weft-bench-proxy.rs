fn main() -> anyhow::Result<()> {
    anyhow::bail!("weft-bench-proxy: not written yet")
}
