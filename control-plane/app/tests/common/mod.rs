//! Shared by the binary's integration tests: the control plane process, a SotW EDS watcher
//! standing in for a proxy. (A real etcd and throwaway certificates: weft-etcd-support.)

#![allow(dead_code)] // each test file uses a different subset

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

pub const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The control plane process; killed on drop whatever happens in the test.
pub struct Cp {
    pub child: Child,
    pub xds: u16,
    pub admin: u16,
    pub dir: PathBuf,
}

impl Drop for Cp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Cp {
    pub async fn start(name: &str, registry: Option<&str>, extra: &[&str]) -> Cp {
        let cp = Cp::spawn(name, registry, extra);
        cp.wait_ready().await;
        cp
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.get("/readyz").await.0 != 200 {
            assert!(
                Instant::now() < deadline,
                "control plane not ready: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the process without waiting for readiness.
    pub fn spawn(name: &str, registry: Option<&str>, extra: &[&str]) -> Cp {
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
        Cp {
            child: cmd.spawn().unwrap(),
            xds,
            admin,
            dir,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    pub fn registry_path(&self) -> PathBuf {
        self.dir.join("registry.yaml")
    }

    /// Replaces the registry file atomically, as editors and ConfigMaps do.
    pub fn write_registry(&self, yaml: &str) {
        let tmp = self.dir.join("registry.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.registry_path()).unwrap();
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
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

    pub async fn json(&self, path: &str) -> serde_json::Value {
        serde_json::from_str(&self.get(path).await.1).unwrap()
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.xds)
    }
}

/// A SotW EDS subscription over ADS that ACKs everything and returns each response's
/// endpoints as "address:port" lists.
pub struct EdsWatch {
    pub rx: tonic::Streaming<DiscoveryResponse>,
    tx: mpsc::Sender<DiscoveryRequest>,
    service: String,
}

impl EdsWatch {
    pub async fn open(cp: &Cp, service: &str) -> EdsWatch {
        EdsWatch::open_url(cp.url(), service).await
    }

    pub async fn open_url(url: String, service: &str) -> EdsWatch {
        let (tx, rx) = mpsc::channel(8);
        let mut client = AggregatedDiscoveryServiceClient::connect(url)
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

    /// Receives the next response, ACKs it, and returns its endpoints as sorted
    /// "address:port" strings (None if it carried no assignment for our service).
    pub async fn next(&mut self, timeout: Duration) -> Option<Option<Vec<String>>> {
        let r = tokio::time::timeout(timeout, self.rx.message())
            .await
            .ok()?;
        let r = r.unwrap().unwrap();
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
        let mut found = None;
        for any in &r.resources {
            let cla = ClusterLoadAssignment::decode(any.value.as_slice()).unwrap();
            if cla.cluster_name != self.service {
                continue;
            }
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
            found = Some(eps);
        }
        Some(found)
    }

    /// Waits (ACKing each response) until the endpoints equal `want`.
    pub async fn until(&mut self, want: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut last = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                None => panic!("endpoints never became {want:?}; last seen {last:?}"),
                Some(Some(eps)) if eps == want => return,
                Some(seen) => last = seen.or(last),
            }
        }
    }
}
