//! Registers the sidecar's app in the service registry and keeps the entry true.
//!
//! What it does: once the app is healthy, registers one instance (service, address, port, zone,
//! protocol, metadata) with the chosen backend and keeps it alive: the control plane's
//! Registration API (register, heartbeat within the TTL, health updates, re-register when the
//! control plane has forgotten the instance) or etcd (a lease kept alive by the sidecar, the
//! instance key written under it in a fenced transaction so a stale sidecar cannot overwrite a
//! newer one). Health changes are pushed at once; deregistration removes the entry. If the
//! sidecar dies, the entry disappears after its TTL.
//!
//! What it does not do: probe health (weft-health-check does) or decide when to drain (the
//! binary does).
//!
//! ## Interface contract (shared with the sidecar binary; keep it stable)

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

/// Where to register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// The control plane's Registration API at `http://host:port` (its xDS port).
    ControlPlane { endpoint: String },
    /// etcd: endpoints, key prefix (control plane's `--etcd-prefix`, default `/weft`), TLS.
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
        ca: Option<std::path::PathBuf>,
        cert: Option<std::path::PathBuf>,
        key: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--register `{value}`: {reason}")]
pub struct ParseBackendError {
    pub value: String,
    pub reason: String,
}

impl Backend {
    /// `control-plane` (uses `control_plane` as the endpoint), `etcd://host:port[,host:port]
    /// [/prefix]` (prefix default `/weft`), `etcds://...` for TLS (files from the caller).
    pub fn parse(value: &str, control_plane: &str) -> Result<Backend, ParseBackendError> {
        let _ = (value, control_plane);
        unimplemented!()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Healthy,
    Unhealthy,
    Draining,
}

/// The instance to register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub service: String,
    /// Stable id; the sidecar derives it from host name and port unless told.
    pub instance_id: String,
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub zone: Option<String>,
    /// `http` or `grpc`.
    pub protocol: String,
    pub metadata: BTreeMap<String, String>,
    /// Entry lifetime without keepalive (control-plane TTL / etcd lease TTL).
    pub ttl: Duration,
}

/// What `/debug/registration` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    pub registered: bool,
    pub health: Option<Health>,
    pub registrations: u64,
    pub last_error: Option<String>,
    /// etcd: the lease id holding the key.
    pub lease: Option<i64>,
    /// etcd: another sidecar holds this instance key; we stopped writing it.
    pub fenced: bool,
}

/// A running registration task.
#[derive(Debug)]
pub struct Registration {
    // implementation-defined
}

impl Registration {
    /// Starts the task. It registers with `health` when first given one that is not
    /// Unhealthy-before-ever-healthy (the caller sends Healthy when the app first passes), and
    /// retries with backoff on errors.
    pub fn spawn(backend: Backend, instance: Instance) -> Registration {
        let _ = (backend, instance);
        unimplemented!()
    }

    /// Reports the app's health; the first Healthy triggers registration.
    pub fn set_health(&self, health: Health) {
        let _ = health;
        unimplemented!()
    }

    pub fn status(&self) -> tokio::sync::watch::Receiver<Status> {
        unimplemented!()
    }

    /// Removes the entry and stops the task (bounded by `timeout`).
    pub async fn deregister(self, timeout: Duration) -> Result<(), RegisterError> {
        let _ = timeout;
        unimplemented!()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("registration API {endpoint}: {source}")]
    ControlPlane {
        endpoint: String,
        #[source]
        source: tonic::Status,
    },
    #[error("connecting to {endpoint}: {message}")]
    Connect { endpoint: String, message: String },
    #[error("etcd: {source}")]
    Etcd {
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd key {key} is held by another sidecar (lease {holder}); not overwriting it")]
    Fenced { key: String, holder: i64 },
    #[error("deregistration timed out after {0:?}")]
    Timeout(Duration),
}
