//! Weft's own gRPC APIs.
//!
//! - `weft.registry.v1.Registration`: how a workload (normally `weft-sidecar`) registers itself
//!   in the control plane's embedded registry with a TTL, heartbeats, and deregisters.
//! - `weft.demo.v1.Echo`: the tiny service the demo and test backends serve, so tests can see
//!   which backend answered.
//!
//! Envoy's xDS protos are not here; they come from `envoy-types`.

#![allow(clippy::all)]

pub mod registry {
    pub mod v1 {
        tonic::include_proto!("weft.registry.v1");
    }
}

pub mod demo {
    pub mod v1 {
        tonic::include_proto!("weft.demo.v1");
    }
}
