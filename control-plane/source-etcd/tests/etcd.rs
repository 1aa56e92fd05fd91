//! The etcd source against a real etcd (Debian's etcd-server): sync, restarts, wipes,
//! compaction, bulk loads and malformed values.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions, Txn, TxnOp};
use tokio::sync::oneshot;
use weft_etcd_support::{Etcd, Proxy, eventually};
use weft_registry::{Hub, Protocol};
use weft_source_etcd::{EtcdMetrics, EtcdOptions, EtcdSource};

const WAIT: Duration = Duration::from_secs(20);

struct Running {
    hub: Arc<Hub>,
    metrics: EtcdMetrics,
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

fn opts(endpoint: String) -> EtcdOptions {
    EtcdOptions {
        endpoints: vec![endpoint],
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        stall_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        ..EtcdOptions::default()
    }
}

fn start(opts: EtcdOptions) -> Running {
    let hub = Hub::new();
    let handle = hub.add_source("etcd");
    assert!(!hub.is_ready(), "ready before the first sync");
    let src = EtcdSource::new(opts, handle);
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

fn endpoint_json(i: usize) -> String {
    format!(
        r#"{{"address":"10.{}.{}.{}","port":8080}}"#,
        (i >> 16) & 255,
        (i >> 8) & 255,
        i & 255
    )
}

/// (service, id) -> address of every instance in the registry.
fn registry_instances(hub: &Hub) -> BTreeMap<(String, String), String> {
    let snap = hub.current();
    let mut out = BTreeMap::new();
    for svc in snap.registry.services.values() {
        for i in &svc.instances {
            out.insert((svc.name.clone(), i.id.clone()), i.endpoint.address.clone());
        }
    }
    out
}

/// The same, read from etcd directly.
async fn etcd_instances(c: &mut Client) -> BTreeMap<(String, String), String> {
    let resp = c
        .get("/weft/services/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for kv in resp.kvs() {
        let key = kv.key_str().unwrap();
        let parts: Vec<&str> = key.split('/').collect();
        let v: serde_json::Value = serde_json::from_slice(kv.value()).unwrap();
        out.insert(
            (parts[3].to_string(), parts[4].to_string()),
            v["address"].as_str().unwrap().to_string(),
        );
    }
    out
}

fn has(hub: &Hub, service: &str, id: &str) -> bool {
    registry_instances(hub).contains_key(&(service.to_string(), id.to_string()))
}

/// Retries `op` (with a fresh client after a failure) until it succeeds: etcd may be down.
async fn retry_put(c: &mut Client, endpoint: &str, key: String, value: String) {
    loop {
        let r = tokio::time::timeout(
            Duration::from_secs(1),
            c.put(key.clone(), value.clone(), None),
        )
        .await;
        if matches!(r, Ok(Ok(_))) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Ok(Ok(nc)) =
            tokio::time::timeout(Duration::from_secs(1), Client::connect([endpoint], None)).await
        {
            *c = nc;
        }
    }
}

async fn retry_delete(c: &mut Client, endpoint: &str, key: String) {
    loop {
        let r = tokio::time::timeout(Duration::from_secs(1), c.delete(key.clone(), None)).await;
        if matches!(r, Ok(Ok(_))) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Ok(Ok(nc)) =
            tokio::time::timeout(Duration::from_secs(1), Client::connect([endpoint], None)).await
        {
            *c = nc;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_delete_and_lease_expiry_are_reflected_and_ready_only_after_sync() {
    let etcd = Etcd::start().await;
    let proxy = Proxy::start(etcd.client_port()).await;
    let mut c = etcd.client().await;
    c.put("/weft/services/echo/i1", endpoint_json(1), None)
        .await
        .unwrap();
    c.put("/weft/service-config/echo", r#"{"protocol":"grpc"}"#, None)
        .await
        .unwrap();

    // With etcd unreachable the source cannot sync, so the hub must not be ready.
    proxy.cut();
    let run = start(opts(proxy.endpoint()));
    eventually(WAIT, "a failed connection attempt", || {
        run.metrics.reconnects() >= 1
    })
    .await;
    assert!(!run.hub.is_ready());
    assert!(run.hub.current().registry.services.is_empty());

    proxy.open();
    eventually(WAIT, "first sync", || run.hub.is_ready()).await;
    // The first sync delivers the whole list at once.
    assert!(has(&run.hub, "echo", "i1"));
    assert_eq!(
        run.hub.current().registry.services["echo"].protocol,
        Protocol::Grpc
    );
    assert_eq!(run.hub.sources()[0].info["endpoints"], proxy.endpoint());

    c.put("/weft/services/echo/i2", endpoint_json(2), None)
        .await
        .unwrap();
    eventually(WAIT, "i2 put", || has(&run.hub, "echo", "i2")).await;
    c.delete("/weft/services/echo/i1", None).await.unwrap();
    eventually(WAIT, "i1 deleted", || !has(&run.hub, "echo", "i1")).await;
    assert!(has(&run.hub, "echo", "i2"));

    let lease = c.lease_grant(2, None).await.unwrap().id();
    c.put(
        "/weft/services/echo/leased",
        endpoint_json(3),
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    eventually(WAIT, "leased instance put", || {
        has(&run.hub, "echo", "leased")
    })
    .await;
    eventually(WAIT, "leased instance expired", || {
        !has(&run.hub, "echo", "leased")
    })
    .await;
    assert!(has(&run.hub, "echo", "i2"));
    let rev = c
        .get("/x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    eventually(WAIT, "revision metric catches up", || {
        run.metrics.revision() >= rev
    })
    .await;
    assert!(run.metrics.connected());
    assert_eq!(
        run.hub.sources()[0].info["revision"],
        run.metrics.revision().to_string()
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_under_writes_loses_nothing() {
    let mut etcd = Etcd::start().await;
    let endpoint = etcd.endpoint();
    let run = start(opts(endpoint.clone()));
    eventually(WAIT, "first sync", || run.hub.is_ready()).await;

    let progress = Arc::new(AtomicUsize::new(0));
    let writer = {
        let progress = progress.clone();
        let endpoint = endpoint.clone();
        let mut c = etcd.client().await;
        tokio::spawn(async move {
            for i in 0..240usize {
                retry_put(
                    &mut c,
                    &endpoint,
                    format!("/weft/services/w/i{i}"),
                    endpoint_json(i),
                )
                .await;
                // Every third write also deletes an earlier key, so ghosts would show.
                if i % 3 == 2 {
                    retry_delete(&mut c, &endpoint, format!("/weft/services/w/i{}", i - 2)).await;
                }
                progress.store(i + 1, Ordering::SeqCst);
            }
        })
    };
    eventually(WAIT, "writer progress before kill", || {
        progress.load(Ordering::SeqCst) >= 60
    })
    .await;
    etcd.kill();
    eventually(WAIT, "the source notices the kill", || {
        !run.metrics.connected() && run.metrics.reconnects() >= 1
    })
    .await;
    etcd.restart().await;
    tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("writer finished")
        .unwrap();

    let mut c = etcd.client().await;
    let want = etcd_instances(&mut c).await;
    assert_eq!(want.len(), 160, "240 puts minus 80 deletes");
    eventually(WAIT, "registry equals etcd after restart", || {
        registry_instances(&run.hub) == want
    })
    .await;
    assert!(run.metrics.reconnects() >= 1);
    // The data survived, so the watch resumed without a relist.
    assert_eq!(run.metrics.relists(), 1);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_etcd_with_lower_revision_is_relisted() {
    let mut etcd = Etcd::start().await;
    let proxy = Proxy::start(etcd.client_port()).await;
    let mut c = etcd.client().await;
    for i in 0..30 {
        c.put(format!("/weft/services/old/i{i}"), endpoint_json(i), None)
            .await
            .unwrap();
    }
    let run = start(opts(proxy.endpoint()));
    eventually(WAIT, "first sync", || {
        registry_instances(&run.hub).len() == 30
    })
    .await;
    let old_rev = run.metrics.revision();
    assert!(old_rev >= 31);

    proxy.cut();
    etcd.wipe();
    etcd.restart().await;
    let mut c = etcd.client().await;
    for i in 0..3 {
        c.put(
            format!("/weft/services/new/n{i}"),
            endpoint_json(100 + i),
            None,
        )
        .await
        .unwrap();
    }
    let want = etcd_instances(&mut c).await;
    assert_eq!(want.len(), 3);
    proxy.open();
    eventually(WAIT, "registry equals the new etcd", || {
        registry_instances(&run.hub) == want
    })
    .await;
    assert!(run.metrics.relists() >= 2);
    assert!(run.metrics.revision() < old_rev);

    // And it keeps watching the new etcd.
    c.put("/weft/services/new/n9", endpoint_json(109), None)
        .await
        .unwrap();
    eventually(WAIT, "watch on the new etcd", || has(&run.hub, "new", "n9")).await;
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_while_disconnected_forces_a_relist() {
    let etcd = Etcd::start().await;
    let proxy = Proxy::start(etcd.client_port()).await;
    let mut c = etcd.client().await;
    for i in 0..10 {
        c.put(format!("/weft/services/s/i{i}"), endpoint_json(i), None)
            .await
            .unwrap();
    }
    let run = start(opts(proxy.endpoint()));
    eventually(WAIT, "first sync", || {
        registry_instances(&run.hub).len() == 10
    })
    .await;
    eventually(WAIT, "watch established", || run.metrics.connected()).await;

    proxy.cut();
    eventually(WAIT, "source lost its watch", || !run.metrics.connected()).await;
    for i in 0..5 {
        c.delete(format!("/weft/services/s/i{i}"), None)
            .await
            .unwrap();
    }
    for i in 20..23 {
        c.put(format!("/weft/services/s/i{i}"), endpoint_json(i), None)
            .await
            .unwrap();
    }
    let rev = c
        .get("/x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    c.compact(rev, None).await.unwrap();
    let want = etcd_instances(&mut c).await;
    assert_eq!(want.len(), 8);

    proxy.open();
    eventually(WAIT, "registry equals etcd after compaction", || {
        registry_instances(&run.hub) == want
    })
    .await;
    assert!(!has(&run.hub, "s", "i0"));
    assert!(run.metrics.relists() >= 2, "compaction must relist");
    run.stop().await;
}

async fn bulk_put(c: &mut Client, from: usize, to: usize) {
    let ops: Vec<TxnOp> = (from..to)
        .map(|i| TxnOp::put(format!("/weft/services/bulk/b{i}"), endpoint_json(i), None))
        .collect();
    for chunk in ops.chunks(100) {
        c.txn(Txn::new().and_then(chunk.to_vec())).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_instances_before_and_during_run() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    bulk_put(&mut c, 0, 1000).await;
    let run = start(opts(etcd.endpoint()));
    eventually(WAIT, "1000 listed", || run.hub.is_ready()).await;
    assert_eq!(registry_instances(&run.hub).len(), 1000);
    bulk_put(&mut c, 1000, 2000).await;
    eventually(WAIT, "2000 present", || {
        registry_instances(&run.hub).len() == 2000
    })
    .await;
    assert_eq!(registry_instances(&run.hub), etcd_instances(&mut c).await);
    assert!(run.metrics.events_applied() >= 1000);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_values_are_skipped_reported_and_fixable() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let ep = |extra: &str| format!(r#"{{"address":"10.0.0.1","port":80{extra}}}"#);
    // (key, value, a word the reason must contain)
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "/weft/services/bad/notjson",
            b"{\"address\": ".to_vec(),
            "parsing",
        ),
        (
            "/weft/services/bad/wrongtype",
            br#"{"address":"10.0.0.1","port":"eighty"}"#.to_vec(),
            "port",
        ),
        (
            "/weft/services/bad/port0",
            br#"{"address":"10.0.0.1","port":0}"#.to_vec(),
            "port",
        ),
        (
            "/weft/services/bad/port70000",
            br#"{"address":"10.0.0.1","port":70000}"#.to_vec(),
            "port",
        ),
        (
            "/weft/services/bad/wneg",
            ep(r#","weight":-1"#).into_bytes(),
            "weight",
        ),
        (
            "/weft/services/bad/whuge",
            ep(r#","weight":1000000000"#).into_bytes(),
            "weight",
        ),
        (
            "/weft/services/bad/nonutf8",
            b"\xff\xfe\x00garbage".to_vec(),
            "UTF-8",
        ),
        ("/weft/services/bad/oversized", vec![b' '; 2 << 20], "limit"),
        (
            "/weft/services/bad/unknownfield",
            ep(r#","colour":"red""#).into_bytes(),
            "colour",
        ),
        ("/weft/whatever/x", b"{}".to_vec(), "unknown key shape"),
        (
            "/weft/services/only-service",
            ep("").into_bytes(),
            "unknown key shape",
        ),
        (
            "/weft/routes/r1",
            br#"{"name":"r2","service":"good","rules":[{}]}"#.to_vec(),
            "differs",
        ),
        (
            "/weft/service-config/good",
            br#"{"protocol":"smtp"}"#.to_vec(),
            "protocol",
        ),
    ];
    // Half are there before the list, half arrive through the watch: both paths must check.
    let (before, after) = bad.split_at(bad.len() / 2);
    for (k, v, _) in before {
        c.put(*k, v.clone(), None).await.unwrap();
    }
    c.put("/weft/services/good/g1", endpoint_json(1), None)
        .await
        .unwrap();
    let run = start(opts(etcd.endpoint()));
    eventually(WAIT, "first sync", || run.hub.is_ready()).await;
    for (k, v, _) in after {
        c.put(*k, v.clone(), None).await.unwrap();
    }
    c.put("/weft/services/good/g2", endpoint_json(2), None)
        .await
        .unwrap();
    eventually(WAIT, "valid keys beside the bad ones", || {
        has(&run.hub, "good", "g2")
    })
    .await;
    eventually(WAIT, "every bad key reported", || {
        run.hub.sources()[0].errors.len() == bad.len()
    })
    .await;
    let status = run.hub.sources()[0].clone();
    for (k, _, word) in &bad {
        let reason = status
            .errors
            .get(*k)
            .unwrap_or_else(|| panic!("{k} not reported: {:?}", status.errors));
        assert!(!reason.is_empty(), "{k}: empty reason");
        assert!(
            reason.contains(word),
            "{k}: reason {reason:?} lacks {word:?}"
        );
    }
    assert_eq!(run.metrics.invalid_values(), bad.len() as u64);
    let inst = registry_instances(&run.hub);
    assert_eq!(inst.len(), 2, "only the valid instances: {inst:?}");
    assert!(run.hub.current().registry.routes.is_empty());
    assert_eq!(
        run.hub.current().registry.services["good"].protocol,
        Protocol::Http
    );

    // A valid write fixes a key; a delete clears an invalid key's error.
    c.put("/weft/services/bad/port0", endpoint_json(7), None)
        .await
        .unwrap();
    c.delete("/weft/whatever/x", None).await.unwrap();
    eventually(WAIT, "fixed key applied", || has(&run.hub, "bad", "port0")).await;
    eventually(WAIT, "errors cleared", || {
        let e = &run.hub.sources()[0].errors;
        !e.contains_key("/weft/services/bad/port0") && !e.contains_key("/weft/whatever/x")
    })
    .await;

    // A valid key turned invalid is removed, not kept serving its old value.
    c.put("/weft/services/good/g1", br#"{"port":1}"#.to_vec(), None)
        .await
        .unwrap();
    eventually(WAIT, "valid-then-invalid key removed", || {
        !has(&run.hub, "good", "g1")
    })
    .await;
    assert!(
        run.hub.sources()[0]
            .errors
            .contains_key("/weft/services/good/g1")
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_watch_stays_up_and_a_stalled_one_is_torn_down() {
    let etcd = Etcd::start().await;
    let proxy = Proxy::start(etcd.client_port()).await;
    let mut c = etcd.client().await;
    c.put("/weft/services/s/a", endpoint_json(1), None)
        .await
        .unwrap();
    let run = start(opts(proxy.endpoint()));
    eventually(WAIT, "first sync", || run.hub.is_ready()).await;
    eventually(WAIT, "watch established", || run.metrics.connected()).await;

    // Idle for more than stall_timeout (2s): progress responses must keep the watch alive.
    // This waits on purpose: the claim is that nothing happens during the interval.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        run.metrics.reconnects(),
        0,
        "idle watch torn down as stalled"
    );
    assert!(run.metrics.connected());

    // A path that silently drops everything: the source must notice and, once the path
    // works again, catch up on what it missed.
    proxy.freeze();
    c.put("/weft/services/s/b", endpoint_json(2), None)
        .await
        .unwrap();
    eventually(WAIT, "stall detected", || run.metrics.reconnects() >= 1).await;
    assert!(!has(&run.hub, "s", "b"));
    assert!(has(&run.hub, "s", "a"), "last known state keeps serving");
    proxy.open();
    eventually(WAIT, "caught up after the stall", || {
        has(&run.hub, "s", "b")
    })
    .await;
    run.stop().await;
}
