//! What the server tells operators about its clients: per-type sync state, per-resource
//! rejections, the recent-NACK log, the rejection metrics and CSDS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use envoy_types::pb::envoy::admin::v3::ClientResourceStatus;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_client::ClientStatusDiscoveryServiceClient;
use envoy_types::pb::envoy::service::status::v3::{
    ClientStatusRequest, ClientStatusResponse, ConfigStatus,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    NodeMatcher, StringMatcher, StructMatcher, string_matcher::MatchPattern,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use weft_xds_server::{CLUSTER, ENDPOINT, SyncState};

const GAUGE_B: &str = r#"weft_xds_rejected_resources{type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster",resource="b"}"#;

fn state(h: &Harness, node: &str, type_url: &str) -> SyncState {
    let c = h
        .server
        .clients()
        .into_iter()
        .find(|c| c.node_id == node)
        .unwrap();
    c.types[type_url].state
}

/// `weft_xds_sync_state_streams` of the Cluster type, as (SYNCED, STALE, NACKED), each series
/// required to exist (a missing one would read as 0).
fn cluster_states(h: &Harness) -> (f64, f64, f64) {
    let series = |state: &str| {
        format!(r#"weft_xds_sync_state_streams{{type_url="{CLUSTER}",state="{state}"}}"#)
    };
    let text = h.metrics_text();
    for st in ["SYNCED", "STALE", "NACKED"] {
        assert!(text.contains(&series(st)), "no {st} series:\n{text}");
    }
    (
        h.metric(&series("SYNCED")),
        h.metric(&series("STALE")),
        h.metric(&series("NACKED")),
    )
}

fn matcher(p: MatchPattern) -> NodeMatcher {
    NodeMatcher {
        node_id: Some(StringMatcher {
            match_pattern: Some(p),
            ignore_case: false,
        }),
        node_metadatas: vec![],
    }
}

async fn csds(
    h: &Harness,
    matchers: Vec<NodeMatcher>,
) -> Result<ClientStatusResponse, tonic::Status> {
    let mut c = ClientStatusDiscoveryServiceClient::new(h.channel().await);
    c.fetch_client_status(ClientStatusRequest {
        node_matchers: matchers,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

#[tokio::test]
async fn a_rejected_resource_is_tracked_reported_and_cleared() {
    let h = start().await;
    h.set("envoy", &[("a", 1), ("b", 1)], &[]);
    // One Delta client that will reject b, one SotW client that accepts everything.
    let mut d = Delta::open(&h).await;
    d.send(DeltaDiscoveryRequest {
        node: Some(node("envoy-1")),
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await;
    let r = d.recv().await;
    d.ack(&r).await;
    let mut s = Sotw::open(&h).await;
    s.subscribe("envoy-2", CLUSTER, &[]).await;
    let r = s.recv().await;
    s.ack(&r, &[]).await;
    wait_until("both SYNCED", || {
        h.server.clients().len() == 2
            && state(&h, "envoy-1", CLUSTER) == SyncState::Synced
            && state(&h, "envoy-2", CLUSTER) == SyncState::Synced
    })
    .await;

    // a and b change; envoy-1 names b in its NACK.
    h.set("envoy", &[("a", 2), ("b", 2)], &[]);
    let r = d.recv().await;
    assert_eq!(r.resources.len(), 2);
    wait_until("STALE while un-ACKed", || {
        state(&h, "envoy-1", CLUSTER) == SyncState::Stale
    })
    .await;
    assert_eq!(
        cluster_states(&h).1,
        1.0 + f64::from(state(&h, "envoy-2", CLUSTER) == SyncState::Stale)
    );
    d.send(DeltaDiscoveryRequest {
        type_url: CLUSTER.into(),
        response_nonce: r.nonce.clone(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: "Error adding/updating cluster(s) b: unknown lb policy".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await;
    let sr = s.recv().await;
    s.ack(&sr, &[]).await;
    wait_until("envoy-1 NACKED", || {
        state(&h, "envoy-1", CLUSTER) == SyncState::Nacked
    })
    .await;
    wait_until("envoy-2 SYNCED", || {
        state(&h, "envoy-2", CLUSTER) == SyncState::Synced
    })
    .await;
    let c = h
        .server
        .clients()
        .into_iter()
        .find(|c| c.node_id == "envoy-1")
        .unwrap();
    assert_eq!(c.state, SyncState::Nacked);
    let rejected = &c.types[CLUSTER].rejected;
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].name, "b");
    assert!(rejected[0].reason.contains("unknown lb policy"));
    assert_eq!(h.metric(GAUGE_B), 1.0);
    assert_eq!(cluster_states(&h), (1.0, 0.0, 1.0));
    assert_eq!(
        h.metric(r#"weft_xds_resource_rejections_total{variant="delta",type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster"}"#),
        1.0
    );
    let log = h.server.nacks();
    assert_eq!(log.len(), 1);
    assert_eq!(
        (log[0].node_id.as_str(), log[0].resources.clone()),
        ("envoy-1", vec!["b".to_string()])
    );

    // Per resource: a accepted, b rejected; over CSDS the same.
    let cfg = h.server.proxy_config("envoy-1");
    let res = &cfg[0].types[CLUSTER].resources;
    assert_eq!(
        res.iter()
            .map(|r| (r.name.as_str(), r.state))
            .collect::<Vec<_>>(),
        [("a", SyncState::Synced), ("b", SyncState::Nacked)]
    );
    let all = csds(&h, vec![]).await.unwrap();
    assert_eq!(all.config.len(), 2);
    let one = csds(&h, vec![matcher(MatchPattern::Prefix("envoy-1".into()))])
        .await
        .unwrap();
    assert_eq!(one.config.len(), 1);
    let cc = &one.config[0];
    assert_eq!(cc.node.as_ref().unwrap().id, "envoy-1");
    let b = cc
        .generic_xds_configs
        .iter()
        .find(|g| g.name == "b")
        .unwrap();
    assert_eq!(b.config_status, ConfigStatus::Error as i32);
    assert_eq!(b.client_status, ClientResourceStatus::Nacked as i32);
    let err = b.error_state.as_ref().unwrap();
    assert!(err.details.contains("unknown lb policy"), "{err:?}");
    let a = cc
        .generic_xds_configs
        .iter()
        .find(|g| g.name == "a")
        .unwrap();
    assert_eq!(a.config_status, ConfigStatus::Synced as i32);
    assert_eq!(a.client_status, ClientResourceStatus::Acked as i32);
    assert_eq!(a.type_url, CLUSTER);
    assert!(a.xds_config.as_ref().is_some_and(|x| x.type_url == CLUSTER));
    let none = csds(&h, vec![matcher(MatchPattern::Exact("nobody".into()))])
        .await
        .unwrap();
    assert!(none.config.is_empty());
    let re = csds(
        &h,
        vec![matcher(MatchPattern::SafeRegex(
            envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher {
                regex: "envoy-[2]".into(),
                ..Default::default()
            },
        ))],
    )
    .await
    .unwrap();
    assert_eq!(re.config.len(), 1);
    let err = csds(
        &h,
        vec![NodeMatcher {
            node_id: None,
            node_metadatas: vec![StructMatcher::default()],
        }],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("node_metadatas"), "{err}");

    // An ACK of another change does not clear b; a fixed b, ACKed, does.
    h.set("envoy", &[("a", 3), ("b", 2)], &[]);
    let r = d.recv().await;
    d.ack(&r).await;
    let sr = s.recv().await;
    s.ack(&sr, &[]).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(state(&h, "envoy-1", CLUSTER), SyncState::Nacked);
    h.set("envoy", &[("a", 3), ("b", 4)], &[]);
    let r = d.recv().await;
    d.ack(&r).await;
    wait_until("envoy-1 SYNCED after the fix", || {
        state(&h, "envoy-1", CLUSTER) == SyncState::Synced
    })
    .await;
    assert_eq!(h.metric(GAUGE_B), 0.0, "the series is removed at zero");
    // envoy-2 was sent b's fix too: STALE until it ACKs.
    assert_eq!(cluster_states(&h), (1.0, 1.0, 0.0));
    let sr = s.recv().await;
    s.ack(&sr, &[]).await;
    wait_until("envoy-2 SYNCED after the fix", || {
        state(&h, "envoy-2", CLUSTER) == SyncState::Synced
    })
    .await;
    assert_eq!(cluster_states(&h), (2.0, 0.0, 0.0));
    assert_eq!(h.server.nacks().len(), 1, "the log keeps what happened");
}

#[tokio::test]
async fn a_client_that_leaves_no_longer_counts_as_rejecting() {
    let h = start().await;
    h.set("envoy", &[("b", 1)], &[("b", 1)]);
    let mut s = Sotw::open(&h).await;
    s.subscribe("envoy-3", ENDPOINT, &["b"]).await;
    let r = s.recv().await;
    // No resource named: blamed on what the response brought, the one assignment.
    s.nack(&r, &["b"], "malformed").await;
    let gauge = r#"weft_xds_rejected_resources{type_url="type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",resource="b"}"#;
    wait_until("the gauge counts it", || h.metric(gauge) == 1.0).await;
    drop(s);
    wait_until("the gauge drops it", || {
        h.metric(gauge) == 0.0 && h.server.clients().is_empty()
    })
    .await;
    assert_eq!(h.server.nacks()[0].resources, ["b"]);
}

#[tokio::test]
async fn csds_streams_one_answer_per_request() {
    let h = start().await;
    h.set("envoy", &[("a", 1)], &[]);
    let mut s = Sotw::open(&h).await;
    s.subscribe("envoy-4", CLUSTER, &[]).await;
    let r = s.recv().await;
    s.ack(&r, &[]).await;
    wait_until("SYNCED", || {
        state(&h, "envoy-4", CLUSTER) == SyncState::Synced
    })
    .await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut c = ClientStatusDiscoveryServiceClient::new(h.channel().await);
    let mut answers = c
        .stream_client_status(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        tx.send(ClientStatusRequest {
            exclude_resource_contents: true,
            ..Default::default()
        })
        .await
        .unwrap();
        let a = answers.message().await.unwrap().unwrap();
        assert_eq!(a.config.len(), 1);
        let g = &a.config[0].generic_xds_configs[0];
        assert_eq!(
            (g.name.as_str(), g.config_status),
            ("a", ConfigStatus::Synced as i32)
        );
        assert!(g.xds_config.is_none(), "exclude_resource_contents");
    }
}
