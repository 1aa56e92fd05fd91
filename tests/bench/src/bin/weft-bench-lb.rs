fn main() -> anyhow::Result<()> {
    anyhow::bail!("weft-bench-lb: not written yet")
}
