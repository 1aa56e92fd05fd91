//! The binary as a user runs it, with a tonic xDS client standing in for a proxy: the
//! registration API feeding xDS, a bad hot reload that keeps the last good config, and
//! SIGTERM draining streams. (Real Envoy and gRPC clients are driven in `tests/`.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_proto::registry::v1::registration_client::RegistrationClient;
use weft_proto::registry::v1::{DeregisterRequest, Endpoint, HeartbeatRequest, RegisterRequest};

const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The control plane process; killed on drop whatever happens in the test.
struct Cp {
    child: Child,
    xds: u16,
    admin: u16,
    dir: PathBuf,
}

impl Drop for Cp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Cp {
    async fn start(name: &str, registry: Option<&str>, extra: &[&str]) -> Cp {
        let dir = std::env::temp_dir().join(format!("weft-app-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (xds, admin) = (free_port(), free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_weft-control-plane"));
        cmd.args(["--xds-listen", &format!("127.0.0.1:{xds}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(["--envoy-http-address", "127.0.0.1"])
            .args(["--debounce", "10ms", "--debounce-max", "100ms"])
            .args(["--file-poll-interval", "50ms"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("stderr.log")).unwrap(),
            ));
        if let Some(reg) = registry {
            let path = dir.join("registry.yaml");
            std::fs::write(&path, reg).unwrap();
            cmd.arg("--registry-file").arg(&path);
        }
        let cp = Cp {
            child: cmd.spawn().unwrap(),
            xds,
            admin,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while cp.get("/readyz").await.0 != 200 {
            assert!(
                Instant::now() < deadline,
                "control plane not ready: {}",
                cp.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cp
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    fn registry_path(&self) -> PathBuf {
        self.dir.join("registry.yaml")
    }

    /// Replaces the registry file atomically, as editors and ConfigMaps do.
    fn write_registry(&self, yaml: &str) {
        let tmp = self.dir.join("registry.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.registry_path()).unwrap();
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.admin)).await else {
            return (0, String::new());
        };
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        if s.write_all(req.as_bytes()).await.is_err() {
            return (0, String::new());
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    async fn json(&self, path: &str) -> serde_json::Value {
        serde_json::from_str(&self.get(path).await.1).unwrap()
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.xds)
    }
}

/// A SotW EDS subscription over ADS that ACKs everything and returns each response's
/// endpoints as "address:port" lists.
struct EdsWatch {
    rx: tonic::Streaming<DiscoveryResponse>,
    tx: mpsc::Sender<DiscoveryRequest>,
    service: String,
}

impl EdsWatch {
    async fn open(cp: &Cp, service: &str) -> EdsWatch {
        let (tx, rx) = mpsc::channel(8);
        let mut client = AggregatedDiscoveryServiceClient::connect(cp.url())
            .await
            .unwrap();
        let rx_stream = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        tx.send(DiscoveryRequest {
            node: Some(Node {
                id: "test-client".into(),
                user_agent_name: "envoy".into(),
                ..Default::default()
            }),
            type_url: EDS.into(),
            resource_names: vec![service.into()],
            ..Default::default()
        })
        .await
        .unwrap();
        EdsWatch {
            rx: rx_stream,
            tx,
            service: service.into(),
        }
    }

    /// Waits (ACKing each response) until the endpoints equal `want`.
    async fn until(&mut self, want: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let r = match tokio::time::timeout(left, self.rx.message()).await {
                Ok(r) => r.unwrap().unwrap(),
                Err(_) => panic!("endpoints never became {want:?}; last seen {last:?}"),
            };
            self.tx
                .send(DiscoveryRequest {
                    type_url: EDS.into(),
                    version_info: r.version_info.clone(),
                    response_nonce: r.nonce.clone(),
                    resource_names: vec![self.service.clone()],
                    ..Default::default()
                })
                .await
                .unwrap();
            for any in &r.resources {
                let cla = ClusterLoadAssignment::decode(any.value.as_slice()).unwrap();
                let mut eps: Vec<String> = cla
                    .endpoints
                    .iter()
                    .flat_map(|l| &l.lb_endpoints)
                    .filter_map(|e| match &e.host_identifier {
                        Some(envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(ep)) => ep.address.clone(),
                        _ => None,
                    })
                    .filter_map(|a| match a.address {
                        Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(sa)) => {
                            let port = match sa.port_specifier {
                                Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(p)) => p,
                                _ => 0,
                            };
                            Some(format!("{}:{}", sa.address, port))
                        }
                        _ => None,
                    })
                    .collect();
                eps.sort();
                if eps == want {
                    return;
                }
                last = eps;
            }
        }
    }
}

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
