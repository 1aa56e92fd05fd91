//! The binary as a user runs it, with a tonic xDS client standing in for a proxy: the
//! registration API feeding xDS, a bad hot reload that keeps the last good config, and
//! SIGTERM draining streams. (Real Envoy and gRPC clients are driven in `tests/`.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Cp, EDS, EdsWatch};
use weft_proto::registry::v1::registration_client::RegistrationClient;
use weft_proto::registry::v1::{DeregisterRequest, Endpoint, HeartbeatRequest, RegisterRequest};

fn endpoint(port: u32) -> Option<Endpoint> {
    Some(Endpoint {
        address: "127.0.0.1".into(),
        port,
        ..Default::default()
    })
}

#[tokio::test]
async fn registration_api_feeds_xds_and_a_lease_expires_without_heartbeats() {
    let cp = Cp::start("registration", None, &[]).await;
    let mut eds = EdsWatch::open(&cp, "pay").await;
    let mut reg = RegistrationClient::connect(cp.url()).await.unwrap();
    let a = reg
        .register(RegisterRequest {
            service: "pay".into(),
            instance_id: "a".into(),
            endpoint: endpoint(7001),
            ttl_seconds: 1,
            protocol: "http".into(),
        })
        .await
        .unwrap()
        .into_inner();
    reg.register(RegisterRequest {
        service: "pay".into(),
        instance_id: "b".into(),
        endpoint: endpoint(7002),
        ttl_seconds: 30,
        protocol: String::new(),
    })
    .await
    .unwrap();
    // A third instance keeps the service alive to the end: when a service's last instance
    // goes, the service itself goes, and clients learn that from CDS, not EDS.
    reg.register(RegisterRequest {
        service: "pay".into(),
        instance_id: "c".into(),
        endpoint: endpoint(7003),
        ttl_seconds: 30,
        protocol: String::new(),
    })
    .await
    .unwrap();
    eds.until(&["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"])
        .await;
    // `a` stops heartbeating: its 1s lease runs out and it leaves EDS; the others stay.
    assert_eq!(a.ttl_seconds, 1);
    eds.until(&["127.0.0.1:7002", "127.0.0.1:7003"]).await;
    // A heartbeat for the expired instance says so, so the workload knows to re-register.
    let err = reg
        .heartbeat(HeartbeatRequest {
            service: "pay".into(),
            instance_id: "a".into(),
            health: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    reg.deregister(DeregisterRequest {
        service: "pay".into(),
        instance_id: "b".into(),
    })
    .await
    .unwrap();
    eds.until(&["127.0.0.1:7003"]).await;
    let regs = cp.json("/debug/registrations").await;
    assert_eq!(
        regs["instances"].as_array().map(Vec::len),
        Some(1),
        "{regs}"
    );
}

#[tokio::test]
async fn bad_hot_reload_keeps_the_last_good_config_and_reports_the_error() {
    let good = "services: [{name: web, endpoints: [{address: 127.0.0.1, port: 8001}]}]\n";
    let cp = Cp::start("reload", Some(good), &[]).await;
    let mut eds = EdsWatch::open(&cp, "web").await;
    eds.until(&["127.0.0.1:8001"]).await;

    cp.write_registry("services: [{name: web, endpoints: [{address: 127.0.0.1, port: 70000}]}]\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    let file = cp.registry_path().display().to_string();
    loop {
        let sources = cp.json("/debug/sources").await;
        let errors = &sources["sources"][0]["errors"];
        if let Some(msg) = errors.get(&file).and_then(|m| m.as_str()) {
            assert!(msg.contains("services[0].endpoints[0].port"), "{msg}");
            break;
        }
        assert!(Instant::now() < deadline, "error never reported: {sources}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = cp.get("/metrics").await.1;
    assert!(
        metrics.contains("weft_file_reload_errors_total 1"),
        "reload error not counted:\n{metrics}"
    );
    assert_eq!(
        cp.get("/readyz").await.0,
        200,
        "a bad reload must not make us unready"
    );
    // The last good endpoint is still what xDS serves: a fresh client gets it.
    let mut fresh = EdsWatch::open(&cp, "web").await;
    fresh.until(&["127.0.0.1:8001"]).await;

    cp.write_registry("services: [{name: web, endpoints: [{address: 127.0.0.1, port: 8002}]}]\n");
    eds.until(&["127.0.0.1:8002"]).await;
    let sources = cp.json("/debug/sources").await;
    assert_eq!(sources["sources"][0]["errors"], serde_json::json!({}));
}

/// `--log-format json`: what a log pipeline (Loki, Elasticsearch, Cloud Logging) ingests
/// without a parser: one JSON object per line, and a rejected file's error carries the file
/// and the reason as fields, not only inside the message.
#[tokio::test]
async fn json_logs_are_one_object_per_line_with_the_rejection_as_fields() {
    let good = "services: [{name: web, endpoints: [{address: 127.0.0.1, port: 8001}]}]\n";
    let cp = Cp::start("jsonlog", Some(good), &["--log-format", "json"]).await;
    cp.write_registry("services: [{name: web, endpoints: [{address: 127.0.0.1, port: 70000}]}]\n");
    let file = cp.registry_path().display().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let rejected = loop {
        let log = cp.log();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
            .collect();
        for l in &lines {
            assert!(
                l["timestamp"].is_string() && l["level"].is_string() && l["target"].is_string(),
                "a line without timestamp, level or target: {l}"
            );
            assert!(l["fields"]["message"].is_string(), "no message: {l}");
        }
        if let Some(l) = lines.iter().find(|l| {
            l["fields"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("rejected")
        }) {
            break l.clone();
        }
        assert!(Instant::now() < deadline, "no rejection logged:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(rejected["level"], "ERROR", "{rejected}");
    assert_eq!(rejected["fields"]["file"], file.as_str(), "{rejected}");
    let reason = rejected["fields"]["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("services[0].endpoints[0].port"),
        "{rejected}"
    );
}

#[tokio::test]
async fn sigterm_drains_open_streams_and_exits() {
    let good = "services: [{name: web, endpoints: [{address: 127.0.0.1, port: 8001}]}]\n";
    let mut cp = Cp::start("drain", Some(good), &["--shutdown-grace", "5s"]).await;
    let mut eds = EdsWatch::open(&cp, "web").await;
    eds.until(&["127.0.0.1:8001"]).await;
    let status = Command::new("kill")
        .args(["-TERM", &cp.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let err = tokio::time::timeout(Duration::from_secs(5), eds.rx.message())
        .await
        .expect("stream ended within the grace period")
        .expect_err("stream ends with a status");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let started = Instant::now();
    let exit = loop {
        if let Some(s) = cp.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "did not exit: {}",
            cp.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "exit status {exit:?}: {}", cp.log());
}

#[tokio::test]
async fn metrics_count_streams_by_variant_and_type() {
    let cp = Cp::start("metrics", Some("services: []\n"), &[]).await;
    let _eds = EdsWatch::open(&cp, "x").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = cp.get("/metrics").await.1;
        if m.contains(&format!(
            "weft_xds_subscribed_streams{{variant=\"sotw\",type_url=\"{EDS}\"}} 1"
        )) && m.contains("weft_xds_streams{variant=\"sotw\",service=\"ads\"} 1")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed the stream:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
