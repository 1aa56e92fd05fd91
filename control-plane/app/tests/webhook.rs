//! The sidecar-injection webhook as the API server calls it: HTTPS `POST /mutate` on
//! `--webhook-listen` of the running control plane.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use base64::Engine as _;
use common::{Cp, free_port};
use weft_etcd_support::Certs;

#[tokio::test]
async fn webhook_injects_the_sidecar_over_https() {
    let certs = Certs::make("webhook");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let cert = certs.server.0.to_str().unwrap().to_string();
    let key = certs.server.1.to_str().unwrap().to_string();
    let cp = Cp::start(
        "webhook",
        None,
        &[
            "--webhook-listen",
            &listen,
            "--webhook-cert",
            &cert,
            "--webhook-key",
            &key,
            "--injector-image",
            "registry.example/weft-sidecar:1.2.3",
            "--injector-control-plane",
            "http://weft.weft-system.svc:18000",
        ],
    )
    .await;

    let ca = reqwest::Certificate::from_pem(&std::fs::read(&certs.ca).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let review = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../injector/tests/fixtures/opted-in.json"
    ))
    .unwrap();
    let mut answer = None;
    for _ in 0..100 {
        match client
            .post(format!("https://localhost:{port}/mutate"))
            .header("content-type", "application/json")
            .body(review.clone())
            .send()
            .await
        {
            Ok(r) => {
                answer = Some(r);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
    let r = answer.expect("the webhook never answered");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    let resp = &v["response"];
    assert_eq!(resp["allowed"], true, "{v}");
    assert_eq!(resp["patchType"], "JSONPatch", "{v}");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(resp["patch"].as_str().unwrap())
        .unwrap();
    let patch = String::from_utf8(patch).unwrap();
    assert!(
        patch.contains("registry.example/weft-sidecar:1.2.3"),
        "{patch}"
    );
    assert!(
        patch.contains("http://weft.weft-system.svc:18000"),
        "{patch}"
    );
    drop(cp);
}

#[test]
fn webhook_listen_without_certificate_is_a_usage_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft-control-plane"))
        .args(["--webhook-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--webhook-cert"), "{err}");
}
