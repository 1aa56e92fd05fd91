//! Minimal benchmark backends (see `weft-bench-proxy`).
