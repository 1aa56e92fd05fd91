fn main() -> anyhow::Result<()> {
    anyhow::bail!("weft-bench-xds: not written yet")
}
