//! `weft-sidecar`: parses flags, wires the sidecar's parts together, waits for a signal and
//! drains. Being written (issue 4).
fn main() {}
