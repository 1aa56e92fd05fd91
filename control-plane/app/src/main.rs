//! `weft-control-plane`: parses flags, wires sources -> hub -> translator -> cache -> xDS
//! server and admin, waits for a signal and drains under a grace timeout. No logic lives
//! here that a library crate could own.

mod config;
mod feedback;
mod pipeline;
mod telemetry;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use tokio::sync::watch;
use weft_registry::Hub;
use weft_translate::{self as translate, Flavor};
use weft_xds_cache::Cache;
use weft_xds_server::XdsServer;

use crate::config::Config;

/// BSD EX_USAGE / EX_CONFIG family: the configuration given to us is wrong.
const EXIT_BAD_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cfg = Config::parse();
    // Dropped last, after the runtime: spans ended while it shuts down are still exported.
    let _telemetry = match init_tracing(&cfg) {
        Ok(t) => t,
        Err(e) if e.is_bad_config() => {
            eprintln!("weft-control-plane: invalid configuration:\n{e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
        Err(e) => {
            eprintln!("weft-control-plane: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-control-plane: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::BadConfig(msg)) => {
            eprintln!("weft-control-plane: invalid configuration:\n{msg}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
        Err(Failure::Other(e)) => {
            eprintln!("weft-control-plane: {e:#}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    BadConfig(String),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

/// Logs on stderr, and spans over OTLP with `--otlp-endpoint`; see telemetry.rs.
fn init_tracing(cfg: &Config) -> Result<telemetry::Telemetry, telemetry::TelemetryError> {
    telemetry::init(&cfg.log_format, cfg.otlp())
}

async fn run(cfg: Config) -> Result<(), Failure> {
    let hub = Hub::new();
    let mut metrics = prometheus_client::registry::Registry::default();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    // Sources, in precedence order (see docs/registry-schema.md, "Merging").
    let file_source = if cfg.registry_files.is_empty() {
        None
    } else {
        let handle = hub.add_source("file");
        let fs = weft_source_file::FileSource::load(cfg.registry_files.clone(), handle)
            .map_err(|e| Failure::BadConfig(e.to_string()))?;
        fs.register_metrics(&mut metrics);
        Some(fs)
    };
    // Which registry objects proxies reject, for the CRDs' `Programmed` condition; fed once
    // the xDS server exists (feedback.rs).
    let (rejections_tx, rejections_rx) =
        watch::channel(Arc::new(weft_source_kubernetes::ProxyRejections::new()));
    let kube_source = if cfg.kubernetes {
        let bad =
            |e: weft_source_kubernetes::KubeError| Failure::BadConfig(format!("kubernetes: {e}"));
        let mut opts = weft_source_kubernetes::KubeOptions {
            namespaces: cfg
                .kube_namespaces
                .iter()
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect(),
            service_selector: cfg.kube_service_selector.clone().filter(|s| !s.is_empty()),
            port_name: cfg.kube_port_name.clone().filter(|s| !s.is_empty()),
            crds: cfg.kube_crds,
            ..Default::default()
        };
        if let Some(ns) = cfg.kube_lease_namespace.clone().filter(|s| !s.is_empty()) {
            opts.lease.namespace = ns;
        }
        opts.validate().map_err(bad)?;
        let client = weft_source_kubernetes::infer_client().await.map_err(bad)?;
        let ks = weft_source_kubernetes::KubernetesSource::new(
            client,
            opts,
            hub.add_source("kubernetes"),
            hub.subscribe(),
        )
        .with_proxy_rejections(rejections_rx);
        ks.register_metrics(&mut metrics);
        Some(ks)
    } else {
        None
    };
    let etcd_source = if cfg.etcd_endpoints.is_empty() {
        None
    } else {
        let opts = weft_source_etcd::EtcdOptions {
            endpoints: cfg.etcd_endpoints.clone(),
            prefix: cfg.etcd_prefix.trim_end_matches('/').to_string(),
            user: cfg.etcd_user.clone().zip(cfg.etcd_password.clone()),
            tls: cfg.etcd_ca.clone().map(|ca| weft_source_etcd::TlsFiles {
                ca,
                cert: cfg.etcd_cert.clone(),
                key: cfg.etcd_key.clone(),
            }),
            ..Default::default()
        };
        opts.validate()
            .map_err(|e| Failure::BadConfig(format!("etcd: {e}")))?;
        let es = weft_source_etcd::EtcdSource::new(opts, hub.add_source("etcd"));
        es.register_metrics(&mut metrics);
        Some(es)
    };
    let consul_source = match &cfg.consul_addr {
        None => None,
        Some(addr) => {
            let opts = weft_source_consul::ConsulOptions {
                address: addr.clone(),
                token: cfg.consul_token.clone().filter(|t| !t.is_empty()),
                datacenter: cfg.consul_datacenter.clone().filter(|d| !d.is_empty()),
                tls: weft_source_consul::TlsFiles {
                    ca: cfg.consul_ca.clone(),
                    cert: cfg.consul_cert.clone(),
                    key: cfg.consul_key.clone(),
                },
                service_tags: cfg.consul_service_tags.clone(),
                service_names: cfg.consul_service_names.clone(),
                warning_as: if cfg.consul_warning_as == "unhealthy" {
                    weft_source_consul::WarningAs::Unhealthy
                } else {
                    weft_source_consul::WarningAs::Healthy
                },
                kv_prefix: cfg.consul_kv_prefix.trim_matches('/').to_string(),
                wait: cfg.consul_wait,
                ..Default::default()
            };
            opts.validate()
                .map_err(|e| Failure::BadConfig(format!("consul: {e}")))?;
            let cs = weft_source_consul::ConsulSource::new(opts, hub.add_source("consul"));
            cs.register_metrics(&mut metrics);
            Some(cs)
        }
    };
    // mTLS on the gRPC port: loaded before anything is bound, so bad files exit 64.
    let grpc_tls = match (
        &cfg.tls_cert,
        &cfg.tls_key,
        &cfg.tls_client_ca,
        &cfg.trust_domain,
    ) {
        (Some(cert), Some(key), Some(client_ca), Some(trust_domain)) => {
            let files = weft_identity::ServerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: client_ca.clone(),
            };
            let config = weft_identity::tls::mtls_server_config(
                &files,
                weft_identity::tls::DEFAULT_RELOAD_INTERVAL,
            )
            .map_err(|e| Failure::BadConfig(format!("--tls-*: {e}")))?;
            Some(weft_identity::TlsIncoming {
                config,
                trust_domain: trust_domain.clone(),
                handshake_timeout: cfg.tls_handshake_timeout,
                max_handshakes: weft_identity::incoming::DEFAULT_MAX_HANDSHAKES,
            })
        }
        _ => None,
    };
    let embedded = weft_registration::EmbeddedRegistry::new(
        hub.add_source("registration"),
        weft_registration::RegistrationOptions {
            default_ttl: cfg.registration_default_ttl,
            require_identity: grpc_tls.is_some(),
            ..Default::default()
        },
    );
    embedded.register_metrics(&mut metrics);

    let types = [
        translate::CLUSTER_TYPE,
        translate::ENDPOINT_TYPE,
        translate::LISTENER_TYPE,
        translate::ROUTE_TYPE,
    ];
    let flavors: Vec<&str> = Flavor::ALL.iter().map(|f| f.as_str()).collect();
    let cache = Cache::new(&flavors, &types);
    cache.register_metrics(&mut metrics);
    let opts = translate::Options {
        http_listener_address: cfg.envoy_http_address.clone(),
        http_listener_port: cfg.envoy_http_port,
    };

    let xds_limits = cfg.xds_limits();
    let xds = XdsServer::new(
        Arc::clone(&cache),
        |node| Flavor::classify(node).as_str().to_string(),
        shutdown_rx.clone(),
    )
    .with_limits(xds_limits.clone());
    let xds = if grpc_tls.is_some() {
        xds.with_authorizer(weft_xds_server::spiffe_node_authorizer())
    } else {
        xds
    };
    xds.register_metrics(&mut metrics);

    let admin = {
        let hub_ready = Arc::clone(&hub);
        let hub_sources = Arc::clone(&hub);
        let hub_endpoints = Arc::clone(&hub);
        let (xds, xds_nacks, xds_config) = (xds.clone(), xds.clone(), xds.clone());
        let cache = Arc::clone(&cache);
        let embedded = embedded.clone();
        weft_admin::Admin::new(move || hub_ready.is_ready(), metrics)
            .status_page()
            .debug(
                "sources",
                move || serde_json::json!({ "sources": hub_sources.sources() }),
            )
            .debug(
                "clients",
                move || serde_json::json!({ "clients": xds.clients() }),
            )
            .debug(
                "nacks",
                move || serde_json::json!({ "nacks": xds_nacks.nacks() }),
            )
            .debug_query("endpoints", move |q| {
                endpoints(&hub_endpoints.current().registry, q.get("service"))
            })
            .debug_query("proxy_config", move |q| {
                proxy_config(&xds_config, q.get("node"))
            })
            .debug("config_dump", move || config_dump(&cache))
            .debug(
                "registrations",
                move || serde_json::json!({ "instances": embedded.instances() }),
            )
    };

    let webhook = match (&cfg.webhook_listen, &cfg.webhook_cert, &cfg.webhook_key) {
        (Some(listen), Some(cert), Some(key)) => {
            let tls = weft_injector::tls_config_with_reload(
                cert,
                key,
                weft_injector::DEFAULT_RELOAD_INTERVAL,
            )
            .map_err(|e| Failure::BadConfig(format!("webhook: {e}")))?;
            let mut injector = weft_injector::InjectorConfig {
                image: cfg.injector_image.clone(),
                ..Default::default()
            };
            if let Some(cp) = &cfg.injector_control_plane {
                injector.control_plane.clone_from(cp);
            }
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding the webhook port {listen}"))?;
            Some((listener, tls, Arc::new(injector)))
        }
        _ => None,
    };

    let admin_listener = tokio::net::TcpListener::bind(cfg.admin_listen)
        .await
        .with_context(|| format!("binding the admin port {}", cfg.admin_listen))?;
    let xds_listener = listen_with_backlog(cfg.xds_listen, XDS_BACKLOG)
        .with_context(|| format!("binding the xDS port {}", cfg.xds_listen))?;

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(weft_admin::serve(
        admin_listener,
        admin,
        wait_true(shutdown_rx.clone()),
    ));
    if let Some(fs) = file_source {
        tasks.spawn(fs.run(cfg.file_poll_interval, wait_true(shutdown_rx.clone())));
    }
    if let Some(ks) = kube_source {
        tasks.spawn(ks.run(wait_true(shutdown_rx.clone())));
        tasks.spawn(feedback::run(
            xds.clone(),
            hub.subscribe(),
            rejections_tx,
            wait_true(shutdown_rx.clone()),
        ));
    }
    if let Some(es) = etcd_source {
        tasks.spawn(es.run(wait_true(shutdown_rx.clone())));
    }
    if let Some(cs) = consul_source {
        tasks.spawn(cs.run(wait_true(shutdown_rx.clone())));
    }
    tasks.spawn(embedded.clone().run_reaper(wait_true(shutdown_rx.clone())));
    if let Some((listener, tls, injector)) = webhook {
        tasks.spawn(weft_injector::serve(
            listener,
            tls,
            injector,
            wait_true(shutdown_rx.clone()),
        ));
    }

    // Serve xDS only once every source has completed its first full sync: a client must never
    // be sent a partial registry as if it were the whole (linkerd2 #1958). Until then the xDS
    // port accepts connections but nothing answers them, and /readyz says why.
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let mut logged = false;
    while !hub.is_ready() {
        if !logged {
            tracing::info!("waiting for the first full sync of every source (see /debug/sources)");
            logged = true;
        }
        tokio::select! {
            () = &mut signal => {
                let _ = shutdown_tx.send(true);
                tasks.abort_all();
                return Ok(());
            }
            () = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
        }
    }
    // Subscribe before reading the initial state: a change in between is then seen twice
    // (harmless), never missed.
    let registry_rx = hub.subscribe();
    let initial = hub.current();
    pipeline::apply(&cache, &opts, None, &initial.registry, Instant::now());
    tasks.spawn(pipeline::run(
        registry_rx,
        Arc::clone(&cache),
        opts,
        initial.registry,
        cfg.debounce,
        cfg.debounce_max,
        shutdown_rx.clone(),
    ));
    tracing::info!(
        xds = %cfg.xds_listen,
        mtls = grpc_tls.is_some(),
        admin = %cfg.admin_listen,
        files = ?cfg.registry_files,
        etcd = ?cfg.etcd_endpoints,
        consul = ?cfg.consul_addr,
        kubernetes = cfg.kubernetes,
        envoy_http_port = cfg.envoy_http_port,
        "weft control plane serving"
    );

    // Keepalive (dead peers on idle streams), max connection age (rebalancing across
    // replicas) and HTTP/2 streams per connection: see `XdsLimits`.
    let grpc = xds_limits
        .configure(tonic::transport::Server::builder())
        .add_routes(xds.routes())
        .add_service(xds.csds())
        .add_service(embedded.service())
        .serve_with_incoming_shutdown(
            weft_identity::incoming::incoming(xds_listener, grpc_tls),
            wait_true(shutdown_rx.clone()),
        );
    let server = tokio::spawn(grpc);

    signal.await;
    tracing::info!(grace = ?cfg.shutdown_grace, "shutting down: draining xDS streams");
    let _ = shutdown_tx.send(true);
    match tokio::time::timeout(cfg.shutdown_grace, server).await {
        Ok(Ok(Ok(()))) => tracing::info!("xDS server stopped"),
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "xDS server ended with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "xDS server task failed"),
        Err(_) => tracing::warn!("grace period over; exiting with streams still open"),
    }
    tasks.abort_all();
    Ok(())
}

/// Pending connections the xDS port queues before the kernel drops them. A control-plane
/// restart makes every proxy reconnect at once; with tokio's default of 1,024, a burst of a
/// few thousand overflowed the accept queue and, with SYN cookies, clients saw their new
/// connections reset. The kernel caps it at `net.core.somaxconn`.
const XDS_BACKLOG: u32 = 8192;

fn listen_with_backlog(
    addr: std::net::SocketAddr,
    backlog: u32,
) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As TcpListener::bind does: a restarted control plane can bind while old connections
    // linger in TIME_WAIT.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

async fn wait_true(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
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

/// A resource decoded and printed with its Rust `Debug` form: readable, though not the
/// proto-JSON mapping Envoy's own config dump uses (that needs descriptor reflection).
fn describe(type_url: &str, any: &[u8]) -> String {
    use envoy_types::pb::envoy::config::{
        cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment, listener::v3::Listener,
        route::v3::RouteConfiguration,
    };
    use prost::Message;
    let Ok(any) = envoy_types::pb::google::protobuf::Any::decode(any) else {
        return "undecodable".to_string();
    };
    let v = any.value.as_slice();
    let text = match type_url {
        translate::CLUSTER_TYPE => Cluster::decode(v).map(|m| format!("{m:?}")),
        translate::ENDPOINT_TYPE => ClusterLoadAssignment::decode(v).map(|m| format!("{m:?}")),
        translate::LISTENER_TYPE => Listener::decode(v).map(|m| format!("{m:?}")),
        translate::ROUTE_TYPE => RouteConfiguration::decode(v).map(|m| format!("{m:?}")),
        _ => return "unknown type".to_string(),
    };
    text.unwrap_or_else(|e| format!("undecodable: {e}"))
}

/// `/debug/endpoints`: the merged registry's services and their instances (one with
/// `?service=`).
fn endpoints(
    registry: &weft_registry::Registry,
    service: Option<&String>,
) -> Result<serde_json::Value, weft_admin::DebugError> {
    let services: Vec<&weft_registry::Service> = match service {
        None => registry.services.values().collect(),
        Some(name) => vec![registry.services.get(name).ok_or_else(|| {
            weft_admin::DebugError::NotFound(format!(
                "no service `{name}` in the registry (see /debug/endpoints for every service)"
            ))
        })?],
    };
    Ok(serde_json::json!({ "services": services }))
}

/// `/debug/proxy_config?node=<id>`: what each stream of that node was sent, per resource, with
/// the current resource decoded where the client holds it.
fn proxy_config(
    xds: &XdsServer,
    node: Option<&String>,
) -> Result<serde_json::Value, weft_admin::DebugError> {
    let node = node.ok_or_else(|| {
        weft_admin::DebugError::BadRequest(
            "node= is required: /debug/proxy_config?node=<node id> (node ids: /debug/clients)"
                .to_string(),
        )
    })?;
    let streams = xds.proxy_config(node);
    if streams.is_empty() {
        return Err(weft_admin::DebugError::NotFound(format!(
            "no connected xDS client has node id `{node}` (see /debug/clients)"
        )));
    }
    let streams: Vec<serde_json::Value> = streams
        .iter()
        .map(|s| {
            let types: serde_json::Map<String, serde_json::Value> = s
                .types
                .iter()
                .map(|(t, tr)| {
                    let resources: Vec<serde_json::Value> = tr
                        .resources
                        .iter()
                        .map(|r| {
                            serde_json::json!({
                                "name": r.name,
                                "version": r.version,
                                "current_version": r.current_version,
                                "state": r.state,
                                "bytes": r.bytes,
                                "in_flight": r.in_flight,
                                "resource": r.current.as_ref().map(|c| describe(t, &c.any)),
                                "rejected": r.rejected,
                            })
                        })
                        .collect();
                    let v = serde_json::json!({
                        "state": tr.state,
                        "current_version": tr.current_version,
                        "last_acked_version": tr.last_acked_version,
                        "last_ack_unix_ms": tr.last_ack_unix_ms,
                        "resources": resources,
                    });
                    (t.clone(), v)
                })
                .collect();
            serde_json::json!({
                "stream_id": s.stream_id,
                "variant": s.variant,
                "flavor": s.flavor,
                "service": s.service,
                "cluster": s.cluster,
                "user_agent": s.user_agent,
                "types": types,
            })
        })
        .collect();
    Ok(serde_json::json!({ "node_id": node, "streams": streams }))
}

/// Every resource of every flavour with its version, decoded to JSON where we know the type.
fn config_dump(cache: &Cache) -> serde_json::Value {
    let mut flavors = serde_json::Map::new();
    for flavor in cache.flavors() {
        let Some(snap) = cache.snapshot(flavor) else {
            continue;
        };
        let mut types = serde_json::Map::new();
        let mut type_urls: Vec<&String> = snap.types.keys().collect();
        type_urls.sort();
        for t in type_urls {
            let ts = &snap.types[t];
            let items: Vec<serde_json::Value> = ts
                .resources
                .values()
                .map(|r| {
                    serde_json::json!({
                        "name": r.name,
                        "version": r.version,
                        "bytes": r.any.len(),
                        "resource": describe(t, &r.any),
                    })
                })
                .collect();
            types.insert(
                t.clone(),
                serde_json::json!({ "version": ts.version, "resources": items }),
            );
        }
        flavors.insert(
            flavor.to_string(),
            serde_json::json!({ "generation": snap.generation, "types": types }),
        );
    }
    serde_json::json!({ "flavors": flavors, "encodes_total": cache.encodes_total() })
}
