//! mTLS on the gRPC port, driven as a proxy would: a client certificate carrying a SPIFFE ID
//! gets config only for nodes its identity owns, and registers only its own service; clients
//! without a certificate, or with one from another CA, never get a gRPC answer.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Cp;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use weft_identity::testing::TestCa;
use weft_proto::registry::v1::registration_client::RegistrationClient;
use weft_proto::registry::v1::{Endpoint as PbEndpoint, RegisterRequest};

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const REGISTRY: &str = "services:
  - name: web
    endpoints: [{address: 127.0.0.1, port: 7001}]
  - name: api
    endpoints: [{address: 127.0.0.1, port: 7002}]
";

/// A directory of certificates, removed on drop.
struct Pki {
    dir: PathBuf,
    ca: PathBuf,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pki {
    fn new(name: &str) -> (Pki, TestCa) {
        let dir = std::env::temp_dir().join(format!("weft-mtls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca = TestCa::new("weft test CA").unwrap();
        let ca_path = ca.write(&dir, "ca").unwrap();
        ca.server(&["localhost", "127.0.0.1"])
            .unwrap()
            .write(&dir, "server")
            .unwrap();
        (Pki { dir, ca: ca_path }, ca)
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    fn server_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.path("server.crt"),
            "--tls-key".into(),
            self.path("server.key"),
            "--tls-client-ca".into(),
            self.path("ca.crt"),
            "--trust-domain".into(),
            "weft.test".into(),
        ]
    }
}

/// A channel to the control plane trusting `ca`, presenting `client` (cert, key) if given.
async fn channel(cp: &Cp, ca: &Path, client: Option<(&Path, &Path)>) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    Endpoint::from_shared(format!("https://127.0.0.1:{}", cp.xds))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// Opens a SotW ADS stream as `node_id`, asks for every cluster and returns the first answer.
async fn first_cds(ch: Channel, node_id: &str) -> Result<DiscoveryResponse, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: node_id.into(),
            cluster: "test".into(),
            ..Default::default()
        }),
        type_url: CDS.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut ads = AggregatedDiscoveryServiceClient::new(ch);
    let mut stream = ads
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no CDS answer within 10s"))??;
    drop(tx);
    first.ok_or_else(|| tonic::Status::aborted("stream ended without an answer"))
}

fn register(service: &str, port: u32) -> RegisterRequest {
    RegisterRequest {
        service: service.into(),
        instance_id: "i-1".into(),
        endpoint: Some(PbEndpoint {
            address: "127.0.0.1".into(),
            port,
            ..Default::default()
        }),
        ttl_seconds: 30,
        protocol: String::new(),
    }
}

#[tokio::test]
async fn mtls_identity_decides_which_node_and_service_a_client_may_use() {
    let (pki, ca) = Pki::new("authz");
    let (web_cert, web_key) = ca
        .client(&["spiffe://weft.test/ns/default/svc/web"])
        .unwrap()
        .write(&pki.dir, "web")
        .unwrap();
    let args = pki.server_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cp = Cp::start("mtls-authz", Some(REGISTRY), &args).await;

    // The web identity as node `web~1` gets the clusters.
    let web = channel(&cp, &pki.ca, Some((&web_cert, &web_key)))
        .await
        .unwrap();
    let cds = first_cds(web.clone(), "web~1").await.unwrap();
    assert_eq!(cds.type_url, CDS);
    assert!(cds.resources.len() >= 2, "{cds:?}");

    // The same identity claiming node `api~1` is refused and gets nothing.
    let denied = first_cds(web.clone(), "api~1").await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    for part in ["spiffe://weft.test/ns/default/svc/web", "api~1"] {
        assert!(denied.message().contains(part), "{}", denied.message());
    }
    let metrics = cp.get("/metrics").await.1;
    assert!(
        metrics.contains("weft_xds_streams_denied_total 1"),
        "{metrics}"
    );

    // Registration: its own service yes, another no.
    let mut reg = RegistrationClient::new(web);
    reg.register(register("web", 7101)).await.unwrap();
    let err = reg.register(register("api", 7102)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let regs = cp.json("/debug/registrations").await.to_string();
    assert!(regs.contains("7101") && !regs.contains("7102"), "{regs}");
}

#[tokio::test]
async fn clients_without_a_certificate_of_the_client_ca_get_no_answer() {
    let (pki, _ca) = Pki::new("refused");
    let (other_pki, other_ca) = Pki::new("refused-other");
    let (other_cert, other_key) = other_ca
        .client(&["spiffe://weft.test/ns/default/svc/web"])
        .unwrap()
        .write(&other_pki.dir, "web")
        .unwrap();
    let args = pki.server_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cp = Cp::start("mtls-refused", Some(REGISTRY), &args).await;

    // No client certificate: the handshake fails (TLS 1.3 reports it on the first read, so
    // the failure may surface at connect or at the first call; either way no gRPC answer).
    let no_cert = match channel(&cp, &pki.ca, None).await {
        Err(e) => e,
        Ok(ch) => format!("{:?}", first_cds(ch, "web~1").await.unwrap_err()),
    };
    assert!(!no_cert.contains("PermissionDenied"), "{no_cert}");

    // A certificate from another CA (trusting the right server CA).
    let other = match channel(&cp, &pki.ca, Some((&other_cert, &other_key))).await {
        Err(e) => e,
        Ok(ch) => {
            let r = first_cds(ch, "web~1").await;
            assert!(r.is_err(), "a foreign client certificate got config: {r:?}");
            format!("{r:?}")
        }
    };
    assert!(!other.contains("PermissionDenied"), "{other}");

    // Plain-text gRPC on the TLS port gets no answer either.
    let plain = Endpoint::from_shared(format!("http://127.0.0.1:{}", cp.xds))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
        .connect_lazy();
    assert!(first_cds(plain, "web~1").await.is_err());
    let log = cp.log();
    assert!(log.contains("TLS handshake failed"), "{log}");
}

#[test]
fn tls_flags_are_all_or_nothing_and_bad_files_exit_64() {
    let bin = env!("CARGO_BIN_EXE_weft-control-plane");
    let out = Command::new(bin)
        .args(["--tls-cert", "/nonexistent.crt"])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-key"), "{err}");

    let (pki, _ca) = Pki::new("badfiles");
    let mut args = pki.server_args();
    args[1] = pki.path("missing.crt");
    let out = Command::new(bin)
        .args(&args)
        .args([
            "--xds-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.crt"), "{err}");

    let out = Command::new(bin)
        .args(pki.server_args())
        .args(["--trust-domain", "Not A Domain"])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
