//! Registers the sidecar's app in the service registry and keeps the entry true.
//!
//! What it does: once the app is healthy, registers one instance (service, address, port, zone,
//! protocol, metadata) with the chosen backend and keeps it alive: the control plane's
//! Registration API (register, heartbeat within the TTL, health updates, re-register when the
//! control plane has forgotten the instance), etcd (a lease kept alive by the sidecar, the
//! instance key written under it in a fenced transaction so a stale sidecar cannot overwrite a
//! newer one) or a Consul agent (see below). Health changes are pushed at once; deregistration
//! removes the entry. If the sidecar dies, the entry disappears after its TTL.
//!
//! What it does not do: probe health (weft-health-check does) or decide when to drain (the
//! binary does). With etcd, a gRPC app's first registration declares its service's protocol
//! (`<prefix>/service-config/<service>`, no lease) only if no such key exists yet: the key is
//! shared by every instance, so an operator's explicit value always wins; the Registration API
//! carries the protocol with each registration instead.
//!
//! ## Consul
//!
//! `--register consul://host:port` (`consuls://` for HTTPS; a bare `consul://` means the local
//! agent at `127.0.0.1:8500`) registers through the *agent* API
//! (`PUT /v1/agent/service/register`), never the catalog API: the agent's anti-entropy would
//! undo catalog writes it does not know about, and only the agent runs checks and reaps.
//!
//! - The entry: `ID` = instance id, `Name` = service, `Address`, `Port`, `Tags` `weft` (and
//!   `grpc` for gRPC apps), `Meta` = the instance metadata plus `zone` and `protocol`,
//!   `Weights {Passing: weight, Warning: 1}`.
//! - The check ([`ConsulCheck`]), always with `DeregisterCriticalServiceAfter` (default: 3x the
//!   TTL, at least one minute, which is also Consul's own minimum) and an explicit initial
//!   `Status` from the current health, so a new entry is neither briefly critical nor passing
//!   before the app is. The default is a TTL check (`service:<id>`) that the sidecar updates
//!   (`PUT /v1/agent/check/update/service:<id>`) every TTL/3 and at once on a health change:
//!   Healthy is `passing`, Unhealthy `critical`, Draining `critical` with output `draining`
//!   (Consul-aware clients stop picking a critical instance; maintenance mode would say the
//!   same with a second check to clean up). With an HTTP or gRPC check Consul probes the app
//!   itself and the sidecar's health only decides the first registration and the initial status.
//! - An agent that lost its state (restarted without a data dir, or reaped the entry after it
//!   was critical for `DeregisterCriticalServiceAfter`, e.g. a long-unhealthy app) answers 404
//!   to the check update or to `GET /v1/agent/service/<id>` (polled every TTL/3 when there is no
//!   TTL check); the sidecar then registers again. Other errors are retried with jittered
//!   backoff capped at TTL/3.
//! - Deregistration: `PUT /v1/agent/service/deregister/<id>`. A killed sidecar's TTL check goes
//!   critical after one TTL and the agent reaps the entry after `DeregisterCriticalServiceAfter`.
//! - The ACL token is read from `CONSUL_HTTP_TOKEN` (Consul's own convention; a command-line
//!   flag would show in `ps`) by [`Backend::parse`] and sent as `X-Consul-Token`. A datacenter
//!   is accepted but not sent: agent endpoints act on the local agent and do not take `?dc=`.
//!
//! ## Interface contract (shared with the sidecar binary; keep it stable)

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

mod consul;
mod control_plane;
mod etcd;

/// Key prefix when `etcd://` names none; the control plane's `--etcd-prefix` default.
pub const DEFAULT_ETCD_PREFIX: &str = "/weft";

/// The Consul agent a bare `consul://` names: the local one, as Consul's own CLI assumes.
pub const DEFAULT_CONSUL_ADDR: &str = "127.0.0.1:8500";

/// Where Consul's ACL token comes from (read by [`Backend::parse`]).
pub const CONSUL_TOKEN_ENV: &str = "CONSUL_HTTP_TOKEN";

/// Where to register.
#[derive(Clone, PartialEq, Eq)]
pub enum Backend {
    /// The control plane's Registration API at `http://host:port` (its xDS port), or
    /// `https://host:port` with `tls` (mTLS: the sidecar's client certificate).
    ControlPlane {
        endpoint: String,
        tls: Option<weft_identity::ClientTlsFiles>,
    },
    /// etcd: endpoints, key prefix (control plane's `--etcd-prefix`, default `/weft`), TLS.
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
        ca: Option<std::path::PathBuf>,
        cert: Option<std::path::PathBuf>,
        key: Option<std::path::PathBuf>,
    },
    /// A Consul agent's HTTP API (see the crate doc).
    Consul {
        /// `http://host:port` or `https://host:port`.
        addr: String,
        /// ACL token, sent as `X-Consul-Token`. Never shown by `Debug`.
        token: Option<String>,
        /// Accepted for symmetry with Consul's other clients but not sent: agent endpoints only
        /// act on the local agent's datacenter.
        datacenter: Option<String>,
        /// TLS (`https://` only): CA file (default: the system's roots), client cert and key.
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        check: ConsulCheck,
        /// The check's `DeregisterCriticalServiceAfter`; `None`: 3x the TTL, at least 1 minute.
        deregister_after: Option<Duration>,
    },
}

/// Which check the Consul registration carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ConsulCheck {
    /// A TTL check (the instance TTL) that the sidecar keeps updated from its own health.
    #[default]
    Ttl,
    /// Consul GETs `url` every `interval`.
    Http { url: String, interval: Duration },
    /// Consul calls the gRPC health service at `target` (`host:port[/service]`) every `interval`.
    Grpc { target: String, interval: Duration },
}

impl std::fmt::Debug for Backend {
    // By hand so that the Consul token never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::ControlPlane { endpoint, tls } => f
                .debug_struct("ControlPlane")
                .field("endpoint", endpoint)
                .field("tls", tls)
                .finish(),
            Backend::Etcd {
                endpoints,
                prefix,
                ca,
                cert,
                key,
            } => f
                .debug_struct("Etcd")
                .field("endpoints", endpoints)
                .field("prefix", prefix)
                .field("ca", ca)
                .field("cert", cert)
                .field("key", key)
                .finish(),
            Backend::Consul {
                addr,
                token,
                datacenter,
                ca,
                cert,
                key,
                check,
                deregister_after,
            } => f
                .debug_struct("Consul")
                .field("addr", addr)
                .field("token", &token.as_ref().map(|_| "<redacted>"))
                .field("datacenter", datacenter)
                .field("ca", ca)
                .field("cert", cert)
                .field("key", key)
                .field("check", check)
                .field("deregister_after", deregister_after)
                .finish(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--register `{value}`: {reason}")]
pub struct ParseBackendError {
    pub value: String,
    pub reason: String,
}

impl Backend {
    /// `control-plane` (uses `control_plane` as the endpoint), `etcd://host:port[,host:port]
    /// [/prefix]` (prefix default `/weft`), `etcds://...` for TLS (files from the caller),
    /// `consul://[host:port]` (default `127.0.0.1:8500`), `consuls://...` for HTTPS. Consul gets a
    /// TTL check and its ACL token from the `CONSUL_HTTP_TOKEN` environment variable (unset or
    /// empty: none); the caller may change the check, datacenter and TLS files afterwards.
    pub fn parse(value: &str, control_plane: &str) -> Result<Backend, ParseBackendError> {
        let token = std::env::var(CONSUL_TOKEN_ENV).ok();
        Backend::parse_with_token(value, control_plane, token)
    }

    /// [`Backend::parse`] with the Consul token given rather than read from the environment.
    pub fn parse_with_token(
        value: &str,
        control_plane: &str,
        consul_token: Option<String>,
    ) -> Result<Backend, ParseBackendError> {
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
                tls: None,
            });
        }
        let consul = if let Some(rest) = value.strip_prefix("consul://") {
            Some(("http", rest))
        } else {
            value.strip_prefix("consuls://").map(|rest| ("https", rest))
        };
        if let Some((scheme, rest)) = consul {
            // One agent, no path: agent endpoints have fixed paths and a sidecar talks to one.
            let host = rest.strip_suffix('/').unwrap_or(rest);
            let host = if host.is_empty() {
                DEFAULT_CONSUL_ADDR
            } else {
                host
            };
            if host.contains(['/', ',', '?', '@']) {
                return Err(err(format!(
                    "`{host}` is not host:port (one agent, no path, query or credentials; \
                     the token comes from {CONSUL_TOKEN_ENV})"
                )));
            }
            check_host_port(host).map_err(err)?;
            return Ok(Backend::Consul {
                addr: format!("{scheme}://{host}"),
                token: consul_token.filter(|t| !t.trim().is_empty()),
                datacenter: None,
                ca: None,
                cert: None,
                key: None,
                check: ConsulCheck::Ttl,
                deregister_after: None,
            });
        }
        let (scheme, rest) = if let Some(rest) = value.strip_prefix("etcd://") {
            ("http", rest)
        } else if let Some(rest) = value.strip_prefix("etcds://") {
            ("https", rest)
        } else {
            return Err(err(
                "expected `control-plane`, `etcd://host:port[,host:port...][/prefix]`, \
                 `etcds://...`, `consul://[host:port]` or `consuls://...`"
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
            check_host_port(host).map_err(err)?;
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

/// `host:port` with a non-empty host and a port in 1..=65535.
fn check_host_port(host: &str) -> Result<(), String> {
    let (h, port) = host
        .rsplit_once(':')
        .ok_or_else(|| format!("endpoint `{host}` needs host:port"))?;
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    if h.is_empty() || !port_ok {
        return Err(format!(
            "endpoint `{host}` needs host:port with a port in 1..=65535"
        ));
    }
    Ok(())
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
        Backend::ControlPlane { endpoint, tls } => {
            control_plane::run(endpoint, tls, ctx, stop).await
        }
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
        Backend::Consul {
            addr,
            token,
            datacenter: _,
            ca,
            cert,
            key,
            check,
            deregister_after,
        } => {
            let conf = consul::Config {
                addr,
                token,
                tls: etcd::TlsFiles { ca, cert, key },
                check,
                deregister_after,
            };
            consul::run(conf, ctx, stop).await;
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
    /// A Consul agent answered with an error status.
    #[error("consul {url}: HTTP {status}: {body}")]
    Consul {
        url: String,
        status: u16,
        body: String,
    },
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
                    tls: None,
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
            ("zk://x:1", "expected `control-plane`"),
            ("consul://x", "needs host:port"),
            ("consul://x:0", "port in 1..=65535"),
            ("consul://a:1,b:2", "one agent"),
            ("consul://a:1/v1", "one agent"),
            ("consul://tok@a:1", "CONSUL_HTTP_TOKEN"),
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

    fn consul(addr: &str, token: Option<&str>) -> Backend {
        Backend::Consul {
            addr: addr.into(),
            token: token.map(Into::into),
            datacenter: None,
            ca: None,
            cert: None,
            key: None,
            check: ConsulCheck::Ttl,
            deregister_after: None,
        }
    }

    #[test]
    fn parses_consul_with_the_token_given() {
        let cases = [
            ("consul://h:8500", None, consul("http://h:8500", None)),
            ("consul://", None, consul("http://127.0.0.1:8500", None)),
            ("consul:///", None, consul("http://127.0.0.1:8500", None)),
            ("consul://h:1/", None, consul("http://h:1", None)),
            (
                "consuls://[::1]:8501",
                None,
                consul("https://[::1]:8501", None),
            ),
            (
                "consul://h:8500",
                Some("s3cret"),
                consul("http://h:8500", Some("s3cret")),
            ),
            // An empty variable means no token, as for Consul's own CLI.
            ("consul://h:8500", Some(" "), consul("http://h:8500", None)),
        ];
        for (value, token, want) in cases {
            let got = Backend::parse_with_token(value, "", token.map(Into::into));
            assert_eq!(got, Ok(want), "{value}");
        }
    }

    #[test]
    fn debug_hides_the_consul_token() {
        let text = format!("{:?}", consul("http://h:1", Some("s3cret")));
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("redacted"), "{text}");
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
