//! Kubernetes source (issue 6): being written.
