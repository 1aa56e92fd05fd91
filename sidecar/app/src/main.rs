//! `weft-sidecar`: parses flags, wires the sidecar's library crates together (xDS client ->
//! config -> proxy; app health check -> registration), serves admin, waits for a signal and
//! drains under a grace timeout. No logic lives here that a library crate could own.
//!
//! Shutdown order, and why (docs/sidecar.md, "Shutdown"): mark the instance draining first so
//! callers stop choosing it, wait `--drain-delay` for that to reach them over EDS, then stop
//! accepting inbound connections and let in-flight requests finish, then deregister, and stop
//! the outbound proxy last because the app may still be calling out while it finishes.

mod config;
mod otlp;
mod xds;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType;
use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use weft_health_check::{Checker, Probe, Verdict};
use weft_proxy::{InboundOptions, Mesh, NoSpans, ProxyOptions, SpanSink};
use weft_sidecar_config::ROUTE_CONFIG_NAME;
use weft_sidecar_register::{Backend, Health, Instance, Registration};
use weft_xds_client::{Variant, XdsClient};

use crate::config::{AppProtocol, Config, LogFormat, Settings, XdsVariant};

/// BSD EX_USAGE / EX_CONFIG family: the configuration given to us is wrong.
const EXIT_BAD_CONFIG: u8 = 64;

/// xDS reconnect backoff: quick enough that a restarted control plane is found again within a
/// second, capped so a long outage does not turn into a reconnect storm across the mesh.
const XDS_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const XDS_BACKOFF_MAX: Duration = Duration::from_secs(30);
const XDS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let cfg = match Config::try_parse() {
        Ok(cfg) => cfg,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not mistakes; everything else clap rejects is a flag
            // with a bad value, and clap's message names it.
            return if e.use_stderr() {
                ExitCode::from(EXIT_BAD_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let settings = match cfg.settings() {
        Ok(s) => s,
        Err(msg) => {
            eprintln!("weft-sidecar: invalid configuration: {msg}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    init_tracing(cfg.log_format, cfg.access_log);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-sidecar: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(cfg, settings));
    // Whatever is still running (connections the grace period gave up on) is abandoned, not
    // waited for: the grace period was the wait.
    rt.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::BadConfig(msg)) => {
            eprintln!("weft-sidecar: invalid configuration: {msg}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
        Err(Failure::Other(e)) => {
            eprintln!("weft-sidecar: {e:#}");
            ExitCode::FAILURE
        }
        Err(Failure::Unclean) => ExitCode::FAILURE,
    }
}

enum Failure {
    BadConfig(String),
    Other(anyhow::Error),
    /// Shutdown did not finish within the grace period (already logged).
    Unclean,
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

fn init_tracing(format: LogFormat, access_log: bool) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if !access_log {
        // A disabled callsite costs one cached check per request, not a formatted line.
        if let Ok(off) = "weft::access=off".parse() {
            filter = filter.add_directive(off);
        }
    }
    // Colour codes only help a person at a terminal; in a log file they are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} listener {addr}"))
}

/// What is running once startup is done, in the order shutdown stops it.
struct Running {
    stop_health: CancellationToken,
    health_task: JoinHandle<()>,
    registration: Option<Arc<Registration>>,
    draining: Arc<AtomicBool>,
    inbound_drain: CancellationToken,
    inbound: JoinHandle<()>,
    outbound_stop: CancellationToken,
    outbound: JoinHandle<()>,
    flush: CancellationToken,
    exporter: Option<JoinHandle<()>>,
    admin_stop: CancellationToken,
    /// Kept until the end: dropping either stops it.
    _xds: XdsClient,
    _checker: Checker,
}

async fn run(cfg: Config, settings: Settings) -> Result<(), Failure> {
    // Bind before anything registers: a port in use is the likeliest startup failure, and the
    // instance must never be advertised on an inbound port we do not hold.
    let admin_listener = bind(cfg.admin_listen, "admin").await?;
    let outbound_listener = bind(cfg.outbound_listen, "outbound").await?;
    let inbound_listener = bind(cfg.inbound_listen, "inbound").await?;
    let inbound_addr = inbound_listener
        .local_addr()
        .context("reading the inbound listener's address")?;

    let instance_id = match &cfg.instance_id {
        Some(id) => id.clone(),
        None => format!(
            "{}-{}",
            hostname().map_err(Failure::BadConfig)?,
            inbound_addr.port()
        ),
    };
    let advertise = match cfg.advertise_address {
        Some(ip) => ip,
        None => advertise_address(inbound_addr.ip(), &settings).await?,
    };

    let mut registry = Registry::default();
    let span_metrics = otlp::SpanMetrics::default();
    span_metrics.register(&mut registry);
    let flush = CancellationToken::new();
    let (spans, exporter): (Arc<dyn SpanSink>, _) = match &cfg.otlp_endpoint {
        Some(endpoint) => {
            let (sink, exporter) = otlp::start(endpoint, &cfg.service, &instance_id, span_metrics)
                .map_err(|e| Failure::BadConfig(format!("--otlp-endpoint `{endpoint}`: {e}")))?;
            (
                Arc::new(sink),
                Some(tokio::spawn(exporter.run(flush.clone()))),
            )
        }
        None => (Arc::new(NoSpans), None),
    };
    let mesh = Mesh::new(
        ProxyOptions {
            service: cfg.service.clone(),
            zone: cfg.zone.clone(),
            ..Default::default()
        },
        spans,
        &mut registry,
    );

    let xds_connected = Gauge::<i64>::default();
    let registered = Gauge::<i64>::default();
    let app_healthy = Gauge::<i64>::default();
    registry.register(
        "weft_sidecar_xds_connected",
        "1 while the xDS stream to the control plane is up",
        xds_connected.clone(),
    );
    registry.register(
        "weft_sidecar_registered",
        "1 while this instance is registered",
        registered.clone(),
    );
    registry.register(
        "weft_sidecar_app_healthy",
        "1 while the app passes its health check",
        app_healthy.clone(),
    );

    // xDS -> config -> proxy.
    let xds_client = XdsClient::spawn(weft_xds_client::Options {
        endpoint: cfg.control_plane.clone(),
        node: node(&cfg, &instance_id),
        variant: match cfg.xds_variant {
            XdsVariant::Delta => Variant::Delta,
            XdsVariant::Sotw => Variant::Sotw,
        },
        route_names: vec![ROUTE_CONFIG_NAME.to_string()],
        validator: xds::validator(),
        backoff_initial: XDS_BACKOFF_INITIAL,
        backoff_max: XDS_BACKOFF_MAX,
        connect_timeout: XDS_CONNECT_TIMEOUT,
        tls: settings.control_plane_tls.clone(),
    });
    let xds_state = xds_client.state();
    tokio::spawn(xds::sync_mesh(
        xds_client.state(),
        Arc::clone(&mesh),
        cfg.zone.clone(),
        xds_connected,
    ));

    // App health -> registration.
    let app_addr = SocketAddr::new(cfg.app_address, cfg.app_port);
    let checker = Checker::spawn(cfg.app_health.clone(), app_addr, settings.schedule.clone());
    let instance = Instance {
        service: cfg.service.clone(),
        instance_id: instance_id.clone(),
        address: advertise,
        // Callers reach the app through its inbound proxy, never directly.
        port: inbound_addr.port(),
        weight: cfg.weight,
        zone: cfg.zone.clone(),
        protocol: cfg.app_protocol.as_str().to_string(),
        metadata: settings.metadata.clone(),
        ttl: cfg.registration_ttl,
    };
    let registration = settings
        .backend
        .clone()
        .map(|backend| Arc::new(Registration::spawn(backend, instance.clone())));
    let registration_status = registration.as_ref().map(|r| r.status());
    if let Some(rx) = registration_status.clone() {
        tokio::spawn(track_registered(rx, registered));
    }
    let stop_health = CancellationToken::new();
    let health_task = tokio::spawn(forward_health(
        checker.watch(),
        registration.clone(),
        app_healthy,
        stop_health.clone(),
    ));

    let draining = Arc::new(AtomicBool::new(false));
    let admin = {
        let ready_draining = Arc::clone(&draining);
        let ready_xds = xds_state.clone();
        let ready_health = checker.watch();
        let no_probe = cfg.app_health == Probe::None;
        let ready = move || {
            !ready_draining.load(Ordering::SeqCst)
                && ready_xds.borrow().synced
                && (no_probe || ready_health.borrow().verdict == Verdict::Healthy)
        };
        let mesh_endpoints = Arc::clone(&mesh);
        let mesh_config = Arc::clone(&mesh);
        let config_xds = xds_state.clone();
        let backend = settings.backend.clone();
        let health_rx = checker.watch();
        let probe = cfg.app_health.clone();
        let schedule = settings.schedule.clone();
        weft_admin::Admin::new(ready, registry)
            .not_ready_message(
                "waiting for the first xDS sync and the app's first passing health check \
                 (see /debug/config and /debug/health)",
            )
            .debug("endpoints", move || mesh_endpoints.debug_endpoints())
            .debug("config", move || {
                serde_json::json!({
                    "mesh": mesh_config.debug_config(),
                    "xds": xds::debug_state(&config_xds.borrow()),
                })
            })
            .debug("registration", move || {
                serde_json::json!({
                    "backend": backend.as_ref().map(describe_backend),
                    "instance": describe_instance(&instance),
                    "status": registration_status.as_ref().map(|rx| rx.borrow().clone()),
                })
            })
            .debug("health", move || {
                serde_json::json!({
                    "probe": probe,
                    "address": app_addr.to_string(),
                    "interval": humantime::format_duration(schedule.interval).to_string(),
                    "timeout": humantime::format_duration(schedule.timeout).to_string(),
                    "rise": schedule.rise,
                    "fall": schedule.fall,
                    "status": *health_rx.borrow(),
                })
            })
    };
    let admin_stop = CancellationToken::new();
    tokio::spawn(weft_admin::serve(
        admin_listener,
        admin,
        admin_stop.clone().cancelled_owned(),
    ));

    let outbound_stop = CancellationToken::new();
    let outbound = tokio::spawn(weft_proxy::serve_outbound(
        outbound_listener,
        Arc::clone(&mesh),
        outbound_stop.clone(),
    ));
    let inbound_drain = CancellationToken::new();
    let inbound = tokio::spawn(weft_proxy::serve_inbound(
        inbound_listener,
        InboundOptions {
            app: app_addr,
            app_http2: cfg.app_protocol == AppProtocol::Grpc,
        },
        Arc::clone(&mesh),
        inbound_drain.clone(),
    ));
    tracing::info!(
        service = %cfg.service,
        instance_id = %instance_id,
        advertise = %SocketAddr::new(advertise, inbound_addr.port()),
        app = %app_addr,
        inbound = %inbound_addr,
        outbound = %cfg.outbound_listen,
        admin = %cfg.admin_listen,
        control_plane = %cfg.control_plane,
        register = %cfg.register,
        "weft sidecar running"
    );

    let mut running = Running {
        stop_health,
        health_task,
        registration,
        draining,
        inbound_drain,
        inbound,
        outbound_stop,
        outbound,
        flush,
        exporter,
        admin_stop,
        _xds: xds_client,
        _checker: checker,
    };

    let signal = shutdown_signal();
    tokio::pin!(signal);
    // The proxies only return once told to; returning earlier means one has failed, and a
    // sidecar that cannot carry traffic must not stay registered.
    let failed = tokio::select! {
        () = &mut signal => None,
        r = &mut running.inbound => Some(("inbound", r)),
        r = &mut running.outbound => Some(("outbound", r)),
    };
    if let Some((what, result)) = failed {
        tracing::error!(server = what, result = ?result, "a proxy stopped unexpectedly; deregistering");
        running.stop_health.cancel();
        let _ = running.health_task.await;
        if let Some(r) = running.registration.and_then(Arc::into_inner) {
            let _ = r.deregister(Duration::from_secs(2)).await;
        }
        return Err(Failure::Other(anyhow::anyhow!(
            "the {what} proxy stopped unexpectedly"
        )));
    }

    tracing::info!(
        drain_delay = ?cfg.drain_delay,
        grace = ?cfg.shutdown_grace,
        "shutting down: draining"
    );
    let second = shutdown_signal();
    tokio::select! {
        clean = shutdown(running, cfg.drain_delay, cfg.shutdown_grace) => {
            if clean { Ok(()) } else { Err(Failure::Unclean) }
        }
        () = second => {
            tracing::warn!("second signal: exiting without finishing the drain");
            Err(Failure::Unclean)
        }
    }
}

/// Runs each shutdown step against one deadline, remembering what has not finished.
struct Deadline {
    at: Instant,
    pending: Vec<&'static str>,
}

impl Deadline {
    async fn step<T>(
        &mut self,
        what: &'static str,
        fut: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        match tokio::time::timeout_at(self.at, fut).await {
            Ok(v) => {
                self.pending.retain(|p| *p != what);
                Some(v)
            }
            Err(_) => {
                tracing::error!(
                    waiting_for = what,
                    still_running = ?self.pending,
                    "shutdown grace period expired"
                );
                None
            }
        }
    }

    fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }
}

const STEP_DRAIN_DELAY: &str = "drain delay";
const STEP_INBOUND: &str = "inbound proxy (in-flight requests)";
const STEP_DEREGISTER: &str = "deregistration";
const STEP_OUTBOUND: &str = "outbound proxy (in-flight requests)";
const STEP_SPANS: &str = "span export";

/// The drain sequence (see the crate docs); true if it finished within `grace`.
async fn shutdown(r: Running, drain_delay: Duration, grace: Duration) -> bool {
    let mut d = Deadline {
        at: Instant::now() + grace,
        pending: vec![
            STEP_DRAIN_DELAY,
            STEP_INBOUND,
            STEP_DEREGISTER,
            STEP_OUTBOUND,
            STEP_SPANS,
        ],
    };
    // Health results must no longer reach the registration: a passing probe during the drain
    // would otherwise flip the instance back to Healthy.
    r.stop_health.cancel();
    let _ = r.health_task.await;
    r.draining.store(true, Ordering::SeqCst);
    if let Some(reg) = &r.registration {
        reg.set_health(Health::Draining);
    }

    if d.step(STEP_DRAIN_DELAY, tokio::time::sleep(drain_delay))
        .await
        .is_none()
    {
        return false;
    }

    r.inbound_drain.cancel();
    match d.step(STEP_INBOUND, r.inbound).await {
        None => return false,
        Some(Err(e)) => tracing::warn!(error = %e, "inbound proxy task failed"),
        Some(Ok(())) => tracing::info!("inbound proxy drained"),
    }

    // The health forwarder has finished, so this is the last reference.
    match r.registration.map(Arc::into_inner) {
        None => {
            d.pending.retain(|p| *p != STEP_DEREGISTER);
        }
        Some(None) => {
            tracing::warn!("registration still shared; leaving the entry to its TTL");
            d.pending.retain(|p| *p != STEP_DEREGISTER);
        }
        Some(Some(reg)) => {
            let timeout = d.remaining();
            match d.step(STEP_DEREGISTER, reg.deregister(timeout)).await {
                None => return false,
                Some(Ok(())) => tracing::info!("deregistered"),
                // Not fatal: the entry goes when its TTL runs out.
                Some(Err(e)) => tracing::warn!(error = %e, "deregistration failed"),
            }
        }
    }

    r.outbound_stop.cancel();
    match d.step(STEP_OUTBOUND, r.outbound).await {
        None => return false,
        Some(Err(e)) => tracing::warn!(error = %e, "outbound proxy task failed"),
        Some(Ok(())) => {}
    }

    r.flush.cancel();
    if let Some(exporter) = r.exporter
        && d.step(STEP_SPANS, exporter).await.is_none()
    {
        return false;
    }
    r.admin_stop.cancel();
    tracing::info!("shutdown complete");
    true
}

/// Passes the app's verdicts on to the registration until `stop`.
async fn forward_health(
    mut rx: watch::Receiver<weft_health_check::Status>,
    registration: Option<Arc<Registration>>,
    healthy: Gauge,
    stop: CancellationToken,
) {
    let mut last = None;
    loop {
        let status = rx.borrow_and_update().clone();
        healthy.set(i64::from(status.verdict == Verdict::Healthy));
        if last != Some(status.verdict) {
            last = Some(status.verdict);
            let health = match status.verdict {
                Verdict::Unknown => None,
                Verdict::Healthy => {
                    tracing::info!("app is healthy");
                    Some(Health::Healthy)
                }
                Verdict::Unhealthy => {
                    tracing::warn!(last_error = ?status.last_error, "app is unhealthy");
                    Some(Health::Unhealthy)
                }
            };
            if let (Some(reg), Some(h)) = (&registration, health) {
                reg.set_health(h);
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}

async fn track_registered(
    mut rx: watch::Receiver<weft_sidecar_register::Status>,
    registered: Gauge,
) {
    loop {
        registered.set(i64::from(rx.borrow_and_update().registered));
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn node(cfg: &Config, instance_id: &str) -> Node {
    Node {
        id: format!("{}~{}", cfg.service, instance_id),
        cluster: cfg.service.clone(),
        user_agent_name: "weft-sidecar".into(),
        user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion(
            env!("CARGO_PKG_VERSION").into(),
        )),
        locality: cfg.zone.as_ref().map(|zone| Locality {
            zone: zone.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The host name for the default instance id: the kernel's, else `$HOSTNAME`.
fn hostname() -> Result<String, String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .ok_or_else(|| {
            "cannot read the host name (/proc/sys/kernel/hostname, $HOSTNAME) for the default \
             --instance-id; pass --instance-id"
                .to_string()
        })
}

/// The IP to register when `--advertise-address` is not given: the inbound listener's own IP
/// if it names one, else the source address the kernel would pick to reach the control plane
/// (the interface other hosts can most likely reach us on).
async fn advertise_address(inbound_ip: IpAddr, s: &Settings) -> anyhow::Result<IpAddr> {
    if !inbound_ip.is_unspecified() {
        return Ok(inbound_ip);
    }
    let target = format!("{}:{}", s.control_plane_host, s.control_plane_port);
    let addrs = tokio::net::lookup_host(&target).await.with_context(|| {
        format!("resolving the control plane {target} to pick --advertise-address")
    })?;
    let mut last_err = None;
    for addr in addrs {
        let local: SocketAddr = if addr.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        // Connecting a UDP socket only chooses a route and a source address; nothing is sent.
        let picked = std::net::UdpSocket::bind(local).and_then(|sock| {
            sock.connect(addr)?;
            sock.local_addr()
        });
        match picked {
            Ok(a) if !a.ip().is_unspecified() => return Ok(a.ip()),
            Ok(_) => {}
            Err(e) => last_err = Some(e),
        }
    }
    Err(anyhow::anyhow!(
        "no local address routes to the control plane {target} ({}); pass --advertise-address",
        last_err.map_or_else(|| "no usable address".to_string(), |e| e.to_string())
    ))
}

fn describe_backend(b: &Backend) -> serde_json::Value {
    match b {
        Backend::ControlPlane { endpoint, tls } => {
            serde_json::json!({ "kind": "control-plane", "endpoint": endpoint, "tls": tls.is_some() })
        }
        Backend::Etcd {
            endpoints,
            prefix,
            ca,
            cert,
            ..
        } => serde_json::json!({
            "kind": "etcd",
            "endpoints": endpoints,
            "prefix": prefix,
            "tls": ca.is_some() || cert.is_some(),
        }),
        Backend::Consul {
            addr,
            token,
            datacenter,
            check,
            deregister_after,
            ..
        } => serde_json::json!({
            "kind": "consul",
            "addr": addr,
            "token": token.is_some(),
            "datacenter": datacenter,
            "tls": addr.starts_with("https://"),
            "check": format!("{check:?}"),
            "deregister_after": deregister_after.map(|d| humantime::format_duration(d).to_string()),
        }),
    }
}

fn describe_instance(i: &Instance) -> serde_json::Value {
    serde_json::json!({
        "service": i.service,
        "instance_id": i.instance_id,
        "address": i.address.to_string(),
        "port": i.port,
        "weight": i.weight,
        "zone": i.zone,
        "protocol": i.protocol,
        "metadata": i.metadata,
        "ttl": humantime::format_duration(i.ttl).to_string(),
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
