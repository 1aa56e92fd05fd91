//! Workload identity for Weft's mTLS (work in progress, see issue 8).
