//! Test support for real etcd (being written).
