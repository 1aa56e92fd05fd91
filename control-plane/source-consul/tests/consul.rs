//! The Consul source against the Consul stand-in (tests/consul-standin; not a real Consul):
//! health mapping, maintenance, index resets, restarts, bad KV values, scale and readiness.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::oneshot;
use weft_consul_standin::{ConsulStandIn, StandInOptions};
use weft_registry::{Health, Hub, Protocol};
use weft_source_consul::{ConsulMetrics, ConsulOptions, ConsulSource, WarningAs};

const WAIT: Duration = Duration::from_secs(20);

struct Running {
    hub: Arc<Hub>,
    metrics: ConsulMetrics,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .expect("source did not stop on shutdown")
            .unwrap();
    }
}

fn opts(url: String) -> ConsulOptions {
    ConsulOptions {
        address: url,
        wait: Duration::from_secs(2),
        min_query_interval: Duration::from_millis(100),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        request_timeout: Duration::from_secs(2),
        ..ConsulOptions::default()
    }
}

fn start(opts: ConsulOptions) -> Running {
    let hub = Hub::new();
    let handle = hub.add_source("consul");
    let src = ConsulSource::new(opts, handle);
    let metrics = src.metrics();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(src.run(async {
        let _ = rx.await;
    }));
    Running {
        hub,
        metrics,
        stop: Some(tx),
        task,
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Registers an instance whose (HTTP) check has the given status; its check id is
/// `service:<id>`.
fn register(c: &ConsulStandIn, id: &str, name: &str, addr: &str, port: u16, status: &str) {
    c.register_service(&json!({
        "ID": id, "Name": name, "Address": addr, "Port": port,
        "Check": {"HTTP": format!("http://{addr}:{port}/health"), "Interval": "10s", "Status": status},
    }))
    .unwrap();
}

/// service -> (address:port -> health) as the hub has it.
fn instances(hub: &Hub) -> BTreeMap<String, BTreeMap<String, Health>> {
    let snap = hub.current();
    snap.registry
        .services
        .iter()
        .filter(|(_, s)| !s.instances.is_empty())
        .map(|(name, s)| {
            let eps = s
                .instances
                .iter()
                .map(|i| {
                    (
                        format!("{}:{}", i.endpoint.address, i.endpoint.port),
                        i.endpoint.health,
                    )
                })
                .collect();
            (name.clone(), eps)
        })
        .collect()
}

fn health_of(hub: &Hub, service: &str, addr: &str) -> Option<Health> {
    instances(hub).get(service)?.get(addr).copied()
}

#[tokio::test]
async fn instances_reach_the_hub_with_their_health_and_fields() {
    let c = ConsulStandIn::start_with(
        "127.0.0.1:0".parse().unwrap(),
        StandInOptions {
            token: Some("tok".into()),
            node_meta: [("zone".to_string(), "node-z".to_string())].into(),
            ..StandInOptions::default()
        },
    )
    .await
    .unwrap();
    c.register_service(&json!({
        "ID": "web-1", "Name": "web", "Address": "10.0.0.1", "Port": 8080, "Tags": ["grpc"],
        "Meta": {"zone": "z1"}, "Weights": {"Passing": 7, "Warning": 1},
        "Check": {"TTL": "60s", "Status": "passing"},
    }))
    .unwrap();
    register(&c, "web-2", "web", "10.0.0.2", 8080, "critical");
    register(&c, "web-3", "web", "10.0.0.3", 8080, "warning");
    // No Service.Address: the node's address is used; no zone meta: the node's zone.
    c.register_service(&json!({"ID": "api-1", "Name": "api", "Port": 9000}))
        .unwrap();

    // Without the token Consul refuses: never synced, so never ready.
    let denied = start(opts(c.url()));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!denied.hub.is_ready());
    assert!(denied.metrics.errors() > 0);
    assert!(!denied.metrics.connected());
    denied.stop().await;

    let r = start(ConsulOptions {
        token: Some("tok".into()),
        ..opts(c.url())
    });
    eventually("first sync", || r.hub.is_ready()).await;
    assert!(r.metrics.connected());
    let snap = r.hub.current();
    let web = &snap.registry.services["web"];
    assert_eq!(web.protocol, Protocol::Grpc);
    let by_addr: BTreeMap<_, _> = web
        .instances
        .iter()
        .map(|i| (i.endpoint.address.as_str(), i))
        .collect();
    assert_eq!(by_addr["10.0.0.1"].endpoint.health, Health::Healthy);
    assert_eq!(by_addr["10.0.0.1"].endpoint.weight, 7);
    assert_eq!(by_addr["10.0.0.1"].endpoint.zone.as_deref(), Some("z1"));
    assert_eq!(by_addr["10.0.0.1"].id, "weft-standin/web-1");
    assert_eq!(by_addr["10.0.0.2"].endpoint.health, Health::Unhealthy);
    assert_eq!(by_addr["10.0.0.3"].endpoint.health, Health::Healthy);
    let api = &snap.registry.services["api"];
    assert_eq!(api.protocol, Protocol::Http);
    assert_eq!(api.instances[0].endpoint.address, "127.0.0.1");
    assert_eq!(api.instances[0].endpoint.port, 9000);
    assert_eq!(api.instances[0].endpoint.zone.as_deref(), Some("node-z"));
    // Consul's own service is not an application service.
    assert!(!snap.registry.services.contains_key("consul"));
    r.stop().await;

    // warning-as unhealthy.
    let r = start(ConsulOptions {
        token: Some("tok".into()),
        warning_as: WarningAs::Unhealthy,
        ..opts(c.url())
    });
    eventually("first sync", || r.hub.is_ready()).await;
    assert_eq!(
        health_of(&r.hub, "web", "10.0.0.3:8080"),
        Some(Health::Unhealthy)
    );
    r.stop().await;
}

#[tokio::test]
async fn check_changes_and_maintenance_change_health() {
    let c = ConsulStandIn::start().await.unwrap();
    register(&c, "a-1", "alpha", "10.1.0.1", 80, "passing");
    register(&c, "a-2", "alpha", "10.1.0.2", 80, "passing");
    let r = start(opts(c.url()));
    eventually("first sync", || r.hub.is_ready()).await;
    assert_eq!(
        health_of(&r.hub, "alpha", "10.1.0.1:80"),
        Some(Health::Healthy)
    );

    c.set_check_status("service:a-1", "critical");
    eventually("a-1 unhealthy", || {
        health_of(&r.hub, "alpha", "10.1.0.1:80") == Some(Health::Unhealthy)
    })
    .await;
    assert_eq!(
        health_of(&r.hub, "alpha", "10.1.0.2:80"),
        Some(Health::Healthy)
    );
    c.set_check_status("service:a-1", "passing");
    eventually("a-1 healthy again", || {
        health_of(&r.hub, "alpha", "10.1.0.1:80") == Some(Health::Healthy)
    })
    .await;

    // Service maintenance: the `_service_maintenance:<id>` check is critical.
    c.set_service_maintenance("a-2", true).unwrap();
    eventually("a-2 in maintenance", || {
        health_of(&r.hub, "alpha", "10.1.0.2:80") == Some(Health::Unhealthy)
    })
    .await;
    c.set_service_maintenance("a-2", false).unwrap();
    eventually("a-2 out of maintenance", || {
        health_of(&r.hub, "alpha", "10.1.0.2:80") == Some(Health::Healthy)
    })
    .await;

    // Node maintenance takes every instance on the node out.
    c.set_node_maintenance(true);
    eventually("node in maintenance", || {
        instances(&r.hub)["alpha"]
            .values()
            .all(|h| *h == Health::Unhealthy)
    })
    .await;
    c.set_node_maintenance(false);

    // Deregistration removes the instance; a new service appears.
    c.deregister_service("a-1").unwrap();
    register(&c, "b-1", "beta", "10.2.0.1", 81, "passing");
    eventually("a-1 gone, beta present", || {
        let i = instances(&r.hub);
        i["alpha"].len() == 1 && i.get("beta").is_some_and(|b| b.len() == 1)
    })
    .await;
    // The last instance of a service going away removes the service's watch and instances.
    c.deregister_service("b-1").unwrap();
    eventually("beta gone", || !instances(&r.hub).contains_key("beta")).await;
    r.stop().await;
}

#[tokio::test]
async fn index_going_backwards_resets_and_still_converges() {
    let c = ConsulStandIn::start().await.unwrap();
    register(&c, "x-1", "xs", "10.3.0.1", 80, "passing");
    c.kv_put("weft/service-config/xs", r#"{"protocol":"grpc"}"#);
    let r = start(opts(c.url()));
    eventually("first sync", || r.hub.is_ready()).await;
    assert_eq!(
        r.hub.current().registry.services["xs"].protocol,
        Protocol::Grpc
    );
    // Let the watches settle into blocking with the current (high) index.
    tokio::time::sleep(Duration::from_millis(300)).await;

    c.reset_index(1);
    eventually("index reset seen", || r.metrics.index_resets() >= 1).await;
    register(&c, "x-2", "xs", "10.3.0.2", 80, "passing");
    c.set_check_status("service:x-1", "critical");
    c.kv_put("weft/service-config/xs", r#"{"protocol":"http"}"#);
    eventually("converged after the reset", || {
        let i = instances(&r.hub);
        i.get("xs")
            .is_some_and(|x| x.len() == 2 && x.get("10.3.0.1:80") == Some(&Health::Unhealthy))
            && r.hub.current().registry.services["xs"].protocol == Protocol::Http
    })
    .await;
    r.stop().await;
}

#[tokio::test]
async fn consul_restart_reconnects_and_drops_stale_instances() {
    let c = ConsulStandIn::start().await.unwrap();
    let addr = c.addr();
    register(&c, "k-1", "keep", "10.4.0.1", 80, "passing");
    register(&c, "k-2", "keep", "10.4.0.2", 80, "passing");
    register(&c, "g-1", "gone", "10.4.0.9", 80, "passing");
    c.kv_put(
        "weft/policies/keep",
        "name: keep\nservice: keep\nlb: least_request\n",
    );
    let r = start(opts(c.url()));
    eventually("first sync", || r.hub.is_ready()).await;
    assert_eq!(instances(&r.hub).len(), 2);

    drop(c);
    eventually("disconnect noticed", || !r.metrics.connected()).await;
    // Consul down: the last known state keeps serving.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(instances(&r.hub).len(), 2);
    assert!(r.hub.current().registry.policies.contains_key("keep"));

    // "The same Consul" comes back with its state re-created, minus some of it.
    let c = ConsulStandIn::start_on(addr).await.unwrap();
    register(&c, "k-1", "keep", "10.4.0.1", 80, "passing");
    eventually("converged on the restarted Consul", || {
        let i = instances(&r.hub);
        i.len() == 1 && i["keep"].len() == 1 && i["keep"].contains_key("10.4.0.1:80")
    })
    .await;
    // The KV watch reconnects on its own backoff, independently of the health watches.
    eventually("the policy deleted while down is gone", || {
        r.hub.current().registry.policies.is_empty()
    })
    .await;
    assert!(r.metrics.connected());
    r.stop().await;
}

#[tokio::test]
async fn malformed_kv_values_are_skipped_and_reported() {
    let c = ConsulStandIn::start().await.unwrap();
    register(&c, "e-1", "echo", "10.5.0.1", 80, "passing");
    c.kv_put(
        "weft/routes/good",
        r#"{"name":"good","service":"echo","rules":[{"backends":[{"service":"echo","weight":1}]}]}"#,
    );
    c.kv_put(
        "weft/routes/bad",
        r#"{"name":"bad","service":"echo","rules":"#,
    );
    c.kv_put("weft/policies/p1", "name: other\nservice: echo\n");
    c.kv_put("weft/nonsense/x", "{}");
    // A folder key, as Consul's UI makes: not data, not an error.
    c.kv_put("weft/routes/", "");
    // Outside the prefix: ignored.
    c.kv_put("weftx/routes/y", "garbage");
    let r = start(opts(c.url()));
    eventually("first sync", || r.hub.is_ready()).await;
    assert!(r.hub.current().registry.routes.contains_key("good"));
    assert!(!r.hub.current().registry.routes.contains_key("bad"));
    let errors = r.hub.sources()[0].errors.clone();
    assert_eq!(
        errors.keys().cloned().collect::<Vec<_>>(),
        vec!["weft/nonsense/x", "weft/policies/p1", "weft/routes/bad"],
        "{errors:?}"
    );
    assert!(errors["weft/policies/p1"].contains("differs"), "{errors:?}");
    assert!(errors["weft/nonsense/x"].contains("unknown key shape"));
    assert_eq!(r.metrics.invalid_values(), 3);

    // Fixing a key applies it and clears its error; breaking a good one removes it.
    c.kv_put(
        "weft/routes/bad",
        r#"{"name":"bad","service":"echo","rules":[{"backends":[{"service":"echo","weight":1}]}]}"#,
    );
    c.kv_put("weft/routes/good", "rules: 5");
    eventually("fix applied, break removed", || {
        let reg = r.hub.current().registry;
        reg.routes.contains_key("bad") && !reg.routes.contains_key("good")
    })
    .await;
    let errors = r.hub.sources()[0].errors.clone();
    assert!(errors.contains_key("weft/routes/good"));
    assert!(!errors.contains_key("weft/routes/bad"));
    c.kv_delete("weft/routes/good", false);
    eventually("deleted key's error cleared", || {
        !r.hub.sources()[0].errors.contains_key("weft/routes/good")
    })
    .await;

    // An instance the schema refuses (a host name, not an IP) is skipped and reported too.
    register(&c, "e-2", "echo", "db.internal", 80, "passing");
    eventually("bad instance reported", || {
        r.hub.sources()[0]
            .errors
            .contains_key("health/echo/weft-standin/e-2")
    })
    .await;
    assert_eq!(instances(&r.hub)["echo"].len(), 1);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_instances_converge_without_spinning() {
    let c = ConsulStandIn::start().await.unwrap();
    let addr_of = |i: usize| format!("10.6.{}.{}", i / 200, i % 200 + 1);
    for i in 0..250 {
        register(
            &c,
            &format!("i-{i}"),
            &format!("svc-{}", i % 50),
            &addr_of(i),
            8080,
            "passing",
        );
    }
    let r = start(opts(c.url()));
    // Churn while the source runs: more registrations and check flips.
    for i in 250..500 {
        register(
            &c,
            &format!("i-{i}"),
            &format!("svc-{}", i % 50),
            &addr_of(i),
            8080,
            "passing",
        );
        if i % 25 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    for i in (0..500).step_by(10) {
        c.set_check_status(&format!("service:i-{i}"), "critical");
    }
    eventually("500 instances with the right health", || {
        let i = instances(&r.hub);
        let n: usize = i.values().map(BTreeMap::len).sum();
        let unhealthy = i
            .values()
            .flat_map(|m| m.values())
            .filter(|h| **h == Health::Unhealthy)
            .count();
        r.hub.is_ready() && i.len() == 50 && n == 500 && unhealthy == 50
    })
    .await;

    // Idle: each watch asks about once per `wait` (2 s), not in a loop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let paths: Vec<String> = (0..50)
        .map(|s| format!("/v1/health/service/svc-{s}"))
        .chain([
            "/v1/catalog/services".to_string(),
            "/v1/kv/weft/".to_string(),
        ])
        .collect();
    let before: Vec<u64> = paths.iter().map(|p| c.requests(p)).collect();
    let idle = Duration::from_secs(4);
    tokio::time::sleep(idle).await;
    for (p, b) in paths.iter().zip(before) {
        let d = c.requests(p) - b;
        // 4 s / 2 s wait = 2 (3 with jitter and the phase); a spinning watch would do ~40.
        assert!(d <= 4, "{p}: {d} queries in {idle:?} while idle");
    }
    r.stop().await;
}

#[tokio::test]
async fn ready_only_after_the_first_full_sync() {
    // Nothing listens yet: not ready.
    let addr = {
        let probe = ConsulStandIn::start().await.unwrap();
        probe.addr()
    };
    let r = start(opts(format!("http://{addr}")));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!r.hub.is_ready());
    assert!(r.metrics.errors() > 0);

    let c = ConsulStandIn::start_on(addr).await.unwrap();
    // Registered without yielding: the source's first catalog answer lists all 20 services.
    for s in 0..20 {
        register(
            &c,
            &format!("r-{s}"),
            &format!("ready-{s}"),
            &format!("10.7.0.{}", s + 1),
            80,
            "passing",
        );
    }
    c.kv_put("weft/policies/ready-0", "name: ready-0\nservice: ready-0\n");
    let deadline = Instant::now() + WAIT;
    loop {
        if r.hub.is_ready() {
            // The first time the hub is ready it already holds every service's instances.
            let i = instances(&r.hub);
            assert_eq!(i.len(), 20, "ready with a partial registry: {i:?}");
            assert!(r.hub.current().registry.policies.contains_key("ready-0"));
            break;
        }
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    r.stop().await;
}
