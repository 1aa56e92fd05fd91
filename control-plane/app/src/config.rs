//! Command-line flags; every flag is also an environment variable `WEFT_<NAME>`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use weft_xds_server::XdsLimits;

/// Weft control plane: watches registries and serves Envoy-compatible xDS (SotW and Delta,
/// ADS and per-type) to Envoy and proxyless gRPC clients.
///
/// With no source flags it runs on its embedded registry alone: workloads register through the
/// registration API (weft.registry.v1) on the xDS port.
#[derive(Debug, Clone, Parser)]
// A flag given twice takes the last value, so a wrapper script (or the benchmarks) can override
// what an earlier argument set.
#[command(name = "weft-control-plane", version, args_override_self = true)]
pub struct Config {
    /// Address of the gRPC port: xDS (ADS, CDS, EDS, LDS, RDS) and the registration API.
    #[arg(long, env = "WEFT_XDS_LISTEN", default_value = "0.0.0.0:18000")]
    pub xds_listen: SocketAddr,

    /// Address of the admin HTTP port: /healthz, /readyz, /metrics, /debug/*.
    #[arg(long, env = "WEFT_ADMIN_LISTEN", default_value = "0.0.0.0:19000")]
    pub admin_listen: SocketAddr,

    /// Serve the gRPC port (xDS and registration) over mTLS only, with this certificate chain
    /// (PEM, leaf first; re-read when it changes). Needs --tls-key, --tls-client-ca and
    /// --trust-domain. See docs/security.md.
    #[arg(long, env = "WEFT_TLS_CERT", requires_all = ["tls_key", "tls_client_ca", "trust_domain"])]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "WEFT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// CA certificate(s) (PEM) that must sign every client certificate on the gRPC port.
    #[arg(long, env = "WEFT_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// SPIFFE trust domain of client certificates (e.g. `weft.example`); a client whose
    /// SPIFFE ID is in another is refused.
    #[arg(long, env = "WEFT_TRUST_DOMAIN", requires = "tls_cert", value_parser = parse_trust_domain)]
    pub trust_domain: Option<weft_identity::TrustDomain>,

    /// Longest a client may take to complete its TLS handshake on the gRPC port.
    #[arg(long, env = "WEFT_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub tls_handshake_timeout: Duration,

    /// Registry file (YAML or JSON) to load and watch; repeatable. In the environment,
    /// separate several paths with commas.
    #[arg(
        long = "registry-file",
        env = "WEFT_REGISTRY_FILE",
        value_delimiter = ','
    )]
    pub registry_files: Vec<PathBuf>,

    /// How often registry files are checked for changes.
    #[arg(long, env = "WEFT_FILE_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub file_poll_interval: Duration,

    /// etcd endpoints to use as a registry source (e.g. http://127.0.0.1:2379); repeatable or
    /// comma-separated. Without it, etcd is not used.
    #[arg(long, env = "WEFT_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,

    /// Key prefix of Weft's data in etcd (see docs/sources/etcd.md).
    #[arg(long, env = "WEFT_ETCD_PREFIX", default_value = "/weft")]
    pub etcd_prefix: String,

    /// CA certificate (PEM) to verify etcd's server certificate.
    #[arg(long, env = "WEFT_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,

    /// Client certificate (PEM) for etcd mTLS; needs --etcd-key.
    #[arg(long, env = "WEFT_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,

    /// Client key (PEM) for etcd mTLS; needs --etcd-cert.
    #[arg(long, env = "WEFT_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,

    /// etcd user (with --etcd-password).
    #[arg(long, env = "WEFT_ETCD_USER", requires = "etcd_password")]
    pub etcd_user: Option<String>,

    /// etcd password. Prefer the environment variable to the flag, which `ps` shows.
    #[arg(
        long,
        env = "WEFT_ETCD_PASSWORD",
        hide_env_values = true,
        requires = "etcd_user"
    )]
    pub etcd_password: Option<String>,

    /// Consul HTTP API address to use as a registry source (e.g. http://127.0.0.1:8500); see
    /// docs/sources/consul.md. Without it, Consul is not used.
    #[arg(long, env = "WEFT_CONSUL_ADDR")]
    pub consul_addr: Option<String>,

    /// Consul ACL token, sent as X-Consul-Token. Prefer the environment variable to the flag,
    /// which `ps` shows.
    #[arg(long, env = "WEFT_CONSUL_TOKEN", hide_env_values = true)]
    pub consul_token: Option<String>,

    /// Consul datacenter to read (`?dc=`); the agent's own when unset.
    #[arg(long, env = "WEFT_CONSUL_DATACENTER")]
    pub consul_datacenter: Option<String>,

    /// CA certificate (PEM) to verify Consul's server certificate (https:// addresses).
    #[arg(long, env = "WEFT_CONSUL_CA")]
    pub consul_ca: Option<PathBuf>,

    /// Client certificate (PEM) for Consul mTLS; needs --consul-key.
    #[arg(long, env = "WEFT_CONSUL_CERT", requires = "consul_key")]
    pub consul_cert: Option<PathBuf>,

    /// Client key (PEM) for Consul mTLS; needs --consul-cert.
    #[arg(long, env = "WEFT_CONSUL_KEY", requires = "consul_cert")]
    pub consul_key: Option<PathBuf>,

    /// Only use Consul services carrying this tag (and only their instances with it);
    /// repeatable or comma-separated.
    #[arg(
        long = "consul-service-tag",
        env = "WEFT_CONSUL_SERVICE_TAG",
        value_delimiter = ','
    )]
    pub consul_service_tags: Vec<String>,

    /// Only use these Consul services (all instances); repeatable or comma-separated. With
    /// neither this nor --consul-service-tag, every service but `consul` is used.
    #[arg(
        long = "consul-service-name",
        env = "WEFT_CONSUL_SERVICE_NAME",
        value_delimiter = ','
    )]
    pub consul_service_names: Vec<String>,

    /// How an instance with a check in `warning` (and none critical) is served.
    #[arg(long, env = "WEFT_CONSUL_WARNING_AS", default_value = "healthy", value_parser = ["healthy", "unhealthy"])]
    pub consul_warning_as: String,

    /// KV prefix of Weft's routes, policies and service configs in Consul.
    #[arg(long, env = "WEFT_CONSUL_KV_PREFIX", default_value = "weft")]
    pub consul_kv_prefix: String,

    /// `wait` of Consul blocking queries (at most 10m).
    #[arg(long, env = "WEFT_CONSUL_WAIT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub consul_wait: Duration,

    /// Use Kubernetes as a registry source: Services, EndpointSlices and Weft's CRDs (see
    /// docs/sources/kubernetes.md). The API server is found in-cluster, else from KUBECONFIG
    /// or ~/.kube/config.
    #[arg(long, env = "WEFT_KUBERNETES")]
    pub kubernetes: bool,

    /// Namespaces in the mesh, comma-separated; all when empty.
    #[arg(long, env = "WEFT_KUBE_NAMESPACES", value_delimiter = ',')]
    pub kube_namespaces: Vec<String>,

    /// Label selector a Service must match to be in the mesh (e.g. `mesh.weft.dev/enabled=true`).
    #[arg(long, env = "WEFT_KUBE_SERVICE_SELECTOR")]
    pub kube_service_selector: Option<String>,

    /// Service port (by name) whose endpoints are served, for Services that have it and no
    /// `mesh.weft.dev/port` annotation; otherwise a Service's first port.
    #[arg(long, env = "WEFT_KUBE_PORT_NAME")]
    pub kube_port_name: Option<String>,

    /// Namespace of the status writers' leader-election Lease; default POD_NAMESPACE, else
    /// `weft-system`.
    #[arg(long, env = "WEFT_KUBE_LEASE_NAMESPACE")]
    pub kube_lease_namespace: Option<String>,

    /// Watch Weft's CRDs (TrafficRoute, TrafficPolicy, ExternalService) and write their status.
    /// `--kube-crds=false` when they are not installed.
    #[arg(long, env = "WEFT_KUBE_CRDS", default_value_t = true, action = clap::ArgAction::Set)]
    pub kube_crds: bool,

    /// Serve the sidecar-injection webhook (HTTPS, `POST /mutate`) on this address; needs
    /// --webhook-cert and --webhook-key. See docs/injection.md.
    #[arg(long, env = "WEFT_WEBHOOK_LISTEN", requires_all = ["webhook_cert", "webhook_key"])]
    pub webhook_listen: Option<std::net::SocketAddr>,

    /// The webhook's certificate (PEM); re-read when it changes, so renewals need no restart.
    #[arg(long, env = "WEFT_WEBHOOK_CERT", requires = "webhook_listen")]
    pub webhook_cert: Option<PathBuf>,

    /// The webhook's private key (PEM).
    #[arg(long, env = "WEFT_WEBHOOK_KEY", requires = "webhook_listen")]
    pub webhook_key: Option<PathBuf>,

    /// Image of the `weft-sidecar` container the webhook injects.
    #[arg(
        long,
        env = "WEFT_INJECTOR_IMAGE",
        default_value = "weft-sidecar:latest"
    )]
    pub injector_image: String,

    /// xDS address injected sidecars use, e.g. `http://weft.weft-system.svc:18000` (the chart
    /// sets it to its own Service).
    #[arg(long, env = "WEFT_INJECTOR_CONTROL_PLANE")]
    pub injector_control_plane: Option<String>,

    /// Port of the HTTP listener served to Envoy (the `weft_http` listener).
    #[arg(long, env = "WEFT_ENVOY_HTTP_PORT", default_value_t = 15001)]
    pub envoy_http_port: u16,

    /// Address Envoy binds its `weft_http` listener to.
    #[arg(long, env = "WEFT_ENVOY_HTTP_ADDRESS", default_value = "0.0.0.0")]
    pub envoy_http_address: String,

    /// Quiet period that ends a burst of registry changes before config is pushed.
    #[arg(long, env = "WEFT_DEBOUNCE", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub debounce: Duration,

    /// Longest a change may wait for a burst to end: under constant churn, config is still
    /// pushed at least this often.
    #[arg(long, env = "WEFT_DEBOUNCE_MAX", default_value = "1s", value_parser = humantime::parse_duration)]
    pub debounce_max: Duration,

    /// Lease of an instance registered without a TTL.
    #[arg(long, env = "WEFT_REGISTRATION_DEFAULT_TTL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub registration_default_ttl: Duration,

    /// On SIGTERM/SIGINT: how long streams get to close before the process exits anyway.
    #[arg(long, env = "WEFT_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Log format on stderr.
    #[arg(long, env = "WEFT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// OTLP/gRPC collector to export spans to, e.g. http://127.0.0.1:4317: one per registry
    /// change pushed and one per xDS response it causes (see docs/xds.md, "Tracing"). Without
    /// it (or empty) no span is made or exported.
    #[arg(long, env = "WEFT_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// `service.name` of the exported spans' resource.
    #[arg(
        long,
        env = "WEFT_OTLP_SERVICE_NAME",
        default_value = "weft-control-plane"
    )]
    pub otlp_service_name: String,

    /// Fraction of config changes (and of clients' initial fetches) traced, from 0 to 1. The
    /// pushes of a change are traced exactly when the change is.
    #[arg(long, env = "WEFT_OTLP_SAMPLE_RATIO", default_value_t = 1.0, value_parser = parse_ratio)]
    pub otlp_sample_ratio: f64,

    // xDS limits and back-pressure: docs/xds.md "Limits and backpressure" (defaults and why
    // are on `weft_xds_server::XdsLimits`).
    /// Largest xDS request message, in bytes; a larger one ends its stream with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "WEFT_XDS_MAX_REQUEST_BYTES", default_value_t = XdsLimits::default().max_request_bytes)]
    pub xds_max_request_bytes: usize,

    /// HTTP/2 concurrent streams per client connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, env = "WEFT_XDS_MAX_STREAMS_PER_CONNECTION", default_value_t = XdsLimits::default().max_streams_per_connection)]
    pub xds_max_streams_per_connection: u32,

    /// Open xDS streams in total; beyond it, new streams are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "WEFT_XDS_MAX_STREAMS", default_value_t = XdsLimits::default().max_streams)]
    pub xds_max_streams: usize,

    /// Requests per second a stream may send once its burst is spent (0: no limit); over it,
    /// its requests are read late, not refused.
    #[arg(long, env = "WEFT_XDS_REQUESTS_PER_SECOND", default_value_t = XdsLimits::default().requests_per_second)]
    pub xds_requests_per_second: u32,

    /// Requests a stream may send at once before --xds-requests-per-second applies.
    #[arg(long, env = "WEFT_XDS_REQUEST_BURST", default_value_t = XdsLimits::default().request_burst)]
    pub xds_request_burst: u32,

    /// Largest encoded `node` of a stream's first request, in bytes; a larger one is refused
    /// with INVALID_ARGUMENT.
    #[arg(long, env = "WEFT_XDS_MAX_NODE_BYTES", default_value_t = XdsLimits::default().max_node_bytes)]
    pub xds_max_node_bytes: usize,

    /// Resource names one stream may subscribe to, across all types; a request over it ends
    /// the stream with RESOURCE_EXHAUSTED.
    #[arg(long, env = "WEFT_XDS_MAX_SUBSCRIPTIONS", default_value_t = XdsLimits::default().max_subscriptions)]
    pub xds_max_subscriptions: usize,

    /// HTTP/2 keepalive ping interval on xDS connections; `off` (or 0) disables.
    #[arg(long, env = "WEFT_XDS_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = duration_or_off)]
    pub xds_keepalive_interval: Duration,

    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "WEFT_XDS_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub xds_keepalive_timeout: Duration,

    /// Age after which an xDS connection is sent GOAWAY so its client reconnects (maybe to
    /// another replica); `off` (or 0) disables.
    #[arg(long, env = "WEFT_XDS_MAX_CONNECTION_AGE", default_value = "30m", value_parser = duration_or_off)]
    pub xds_max_connection_age: Duration,

    /// After --xds-max-connection-age, how long its streams get before the connection is
    /// closed.
    #[arg(long, env = "WEFT_XDS_MAX_CONNECTION_AGE_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub xds_max_connection_age_grace: Duration,
}

/// A duration, or `off`; `off` and 0 are both `Duration::ZERO`, which means disabled.
fn duration_or_off(s: &str) -> Result<Duration, humantime::DurationError> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("`{s}` is not a number from 0 to 1")),
    }
}

impl Config {
    /// Span export options, when `--otlp-endpoint` is given (and not empty).
    pub fn otlp(&self) -> Option<crate::telemetry::OtlpOptions> {
        let endpoint = self.otlp_endpoint.as_deref().map(str::trim)?;
        (!endpoint.is_empty()).then(|| crate::telemetry::OtlpOptions {
            endpoint: endpoint.to_string(),
            service_name: self.otlp_service_name.clone(),
            sample_ratio: self.otlp_sample_ratio,
        })
    }

    /// The xDS server's limits from the `--xds-*` flags.
    pub fn xds_limits(&self) -> XdsLimits {
        let off_if_zero = |d: Duration| (!d.is_zero()).then_some(d);
        XdsLimits {
            max_request_bytes: self.xds_max_request_bytes,
            max_streams_per_connection: self.xds_max_streams_per_connection,
            max_streams: self.xds_max_streams,
            requests_per_second: self.xds_requests_per_second,
            request_burst: self.xds_request_burst,
            max_node_bytes: self.xds_max_node_bytes,
            max_subscriptions: self.xds_max_subscriptions,
            keepalive_interval: off_if_zero(self.xds_keepalive_interval),
            keepalive_timeout: self.xds_keepalive_timeout,
            max_connection_age: off_if_zero(self.xds_max_connection_age),
            max_connection_age_grace: self.xds_max_connection_age_grace,
        }
    }
}

fn parse_trust_domain(s: &str) -> Result<weft_identity::TrustDomain, String> {
    weft_identity::TrustDomain::new(s).map_err(|e| e.to_string())
}
