//! Sidecar injection webhook (issue 6): being written.
