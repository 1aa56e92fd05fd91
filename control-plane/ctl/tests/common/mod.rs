//! Shared by weftctl's binary tests: the real control plane on free loopback ports, the real
//! weftctl run against it, and minimal ADS clients (SotW and Delta) standing in for proxies.
//! Trimmed from control-plane/app/tests/common.

#![allow(dead_code)] // each test file uses a different subset
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A scratch directory for one test, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("weftctl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `weft-control-plane` binary: `$WEFT_CONTROL_PLANE_BIN` as given (`make test` has built
/// every binary already), else the one beside weftctl's, built once per test binary: `cargo
/// test -p weftctl` builds only weftctl, and a stale control plane would test yesterday's server.
pub fn control_plane_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(given) = std::env::var_os("WEFT_CONTROL_PLANE_BIN").filter(|v| !v.is_empty()) {
            return PathBuf::from(given);
        }
        let bin = Path::new(env!("CARGO_BIN_EXE_weftctl")).with_file_name("weft-control-plane");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "weft-control-plane",
                "--bin",
                "weft-control-plane",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status();
        match status {
            Ok(s) if s.success() => {}
            // Offline, or the workspace mid-edit: an existing binary still tests something.
            other if bin.is_file() => {
                eprintln!(
                    "building weft-control-plane failed ({other:?}); using {}",
                    bin.display()
                )
            }
            other => panic!(
                "cannot build weft-control-plane ({other:?}); build it with `cargo build -p \
                 weft-control-plane`"
            ),
        }
        bin
    })
}

/// What one weftctl run did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

/// Runs the real weftctl with `args`, no `WEFT_ADMIN` from the environment.
pub fn weftctl(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_weftctl"))
        .args(args)
        .env_remove("WEFT_ADMIN")
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The control plane process; killed on drop whatever happens in the test.
pub struct Cp {
    pub child: Child,
    pub xds: u16,
    pub admin: u16,
    pub dir: Scratch,
}

impl Drop for Cp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Cp {
    /// Starts the control plane serving `registry` from a file and waits until it is ready.
    pub async fn start(name: &str, registry: &str) -> Cp {
        let dir = Scratch::new(name);
        let path = dir.write("registry.yaml", registry);
        let (xds, admin) = (free_port(), free_port());
        let child = Command::new(control_plane_bin())
            .args(["--xds-listen", &format!("127.0.0.1:{xds}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(["--envoy-http-address", "127.0.0.1"])
            .args(["--debounce", "10ms", "--debounce-max", "100ms"])
            .args(["--file-poll-interval", "50ms"])
            .arg("--registry-file")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.0.join("stderr.log")).unwrap(),
            ))
            .spawn()
            .unwrap();
        let cp = Cp {
            child,
            xds,
            admin,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while cp.weftctl(&["endpoints"]).code != 0 {
            assert!(
                Instant::now() < deadline,
                "control plane not up: {}",
                cp.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cp
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("stderr.log")).unwrap_or_default()
    }

    /// Replaces the registry file atomically, as editors and ConfigMaps do.
    pub fn write_registry(&self, yaml: &str) {
        let tmp = self.dir.write("registry.yaml.tmp", yaml);
        std::fs::rename(&tmp, self.dir.0.join("registry.yaml")).unwrap();
    }

    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin)
    }

    pub fn xds_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.xds)
    }

    /// weftctl with `--admin` pointing at this control plane.
    pub fn weftctl(&self, args: &[&str]) -> Run {
        let admin = self.admin_url();
        let mut all = vec!["--admin", admin.as_str()];
        all.extend_from_slice(args);
        weftctl(&all)
    }

    /// Runs weftctl until `done` accepts its run; panics with the last run after 15s.
    pub async fn weftctl_until(
        &self,
        args: &[&str],
        what: &str,
        done: impl Fn(&Run) -> bool,
    ) -> Run {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let run = self.weftctl(args);
            if done(&run) {
                return run;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: never happened; last `weftctl {}`: {run:?}",
                args.join(" ")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn node(id: &str) -> Node {
    Node {
        id: id.into(),
        cluster: "e2e".into(),
        user_agent_name: "envoy".into(),
        ..Default::default()
    }
}

/// A SotW ADS stream that subscribes per type and ACKs or NACKs what it is sent.
pub struct SotwProxy {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: tonic::Streaming<DiscoveryResponse>,
    node: Option<Node>,
    /// Per type: the names subscribed and the last version ACKed.
    types: HashMap<String, (Vec<String>, String)>,
}

impl SotwProxy {
    pub async fn connect(cp: &Cp, node_id: &str) -> SotwProxy {
        let (tx, rx) = mpsc::channel(16);
        let mut client = AggregatedDiscoveryServiceClient::connect(cp.xds_url())
            .await
            .unwrap();
        let rx = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        SotwProxy {
            tx,
            rx,
            node: Some(node(node_id)),
            types: HashMap::new(),
        }
    }

    /// Subscribes to `type_url` (`names` empty: wildcard) and ACKs its first response.
    pub async fn subscribe(&mut self, type_url: &str, names: &[&str]) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        self.types
            .insert(type_url.to_string(), (names.clone(), String::new()));
        self.tx
            .send(DiscoveryRequest {
                node: self.node.take(),
                type_url: type_url.into(),
                resource_names: names,
                ..Default::default()
            })
            .await
            .unwrap();
        let r = self.next_of(type_url).await;
        self.ack(&r).await;
    }

    /// The next response of `type_url`, ACKing any other type's response on the way.
    pub async fn next_of(&mut self, type_url: &str) -> DiscoveryResponse {
        loop {
            let r = tokio::time::timeout(Duration::from_secs(15), self.rx.message())
                .await
                .unwrap_or_else(|_| panic!("no {type_url} response in 15s"))
                .unwrap()
                .unwrap();
            if r.type_url == type_url {
                return r;
            }
            self.ack(&r).await;
        }
    }

    pub async fn ack(&mut self, r: &DiscoveryResponse) {
        let (names, acked) = self.types.get_mut(&r.type_url).unwrap();
        *acked = r.version_info.clone();
        let req = DiscoveryRequest {
            type_url: r.type_url.clone(),
            version_info: r.version_info.clone(),
            response_nonce: r.nonce.clone(),
            resource_names: names.clone(),
            ..Default::default()
        };
        self.tx.send(req).await.unwrap();
    }

    /// Rejects `r`, keeping the last ACKed version, as Envoy does.
    pub async fn nack(&mut self, r: &DiscoveryResponse, message: &str) {
        let (names, acked) = &self.types[&r.type_url];
        let req = DiscoveryRequest {
            type_url: r.type_url.clone(),
            version_info: acked.clone(),
            response_nonce: r.nonce.clone(),
            resource_names: names.clone(),
            error_detail: Some(RpcStatus {
                code: 3,
                message: message.into(),
                details: vec![],
            }),
            ..Default::default()
        };
        self.tx.send(req).await.unwrap();
    }
}

/// A Delta ADS stream subscribed to one type (wildcard), ACKing everything; kept open by its
/// owner for as long as it should show in `weftctl status`.
pub struct DeltaProxy {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl DeltaProxy {
    pub async fn connect(cp: &Cp, node_id: &str, type_url: &str) -> DeltaProxy {
        let (tx, rx) = mpsc::channel(16);
        let mut client = AggregatedDiscoveryServiceClient::connect(cp.xds_url())
            .await
            .unwrap();
        let rx = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut p = DeltaProxy { tx, rx };
        p.tx.send(DeltaDiscoveryRequest {
            node: Some(node(node_id)),
            type_url: type_url.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let r = tokio::time::timeout(Duration::from_secs(15), p.rx.message())
            .await
            .expect("no Delta response in 15s")
            .unwrap()
            .unwrap();
        p.tx.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        p
    }
}
