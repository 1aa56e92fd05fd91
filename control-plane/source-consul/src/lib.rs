//! Consul source (issue 5): being written.
