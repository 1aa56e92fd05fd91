//! etcd as a source, end to end: a real etcd, the real binary, and an xDS client. Instances
//! put, deleted and expired in etcd reach the client; put -> client ACK latency is measured
//! and printed (a measurement, not an assertion: timings belong in benchmarks).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::time::{Duration, Instant};

use common::{Cp, EdsWatch};
use etcd_client::PutOptions;
use weft_etcd_support::{Certs, Etcd};

fn ep(port: u16) -> String {
    format!(r#"{{"address":"127.0.0.1","port":{port}}}"#)
}

#[tokio::test]
async fn etcd_instances_reach_an_xds_client_and_leases_expire() {
    let etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    kv.put("/weft/services/pay/a", ep(7001), None)
        .await
        .unwrap();
    let cp = Cp::start("etcd-e2e", None, &["--etcd-endpoints", &etcd.endpoint()]).await;
    let mut eds = EdsWatch::open(&cp, "pay").await;
    eds.until(&["127.0.0.1:7001"]).await;

    // An instance on a 2 s lease that nobody keeps alive: present, then gone.
    let lease = kv.lease_grant(2, None).await.unwrap().id();
    kv.put(
        "/weft/services/pay/b",
        ep(7002),
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    eds.until(&["127.0.0.1:7001", "127.0.0.1:7002"]).await;
    eds.until(&["127.0.0.1:7001"]).await;

    // A bad value is skipped and shown; the good one beside it keeps working.
    kv.put(
        "/weft/services/pay/c",
        r#"{"address":"127.0.0.1","port":0}"#,
        None,
    )
    .await
    .unwrap();
    kv.put("/weft/services/pay/d", ep(7004), None)
        .await
        .unwrap();
    eds.until(&["127.0.0.1:7001", "127.0.0.1:7004"]).await;
    let sources = cp.json("/debug/sources").await;
    let etcd_src = sources["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "etcd")
        .unwrap()
        .clone();
    let err = etcd_src["errors"]["/weft/services/pay/c"]
        .as_str()
        .unwrap_or_default();
    assert!(err.contains("port"), "{etcd_src}");

    kv.delete("/weft/services/pay/a", None).await.unwrap();
    eds.until(&["127.0.0.1:7004"]).await;
}

#[tokio::test]
async fn xds_waits_for_etcds_first_sync() {
    let mut etcd = Etcd::stopped();
    let cp = Cp::spawn("etcd-late", None, &["--etcd-endpoints", &etcd.endpoint()]);
    // etcd is down: admin answers, readiness says no, and xDS serves nothing partial.
    let deadline = Instant::now() + Duration::from_secs(10);
    while cp.get("/healthz").await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "admin never came up: {}",
            cp.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(cp.get("/readyz").await.0, 503);
    // A client that connects now waits: nothing answers until the registry is whole.
    let early = tokio::spawn(early_client(cp.url()));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !early.is_finished(),
        "xDS answered before etcd's first sync"
    );
    assert_eq!(cp.get("/readyz").await.0, 503);
    etcd.restart().await;
    etcd.client()
        .await
        .put("/weft/services/pay/a", ep(7001), None)
        .await
        .unwrap();
    cp.wait_ready().await;
    // The client that connected early is answered once the registry is whole.
    tokio::time::timeout(Duration::from_secs(20), early)
        .await
        .expect("the early client got config after the first sync")
        .unwrap();
}

async fn early_client(url: String) {
    let mut w = EdsWatch::open_url(url, "pay").await;
    w.until(&["127.0.0.1:7001"]).await;
}

#[tokio::test]
async fn put_to_ack_is_measured() {
    let etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    kv.put("/weft/services/lat/base", ep(9000), None)
        .await
        .unwrap();
    let cp = Cp::start(
        "etcd-latency",
        None,
        &["--etcd-endpoints", &etcd.endpoint()],
    )
    .await;
    let mut eds = EdsWatch::open(&cp, "lat").await;
    eds.until(&["127.0.0.1:9000"]).await;
    // Each put changes the one instance's port; time until the client holds (and ACKs) it.
    let mut samples = Vec::new();
    for i in 0..200u16 {
        let port = 10_000 + i;
        let want = vec![format!("127.0.0.1:{port}")];
        let t0 = Instant::now();
        kv.put("/weft/services/lat/base", ep(port), None)
            .await
            .unwrap();
        loop {
            match eds.next(Duration::from_secs(10)).await {
                None => panic!("put {i} never reached the client"),
                Some(Some(eps)) if eps == want => break,
                Some(_) => {}
            }
        }
        samples.push(t0.elapsed());
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    println!(
        "etcd put -> xDS client ACK over {} puts (debounce 10ms, as every test here runs): median {:?}, p99 {:?}, max {:?}",
        samples.len(),
        pct(0.5),
        pct(0.99),
        samples[samples.len() - 1]
    );
}

#[tokio::test]
async fn etcd_over_mutual_tls() {
    let certs = Certs::make("mtls");
    let etcd = Etcd::start_mtls(&certs).await;
    etcd.client()
        .await
        .put("/weft/services/pay/a", ep(7001), None)
        .await
        .unwrap();
    let (ca, cert, key) = (
        certs.ca.display().to_string(),
        certs.client.0.display().to_string(),
        certs.client.1.display().to_string(),
    );
    let cp = Cp::start(
        "etcd-mtls",
        None,
        &[
            "--etcd-endpoints",
            &etcd.endpoint(),
            "--etcd-ca",
            &ca,
            "--etcd-cert",
            &cert,
            "--etcd-key",
            &key,
        ],
    )
    .await;
    let mut eds = EdsWatch::open(&cp, "pay").await;
    eds.until(&["127.0.0.1:7001"]).await;

    // Without a client certificate, etcd refuses us: never ready, nothing served.
    let no_cert = Cp::spawn(
        "etcd-no-cert",
        None,
        &["--etcd-endpoints", &etcd.endpoint(), "--etcd-ca", &ca],
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(no_cert.get("/readyz").await.0, 503, "{}", no_cert.log());
}

#[tokio::test]
async fn half_configured_tls_is_refused_at_startup() {
    let certs = Certs::make("half");
    let ca = certs.ca.display().to_string();
    let mut cp = Cp::spawn(
        "etcd-half-tls",
        None,
        &["--etcd-endpoints", "http://127.0.0.1:1", "--etcd-ca", &ca],
    );
    let status = tokio::task::spawn_blocking(move || {
        let s = cp.child.wait().unwrap();
        (s, cp.log())
    })
    .await
    .unwrap();
    assert_eq!(status.0.code(), Some(64), "{}", status.1);
    assert!(status.1.contains("https://"), "{}", status.1);
}
