//! A stateful stand-in for the parts of Consul's HTTP API that Weft uses. Tests only: no real
//! Consul can be installed on our CI machines, so the Consul source and the sidecar's Consul
//! registration are tested against this, written to follow Consul's documented semantics.
//!
//! ## Interface contract (shared by the Consul source tests and the sidecar registration tests)

use std::net::SocketAddr;

/// A running stand-in. Dropping it stops the server (state is lost, as a Consul agent restart
/// with no data dir would lose it).
#[derive(Debug)]
pub struct ConsulStandIn {
    // implementation-defined
}

impl ConsulStandIn {
    /// Starts on 127.0.0.1 and a free port.
    pub async fn start() -> std::io::Result<ConsulStandIn> {
        unimplemented!()
    }

    /// Starts on a given address (to restart "the same Consul" on its old port).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<ConsulStandIn> {
        let _ = addr;
        unimplemented!()
    }

    pub fn addr(&self) -> SocketAddr {
        unimplemented!()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        unimplemented!()
    }

    /// Sets a check's status (`passing`, `warning`, `critical`) as Consul's own check runner
    /// would, bumping the index.
    pub fn set_check_status(&self, check_id: &str, status: &str) {
        let _ = (check_id, status);
        unimplemented!()
    }

    /// Makes the raft index go backwards (as after a snapshot restore), to test index resets.
    pub fn reset_index(&self, to: u64) {
        let _ = to;
        unimplemented!()
    }

    /// The agent's registered services as JSON (`/v1/agent/services` shape), for assertions.
    pub fn agent_services(&self) -> serde_json::Value {
        unimplemented!()
    }

    /// The agent's checks as JSON (`/v1/agent/checks` shape), for assertions.
    pub fn agent_checks(&self) -> serde_json::Value {
        unimplemented!()
    }

    /// Number of HTTP requests served per path (to check that clients do not spin).
    pub fn requests(&self, path: &str) -> u64 {
        let _ = path;
        unimplemented!()
    }
}
