//! The Kubernetes source against an in-test fake API server (tests/common; not a real
//! cluster): discovery from Services and EndpointSlices, selectors, 410 Gone relists,
//! bookmarks, readiness, CRDs with status, and leader election.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{FakeApi, LEASES, POLICIES, ROUTES, SERVICES, SLICES};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use weft_registry::{Health, Hub, Protocol, Registry};
use weft_source_kubernetes::{KubeMetrics, KubeOptions, KubernetesSource, LeaseOptions};

struct Running {
    hub: Arc<Hub>,
    metrics: KubeMetrics,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn opts(identity: &str) -> KubeOptions {
    KubeOptions {
        watch_timeout: Some(30),
        status_retry: Duration::from_millis(200),
        lease: LeaseOptions {
            namespace: "weft-system".into(),
            name: "weft-control-plane".into(),
            identity: identity.into(),
            duration: Duration::from_secs(2),
            renew_deadline: Duration::from_millis(1500),
            retry_period: Duration::from_millis(200),
        },
        ..Default::default()
    }
}

fn start(port: u16, opts: KubeOptions) -> Running {
    let hub = Hub::new();
    let source = KubernetesSource::new(
        FakeApi::client_for(port),
        opts,
        hub.add_source("kubernetes"),
        hub.subscribe(),
    );
    let metrics = source.metrics();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(source.run(async move {
        let _ = rx.await;
    }));
    Running {
        hub,
        metrics,
        stop: Some(tx),
        task,
    }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn service(ns: &str, name: &str, labels: Value) -> Value {
    json!({"metadata": {"name": name, "namespace": ns, "labels": labels},
           "spec": {"ports": [{"name": "grpc-api", "port": 90}]}})
}

fn slice(ns: &str, name: &str, svc: &str, endpoints: Value) -> Value {
    json!({"metadata": {"name": name, "namespace": ns,
                        "labels": {"kubernetes.io/service-name": svc}},
           "addressType": "IPv4",
           "ports": [{"name": "grpc-api", "port": 9090}],
           "endpoints": endpoints})
}

/// (address, health, zone) of a service's instances, sorted.
fn instances(reg: &Registry, service: &str) -> Option<Vec<(String, Health, Option<String>)>> {
    reg.services.get(service).map(|s| {
        s.instances
            .iter()
            .map(|i| {
                (
                    format!("{}:{}", i.endpoint.address, i.endpoint.port),
                    i.endpoint.health,
                    i.endpoint.zone.clone(),
                )
            })
            .collect()
    })
}

fn no_crds(identity: &str) -> KubeOptions {
    KubeOptions {
        crds: false,
        ..opts(identity)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_and_slices_become_instances_with_health_zone_and_protocol() {
    let api = FakeApi::start().await;
    api.apply(SERVICES, service("shop", "pay", json!({})));
    api.apply(
        SLICES,
        slice(
            "shop",
            "pay-1",
            "pay",
            json!([{"addresses": ["10.0.0.1"], "zone": "z1", "conditions": {"ready": true}},
                   {"addresses": ["10.0.0.2"], "conditions": {"ready": true}}]),
        ),
    );
    let r = start(api.port, no_crds("a"));
    let hub = Arc::clone(&r.hub);
    until("pay.shop with two healthy instances", || {
        instances(&hub.current().registry, "pay.shop").is_some_and(|i| i.len() == 2)
    })
    .await;
    assert!(hub.is_ready());
    let reg = hub.current().registry;
    assert_eq!(reg.services["pay.shop"].protocol, Protocol::Grpc);
    assert_eq!(
        instances(&reg, "pay.shop").unwrap(),
        vec![
            ("10.0.0.1:9090".into(), Health::Healthy, Some("z1".into())),
            ("10.0.0.2:9090".into(), Health::Healthy, None),
        ]
    );

    // Not ready -> unhealthy; terminating but serving -> draining.
    api.apply(
        SLICES,
        slice(
            "shop",
            "pay-1",
            "pay",
            json!([{"addresses": ["10.0.0.1"], "zone": "z1", "conditions": {"ready": false}},
                   {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}}]),
        ),
    );
    until("unhealthy and draining", || {
        instances(&hub.current().registry, "pay.shop")
            == Some(vec![
                ("10.0.0.1:9090".into(), Health::Unhealthy, Some("z1".into())),
                ("10.0.0.2:9090".into(), Health::Draining, None),
            ])
    })
    .await;

    // The slice goes: its instances go; the Service stays, empty.
    api.delete(SLICES, "shop", "pay-1");
    until("no instances", || {
        instances(&hub.current().registry, "pay.shop") == Some(vec![])
    })
    .await;
    api.delete(SERVICES, "shop", "pay");
    until("service gone", || {
        !hub.current().registry.services.contains_key("pay.shop")
    })
    .await;
    assert!(r.metrics.events() >= 5, "{}", r.metrics.events());
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_and_label_selectors_decide_what_is_in_the_mesh() {
    let api = FakeApi::start().await;
    let eps = json!([{"addresses": ["10.0.0.1"]}]);
    api.apply(SERVICES, service("shop", "in", json!({"mesh": "on"})));
    api.apply(SERVICES, service("shop", "unlabelled", json!({})));
    api.apply(
        SERVICES,
        service("other", "elsewhere", json!({"mesh": "on"})),
    );
    api.apply(SLICES, slice("shop", "in-1", "in", eps.clone()));
    api.apply(
        SLICES,
        slice("shop", "unlabelled-1", "unlabelled", eps.clone()),
    );
    api.apply(
        SLICES,
        slice("other", "elsewhere-1", "elsewhere", eps.clone()),
    );
    let r = start(
        api.port,
        KubeOptions {
            namespaces: vec!["shop".into()],
            service_selector: Some("mesh=on".into()),
            ..no_crds("a")
        },
    );
    let hub = Arc::clone(&r.hub);
    until("synced", || hub.is_ready()).await;
    let names: Vec<String> = hub.current().registry.services.keys().cloned().collect();
    assert_eq!(names, vec!["in.shop".to_string()]);
    // The watches were namespaced, not cluster-wide and filtered here.
    assert!(
        api.log()
            .iter()
            .all(|l| !l.path.ends_with("/v1/services") && !l.path.ends_with("/v1/endpointslices")),
        "{:?}",
        api.log()
    );

    // Labelled into the mesh, and out of it.
    api.apply(
        SERVICES,
        service("shop", "unlabelled", json!({"mesh": "on"})),
    );
    api.apply(SERVICES, service("shop", "in", json!({"mesh": "off"})));
    until("selection follows labels", || {
        let reg = hub.current().registry;
        reg.services.keys().cloned().collect::<Vec<_>>() == vec!["unlabelled.shop".to_string()]
            && instances(&reg, "unlabelled.shop").is_some_and(|i| i.len() == 1)
    })
    .await;
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_410_relists_and_converges_without_duplicates_or_ghosts() {
    let api = FakeApi::start().await;
    api.apply(SERVICES, service("shop", "pay", json!({})));
    api.apply(SERVICES, service("shop", "old", json!({})));
    api.apply(
        SLICES,
        slice("shop", "pay-1", "pay", json!([{"addresses": ["10.0.0.1"]}])),
    );
    let r = start(api.port, no_crds("a"));
    let hub = Arc::clone(&r.hub);
    until("synced", || hub.is_ready()).await;
    let relists = r.metrics.relists();
    assert_eq!(relists, 2, "one list per watch at startup");
    until("watches open", || api.with(|s| s.watch_count()) == 2).await;

    // Changes the source cannot see as events: its watches are cut, history is compacted, so
    // resuming gets 410 Gone and only a relist can tell what happened.
    api.with(|s| {
        s.drop_watches();
        s.delete(SERVICES, "shop", "old");
        s.apply(
            SLICES,
            slice(
                "shop",
                "pay-1",
                "pay",
                json!([{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2"]}]),
            ),
        );
        s.apply(SERVICES, service("shop", "new", json!({})));
        s.compact();
    });
    until("converged after relist", || {
        let reg = hub.current().registry;
        reg.services.keys().cloned().collect::<Vec<_>>()
            == vec!["new.shop".to_string(), "pay.shop".to_string()]
            && instances(&reg, "pay.shop").is_some_and(|i| i.len() == 2)
    })
    .await;
    assert!(
        r.metrics.relists() >= relists + 2,
        "{}",
        r.metrics.relists()
    );
    assert!(api.with(|s| s.gone) >= 2, "both watches were told 410 Gone");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_advance_the_resume_version_without_events() {
    let api = FakeApi::start().await;
    api.apply(SERVICES, service("shop", "pay", json!({})));
    let r = start(api.port, no_crds("a"));
    let hub = Arc::clone(&r.hub);
    until("synced", || hub.is_ready()).await;
    until("watches open", || api.with(|s| s.watch_count()) == 2).await;
    // Every watch asked for bookmarks.
    assert!(
        api.log()
            .iter()
            .filter(|l| l.query.contains("watch="))
            .all(|l| l.query.contains("allowWatchBookmarks=true")),
        "{:?}",
        api.log()
    );
    // A change the Service watch does not see moves the global version past its own.
    api.apply(
        SLICES,
        slice("shop", "pay-1", "pay", json!([{"addresses": ["10.0.0.1"]}])),
    );
    until("slice seen", || {
        instances(&hub.current().registry, "pay.shop").is_some_and(|i| i.len() == 1)
    })
    .await;
    let (events, generation, relists) = (
        r.metrics.events(),
        hub.current().generation,
        r.metrics.relists(),
    );
    api.with(|s| s.bookmark());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(r.metrics.events(), events, "a bookmark is not an event");
    assert_eq!(hub.current().generation, generation);
    // Compact at the bookmark's version and reconnect: only a watch that took the bookmark's
    // version resumes without 410 (and so without a relist).
    api.with(|s| {
        s.compact();
        s.drop_watches();
    });
    until("watches reopened", || api.with(|s| s.watch_count()) == 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(r.metrics.relists(), relists, "resumed without a relist");
    assert_eq!(api.with(|s| s.gone), 0);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_only_after_every_initial_list_and_last_state_survives_outages() {
    let api = FakeApi::start().await;
    api.apply(SERVICES, service("shop", "pay", json!({})));
    api.apply(
        SLICES,
        slice("shop", "pay-1", "pay", json!([{"addresses": ["10.0.0.1"]}])),
    );
    api.with(|s| s.failing = true);
    let r = start(api.port, no_crds("a"));
    let hub = Arc::clone(&r.hub);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!hub.is_ready(), "ready before any list succeeded");
    api.with(|s| s.failing = false);
    until("ready", || hub.is_ready()).await;
    assert_eq!(
        instances(&hub.current().registry, "pay.shop")
            .unwrap()
            .len(),
        1
    );
    // The API server goes away: the last known state keeps serving.
    api.with(|s| {
        s.failing = true;
        s.drop_watches();
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        instances(&hub.current().registry, "pay.shop")
            .unwrap()
            .len(),
        1
    );
    api.with(|s| s.failing = false);
    api.apply(
        SLICES,
        slice(
            "shop",
            "pay-1",
            "pay",
            json!([{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.3"]}]),
        ),
    );
    until("recovered", || {
        instances(&hub.current().registry, "pay.shop").is_some_and(|i| i.len() == 2)
    })
    .await;
    r.stop().await;
}

fn route(name: &str, spec: Value) -> Value {
    json!({"metadata": {"name": name, "namespace": "shop"}, "spec": spec})
}

fn condition(obj: &Value, type_: &str) -> Option<Value> {
    obj.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

fn cond_status(api: &FakeApi, coll: &str, name: &str, type_: &str) -> Option<String> {
    let o = api.get(coll, "shop", name)?;
    condition(&o, type_).and_then(|c| c["status"].as_str().map(String::from))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crds_apply_when_valid_and_report_status_with_the_field_when_not() {
    let api = FakeApi::start().await;
    api.apply(SERVICES, service("shop", "pay", json!({})));
    api.apply(
        ROUTES,
        route(
            "good",
            json!({"service": "pay.shop", "rules": [{"match": {"path_prefix": "/v2"}, "timeout": "2s"}]}),
        ),
    );
    api.apply(
        ROUTES,
        route(
            "bad",
            json!({"service": "pay.shop", "rules": [{"backends": [{"service": "pay.shop", "weight": 0}]}]}),
        ),
    );
    api.apply(
        ROUTES,
        route(
            "dangling",
            json!({"service": "pay.shop", "rules": [{"backends": [{"service": "nowhere.shop"}]}]}),
        ),
    );
    api.apply(
        POLICIES,
        route("pay", json!({"service": "pay.shop", "lb": "least_request"})),
    );
    let r = start(api.port, opts("a"));
    let hub = Arc::clone(&r.hub);
    until("synced", || hub.is_ready()).await;
    let reg = hub.current().registry;
    assert!(reg.routes.contains_key("shop.good"), "{:?}", reg.routes);
    assert!(reg.routes.contains_key("shop.dangling"));
    assert!(
        !reg.routes.contains_key("shop.bad"),
        "invalid route applied"
    );
    assert!(reg.policies.contains_key("shop.pay"));
    let src = &hub.sources()[0];
    let err = &src.errors["TrafficRoute/shop/bad"];
    assert!(err.contains("spec.rules[0].backends[0].weight"), "{err}");
    assert!(r.metrics.invalid_objects() >= 1);

    until("statuses written", || {
        cond_status(&api, ROUTES, "good", "Accepted").as_deref() == Some("True")
            && cond_status(&api, ROUTES, "bad", "Accepted").as_deref() == Some("False")
            && cond_status(&api, ROUTES, "dangling", "ResolvedRefs").as_deref() == Some("False")
            && cond_status(&api, POLICIES, "pay", "Accepted").as_deref() == Some("True")
    })
    .await;
    let good = api.get(ROUTES, "shop", "good").unwrap();
    assert_eq!(good["status"]["observedGeneration"], 1);
    assert_eq!(condition(&good, "ResolvedRefs").unwrap()["status"], "True");
    let bad = condition(&api.get(ROUTES, "shop", "bad").unwrap(), "Accepted").unwrap();
    assert_eq!(bad["reason"], "Invalid");
    assert!(
        bad["message"]
            .as_str()
            .unwrap()
            .contains("spec.rules[0].backends[0].weight"),
        "{bad}"
    );
    let dangling = condition(
        &api.get(ROUTES, "shop", "dangling").unwrap(),
        "ResolvedRefs",
    )
    .unwrap();
    assert_eq!(dangling["reason"], "BackendNotFound");
    assert!(
        dangling["message"]
            .as_str()
            .unwrap()
            .contains("nowhere.shop")
    );

    // The missing backend appears: ResolvedRefs turns True. Fixing the bad route applies it.
    api.apply(SERVICES, service("shop", "nowhere", json!({})));
    api.apply(
        ROUTES,
        route(
            "bad",
            json!({"service": "pay.shop", "rules": [{"backends": [{"service": "pay.shop", "weight": 1}]}]}),
        ),
    );
    until("resolved and fixed", || {
        cond_status(&api, ROUTES, "dangling", "ResolvedRefs").as_deref() == Some("True")
            && cond_status(&api, ROUTES, "bad", "Accepted").as_deref() == Some("True")
            && hub.current().registry.routes.contains_key("shop.bad")
    })
    .await;
    let fixed = api.get(ROUTES, "shop", "bad").unwrap();
    assert_eq!(fixed["status"]["observedGeneration"], 2);
    assert!(hub.sources()[0].errors.is_empty());

    // Settled: no further status writes (nothing is rewritten when nothing changed).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes = r.metrics.status_writes();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(r.metrics.status_writes(), writes);
    r.stop().await;
}

fn status_patch_ports(api: &FakeApi) -> Vec<u16> {
    api.log()
        .iter()
        .filter(|l| l.method == "PATCH" && l.path.ends_with("/status"))
        .map(|l| l.port)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_writes_status_and_another_takes_over_after_expiry() {
    let mut api = FakeApi::start().await;
    let port_a = api.port;
    let port_b = api.listen().await;
    api.apply(SERVICES, service("shop", "pay", json!({})));
    api.apply(
        ROUTES,
        route("r1", json!({"service": "pay.shop", "rules": [{}]})),
    );
    let a = start(port_a, opts("replica-a"));
    until("a leads", || a.metrics.leader()).await;
    let b = start(port_b, opts("replica-b"));
    until("b synced", || b.hub.is_ready()).await;
    until("r1 accepted", || {
        cond_status(&api, ROUTES, "r1", "Accepted").as_deref() == Some("True")
    })
    .await;
    api.apply(
        ROUTES,
        route("r2", json!({"service": "pay.shop", "rules": [{}]})),
    );
    until("r2 accepted", || {
        cond_status(&api, ROUTES, "r2", "Accepted").as_deref() == Some("True")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!b.metrics.leader());
    let ports = status_patch_ports(&api);
    assert!(!ports.is_empty());
    assert!(ports.iter().all(|p| *p == port_a), "{ports:?}");
    let lease = api
        .get(LEASES, "weft-system", "weft-control-plane")
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "replica-a");

    // The holder dies without releasing: b waits out the lease, then takes over and writes.
    let died = Instant::now();
    a.task.abort();
    drop(a);
    until("b leads", || b.metrics.leader()).await;
    assert!(
        died.elapsed() >= Duration::from_millis(1500),
        "took over before the lease could expire: {:?}",
        died.elapsed()
    );
    api.apply(
        ROUTES,
        route("r3", json!({"service": "pay.shop", "rules": [{}]})),
    );
    until("r3 accepted by b", || {
        cond_status(&api, ROUTES, "r3", "Accepted").as_deref() == Some("True")
    })
    .await;
    assert_eq!(status_patch_ports(&api).last(), Some(&port_b));
    let lease = api
        .get(LEASES, "weft-system", "weft-control-plane")
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "replica-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);

    // A graceful stop releases the lease at once.
    b.stop().await;
    let lease = api
        .get(LEASES, "weft-system", "weft-control-plane")
        .unwrap();
    assert!(lease["spec"]["holderIdentity"].is_null(), "{lease}");
}
