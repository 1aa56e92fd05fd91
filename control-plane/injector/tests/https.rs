#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The webhook over HTTPS: a self-signed certificate for 127.0.0.1, `serve` on a loopback
//! port, and a client that trusts only that certificate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;
use weft_identity::TlsError;
use weft_injector::{InjectError, InjectorConfig, serve, tls_config, tls_config_with_reload};

/// A directory of its own per test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "weft-injector-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// (certificate PEM, key PEM) for 127.0.0.1.
fn self_signed() -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    (ck.cert.pem(), ck.signing_key.serialize_pem())
}

fn write_pair(dir: &TempDir, (cert, key): &(String, String)) -> (PathBuf, PathBuf) {
    let (c, k) = (dir.path("tls.crt"), dir.path("tls.key"));
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    (c, k)
}

fn client(trusted_cert_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(trusted_cert_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(tls: Arc<weft_injector::rustls::ServerConfig>) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(
            listener,
            tls,
            Arc::new(InjectorConfig::default()),
            async {
                let _ = stopped.await;
            },
        ));
        Server {
            addr,
            stop: Some(stop),
            task,
        }
    }
    fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

#[tokio::test]
async fn answers_admission_reviews_over_https() {
    let dir = TempDir::new();
    let pair = self_signed();
    let (cert, key) = write_pair(&dir, &pair);
    let server = Server::start(tls_config(&cert, &key).unwrap()).await;
    let http = client(&pair.0);

    let resp = http
        .post(server.url("/mutate"))
        .header("content-type", "application/json")
        .body(fixture("opted-in.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // ALPN offers h2, as the API server prefers.
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let review: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    assert_eq!(
        review["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(review["response"]["allowed"], true);
    assert_eq!(review["response"]["patchType"], "JSONPatch");
    assert!(review["response"]["patch"].as_str().unwrap().len() > 100);

    let resp = http
        .post(server.url("/mutate"))
        .body(fixture("not-opted-in.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let review: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert!(review["response"].get("patch").is_none());

    let resp = http
        .post(server.url("/mutate"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("not an AdmissionReview")
    );

    let resp = http.get(server.url("/mutate")).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    let resp = http.post(server.url("/validate")).send().await.unwrap();
    assert_eq!(resp.status(), 404);

    let big = vec![b' '; weft_injector::MAX_BODY_BYTES + 1];
    let resp = http
        .post(server.url("/mutate"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);

    // HTTP/1.1 works too.
    let h1 = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pair.0.as_bytes()).unwrap())
        .http1_only()
        .build()
        .unwrap();
    let resp = h1
        .post(server.url("/mutate"))
        .body(fixture("opted-in.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);

    server.stop().await;
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_restart() {
    let dir = TempDir::new();
    let first = self_signed();
    let (cert, key) = write_pair(&dir, &first);
    let server = Server::start(tls_config_with_reload(&cert, &key, Duration::ZERO).unwrap()).await;
    let ping = |pem: String, url: String| async move {
        client(&pem)
            .post(url)
            .body(fixture("not-opted-in.json"))
            .send()
            .await
            .map(|r| r.status())
    };
    assert_eq!(
        ping(first.0.clone(), server.url("/mutate")).await.unwrap(),
        200
    );

    let second = self_signed();
    write_pair(&dir, &second);
    assert_eq!(
        ping(second.0.clone(), server.url("/mutate")).await.unwrap(),
        200
    );
    assert!(ping(first.0.clone(), server.url("/mutate")).await.is_err());

    // A half-written pair (new certificate, old key) is refused; the last good pair stays.
    let third = self_signed();
    std::fs::write(&cert, &third.0).unwrap();
    assert_eq!(
        ping(second.0.clone(), server.url("/mutate")).await.unwrap(),
        200
    );

    server.stop().await;
}

#[test]
fn bad_certificate_files_are_errors() {
    let dir = TempDir::new();
    let missing = dir.path("missing.pem");
    assert!(matches!(
        tls_config(&missing, &missing),
        Err(InjectError::Tls(TlsError::Read { .. }))
    ));

    let garbage = dir.path("garbage.pem");
    std::fs::write(&garbage, "not a pem").unwrap();
    let pair = self_signed();
    let (cert, key) = write_pair(&dir, &pair);
    let err = tls_config(&garbage, &key).unwrap_err();
    assert!(
        matches!(err, InjectError::Tls(TlsError::Pem { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("garbage.pem"), "{err}");
    assert!(matches!(
        tls_config(&cert, &garbage),
        Err(InjectError::Tls(TlsError::Pem { .. }))
    ));

    let other = self_signed();
    let other_key = dir.path("other.key");
    std::fs::write(&other_key, &other.1).unwrap();
    assert!(matches!(
        tls_config(&cert, &other_key),
        Err(InjectError::Tls(TlsError::Rustls(_)))
    ));
    assert!(tls_config(Path::new(&cert), Path::new(&key)).is_ok());
}
