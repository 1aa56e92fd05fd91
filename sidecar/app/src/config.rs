//! Command-line flags; every flag is also an environment variable `WEFT_<NAME>`.
//!
//! Parsing is split in two: clap checks each flag on its own ([`Config`]), then
//! [`Config::settings`] checks what needs several flags together (the `--register` backend
//! needs `--control-plane`, the etcd TLS files need `etcds://`). Both kinds of mistake exit 64
//! naming the flag, before anything is bound or spawned.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use weft_health_check::{Probe, Schedule};
use weft_sidecar_register::Backend;

/// Weft sidecar: runs beside one app instance. It registers the app in the mesh while the app
/// passes its health check, proxies the app's inbound traffic, balances the app's outbound
/// calls over endpoints learnt from the control plane over xDS, and carries W3C trace context.
///
/// The app calls other services through the outbound listener with `Host: <service>`; other
/// sidecars reach this app through the inbound listener. See docs/sidecar.md.
#[derive(Debug, Clone, Parser)]
#[command(name = "weft-sidecar", version)]
pub struct Config {
    /// Name of the app's service in the mesh (the name other services call it by).
    #[arg(long, env = "WEFT_SERVICE")]
    pub service: String,

    /// Port the app listens on; the inbound proxy forwards to it.
    #[arg(long, env = "WEFT_APP_PORT")]
    pub app_port: u16,

    /// Address the app listens on (normally loopback).
    #[arg(long, env = "WEFT_APP_ADDRESS", default_value = "127.0.0.1")]
    pub app_address: IpAddr,

    /// What the app speaks: `http` (HTTP/1.1 or h2c, kept per request) or `grpc` (the app is
    /// h2c only and is registered with protocol grpc).
    #[arg(long, env = "WEFT_APP_PROTOCOL", value_enum, default_value_t = AppProtocol::Http)]
    pub app_protocol: AppProtocol,

    /// How to check the app's health: `http:/path` (GET, 2xx/3xx pass), `tcp` (connect),
    /// `grpc` or `grpc:SERVICE` (grpc.health.v1 answers SERVING), or `none` (always healthy).
    /// The app is registered once it passes and marked unhealthy when it fails.
    #[arg(long, env = "WEFT_APP_HEALTH", default_value = "tcp", value_parser = parse_probe)]
    pub app_health: Probe,

    /// Time between two app health probes.
    #[arg(long, env = "WEFT_HEALTH_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub health_interval: Duration,

    /// Longest one app health probe may take before it counts as failed.
    #[arg(long, env = "WEFT_HEALTH_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub health_timeout: Duration,

    /// Consecutive passing probes before the app counts as healthy.
    #[arg(long, env = "WEFT_HEALTH_RISE", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_rise: u32,

    /// Consecutive failing probes before the app counts as unhealthy.
    #[arg(long, env = "WEFT_HEALTH_FALL", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_fall: u32,

    /// Address of the inbound listener: other sidecars send this app's traffic here. Its port
    /// is the port registered for the instance.
    #[arg(long, env = "WEFT_INBOUND_LISTEN", default_value = "0.0.0.0:15006")]
    pub inbound_listen: SocketAddr,

    /// Address of the outbound listener: the app sends its calls to other services here, naming
    /// the service in the Host header (`:authority` for gRPC).
    #[arg(long, env = "WEFT_OUTBOUND_LISTEN", default_value = "127.0.0.1:15001")]
    pub outbound_listen: SocketAddr,

    /// Address of the admin HTTP port: /healthz, /readyz, /metrics, /debug/*.
    #[arg(long, env = "WEFT_ADMIN_LISTEN", default_value = "127.0.0.1:15000")]
    pub admin_listen: SocketAddr,

    /// The control plane's xDS port, `http://host:port` (also its registration API), or
    /// `https://host:port` for mTLS (needs --tls-ca, --tls-cert and --tls-key).
    #[arg(long, env = "WEFT_CONTROL_PLANE", value_parser = parse_control_plane)]
    pub control_plane: String,

    /// CA certificate (PEM) that signs the control plane's certificate (`https://` only).
    #[arg(long, env = "WEFT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// This sidecar's client certificate (PEM), carrying its SPIFFE ID as its one URI SAN
    /// (`https://` only); needs --tls-key. See docs/security.md.
    #[arg(long, env = "WEFT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "WEFT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Name the control plane's certificate must carry [default: the --control-plane host].
    #[arg(long, env = "WEFT_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,

    /// xDS protocol variant: `delta` (incremental) or `sotw` (state of the world).
    #[arg(long, env = "WEFT_XDS_VARIANT", value_enum, default_value_t = XdsVariant::Delta)]
    pub xds_variant: XdsVariant,

    /// Where to register the app: `control-plane` (its registration API), `etcd://host:port
    /// [,host:port][/prefix]`, `etcds://...` (TLS; see --etcd-ca/--etcd-cert/--etcd-key),
    /// `consul://host:port` (the local Consul agent's API, with a TTL check the sidecar keeps
    /// current; ACL token from CONSUL_HTTP_TOKEN), `consuls://...` (TLS; see --consul-ca...), or
    /// `none` (do not register).
    #[arg(long, env = "WEFT_REGISTER", default_value = "control-plane")]
    pub register: String,

    /// CA certificate (PEM) that signs etcd's server certificate (`etcds://` only).
    #[arg(long, env = "WEFT_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,

    /// Client certificate (PEM) for etcd mTLS (`etcds://` only); needs --etcd-key.
    #[arg(long, env = "WEFT_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,

    /// Client key (PEM) for etcd mTLS (`etcds://` only); needs --etcd-cert.
    #[arg(long, env = "WEFT_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,

    /// CA certificate (PEM) that signs the Consul agent's certificate (`consuls://` only).
    #[arg(long, env = "WEFT_CONSUL_CA")]
    pub consul_ca: Option<PathBuf>,

    /// Client certificate (PEM) for the Consul agent (`consuls://` only); needs --consul-key.
    #[arg(long, env = "WEFT_CONSUL_CERT", requires = "consul_key")]
    pub consul_cert: Option<PathBuf>,

    /// Client key (PEM) for the Consul agent (`consuls://` only); needs --consul-cert.
    #[arg(long, env = "WEFT_CONSUL_KEY", requires = "consul_cert")]
    pub consul_key: Option<PathBuf>,

    /// Lifetime of the registration without keepalives: if the sidecar dies, the instance
    /// leaves the registry after this long.
    #[arg(long, env = "WEFT_REGISTRATION_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub registration_ttl: Duration,

    /// Stable id of this instance within its service [default: <hostname>-<inbound port>].
    #[arg(long, env = "WEFT_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// IP address registered for this instance [default: the --inbound-listen IP when it is
    /// not 0.0.0.0/::, else the local address this host uses to reach the control plane].
    #[arg(long, env = "WEFT_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<IpAddr>,

    /// Zone of this instance: registered with it, and preferred for outbound calls.
    #[arg(long, env = "WEFT_ZONE")]
    pub zone: Option<String>,

    /// Relative weight of this instance when others balance over it.
    #[arg(long, env = "WEFT_WEIGHT", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub weight: u32,

    /// Metadata registered with the instance, `KEY=VALUE`; repeatable. In the environment,
    /// separate several pairs with commas.
    #[arg(long = "metadata", env = "WEFT_METADATA", value_delimiter = ',', value_parser = parse_metadata)]
    pub metadata: Vec<(String, String)>,

    /// OTLP/gRPC collector to export spans to, e.g. http://127.0.0.1:4317. Without it, spans
    /// are not exported (trace context is still propagated).
    #[arg(long, env = "WEFT_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// On SIGTERM/SIGINT: time between marking the instance draining and closing the inbound
    /// listener, so callers learn of the drain through EDS before connections are refused.
    #[arg(long, env = "WEFT_DRAIN_DELAY", default_value = "3s", value_parser = humantime::parse_duration)]
    pub drain_delay: Duration,

    /// On SIGTERM/SIGINT: how long the whole shutdown (drain delay included) may take before
    /// the process exits anyway, with status 1.
    #[arg(long, env = "WEFT_SHUTDOWN_GRACE", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Log format on stderr (access log lines use the target `weft::access`).
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// One log line per request (target `weft::access`). Off by default, as in Envoy, Istio
    /// and Linkerd: at 1,000 requests per second the synchronous line was about a tenth of
    /// the sidecar's CPU.
    #[arg(long, env = "WEFT_ACCESS_LOG")]
    pub access_log: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AppProtocol {
    Http,
    Grpc,
}

impl AppProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            AppProtocol::Http => "http",
            AppProtocol::Grpc => "grpc",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum XdsVariant {
    Delta,
    Sotw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

/// What the flags mean once checked together.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `None` for `--register none`.
    pub backend: Option<Backend>,
    /// The control plane's host and port, for finding the advertise address.
    pub control_plane_host: String,
    pub control_plane_port: u16,
    /// mTLS to the control plane (`https://` control plane).
    pub control_plane_tls: Option<weft_identity::ClientTlsFiles>,
    pub schedule: Schedule,
    pub metadata: BTreeMap<String, String>,
}

impl Config {
    /// Cross-flag checks; the error names the flag.
    pub fn settings(&self) -> Result<Settings, String> {
        if self.service.is_empty() {
            return Err("--service must not be empty".into());
        }
        if self.instance_id.as_deref() == Some("") {
            return Err("--instance-id must not be empty".into());
        }
        if self.registration_ttl < Duration::from_secs(1) {
            return Err(format!(
                "--registration-ttl {}: must be at least 1s (TTLs are whole seconds)",
                humantime::format_duration(self.registration_ttl)
            ));
        }
        if self.health_interval.is_zero() {
            return Err("--health-interval must be above zero".into());
        }
        if self.health_timeout.is_zero() {
            return Err("--health-timeout must be above zero".into());
        }
        let control_plane_tls = self.control_plane_tls()?;
        let tls_files = self.etcd_ca.is_some() || self.etcd_cert.is_some();
        let consul_tls_files = self.consul_ca.is_some() || self.consul_cert.is_some();
        let backend = match self.register.as_str() {
            "none" => None,
            value => {
                let mut backend =
                    Backend::parse(value, &self.control_plane).map_err(|e| e.to_string())?;
                match &mut backend {
                    // Guarded so that etcd/Consul TLS files given with this backend still
                    // fall through to the errors below.
                    Backend::ControlPlane { tls, .. } if !tls_files && !consul_tls_files => {
                        tls.clone_from(&control_plane_tls)
                    }
                    Backend::Etcd { ca, cert, key, .. } if value.starts_with("etcds://") => {
                        ca.clone_from(&self.etcd_ca);
                        cert.clone_from(&self.etcd_cert);
                        key.clone_from(&self.etcd_key);
                    }
                    Backend::Consul { ca, cert, key, .. } if value.starts_with("consuls://") => {
                        ca.clone_from(&self.consul_ca);
                        cert.clone_from(&self.consul_cert);
                        key.clone_from(&self.consul_key);
                    }
                    _ if consul_tls_files => {
                        return Err(format!(
                            "--consul-ca/--consul-cert/--consul-key need --register consuls://..., not `{value}`"
                        ));
                    }
                    _ if tls_files && !value.starts_with("etcds://") => {
                        return Err(format!(
                            "--etcd-ca/--etcd-cert/--etcd-key need --register etcds://..., not `{value}`"
                        ));
                    }
                    _ => {}
                }
                Some(backend)
            }
        };
        if backend.is_none() && tls_files {
            return Err("--etcd-ca/--etcd-cert/--etcd-key need --register etcds://...".into());
        }
        if backend.is_none() && consul_tls_files {
            return Err(
                "--consul-ca/--consul-cert/--consul-key need --register consuls://...".into(),
            );
        }
        let (control_plane_host, control_plane_port) = split_control_plane(&self.control_plane)?;
        let mut metadata = BTreeMap::new();
        for (k, v) in &self.metadata {
            if metadata.insert(k.clone(), v.clone()).is_some() {
                return Err(format!("--metadata: key `{k}` given twice"));
            }
        }
        Ok(Settings {
            backend,
            control_plane_host,
            control_plane_port,
            control_plane_tls,
            schedule: Schedule {
                interval: self.health_interval,
                timeout: self.health_timeout,
                rise: self.health_rise,
                fall: self.health_fall,
            },
            metadata,
        })
    }
}

impl Config {
    /// `https://` needs all three TLS files, `http://` none; the files must load now.
    fn control_plane_tls(&self) -> Result<Option<weft_identity::ClientTlsFiles>, String> {
        let https = self.control_plane.starts_with("https://");
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) if https => {
                let files = weft_identity::ClientTlsFiles {
                    ca: ca.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                    server_name: self.tls_server_name.clone(),
                };
                files.load_pems().map_err(|e| format!("--tls-*: {e}"))?;
                Ok(Some(files))
            }
            (None, None, None) if !https => {
                if self.tls_server_name.is_some() {
                    return Err("--tls-server-name needs --control-plane https://...".into());
                }
                Ok(None)
            }
            _ if https => Err(format!(
                "--control-plane `{}` is https: it needs --tls-ca, --tls-cert and --tls-key \
                 (the control plane requires a client certificate)",
                self.control_plane
            )),
            _ => Err(format!(
                "--tls-ca/--tls-cert/--tls-key need --control-plane https://..., not `{}`",
                self.control_plane
            )),
        }
    }
}

fn parse_probe(s: &str) -> Result<Probe, String> {
    s.parse::<Probe>().map_err(|e| {
        format!(
            "{} (expected `http:/path`, `tcp`, `grpc`, `grpc:SERVICE` or `none`)",
            e.reason
        )
    })
}

fn parse_metadata(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err("expected KEY=VALUE".into()),
    }
}

fn parse_control_plane(s: &str) -> Result<String, String> {
    split_control_plane(s).map(|_| s.trim_end_matches('/').to_string())
}

/// `http://host:port` or `https://host:port` -> (host, port).
fn split_control_plane(s: &str) -> Result<(String, u16), String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(|| format!("--control-plane `{s}`: expected http://host:port"))?;
    let authority = rest.trim_end_matches('/');
    if authority.contains('/') {
        return Err(format!(
            "--control-plane `{s}`: expected http://host:port, without a path"
        ));
    }
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| format!("--control-plane `{s}`: missing the port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("--control-plane `{s}`: bad port `{port}`"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err(format!("--control-plane `{s}`: expected http://host:port"));
    }
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn control_plane_addresses() {
        assert_eq!(
            split_control_plane("http://cp.mesh:18000").unwrap(),
            ("cp.mesh".to_string(), 18000)
        );
        assert_eq!(
            split_control_plane("http://[::1]:18000/").unwrap(),
            ("::1".to_string(), 18000)
        );
        assert_eq!(
            split_control_plane("https://cp.mesh:18000").unwrap(),
            ("cp.mesh".to_string(), 18000)
        );
        assert!(split_control_plane("cp:18000").is_err());
        assert!(split_control_plane("http://cp").is_err());
        assert!(split_control_plane("http://cp:x").is_err());
        assert!(split_control_plane("http://cp:1/x").is_err());
    }

    #[test]
    fn tls_flags_must_match_the_control_plane_scheme() {
        let cfg = |extra: &[&str]| {
            let mut args = vec!["weft-sidecar", "--service", "web", "--app-port", "8080"];
            args.extend_from_slice(extra);
            Config::try_parse_from(args).unwrap()
        };
        let err = cfg(&["--control-plane", "https://cp:18000"])
            .settings()
            .unwrap_err();
        assert!(
            err.contains("needs --tls-ca, --tls-cert and --tls-key"),
            "{err}"
        );
        let err = cfg(&["--control-plane", "http://cp:18000", "--tls-ca", "/ca.crt"])
            .settings()
            .unwrap_err();
        assert!(err.contains("need --control-plane https://"), "{err}");
        let err = cfg(&[
            "--control-plane",
            "https://cp:18000",
            "--tls-ca",
            "/nonexistent/ca.crt",
            "--tls-cert",
            "/nonexistent/c.crt",
            "--tls-key",
            "/nonexistent/c.key",
        ])
        .settings()
        .unwrap_err();
        assert!(err.contains("/nonexistent/ca.crt"), "{err}");
        assert!(
            cfg(&["--control-plane", "http://cp:18000"])
                .settings()
                .is_ok()
        );
    }

    #[test]
    fn metadata_pairs() {
        assert_eq!(
            parse_metadata("team=pay=ments").unwrap(),
            ("team".into(), "pay=ments".into())
        );
        assert_eq!(parse_metadata("k=").unwrap(), ("k".into(), String::new()));
        assert!(parse_metadata("=v").is_err());
        assert!(parse_metadata("kv").is_err());
    }
}
