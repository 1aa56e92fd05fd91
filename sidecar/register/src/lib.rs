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
//! What it does not do: probe health (weft-health-check does), decide when to drain (the
//! binary does), or write the service's protocol to etcd (`<prefix>/service-config/<service>`
//! is shared by every instance, so it is left to the operator; the Registration API carries
//! the protocol with each registration).
//!
//! ## Interface contract (shared with the sidecar binary; keep it stable)

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

mod control_plane;
mod etcd;

/// Key prefix when `etcd://` names none; the control plane's `--etcd-prefix` default.
pub const DEFAULT_ETCD_PREFIX: &str = "/weft";

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
        let err = |reason: String| ParseBackendError {
            value: value.to_string(),
            reason,
        };
        if value == "control-plane" {
            if control_plane.is_empty() {
                return Err(err("no control-plane endpoint to register with".into()));
            }
            return Ok(Backend::ControlPlane {
                endpoint: control_plane.to_string(),
            });
        }
        let (scheme, rest) = if let Some(rest) = value.strip_prefix("etcd://") {
            ("http", rest)
        } else if let Some(rest) = value.strip_prefix("etcds://") {
            ("https", rest)
        } else {
            return Err(err(
                "expected `control-plane`, `etcd://host:port[,host:port...][/prefix]` or \
                 `etcds://...`"
                    .into(),
            ));
        };
        let (hosts, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        // The control plane's prefix has no trailing slash; `/weft/` must mean `/weft`.
        let prefix = prefix.trim_end_matches('/');
        let prefix = if prefix.is_empty() {
            DEFAULT_ETCD_PREFIX.to_string()
        } else {
            prefix.to_string()
        };
        if prefix.contains("//") {
            return Err(err(format!("prefix `{prefix}` has an empty path segment")));
        }
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            let (h, port) = host
                .rsplit_once(':')
                .ok_or_else(|| err(format!("endpoint `{host}` needs host:port")))?;
            let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
            if h.is_empty() || !port_ok {
                return Err(err(format!(
                    "endpoint `{host}` needs host:port with a port in 1..=65535"
                )));
            }
            endpoints.push(format!("{scheme}://{host}"));
        }
        Ok(Backend::Etcd {
            endpoints,
            prefix,
            ca: None,
            cert: None,
            key: None,
        })
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
///
/// Dropping it without [`Registration::deregister`] stops the task at once and leaves the entry
/// to expire after its TTL, as if the sidecar had been killed.
pub struct Registration {
    health: watch::Sender<Option<Health>>,
    status: watch::Receiver<Status>,
    stop: Option<oneshot::Sender<Reply>>,
    task: JoinHandle<()>,
}

/// How the task answers a deregistration request.
type Reply = oneshot::Sender<Result<(), RegisterError>>;

impl Registration {
    /// Starts the task. It registers with `health` when first given one that is not
    /// Unhealthy-before-ever-healthy (the caller sends Healthy when the app first passes), and
    /// retries with backoff on errors.
    ///
    /// Only Healthy starts registration: Unhealthy or Draining before that registers nothing.
    /// Must be called inside a Tokio runtime.
    pub fn spawn(backend: Backend, instance: Instance) -> Registration {
        let (health, health_rx) = watch::channel(None);
        let (status_tx, status) = watch::channel(Status::default());
        let (stop, stop_rx) = oneshot::channel();
        let ctx = Ctx {
            instance,
            health: health_rx,
            status: status_tx,
        };
        let task = tokio::spawn(run(backend, ctx, stop_rx));
        Registration {
            health,
            status,
            stop: Some(stop),
            task,
        }
    }

    /// Reports the app's health; the first Healthy triggers registration.
    pub fn set_health(&self, health: Health) {
        // Repeating the current health is not news; only a change is pushed to the backend.
        self.health.send_if_modified(|h| {
            let changed = *h != Some(health);
            *h = Some(health);
            changed
        });
    }

    pub fn status(&self) -> tokio::sync::watch::Receiver<Status> {
        self.status.clone()
    }

    /// Removes the entry and stops the task (bounded by `timeout`).
    pub async fn deregister(mut self, timeout: Duration) -> Result<(), RegisterError> {
        let Some(stop) = self.stop.take() else {
            return Ok(());
        };
        let (reply, answer) = oneshot::channel();
        if stop.send(reply).is_err() {
            // The task already ended (it only does when nothing can be registered any more).
            return Ok(());
        }
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Ok(()),
            // Dropping `self` aborts the task; the entry then goes with its TTL.
            Err(_) => Err(RegisterError::Timeout(timeout)),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What every backend's task works with.
struct Ctx {
    instance: Instance,
    health: watch::Receiver<Option<Health>>,
    status: watch::Sender<Status>,
}

impl Ctx {
    /// The health to write now, marking it seen so that only later changes wake the task.
    fn take_health(&mut self) -> Health {
        self.health.borrow_and_update().unwrap_or(Health::Healthy)
    }

    fn record_error(&self, e: &RegisterError) {
        let text = e.to_string();
        self.status.send_if_modified(|s| {
            let changed = s.last_error.as_deref() != Some(text.as_str());
            s.last_error = Some(text.clone());
            changed
        });
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        self.status.send_if_modified(|s| {
            let before = s.clone();
            f(s);
            *s != before
        });
    }

    /// Renewal period: three renewals per TTL, so one lost renewal never loses the entry.
    fn period(&self, ttl: Duration) -> Duration {
        (ttl / 3).max(Duration::from_millis(100))
    }
}

async fn run(backend: Backend, mut ctx: Ctx, mut stop: oneshot::Receiver<Reply>) {
    let first_healthy = tokio::select! {
        r = ctx.health.wait_for(|h| *h == Some(Health::Healthy)) => r.is_ok(),
        reply = &mut stop => {
            // Nothing was registered, so there is nothing to remove.
            if let Ok(reply) = reply {
                let _ = reply.send(Ok(()));
            }
            return;
        }
    };
    if !first_healthy {
        return;
    }
    match backend {
        Backend::ControlPlane { endpoint } => control_plane::run(endpoint, ctx, stop).await,
        Backend::Etcd {
            endpoints,
            prefix,
            ca,
            cert,
            key,
        } => {
            let tls = etcd::TlsFiles { ca, cert, key };
            etcd::run(endpoints, prefix, tls, ctx, stop).await;
        }
    }
}

/// Delay before retry number `failures` (1-based): exponential from 100 ms, capped at `cap`,
/// drawn from its upper half so that many sidecars restarted together spread out but none
/// retries at once.
fn backoff(failures: u32, cap: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let full = Duration::from_millis(100)
        .saturating_mul(1u32 << exp)
        .min(cap)
        .max(Duration::from_millis(10));
    let half = full / 2;
    let jitter_ms = rand::random_range(0..=u64::try_from(half.as_millis()).unwrap_or(u64::MAX));
    half + Duration::from_millis(jitter_ms)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn etcd(endpoints: &[&str], prefix: &str) -> Backend {
        Backend::Etcd {
            endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
            prefix: prefix.into(),
            ca: None,
            cert: None,
            key: None,
        }
    }

    #[test]
    fn parses_backends() {
        let cp = "http://cp:18000";
        let cases = [
            (
                "control-plane",
                Backend::ControlPlane {
                    endpoint: cp.into(),
                },
            ),
            ("etcd://h:2379", etcd(&["http://h:2379"], "/weft")),
            (
                "etcd://a:1,b:2/mesh/prod",
                etcd(&["http://a:1", "http://b:2"], "/mesh/prod"),
            ),
            ("etcd://a:1/", etcd(&["http://a:1"], "/weft")),
            ("etcd://a:1/x/", etcd(&["http://a:1"], "/x")),
            ("etcds://[::1]:2379", etcd(&["https://[::1]:2379"], "/weft")),
            (
                "etcds://a:1,b:2/p",
                etcd(&["https://a:1", "https://b:2"], "/p"),
            ),
        ];
        for (value, want) in cases {
            assert_eq!(Backend::parse(value, cp), Ok(want), "{value}");
        }
    }

    #[test]
    fn parse_errors_name_the_value() {
        for (value, reason) in [
            ("consul://x:1", "expected `control-plane`"),
            ("etcd://", "needs host:port"),
            ("etcd://h", "needs host:port"),
            ("etcd://h:0", "port in 1..=65535"),
            ("etcd://h:x", "port in 1..=65535"),
            ("etcd://:1", "port in 1..=65535"),
            ("etcd://a:1,,b:2", "needs host:port"),
            ("etcd://a:1//x", "empty path segment"),
        ] {
            let e = Backend::parse(value, "http://cp:1").unwrap_err();
            assert_eq!(e.value, value);
            let text = e.to_string();
            assert!(text.contains(&format!("`{value}`")), "{text}");
            assert!(text.contains(reason), "{value}: {text}");
        }
        assert!(Backend::parse("control-plane", "").is_err());
    }

    #[test]
    fn backoff_grows_and_stays_under_the_cap() {
        let cap = Duration::from_millis(700);
        for n in 1..40 {
            let d = backoff(n, cap);
            assert!(d <= cap, "{n}: {d:?}");
        }
        assert!(backoff(1, cap) <= Duration::from_millis(100));
        assert!(backoff(10, cap) >= Duration::from_millis(350));
    }
}
