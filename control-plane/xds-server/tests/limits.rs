//! Limits and back-pressure (docs/xds.md "Limits and backpressure"): a real server on loopback,
//! configured the way the binary configures it ([`XdsLimits::configure`] on tonic's builder),
//! driven by tonic clients; each test hits one limit and checks the status and the metric.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use prost::Message;
use weft_xds_server::{CLUSTER, ENDPOINT, XdsLimits};

mod common;
use common::{Delta, Sotw, node, start_with as start, wait_until};

fn tag_of(c: &Cluster) -> String {
    c.alt_stat_name.split(':').next().unwrap().to_string()
}

fn sotw_tags(r: &DiscoveryResponse) -> Vec<String> {
    r.resources
        .iter()
        .map(|a| tag_of(&Cluster::decode(a.value.as_slice()).unwrap()))
        .collect()
}

// === Request size ===

#[tokio::test]
async fn request_over_the_default_4mib_ends_the_stream_with_resource_exhausted() {
    let h = start(XdsLimits::default()).await;
    h.set_clusters(&["a"], "v1", 0);
    // A name list of 5 MiB: over the default limit of 4 MiB.
    let names: Vec<String> = (0..5 * 1024).map(|i| format!("{i:01024}")).collect();
    let mut big = Sotw::open(&h).await;
    big.send(DiscoveryRequest {
        node: Some(node("big")),
        type_url: CLUSTER.into(),
        resource_names: names,
        ..Default::default()
    })
    .await;
    let err = big.error().await;
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("--xds-max-request-bytes") && err.message().contains("4194304"),
        "{}",
        err.message()
    );
    assert_eq!(
        h.metric(r#"weft_xds_streams_refused_total{reason="request_too_large"}"#),
        1.0
    );
    // Another stream is unaffected.
    let mut ok = Sotw::open(&h).await;
    ok.subscribe("ok", CLUSTER, &[]).await;
    assert_eq!(sotw_tags(&ok.recv().await), ["v1"]);
}

// === Streams in total and per connection ===

#[tokio::test]
async fn streams_over_the_total_are_refused_at_once_with_resource_exhausted() {
    let h = start(XdsLimits {
        max_streams: 2,
        ..XdsLimits::default()
    })
    .await;
    h.set_clusters(&["a"], "v1", 0);
    let mut first = Sotw::open(&h).await;
    first.subscribe("1", CLUSTER, &[]).await;
    first.recv().await;
    let mut second = Sotw::open(&h).await;
    second.subscribe("2", CLUSTER, &[]).await;
    second.recv().await;

    // Refused at once: in the response headers, before any request is read.
    let started = Instant::now();
    let err = match Sotw::open_on(h.channel().await).await {
        Err(e) => e,
        Ok(mut third) => third.error().await,
    };
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("--xds-max-streams"),
        "{}",
        err.message()
    );
    assert_eq!(
        h.metric(r#"weft_xds_streams_refused_total{reason="max_streams"}"#),
        1.0
    );

    // A slot freed by a stream that ends is usable again.
    drop(first);
    wait_until("the first stream is gone", || h.streams() == 1.0).await;
    let mut again = Sotw::open(&h).await;
    again.subscribe("3", CLUSTER, &[]).await;
    assert_eq!(sotw_tags(&again.recv().await), ["v1"]);
    drop(second);
}

#[tokio::test]
async fn streams_over_the_per_connection_limit_wait_for_a_free_slot() {
    let h = start(XdsLimits {
        max_streams_per_connection: 2,
        ..XdsLimits::default()
    })
    .await;
    h.set_clusters(&["a"], "v1", 0);
    let ch = h.channel().await;
    let mut first = Sotw::open_on(ch.clone()).await.unwrap();
    first.subscribe("1", CLUSTER, &[]).await;
    first.recv().await;
    let mut second = Sotw::open_on(ch.clone()).await.unwrap();
    second.subscribe("2", CLUSTER, &[]).await;
    second.recv().await;

    // The third stream on the same connection is held by the client's HTTP/2 layer (the
    // server advertised SETTINGS_MAX_CONCURRENT_STREAMS = 2): it is not opened on the server.
    let third = tokio::spawn(async move {
        let mut s = Sotw::open_on(ch).await.unwrap();
        s.subscribe("3", CLUSTER, &[]).await;
        sotw_tags(&s.recv().await)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !third.is_finished(),
        "a third stream was served on the connection"
    );
    assert_eq!(h.streams(), 2.0);
    assert_eq!(
        h.metric("weft_xds_streams_opened_total{variant=\"sotw\",service=\"ads\"}"),
        2.0
    );

    drop(first);
    let tags = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("the third stream opens once a slot frees")
        .unwrap();
    assert_eq!(tags, ["v1"]);
    drop(second);
}

// === Request rate ===

#[tokio::test]
async fn requests_over_the_rate_are_throttled_not_refused() {
    let h = start(XdsLimits {
        requests_per_second: 10,
        request_burst: 5,
        ..XdsLimits::default()
    })
    .await;
    h.set_clusters(&["a"], "v1", 0);
    let mut c = Sotw::open(&h).await;
    c.subscribe("n", CLUSTER, &[]).await;
    let r = c.recv().await;
    c.ack(&r, &[]).await;
    // 30 requests at once (stale nonces: the server reads and ignores them), then a real
    // subscription change whose answer tells when the server got to it.
    let started = Instant::now();
    for _ in 0..30 {
        c.send(DiscoveryRequest {
            response_nonce: "stale".into(),
            type_url: CLUSTER.into(),
            ..Default::default()
        })
        .await;
    }
    c.send(DiscoveryRequest {
        type_url: ENDPOINT.into(),
        resource_names: vec!["a".into()],
        ..Default::default()
    })
    .await;
    let eds = c.recv().await;
    let took = started.elapsed();
    assert_eq!(eds.type_url, ENDPOINT);
    // 33 requests with a burst of 5 at 10/s: the last is read ~2.8s after the first.
    assert!(
        took >= Duration::from_secs(2),
        "33 requests at 10/s (burst 5) were read in {took:?}"
    );
    assert!(h.metric("weft_xds_requests_throttled_total") >= 20.0);
    assert_eq!(
        h.metric(r#"weft_xds_stream_errors_total{variant="sotw",service="ads"}"#),
        0.0
    );
    // The stream lives on and is served as usual.
    c.ack(&eds, &[]).await;
    h.set_clusters(&["a"], "v2", 0);
    assert_eq!(sotw_tags(&c.recv().await), ["v2"]);
}

// === Node size ===

fn node_with_metadata(id: &str, bytes: usize) -> Node {
    let mut fields = std::collections::HashMap::new();
    fields.insert(
        "blob".to_string(),
        Value {
            kind: Some(Kind::StringValue("m".repeat(bytes))),
        },
    );
    Node {
        metadata: Some(Struct { fields }),
        ..node(id)
    }
}

#[tokio::test]
async fn node_over_the_limit_is_refused_with_invalid_argument() {
    let h = start(XdsLimits {
        max_node_bytes: 4096,
        ..XdsLimits::default()
    })
    .await;
    h.set_clusters(&["a"], "v1", 0);
    let mut big = Sotw::open(&h).await;
    big.send(DiscoveryRequest {
        node: Some(node_with_metadata("big", 8192)),
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await;
    let err = big.error().await;
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("4096") && err.message().contains("--xds-max-node-bytes"),
        "{}",
        err.message()
    );
    assert_eq!(
        h.metric(r#"weft_xds_streams_refused_total{reason="node_too_large"}"#),
        1.0
    );
    // Under the limit, with metadata, is served.
    let mut ok = Sotw::open(&h).await;
    ok.send(DiscoveryRequest {
        node: Some(node_with_metadata("ok", 2048)),
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await;
    assert_eq!(sotw_tags(&ok.recv().await), ["v1"]);
}

// === Subscriptions ===

#[tokio::test]
async fn subscriptions_over_the_limit_end_the_stream_with_resource_exhausted() {
    let h = start(XdsLimits {
        max_subscriptions: 5,
        ..XdsLimits::default()
    })
    .await;
    h.set_clusters(&["a"], "v1", 0);

    // SotW: one request with 6 names.
    let mut sotw = Sotw::open(&h).await;
    sotw.subscribe("s", CLUSTER, &["a", "b", "c", "d", "e", "f"])
        .await;
    let err = sotw.error().await;
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("6 resource names")
            && err.message().contains("limit of 5")
            && err.message().contains("--xds-max-subscriptions"),
        "{}",
        err.message()
    );

    // Delta: 3 clusters, then 2 endpoints (5 across types: fine), then one more.
    let mut d = Delta::open(&h).await;
    let sub = |type_url: &str, names: &[&str], first: bool| DeltaDiscoveryRequest {
        node: first.then(|| node("d")),
        type_url: type_url.into(),
        resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    d.send(sub(CLUSTER, &["a", "b", "c"], true)).await;
    d.send(sub(ENDPOINT, &["a", "b"], false)).await;
    let r = d.next(Duration::from_secs(10)).await.unwrap().unwrap();
    assert_eq!(r.type_url, CLUSTER);
    d.send(sub(ENDPOINT, &["c"], false)).await;
    let err = loop {
        match d
            .next(Duration::from_secs(10))
            .await
            .expect("the stream ends")
        {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("6 resource names"),
        "{}",
        err.message()
    );
    assert_eq!(
        h.metric(r#"weft_xds_streams_refused_total{reason="too_many_subscriptions"}"#),
        2.0
    );
}

// === A client that does not read ===

#[tokio::test]
async fn client_that_does_not_read_gets_the_latest_version_not_a_backlog() {
    let h = start(XdsLimits::default()).await;
    h.set_clusters(&["a", "b"], "v0", 10_000);
    let mut c = Sotw::open(&h).await;
    c.subscribe("slow", CLUSTER, &[]).await;
    wait_until("the first response is sent", || {
        h.metric(&format!(
            "weft_xds_pushes_total{{variant=\"sotw\",type_url=\"{CLUSTER}\"}}"
        )) == 1.0
    })
    .await;
    for i in 1..=200 {
        h.set_clusters(&["a", "b"], &format!("v{i}"), 10_000);
    }
    // Nothing else was sent: the first response is not ACKed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pushes = format!("weft_xds_pushes_total{{variant=\"sotw\",type_url=\"{CLUSTER}\"}}");
    assert_eq!(h.metric(&pushes), 1.0);
    assert!(h.metric("weft_xds_queued_responses") <= 1.0);

    // Reading now: the one stale response, then straight to the latest.
    let stale = c.recv().await;
    assert_eq!(sotw_tags(&stale), ["v0", "v0"]);
    c.ack(&stale, &[]).await;
    let latest = c.recv().await;
    assert_eq!(sotw_tags(&latest), ["v200", "v200"]);
    assert_eq!(h.metric(&pushes), 2.0);
}

/// The worst client: it never reads, yet ACKs every response blindly (nonces are a counter), so
/// the protocol's one-unACKed-response-per-type does not hold it back. What holds it back is
/// the transport: the client's HTTP/2 window fills, then the server's HTTP/2 send buffer, then
/// the stream's queue of 8; then the stream's task waits, and further changes only replace
/// the snapshot it will send next.
#[tokio::test]
async fn blind_acker_that_never_reads_keeps_the_server_queue_bounded() {
    let h = start(XdsLimits::default()).await;
    const PAD: usize = 100_000;
    h.set_clusters(&["a"], "v0", PAD);
    let pushes = format!("weft_xds_pushes_total{{variant=\"delta\",type_url=\"{CLUSTER}\"}}");
    let mut c = Delta::open(&h).await;
    c.send(DeltaDiscoveryRequest {
        node: Some(node("blind")),
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await;
    wait_until("the first response is sent", || h.metric(&pushes) == 1.0).await;

    let mut max_queued: f64 = 0.0;
    let mut blocked_at = None;
    for i in 1..=300u32 {
        // ACK the response with nonce i (the i-th sent), unseen, then change the cluster.
        c.send(DeltaDiscoveryRequest {
            type_url: CLUSTER.into(),
            response_nonce: i.to_string(),
            ..Default::default()
        })
        .await;
        h.set_clusters(&["a"], &format!("v{i}"), PAD);
        // Generous: a push that is merely slow (a loaded machine) must not look like a stall.
        let deadline = Instant::now() + Duration::from_secs(2);
        while h.metric(&pushes) < f64::from(i + 1) && Instant::now() < deadline {
            max_queued = max_queued.max(h.metric("weft_xds_queued_responses"));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        max_queued = max_queued.max(h.metric("weft_xds_queued_responses"));
        if h.metric(&pushes) < f64::from(i + 1) {
            blocked_at = Some(i);
            break;
        }
    }
    let blocked_at = blocked_at.expect("the server stopped pushing to a client that does not read");
    let pushed = h.metric(&pushes);
    eprintln!("blocked after {pushed} responses of ~{PAD} bytes; queue peaked at {max_queued}");
    // 8 in the queue and the one the stream's task is waiting to put in it.
    assert!(max_queued <= 9.0, "queued responses peaked at {max_queued}");
    assert_eq!(
        h.metric("weft_xds_queued_responses"),
        9.0,
        "the queue is full"
    );

    // Many more changes while blocked: nothing more is queued or pushed.
    for i in blocked_at + 1..=blocked_at + 100 {
        h.set_clusters(&["a"], &format!("v{i}"), PAD);
    }
    let latest = format!("v{}", blocked_at + 100);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.metric(&pushes), pushed);
    assert_eq!(h.metric("weft_xds_queued_responses"), 9.0);

    // Reading now: the backlog is what was already in flight, then the latest version. ACK
    // properly from here on, as a client that caught up would.
    let mut read = 0;
    let mut last_tag = String::new();
    while let Some(r) = c.next(Duration::from_secs(5)).await {
        let r = r.unwrap();
        read += 1;
        for res in &r.resources {
            let cl = Cluster::decode(res.resource.as_ref().unwrap().value.as_slice()).unwrap();
            last_tag = tag_of(&cl);
        }
        c.send(DeltaDiscoveryRequest {
            type_url: CLUSTER.into(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await;
        if last_tag == latest {
            break;
        }
    }
    eprintln!("read {read} responses to reach {latest}");
    assert_eq!(last_tag, latest);
    assert!(
        f64::from(read) <= pushed + 2.0,
        "read {read} responses, {pushed} were in flight"
    );
}

// === Connection age ===

#[tokio::test]
async fn connections_are_closed_at_max_age_and_clients_reconnect() {
    let h = start(XdsLimits {
        max_connection_age: Some(Duration::from_secs(2)),
        max_connection_age_grace: Duration::from_secs(1),
        ..XdsLimits::default()
    })
    .await;
    h.set_clusters(&["a"], "v1", 0);
    let ch = h.channel().await;
    let started = Instant::now();
    let mut c = Sotw::open_on(ch.clone()).await.unwrap();
    c.subscribe("aged", CLUSTER, &[]).await;
    let r = c.recv().await;
    c.ack(&r, &[]).await;
    // The stream never ends on its own: it ends when the connection is closed at
    // age + grace (GOAWAY at 2s, closed at 3s).
    let end = c.next().await;
    let ended = started.elapsed();
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
    assert!(
        ended >= Duration::from_millis(1500) && ended < Duration::from_secs(8),
        "stream ended after {ended:?}"
    );
    // The same channel reconnects (a new connection) and gets config again.
    let mut again = Sotw::open_on(ch).await.unwrap();
    again.subscribe("aged", CLUSTER, &[]).await;
    assert_eq!(sotw_tags(&again.recv().await), ["v1"]);
    assert_eq!(
        h.metric(r#"weft_xds_streams_opened_total{variant="sotw",service="ads"}"#),
        2.0
    );
}
