//! The in-tree xDS load client (see `weft-bench-xds`).
