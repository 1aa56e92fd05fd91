//! What the xDS server's integration tests share: a real server on loopback (configured as the
//! binary configures it) and minimal SotW and Delta ADS clients over tonic.

#![allow(dead_code)] // each test binary uses part of it
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;
use weft_xds_cache::{Cache, TypeUpdate};
use weft_xds_server::{CLUSTER, ENDPOINT, LISTENER, ROUTE, XdsLimits, XdsServer};

/// How long a client waits to be sure no response is coming.
pub const QUIET: Duration = Duration::from_millis(300);

pub struct Harness {
    pub cache: Arc<Cache>,
    pub server: XdsServer,
    pub addr: std::net::SocketAddr,
    pub registry: Arc<Mutex<Registry>>,
    pub drain: watch::Sender<bool>,
}

/// A server with the default limits: flavour `grpc` for nodes whose user agent says grpc,
/// `envoy` for the rest.
pub async fn start() -> Harness {
    start_with(XdsLimits::default()).await
}

pub async fn start_with(limits: XdsLimits) -> Harness {
    let cache = Cache::new(&["envoy", "grpc"], &[CLUSTER, ENDPOINT, LISTENER, ROUTE]);
    let (drain, drain_rx) = watch::channel(false);
    let server = XdsServer::new(
        Arc::clone(&cache),
        |node: Option<&Node>| {
            if node.is_some_and(|n| n.user_agent_name.contains("grpc")) {
                "grpc".to_string()
            } else {
                "envoy".to_string()
            }
        },
        drain_rx,
    )
    .with_limits(limits.clone());
    let mut registry = Registry::default();
    server.register_metrics(&mut registry);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let routes = server.routes();
    let csds = server.csds();
    tokio::spawn(async move {
        limits
            .configure(tonic::transport::Server::builder())
            .add_routes(routes)
            .add_service(csds)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    Harness {
        cache,
        server,
        addr,
        registry: Arc::new(Mutex::new(registry)),
        drain,
    }
}

impl Harness {
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Sets clusters (name, connect-timeout ms) and endpoints (name, port) for `flavor`.
    pub fn set(&self, flavor: &str, clusters: &[(&str, u32)], endpoints: &[(&str, u32)]) {
        let c = clusters.iter().map(|(n, ms)| {
            (
                n.to_string(),
                Cluster {
                    name: n.to_string(),
                    connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
                        seconds: 0,
                        nanos: (*ms as i32) * 1_000_000,
                    }),
                    ..Default::default()
                },
            )
        });
        let e = endpoints.iter().map(|(n, port)| {
            (
                n.to_string(),
                ClusterLoadAssignment {
                    cluster_name: n.to_string(),
                    policy: Some(envoy_types::pb::envoy::config::endpoint::v3::cluster_load_assignment::Policy {
                        // Any field that changes the bytes stands in for an endpoint change.
                        overprovisioning_factor: Some(envoy_types::pb::google::protobuf::UInt32Value {
                            value: *port,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )
        });
        self.cache.apply(
            flavor,
            vec![
                TypeUpdate::replace(CLUSTER, c),
                TypeUpdate::replace(ENDPOINT, e),
            ],
            Instant::now(),
        );
    }

    pub fn client_types(&self, node: &str) -> serde_json::Value {
        let c = self
            .server
            .clients()
            .into_iter()
            .find(|c| c.node_id == node)
            .expect("client listed");
        serde_json::to_value(&c.types).unwrap()
    }

    /// Sets clusters, each carrying `tag` (in `alt_stat_name`) padded to `pad` bytes, so a test
    /// can tell versions apart and make responses as large as it needs.
    pub fn set_clusters(&self, names: &[&str], tag: &str, pad: usize) {
        let c = names.iter().map(|n| {
            let mut alt = format!("{tag}:");
            alt.extend(std::iter::repeat_n('x', pad));
            (
                n.to_string(),
                Cluster {
                    name: n.to_string(),
                    alt_stat_name: alt,
                    ..Default::default()
                },
            )
        });
        self.cache.apply(
            "envoy",
            vec![TypeUpdate::replace(CLUSTER, c)],
            Instant::now(),
        );
    }

    /// The value of one sample in the Prometheus text exposition, 0 if absent.
    pub fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry.lock().unwrap())
            .unwrap();
        text
    }

    pub fn metric(&self, sample: &str) -> f64 {
        self.metrics_text()
            .lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    pub fn streams(&self) -> f64 {
        self.metric(r#"weft_xds_streams{variant="sotw",service="ads"}"#)
            + self.metric(r#"weft_xds_streams{variant="delta",service="ads"}"#)
    }
}

pub fn node(id: &str) -> Node {
    Node {
        id: id.into(),
        user_agent_name: "envoy".into(),
        ..Default::default()
    }
}

pub async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within 10s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// === SotW client ===

pub struct Sotw {
    pub tx: mpsc::Sender<DiscoveryRequest>,
    pub rx: Streaming<DiscoveryResponse>,
}

impl Sotw {
    pub async fn open_on(ch: Channel) -> Result<Sotw, tonic::Status> {
        let (tx, rx) = mpsc::channel(64);
        let mut client = AggregatedDiscoveryServiceClient::new(ch);
        let rx = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Sotw { tx, rx })
    }

    pub async fn open(h: &Harness) -> Sotw {
        Self::open_on(h.channel().await).await.unwrap()
    }

    pub async fn send(&self, req: DiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    pub async fn subscribe(&self, node_id: &str, type_url: &str, names: &[&str]) {
        self.send(DiscoveryRequest {
            node: Some(node(node_id)),
            type_url: type_url.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await;
    }

    /// The next message or the end of the stream, within 10 s.
    pub async fn next(&mut self) -> Result<Option<DiscoveryResponse>, tonic::Status> {
        tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("a response or an end within 10s")
    }

    pub async fn recv(&mut self) -> DiscoveryResponse {
        self.next().await.expect("stream ok").expect("stream open")
    }

    pub async fn error(&mut self) -> tonic::Status {
        self.next()
            .await
            .expect_err("the stream ends with an error")
    }

    pub async fn quiet(&mut self) {
        if let Ok(r) = tokio::time::timeout(QUIET, self.rx.message()).await {
            panic!("expected no response, got {r:?}");
        }
    }

    pub async fn ack(&self, r: &DiscoveryResponse, names: &[&str]) {
        self.send(DiscoveryRequest {
            version_info: r.version_info.clone(),
            response_nonce: r.nonce.clone(),
            type_url: r.type_url.clone(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await;
    }

    pub async fn nack(&self, r: &DiscoveryResponse, names: &[&str], msg: &str) {
        self.send(DiscoveryRequest {
            version_info: String::new(),
            response_nonce: r.nonce.clone(),
            type_url: r.type_url.clone(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            error_detail: Some(RpcStatus {
                code: 3,
                message: msg.into(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await;
    }
}

// === Delta client ===

pub struct Delta {
    pub tx: mpsc::Sender<DeltaDiscoveryRequest>,
    pub rx: Streaming<DeltaDiscoveryResponse>,
}

impl Delta {
    pub async fn open(h: &Harness) -> Delta {
        let (tx, rx) = mpsc::channel(1024);
        let mut client = AggregatedDiscoveryServiceClient::new(h.channel().await);
        let rx = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Delta { tx, rx }
    }

    pub async fn send(&self, req: DeltaDiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    /// The next message, the end of the stream (`None`), or `None` after `wait`.
    pub async fn next(
        &mut self,
        wait: Duration,
    ) -> Option<Result<DeltaDiscoveryResponse, tonic::Status>> {
        match tokio::time::timeout(wait, self.rx.message()).await {
            Err(_) => None,
            Ok(r) => r.transpose(),
        }
    }

    pub async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("a response within 5s")
            .expect("stream ok")
            .expect("stream open")
    }

    pub async fn quiet(&mut self) {
        if let Ok(r) = tokio::time::timeout(QUIET, self.rx.message()).await {
            panic!("expected no response, got {r:?}");
        }
    }

    pub async fn ack(&self, r: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await;
    }
}
