//! The `--xds-*` limit flags reach the xDS server and its transport (the limits themselves are
//! tested one by one in control-plane/xds-server/tests/limits.rs).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::time::{Duration, Instant};

use common::{Cp, EDS};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

async fn open(
    cp: &Cp,
    id: &str,
) -> Result<
    (
        mpsc::Sender<DiscoveryRequest>,
        tonic::Streaming<DiscoveryResponse>,
    ),
    tonic::Status,
> {
    let (tx, rx) = mpsc::channel(8);
    let mut client = AggregatedDiscoveryServiceClient::connect(cp.url())
        .await
        .unwrap();
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: id.into(),
            user_agent_name: "envoy".into(),
            ..Default::default()
        }),
        type_url: EDS.into(),
        resource_names: vec!["pay".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let stream = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, stream))
}

async fn metric(cp: &Cp, sample: &str) -> f64 {
    cp.get("/metrics")
        .await
        .1
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn xds_limit_flags_refuse_streams_and_age_out_connections() {
    let cp = Cp::start(
        "xds-limits",
        None,
        &[
            "--xds-max-streams",
            "1",
            "--xds-max-connection-age",
            "2s",
            "--xds-max-connection-age-grace",
            "1s",
        ],
    )
    .await;
    let started = Instant::now();
    let (_tx, mut first) = open(&cp, "first").await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), first.message())
        .await
        .expect("a response")
        .unwrap();

    // --xds-max-streams 1: a second stream is refused.
    let err = match open(&cp, "second").await {
        Err(e) => e,
        Ok((_tx, mut s)) => s.message().await.unwrap_err(),
    };
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert_eq!(
        metric(
            &cp,
            r#"weft_xds_streams_refused_total{reason="max_streams"}"#
        )
        .await,
        1.0
    );

    // --xds-max-connection-age 2s (+1s grace): the first stream's connection is closed.
    let end = tokio::time::timeout(Duration::from_secs(10), first.message())
        .await
        .expect("the connection is closed at its age");
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    // The slot is free again and a reconnecting client is served.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut again = loop {
        match open(&cp, "again").await {
            Ok((tx, s)) => break (tx, s),
            Err(e) => {
                assert!(Instant::now() < deadline, "never admitted again: {e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), again.1.message())
        .await
        .expect("a response after reconnecting")
        .unwrap()
        .expect("stream open");
}

#[test]
fn xds_limit_flags_are_documented_in_help() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft-control-plane"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--xds-max-request-bytes",
        "--xds-max-streams-per-connection",
        "--xds-max-streams",
        "--xds-requests-per-second",
        "--xds-request-burst",
        "--xds-max-node-bytes",
        "--xds-max-subscriptions",
        "--xds-keepalive-interval",
        "--xds-keepalive-timeout",
        "--xds-max-connection-age",
        "--xds-max-connection-age-grace",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}
