//! The client against Weft's real xDS server, in process, over loopback: sync, changes,
//! NACKs, control-plane restarts and a control plane that is down at start, each for Delta and
//! SotW.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use weft_registry::{Hub, Registry, SourceEvent, parse_document};
use weft_translate::{self as translate, Flavor};
use weft_xds_cache::{Cache, TypeUpdate};
use weft_xds_client::{
    CLUSTER_TYPE, ENDPOINT_TYPE, Options, ROUTE_TYPE, Resource, State, Validator, Variant,
    XdsClient,
};
use weft_xds_server::XdsServer;

const WAIT: Duration = Duration::from_secs(15);
const NODE: &str = "sidecar-test";

fn registry(yaml: &str) -> Arc<Registry> {
    let hub = Hub::new();
    let src = hub.add_source("file");
    let doc = parse_document("t", yaml).unwrap();
    let mut ev = vec![SourceEvent::Init];
    ev.extend(doc.into_objects().into_iter().map(SourceEvent::InitApply));
    ev.push(SourceEvent::InitDone);
    src.apply(ev);
    hub.current().registry
}

fn new_cache() -> Arc<Cache> {
    let flavors: Vec<&str> = Flavor::ALL.iter().map(|f| f.as_str()).collect();
    Cache::new(
        &flavors,
        &[
            translate::CLUSTER_TYPE,
            translate::ENDPOINT_TYPE,
            translate::LISTENER_TYPE,
            translate::ROUTE_TYPE,
        ],
    )
}

/// Translates `yaml` and makes it the whole content of the cache, as the control plane does.
fn set(cache: &Cache, yaml: &str) {
    let reg = registry(yaml);
    let opts = translate::Options::default();
    for flavor in Flavor::ALL {
        let r = translate::translate(&reg, &opts, flavor);
        cache.apply(
            flavor.as_str(),
            vec![
                TypeUpdate::replace(
                    translate::CLUSTER_TYPE,
                    r.clusters.into_iter().map(|c| (c.name.clone(), c)),
                ),
                TypeUpdate::replace(
                    translate::ENDPOINT_TYPE,
                    r.endpoints.into_iter().map(|e| (e.cluster_name.clone(), e)),
                ),
                TypeUpdate::replace(
                    translate::LISTENER_TYPE,
                    r.listeners.into_iter().map(|l| (l.name.clone(), l)),
                ),
                TypeUpdate::replace(
                    translate::ROUTE_TYPE,
                    r.routes.into_iter().map(|r| (r.name.clone(), r)),
                ),
            ],
            Instant::now(),
        );
    }
}

fn services(list: &[(&str, u16)]) -> String {
    let mut y = String::from("services:\n");
    for (name, port) in list {
        y.push_str(&format!(
            "  - {{name: {name}, endpoints: [{{address: 127.0.0.1, port: {port}}}]}}\n"
        ));
    }
    y
}

struct Server {
    xds: XdsServer,
    drain: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(cache: &Arc<Cache>, addr: SocketAddr) -> Server {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        Self::serve(cache, listener)
    }

    fn serve(cache: &Arc<Cache>, listener: tokio::net::TcpListener) -> Server {
        let (drain, drain_rx) = watch::channel(false);
        let xds = XdsServer::new(
            Arc::clone(cache),
            |node| Flavor::classify(node).as_str().to_string(),
            drain_rx.clone(),
        );
        let routes = xds.routes();
        let mut stop = drain_rx;
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async move {
                        let _ = stop.wait_for(|d| *d).await;
                    },
                )
                .await
                .unwrap();
        });
        Server { xds, drain, task }
    }

    /// Ends every stream (UNAVAILABLE, as on SIGTERM) and waits until the port is free.
    async fn stop(self) {
        self.drain.send(true).unwrap();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("server stops")
            .unwrap();
    }

    /// This server's view of our client's stream, per type: (pushes, acks, nacks).
    fn counts(&self, type_url: &str) -> Option<(u64, u64, u64)> {
        let c = self.xds.clients().into_iter().find(|c| c.node_id == NODE)?;
        let t = c.types.get(type_url)?;
        Some((t.pushes, t.acks, t.nacks))
    }
}

async fn free_addr() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

fn accept_all() -> Validator {
    Arc::new(|_: Resource<'_>| Ok(()))
}

fn options(addr: SocketAddr, variant: Variant, validator: Validator) -> Options {
    Options {
        endpoint: format!("http://{addr}"),
        node: Node {
            id: NODE.into(),
            cluster: "test".into(),
            user_agent_name: "weft-sidecar".into(),
            ..Default::default()
        },
        variant,
        route_names: vec!["weft_http".into()],
        validator,
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(300),
        connect_timeout: Duration::from_secs(1),
        tls: None,
    }
}

async fn wait_for(
    rx: &mut watch::Receiver<Arc<State>>,
    what: &str,
    pred: impl Fn(&State) -> bool,
) -> Arc<State> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = Arc::clone(&rx.borrow_and_update());
        if pred(&s) {
            return s;
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(r) => r.unwrap(),
            Err(_) => panic!("timed out waiting for {what}; last state: {s:#?}"),
        }
    }
}

/// Polls a condition that is not published on the watch (the server's view).
async fn poll(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn names<T>(m: &std::collections::BTreeMap<String, T>) -> Vec<&str> {
    m.keys().map(String::as_str).collect()
}

fn endpoint_debug(s: &State, cluster: &str) -> String {
    format!("{:?}", s.endpoints.get(cluster))
}

// === Scenarios, each run for both variants ===

async fn sync_and_follow_changes(variant: Variant) {
    let cache = new_cache();
    set(&cache, &services(&[("a", 1001), ("b", 1002)]));
    let addr = free_addr().await;
    let server = Server::start(&cache, addr).await;
    let client = XdsClient::spawn(options(addr, variant, accept_all()));
    let mut rx = client.state();

    let s = wait_for(&mut rx, "initial sync", |s| s.synced).await;
    assert!(s.connected);
    assert_eq!(names(&s.clusters), ["a", "b"]);
    assert_eq!(names(&s.endpoints), ["a", "b"]);
    assert_eq!(names(&s.routes), ["weft_http"]);
    assert!(endpoint_debug(&s, "a").contains("PortValue(1001)"));
    assert!(s.last_nack.is_none());
    match variant {
        Variant::Delta => {
            for (t, n) in [
                (CLUSTER_TYPE, "a"),
                (CLUSTER_TYPE, "b"),
                (ENDPOINT_TYPE, "a"),
                (ENDPOINT_TYPE, "b"),
                (ROUTE_TYPE, "weft_http"),
            ] {
                assert!(
                    s.versions.contains_key(&(t.to_string(), n.to_string())),
                    "version of {t} {n} in {:?}",
                    s.versions
                );
            }
        }
        Variant::Sotw => {
            for t in [CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE] {
                assert!(s.versions.contains_key(&(t.to_string(), String::new())));
            }
        }
    }

    // An endpoint change.
    set(&cache, &services(&[("a", 1003), ("b", 1002)]));
    let s = wait_for(&mut rx, "a's new endpoint", |s| {
        endpoint_debug(s, "a").contains("PortValue(1003)")
    })
    .await;
    assert_eq!(names(&s.clusters), ["a", "b"]);

    // A new service: its cluster, then its endpoints through the widened EDS subscription.
    set(&cache, &services(&[("a", 1003), ("b", 1002), ("c", 1004)]));
    let s = wait_for(&mut rx, "c's cluster and endpoints", |s| {
        s.clusters.contains_key("c") && endpoint_debug(s, "c").contains("PortValue(1004)")
    })
    .await;
    assert_eq!(names(&s.endpoints), ["a", "b", "c"]);
    poll("the server to see c in the EDS subscription", || {
        server.xds.clients().iter().any(|c| {
            c.types
                .get(ENDPOINT_TYPE)
                .is_some_and(|t| t.subscriptions.iter().any(|n| n == "c"))
        })
    })
    .await;

    // A removed service: cluster and endpoints gone, and unsubscribed.
    set(&cache, &services(&[("a", 1003), ("c", 1004)]));
    let s = wait_for(&mut rx, "b gone", |s| {
        !s.clusters.contains_key("b") && !s.endpoints.contains_key("b")
    })
    .await;
    assert_eq!(names(&s.clusters), ["a", "c"]);
    assert_eq!(names(&s.endpoints), ["a", "c"]);
    if variant == Variant::Delta {
        assert!(
            !s.versions.keys().any(|(_, n)| n == "b"),
            "{:?}",
            s.versions
        );
    }
    poll("the server to see b unsubscribed", || {
        server.xds.clients().iter().any(|c| {
            c.types
                .get(ENDPOINT_TYPE)
                .is_some_and(|t| t.subscriptions == ["a".to_string(), "c".to_string()])
        })
    })
    .await;
    assert!(rx.borrow().last_nack.is_none());
    assert_eq!(rx.borrow().reconnects, 0);

    drop(client);
    server.stop().await;
}

async fn nack_keeps_previous_then_accepts_fix(variant: Variant) {
    let cache = new_cache();
    set(&cache, &services(&[("a", 1001)]));
    let addr = free_addr().await;
    let server = Server::start(&cache, addr).await;
    let validator: Validator = Arc::new(|r: Resource<'_>| match r {
        Resource::Cluster(c) if c.name == "bad" => Err("cluster `bad` is not supported".into()),
        _ => Ok(()),
    });
    let client = XdsClient::spawn(options(addr, variant, validator));
    let mut rx = client.state();
    let before = wait_for(&mut rx, "initial sync", |s| s.synced).await;

    set(&cache, &services(&[("a", 1001), ("bad", 1002)]));
    let s = wait_for(&mut rx, "a NACK", |s| s.last_nack.is_some()).await;
    let (t, msg) = s.last_nack.clone().unwrap();
    assert_eq!(t, CLUSTER_TYPE);
    assert!(msg.contains("cluster `bad` is not supported"), "{msg}");
    assert_eq!(names(&s.clusters), ["a"]);
    assert_eq!(s.clusters, before.clusters);
    assert_eq!(names(&s.endpoints), ["a"]);
    assert_eq!(
        s.versions.get(&(CLUSTER_TYPE.to_string(), "a".to_string())),
        before
            .versions
            .get(&(CLUSTER_TYPE.to_string(), "a".to_string()))
    );
    if variant == Variant::Sotw {
        assert_eq!(
            s.versions.get(&(CLUSTER_TYPE.to_string(), String::new())),
            before
                .versions
                .get(&(CLUSTER_TYPE.to_string(), String::new()))
        );
    }
    poll("the server to count the NACK", || {
        server.counts(CLUSTER_TYPE).is_some_and(|(_, _, n)| n == 1)
    })
    .await;
    let c = server
        .xds
        .clients()
        .into_iter()
        .find(|c| c.node_id == NODE)
        .unwrap();
    let nack = c.types[CLUSTER_TYPE].last_nack.clone().unwrap();
    assert!(nack.message.contains("cluster `bad`"), "{nack:?}");

    // The fixed registry is accepted.
    set(&cache, &services(&[("a", 1001), ("good", 1003)]));
    let s = wait_for(&mut rx, "the fixed registry", |s| {
        s.clusters.contains_key("good") && s.endpoints.contains_key("good")
    })
    .await;
    assert_eq!(names(&s.clusters), ["a", "good"]);
    assert!(s.synced);
    assert_eq!(server.counts(CLUSTER_TYPE).unwrap().2, 1, "only one NACK");

    drop(client);
    server.stop().await;
}

async fn restart_keeps_state_and_resumes(variant: Variant) {
    let cache = new_cache();
    set(&cache, &services(&[("a", 1001), ("b", 1002)]));
    let addr = free_addr().await;
    let server = Server::start(&cache, addr).await;
    let client = XdsClient::spawn(options(addr, variant, accept_all()));
    let mut rx = client.state();
    let before = wait_for(&mut rx, "initial sync", |s| s.synced).await;
    assert!(before.last_update.is_some());

    server.stop().await;
    let down = wait_for(&mut rx, "the disconnect", |s| !s.connected).await;
    assert!(down.synced, "the last good config keeps serving");
    assert_eq!(down.clusters, before.clusters);
    assert_eq!(down.endpoints, before.endpoints);
    assert_eq!(down.routes, before.routes);
    assert!(down.last_error.is_some());
    assert!(down.reconnects >= 1);

    let server = Server::start(&cache, addr).await;
    let up = wait_for(&mut rx, "the reconnect", |s| s.connected).await;
    assert!(up.synced);
    // The server has processed all three subscriptions and the client ACKed CDS.
    poll("resubscription on the new server", || {
        server.counts(CLUSTER_TYPE).is_some_and(|(_, a, _)| a >= 1)
            && server.counts(ENDPOINT_TYPE).is_some()
            && server.counts(ROUTE_TYPE).is_some()
    })
    .await;
    // Give any (unwanted) re-send time to arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (eds_pushes, _, _) = server.counts(ENDPOINT_TYPE).unwrap();
    let (rds_pushes, _, _) = server.counts(ROUTE_TYPE).unwrap();
    match variant {
        // initial_resource_versions: the server knows we hold everything.
        Variant::Delta => {
            assert_eq!(eds_pushes, 0, "Delta resume must not re-send endpoints");
            assert_eq!(rds_pushes, 0, "Delta resume must not re-send routes");
            let (cds_pushes, _, _) = server.counts(CLUSTER_TYPE).unwrap();
            assert_eq!(cds_pushes, 1, "one (empty) answer to the wildcard");
        }
        // SotW always answers a reopened subscription: same versions, nothing new.
        Variant::Sotw => {
            poll("SotW re-sent endpoints and routes, ACKed", || {
                server.counts(ENDPOINT_TYPE).is_some_and(|(_, a, _)| a >= 1)
                    && server.counts(ROUTE_TYPE).is_some_and(|(_, a, _)| a >= 1)
            })
            .await;
        }
    }
    let now = rx.borrow().clone();
    assert_eq!(now.clusters, before.clusters);
    assert_eq!(now.endpoints, before.endpoints);
    assert_eq!(now.routes, before.routes);
    assert_eq!(now.versions, before.versions);
    assert_eq!(
        now.last_update, before.last_update,
        "nothing new was applied after the reconnect"
    );
    assert!(now.last_nack.is_none());

    // And the new stream follows changes.
    set(&cache, &services(&[("a", 1001), ("b", 1005)]));
    wait_for(&mut rx, "a change after the restart", |s| {
        endpoint_debug(s, "b").contains("PortValue(1005)")
    })
    .await;

    drop(client);
    server.stop().await;
}

async fn server_down_at_start(variant: Variant) {
    let cache = new_cache();
    set(&cache, &services(&[("a", 1001)]));
    let addr = free_addr().await;
    let client = XdsClient::spawn(options(addr, variant, accept_all()));
    let mut rx = client.state();
    let s = wait_for(&mut rx, "failed attempts", |s| s.reconnects >= 2).await;
    assert!(!s.connected && !s.synced);
    let err = s.last_error.clone().unwrap();
    assert!(err.contains(&addr.to_string()), "{err}");

    let server = Server::start(&cache, addr).await;
    let s = wait_for(&mut rx, "sync once the server is up", |s| s.synced).await;
    assert!(s.connected);
    assert_eq!(names(&s.clusters), ["a"]);
    assert_eq!(names(&s.endpoints), ["a"]);
    assert_eq!(names(&s.routes), ["weft_http"]);

    drop(client);
    server.stop().await;
}

async fn drop_stops_the_client(variant: Variant) {
    let cache = new_cache();
    set(&cache, &services(&[("a", 1001)]));
    let addr = free_addr().await;
    let server = Server::start(&cache, addr).await;
    let client = XdsClient::spawn(options(addr, variant, accept_all()));
    let mut rx = client.state();
    wait_for(&mut rx, "initial sync", |s| s.synced).await;
    assert!(server.counts(CLUSTER_TYPE).is_some());
    drop(client);
    poll("the stream to close", || {
        server.counts(CLUSTER_TYPE).is_none()
    })
    .await;
    server.stop().await;
}

macro_rules! both {
    ($($name:ident),*) => {
        mod delta {
            $(#[tokio::test]
            async fn $name() {
                super::init_tracing();
                super::$name(weft_xds_client::Variant::Delta).await;
            })*
        }
        mod sotw {
            $(#[tokio::test]
            async fn $name() {
                super::init_tracing();
                super::$name(weft_xds_client::Variant::Sotw).await;
            })*
        }
    };
}

both!(
    sync_and_follow_changes,
    nack_keeps_previous_then_accepts_fix,
    restart_keeps_state_and_resumes,
    server_down_at_start,
    drop_stops_the_client
);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}
