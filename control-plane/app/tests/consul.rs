//! Consul as a source, end to end: the Consul stand-in (tests/consul-standin, not a real
//! Consul) in-process, the real binary with `--consul-addr`, and an xDS client. An instance
//! registered in Consul reaches the client; a critical check marks it unhealthy; deregistering
//! removes it; a malformed KV value is shown in /debug/sources.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::time::{Duration, Instant};

use common::{Cp, EDS};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::core::v3::address::Address;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use prost::Message;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_consul_standin::ConsulStandIn;

/// "address:port" -> Envoy health status (1 = HEALTHY, 2 = UNHEALTHY), sorted.
type Seen = Vec<(String, i32)>;

/// Waits, ACKing every EDS response for `service`, until its endpoints equal `want`.
async fn eds_until(url: String, service: &str, want: &[(&str, i32)]) {
    let (tx, rx) = mpsc::channel(8);
    let mut client = AggregatedDiscoveryServiceClient::connect(url)
        .await
        .unwrap();
    let mut stream = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let request = |version: String, nonce: String| DiscoveryRequest {
        node: Some(Node {
            id: "consul-test".into(),
            user_agent_name: "envoy".into(),
            ..Default::default()
        }),
        type_url: EDS.into(),
        resource_names: vec![service.into()],
        version_info: version,
        response_nonce: nonce,
        ..Default::default()
    };
    tx.send(request(String::new(), String::new()))
        .await
        .unwrap();
    let want: Seen = want.iter().map(|(a, h)| (a.to_string(), *h)).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last: Option<Seen> = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(msg) = tokio::time::timeout(left, stream.message()).await else {
            panic!("{service}: endpoints never became {want:?}; last seen {last:?}");
        };
        let r = msg.unwrap().unwrap();
        tx.send(request(r.version_info.clone(), r.nonce.clone()))
            .await
            .unwrap();
        for any in &r.resources {
            let cla = ClusterLoadAssignment::decode(any.value.as_slice()).unwrap();
            if cla.cluster_name != service {
                continue;
            }
            let mut seen: Seen = cla
                .endpoints
                .iter()
                .flat_map(|l| &l.lb_endpoints)
                .filter_map(|e| {
                    let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                        return None;
                    };
                    let Some(Address::SocketAddress(sa)) = ep.address.as_ref()?.address.clone()
                    else {
                        return None;
                    };
                    let port = match sa.port_specifier {
                        Some(PortSpecifier::PortValue(p)) => p,
                        _ => 0,
                    };
                    Some((format!("{}:{port}", sa.address), e.health_status))
                })
                .collect();
            seen.sort();
            if seen == want {
                return;
            }
            last = Some(seen);
        }
    }
}

fn register(c: &ConsulStandIn, id: &str, port: u16) {
    c.register_service(&json!({
        "ID": id, "Name": "pay", "Address": "127.0.0.1", "Port": port,
        "Check": {"HTTP": format!("http://127.0.0.1:{port}/health"), "Interval": "10s", "Status": "passing"},
    }))
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_instances_reach_an_xds_client_and_critical_checks_mark_them_unhealthy() {
    let consul = ConsulStandIn::start().await.unwrap();
    register(&consul, "pay-1", 7101);
    consul.kv_put("weft/routes/broken", "{not a route");
    let cp = Cp::start(
        "consul-e2e",
        None,
        &["--consul-addr", &consul.url(), "--consul-wait", "2s"],
    )
    .await;
    eds_until(cp.url(), "pay", &[("127.0.0.1:7101", 1)]).await;

    register(&consul, "pay-2", 7102);
    eds_until(
        cp.url(),
        "pay",
        &[("127.0.0.1:7101", 1), ("127.0.0.1:7102", 1)],
    )
    .await;

    // A failing check: still listed, but marked unhealthy so no traffic goes there.
    consul.set_check_status("service:pay-1", "critical");
    eds_until(
        cp.url(),
        "pay",
        &[("127.0.0.1:7101", 2), ("127.0.0.1:7102", 1)],
    )
    .await;

    consul.deregister_service("pay-1").unwrap();
    eds_until(cp.url(), "pay", &[("127.0.0.1:7102", 1)]).await;

    let sources = cp.json("/debug/sources").await;
    let src = sources["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "consul")
        .unwrap()
        .clone();
    assert_eq!(src["synced"], true, "{src}");
    assert!(
        src["errors"]["weft/routes/broken"].is_string(),
        "bad KV value not reported: {src}"
    );
    let (_, metrics) = cp.get("/metrics").await;
    assert!(metrics.contains("weft_consul_queries_total"), "{metrics}");
    assert!(metrics.contains("weft_consul_connected 1"), "{metrics}");
}

#[tokio::test]
async fn consul_flags_are_checked_at_startup() {
    // TLS files with a plain http:// address are refused (exit 64), not run in plaintext.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft-control-plane"))
        .args([
            "--consul-addr",
            "http://127.0.0.1:1",
            "--consul-ca",
            "/nonexistent",
        ])
        .args([
            "--xds-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("https"),
        "{out:?}"
    );
}
