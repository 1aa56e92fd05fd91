//! Protocol tests: a real server on loopback driven by tonic clients, one test per rule of
//! Envoy's xDS protocol that Weft promises (see docs/xds.md), for SotW and Delta.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::collections::HashMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::cluster::v3::cluster_discovery_service_client::ClusterDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_xds_server::{CLUSTER, ENDPOINT};

mod common;
use common::{Delta, Sotw, node, start};

fn names(r: &DiscoveryResponse) -> Vec<String> {
    let mut n: Vec<String> = r
        .resources
        .iter()
        .map(|a| {
            if a.type_url == CLUSTER {
                Cluster::decode(a.value.as_slice()).unwrap().name
            } else {
                ClusterLoadAssignment::decode(a.value.as_slice())
                    .unwrap()
                    .cluster_name
            }
        })
        .collect();
    n.sort();
    n
}

fn dnames(r: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut n: Vec<String> = r.resources.iter().map(|x| x.name.clone()).collect();
    n.sort();
    n
}

async fn wait_until(f: impl Fn() -> bool) {
    common::wait_until("condition", f).await;
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

// === SotW tests ===

#[tokio::test]
async fn sotw_wildcard_cds_is_answered_and_an_ack_gets_nothing_more() {
    let h = start().await;
    h.set("envoy", &[("a", 1), ("b", 1)], &[]);
    let mut c = Sotw::open(&h).await;
    c.subscribe("n1", CLUSTER, &[]).await;
    let r = c.recv().await;
    assert_eq!(names(&r), s(&["a", "b"]));
    assert!(!r.version_info.is_empty() && !r.nonce.is_empty());
    c.ack(&r, &[]).await;
    c.quiet().await;
    let t = h.client_types("n1");
    assert_eq!(t[CLUSTER]["acks"], 1);
    assert_eq!(t[CLUSTER]["wildcard"], true);
    assert_eq!(t[CLUSTER]["last_acked_version"], r.version_info.as_str());
}

#[tokio::test]
async fn sotw_explicit_star_is_wildcard_for_any_type() {
    let h = start().await;
    h.set("envoy", &[], &[("a", 1), ("b", 2)]);
    let mut c = Sotw::open(&h).await;
    c.subscribe("n", ENDPOINT, &["*"]).await;
    assert_eq!(names(&c.recv().await), s(&["a", "b"]));
}

#[tokio::test]
async fn sotw_at_most_one_unacked_response_and_latest_wins() {
    let h = start().await;
    h.set("envoy", &[("a", 1)], &[]);
    let mut c = Sotw::open(&h).await;
    c.subscribe("n", CLUSTER, &[]).await;
    let first = c.recv().await;
    // Two changes while the first response is un-ACKed: nothing may be sent yet.
    h.set("envoy", &[("a", 2)], &[]);
    h.set("envoy", &[("a", 2), ("c", 3)], &[]);
    c.quiet().await;
    c.ack(&first, &[]).await;
    let latest = c.recv().await;
    assert_eq!(
        names(&latest),
        s(&["a", "c"]),
        "skipped straight to the latest state"
    );
    c.ack(&latest, &[]).await;
    c.quiet().await;
}

#[tokio::test]
async fn sotw_nacked_version_is_not_resent_but_a_new_one_is() {
    let h = start().await;
    h.set("envoy", &[("a", 1)], &[]);
    let mut c = Sotw::open(&h).await;
    c.subscribe("n", CLUSTER, &[]).await;
    let r = c.recv().await;
    c.nack(&r, &[], "cluster a: bad thing").await;
    // No resend loop (go-control-plane #962).
    c.quiet().await;
    let t = h.client_types("n");
    assert_eq!(t[CLUSTER]["nacks"], 1);
    assert_eq!(t[CLUSTER]["last_nack"]["message"], "cluster a: bad thing");
    assert_eq!(t[CLUSTER]["last_nack"]["version"], r.version_info.as_str());
    assert_eq!(t[CLUSTER]["pushes"], 1);
    h.set("envoy", &[("a", 9)], &[]);
    let fixed = c.recv().await;
    assert_ne!(fixed.version_info, r.version_info);
}

#[tokio::test]
async fn sotw_named_resource_is_sent_when_it_appears() {
    let h = start().await;
    h.set("envoy", &[], &[("a", 1)]);
    let mut c = Sotw::open(&h).await;
    c.subscribe("n", ENDPOINT, &["a", "b"]).await;
    let r = c.recv().await;
    assert_eq!(names(&r), s(&["a"]));
    c.ack(&r, &["a", "b"]).await;
    c.quiet().await;
    h.set("envoy", &[], &[("a", 1), ("b", 2)]);
    let r = c.recv().await;
    assert_eq!(names(&r), s(&["a", "b"]));
}

#[tokio::test]
async fn sotw_cluster_removal_is_sent_as_absence() {
    let h = start().await;
    h.set("envoy", &[("a", 1), ("b", 1)], &[]);
    let mut c = Sotw::open(&h).await;
    c.subscribe("n", CLUSTER, &[]).await;
    let r = c.recv().await;
    c.ack(&r, &[]).await;
    h.set("envoy", &[("a", 1)], &[]);
    assert_eq!(names(&c.recv().await), s(&["a"]));
}

#[tokio::test]
async fn sotw_unrelated_endpoint_change_is_not_pushed() {
    let h = start().await;
    h.set("envoy", &[], &[("a", 1), ("b", 1)]);
    let mut c = Sotw::open(&h).await;
    c.subscribe("n", ENDPOINT, &["a"]).await;
    let r = c.recv().await;
    c.ack(&r, &["a"]).await;
    h.set("envoy", &[], &[("a", 1), ("b", 2)]);
    c.quiet().await;
}

#[tokio::test]
async fn sotw_reconnect_with_old_version_still_gets_config() {
    let h = start().await;
    h.set("envoy", &[("a", 1)], &[]);
    let mut c = Sotw::open(&h).await;
    c.subscribe("n", CLUSTER, &[]).await;
    let r = c.recv().await;
    drop(c);
    // A client that held this exact version (e.g. from before a control-plane restart)
    // reconnects claiming it: it must still be answered.
    let mut c2 = Sotw::open(&h).await;
    c2.send(DiscoveryRequest {
        node: Some(node("n")),
        type_url: CLUSTER.into(),
        version_info: r.version_info.clone(),
        ..Default::default()
    })
    .await;
    let r2 = c2.recv().await;
    assert_eq!(names(&r2), s(&["a"]));
    assert_eq!(
        r2.version_info, r.version_info,
        "content-hash versions are stable"
    );
}

#[tokio::test]
async fn sotw_resubscription_is_answered() {
    let h = start().await;
    h.set("envoy", &[], &[("a", 1)]);
    let mut c = Sotw::open(&h).await;
    c.subscribe("n", ENDPOINT, &["a"]).await;
    let r = c.recv().await;
    c.ack(&r, &[]).await; // unsubscribes everything
    c.quiet().await;
    c.send(DiscoveryRequest {
        type_url: ENDPOINT.into(),
        resource_names: s(&["a"]),
        response_nonce: r.nonce.clone(),
        version_info: r.version_info.clone(),
        ..Default::default()
    })
    .await;
    assert_eq!(names(&c.recv().await), s(&["a"]), "go-control-plane #431");
}

#[tokio::test]
async fn sotw_push_order_is_make_before_break_and_cluster_change_resends_endpoints() {
    let h = start().await;
    h.set("envoy", &[("a", 1)], &[("a", 1)]);
    let mut c = Sotw::open(&h).await;
    c.subscribe("n", CLUSTER, &[]).await;
    let r = c.recv().await;
    c.ack(&r, &[]).await;
    c.subscribe("n", ENDPOINT, &["a"]).await;
    let r = c.recv().await;
    c.ack(&r, &["a"]).await;
    c.quiet().await;
    // Only the cluster changes: its endpoints must follow it.
    h.set("envoy", &[("a", 2)], &[("a", 1)]);
    let first = c.recv().await;
    assert_eq!(first.type_url, CLUSTER);
    let second = c.recv().await;
    assert_eq!(
        second.type_url, ENDPOINT,
        "endpoints re-sent after their cluster"
    );
    assert_eq!(names(&second), s(&["a"]));
}

#[tokio::test]
async fn sotw_unknown_type_url_ends_only_that_stream() {
    let h = start().await;
    h.set("envoy", &[("a", 1)], &[]);
    let mut good = Sotw::open(&h).await;
    good.subscribe("good", CLUSTER, &[]).await;
    let r = good.recv().await;
    good.ack(&r, &[]).await;
    let mut bad = Sotw::open(&h).await;
    bad.subscribe("bad", "type.googleapis.com/nope.Nope", &[])
        .await;
    let err = tokio::time::timeout(Duration::from_secs(5), bad.rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("nope.Nope"), "{}", err.message());
    h.set("envoy", &[("a", 1), ("b", 1)], &[]);
    assert_eq!(names(&good.recv().await), s(&["a", "b"]));
}

/// Bytes that are not a protobuf message, sent as one gRPC message.
#[derive(Clone, Debug, Default, PartialEq)]
struct Garbage(Vec<u8>);

impl prost::Message for Garbage {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        buf.put_slice(&self.0);
    }
    fn merge_field(
        &mut self,
        tag: u32,
        wt: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wt, tag, buf, ctx)
    }
    fn encoded_len(&self) -> usize {
        self.0.len()
    }
    fn clear(&mut self) {
        self.0.clear();
    }
}

#[tokio::test]
async fn garbage_ends_only_that_stream() {
    let h = start().await;
    h.set("envoy", &[("a", 1)], &[]);
    let mut good = Sotw::open(&h).await;
    good.subscribe("good", CLUSTER, &[]).await;
    let r = good.recv().await;
    good.ack(&r, &[]).await;

    let mut grpc = tonic::client::Grpc::new(h.channel().await);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
    );
    let codec = tonic_prost::ProstCodec::<Garbage, DiscoveryResponse>::default();
    let req = tokio_stream::iter(vec![Garbage(vec![0xff, 0xff, 0xff, 0xff, 0x0f, 0x01])]);
    let res = grpc.streaming(tonic::Request::new(req), path, codec).await;
    let err = match res {
        Err(e) => e,
        Ok(resp) => resp.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("malformed xDS request"), "{err:?}");
    h.set("envoy", &[("a", 1), ("z", 1)], &[]);
    assert_eq!(names(&good.recv().await), s(&["a", "z"]));
}

#[tokio::test]
async fn clients_get_their_flavour() {
    let h = start().await;
    h.set("envoy", &[("for-envoy", 1)], &[]);
    h.set("grpc", &[("for-grpc", 1)], &[]);
    let mut c = Sotw::open(&h).await;
    c.send(DiscoveryRequest {
        node: Some(Node {
            id: "g".into(),
            user_agent_name: "gRPC C-core linux Python".to_lowercase(),
            ..Default::default()
        }),
        type_url: CLUSTER.into(),
        resource_names: s(&["for-grpc", "for-envoy"]),
        ..Default::default()
    })
    .await;
    assert_eq!(names(&c.recv().await), s(&["for-grpc"]));
}

#[tokio::test]
async fn per_type_service_serves_its_type_only() {
    let h = start().await;
    h.set("envoy", &[("a", 1)], &[]);
    let (tx, rx) = mpsc::channel(4);
    let mut client = ClusterDiscoveryServiceClient::new(h.channel().await);
    let mut stream = client
        .stream_clusters(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(DiscoveryRequest {
        node: Some(node("cds")),
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = stream.message().await.unwrap().unwrap();
    assert_eq!(names(&r), s(&["a"]));
    tx.send(DiscoveryRequest {
        type_url: ENDPOINT.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let err = stream.message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("serves only"), "{}", err.message());
}

#[tokio::test]
async fn drain_ends_streams_with_unavailable() {
    let h = start().await;
    h.set("envoy", &[("a", 1)], &[]);
    let mut c = Sotw::open(&h).await;
    c.subscribe("n", CLUSTER, &[]).await;
    let _ = c.recv().await;
    h.drain.send(true).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), c.rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
}

// === Delta tests ===

#[tokio::test]
async fn delta_legacy_wildcard_and_removals() {
    let h = start().await;
    h.set("envoy", &[("a", 1), ("b", 1)], &[]);
    let mut c = Delta::open(&h).await;
    c.send(DeltaDiscoveryRequest {
        node: Some(node("d")),
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await;
    let r = c.recv().await;
    assert_eq!(dnames(&r), s(&["a", "b"]));
    assert!(r.removed_resources.is_empty());
    c.ack(&r).await;
    c.quiet().await;
    // Change one, remove one: only the change and the removal are sent.
    h.set("envoy", &[("a", 2)], &[]);
    let r = c.recv().await;
    assert_eq!(dnames(&r), s(&["a"]));
    assert_eq!(r.removed_resources, s(&["b"]));
    c.ack(&r).await;
    c.quiet().await;
}

#[tokio::test]
async fn delta_nonexistent_name_is_reported_removed_once_then_sent_when_it_appears() {
    let h = start().await;
    let mut c = Delta::open(&h).await;
    c.send(DeltaDiscoveryRequest {
        node: Some(node("d")),
        type_url: ENDPOINT.into(),
        resource_names_subscribe: s(&["ghost"]),
        ..Default::default()
    })
    .await;
    let r = c.recv().await;
    assert!(r.resources.is_empty());
    assert_eq!(r.removed_resources, s(&["ghost"]));
    c.ack(&r).await;
    c.quiet().await;
    h.set("envoy", &[], &[("ghost", 7)]);
    let r = c.recv().await;
    assert_eq!(dnames(&r), s(&["ghost"]));
}

#[tokio::test]
async fn delta_initial_resource_versions_skip_current_and_remove_ghosts() {
    let h = start().await;
    h.set("envoy", &[("a", 1), ("b", 1)], &[]);
    let version_of = |name: &str| {
        h.cache
            .snapshot("envoy")
            .unwrap()
            .resource(CLUSTER, name)
            .unwrap()
            .version
            .clone()
    };
    let mut c = Delta::open(&h).await;
    c.send(DeltaDiscoveryRequest {
        node: Some(node("d")),
        type_url: CLUSTER.into(),
        initial_resource_versions: HashMap::from([
            ("a".to_string(), version_of("a")),
            ("b".to_string(), "stale".to_string()),
            ("zombie".to_string(), "x".to_string()),
        ]),
        ..Default::default()
    })
    .await;
    let r = c.recv().await;
    assert_eq!(dnames(&r), s(&["b"]), "a is current, b is stale");
    assert_eq!(r.removed_resources, s(&["zombie"]));
}

#[tokio::test]
async fn delta_stale_nonce_still_applies_subscriptions() {
    let h = start().await;
    h.set("envoy", &[], &[("a", 1), ("b", 1)]);
    let mut c = Delta::open(&h).await;
    c.send(DeltaDiscoveryRequest {
        node: Some(node("d")),
        type_url: ENDPOINT.into(),
        resource_names_subscribe: s(&["a"]),
        ..Default::default()
    })
    .await;
    let r = c.recv().await;
    c.ack(&r).await;
    c.send(DeltaDiscoveryRequest {
        type_url: ENDPOINT.into(),
        response_nonce: "not-a-nonce-we-sent".into(),
        resource_names_subscribe: s(&["b"]),
        ..Default::default()
    })
    .await;
    assert_eq!(dnames(&c.recv().await), s(&["b"]));
}

#[tokio::test]
async fn delta_resubscribe_resends_and_unsubscribe_stops_updates() {
    let h = start().await;
    h.set("envoy", &[], &[("a", 1)]);
    let mut c = Delta::open(&h).await;
    c.send(DeltaDiscoveryRequest {
        node: Some(node("d")),
        type_url: ENDPOINT.into(),
        resource_names_subscribe: s(&["a"]),
        ..Default::default()
    })
    .await;
    let r = c.recv().await;
    c.ack(&r).await;
    c.send(DeltaDiscoveryRequest {
        type_url: ENDPOINT.into(),
        resource_names_unsubscribe: s(&["a"]),
        ..Default::default()
    })
    .await;
    // The unsubscribe travels over the network; the cache change is local. Wait until the
    // server has applied it, or the change could legitimately be pushed first.
    wait_until(|| h.client_types("d")[ENDPOINT]["subscriptions"] == serde_json::json!([])).await;
    h.set("envoy", &[], &[("a", 2)]);
    c.quiet().await;
    c.send(DeltaDiscoveryRequest {
        type_url: ENDPOINT.into(),
        resource_names_subscribe: s(&["a"]),
        ..Default::default()
    })
    .await;
    assert_eq!(dnames(&c.recv().await), s(&["a"]));
}

#[tokio::test]
async fn delta_nack_is_recorded_and_not_resent() {
    let h = start().await;
    h.set("envoy", &[("a", 1)], &[]);
    let mut c = Delta::open(&h).await;
    c.send(DeltaDiscoveryRequest {
        node: Some(node("d")),
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await;
    let r = c.recv().await;
    c.send(DeltaDiscoveryRequest {
        type_url: CLUSTER.into(),
        response_nonce: r.nonce.clone(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: "no".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await;
    c.quiet().await;
    let t = h.client_types("d");
    assert_eq!(t[CLUSTER]["nacks"], 1);
    assert_eq!(t[CLUSTER]["last_nack"]["message"], "no");
    h.set("envoy", &[("a", 2)], &[]);
    assert_eq!(dnames(&c.recv().await), s(&["a"]));
}

#[tokio::test]
async fn delta_cluster_change_resends_its_endpoints_after_it() {
    let h = start().await;
    h.set("envoy", &[("a", 1)], &[("a", 1)]);
    let mut c = Delta::open(&h).await;
    c.send(DeltaDiscoveryRequest {
        node: Some(node("d")),
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await;
    let r = c.recv().await;
    c.ack(&r).await;
    c.send(DeltaDiscoveryRequest {
        type_url: ENDPOINT.into(),
        resource_names_subscribe: s(&["a"]),
        ..Default::default()
    })
    .await;
    let r = c.recv().await;
    c.ack(&r).await;
    c.quiet().await;
    h.set("envoy", &[("a", 2)], &[("a", 1)]);
    let first = c.recv().await;
    assert_eq!(first.type_url, CLUSTER);
    let second = c.recv().await;
    assert_eq!(second.type_url, ENDPOINT);
    assert_eq!(dnames(&second), s(&["a"]));
}

#[tokio::test]
async fn one_encode_per_changed_resource_whatever_the_number_of_streams() {
    let h = start().await;
    h.set("envoy", &[("a", 1)], &[]);
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut c = Sotw::open(&h).await;
        c.subscribe(&format!("n{i}"), CLUSTER, &[]).await;
        let r = c.recv().await;
        c.ack(&r, &[]).await;
        clients.push(c);
    }
    let before = h.cache.encodes_total();
    h.set("envoy", &[("a", 2)], &[]);
    for c in &mut clients {
        let r = c.recv().await;
        assert_eq!(names(&r), s(&["a"]));
    }
    assert_eq!(h.cache.encodes_total() - before, 1);
}

#[tokio::test]
async fn convergence_counts_changes_made_while_connected_not_initial_fetches() {
    let h = start().await;
    let mut reg = prometheus_client::registry::Registry::default();
    h.server.register_metrics(&mut reg);
    let count = |reg: &prometheus_client::registry::Registry| {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, reg).unwrap();
        out.lines()
            .find(|l| l.starts_with("weft_xds_convergence_seconds_count"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap()
    };
    h.set("envoy", &[("a", 1)], &[]);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut c = Sotw::open(&h).await;
    c.subscribe("n", CLUSTER, &[]).await;
    let r = c.recv().await;
    c.ack(&r, &[]).await;
    c.quiet().await;
    assert_eq!(
        count(&reg),
        0,
        "the initial fetch is not a convergence sample"
    );
    h.set("envoy", &[("a", 2)], &[]);
    let r = c.recv().await;
    c.ack(&r, &[]).await;
    wait_until(|| count(&reg) == 1).await;
}
