//! Kubernetes as a source, end to end: the fake API server of
//! control-plane/source-kubernetes/tests/common (not a real cluster) in-process, the real
//! binary with `--kubernetes` finding it through a KUBECONFIG file, and an xDS client. An
//! EndpointSlice's endpoints reach the client and follow the slice; a TrafficRoute gets its
//! status written.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;
#[path = "../../source-kubernetes/tests/common/mod.rs"]
mod fake_api;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cp, EdsWatch, free_port};
use fake_api::{FakeApi, ROUTES, SERVICES, SLICES};
use serde_json::json;

fn spawn_with_kubeconfig(name: &str, api: &FakeApi, extra: &[&str]) -> Cp {
    let dir = std::env::temp_dir().join(format!("weft-app-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let (xds, admin) = (free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_weft-control-plane"))
        .args(["--xds-listen", &format!("127.0.0.1:{xds}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--debounce", "10ms", "--debounce-max", "100ms"])
        .arg("--kubernetes")
        .args(extra)
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAME", "cp-test")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("stderr.log")).unwrap(),
        ))
        .spawn()
        .unwrap();
    Cp {
        child,
        xds,
        admin,
        dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_slices_reach_an_xds_client_and_routes_get_status() {
    let api = FakeApi::start().await;
    api.apply(
        SERVICES,
        json!({"metadata": {"name": "pay", "namespace": "shop"},
               "spec": {"ports": [{"name": "http", "port": 80}]}}),
    );
    let slice = |addrs: &[&str]| {
        let eps: Vec<_> = addrs
            .iter()
            .map(|a| json!({"addresses": [a], "conditions": {"ready": true}}))
            .collect();
        json!({"metadata": {"name": "pay-1", "namespace": "shop",
                            "labels": {"kubernetes.io/service-name": "pay"}},
               "addressType": "IPv4",
               "ports": [{"name": "http", "port": 8080}],
               "endpoints": eps})
    };
    api.apply(SLICES, slice(&["10.1.0.1"]));
    api.apply(
        ROUTES,
        json!({"metadata": {"name": "pay", "namespace": "shop"},
               "spec": {"service": "pay.shop", "rules": [{"timeout": "2s"}]}}),
    );
    let cp = spawn_with_kubeconfig("kube-e2e", &api, &[]);
    cp.wait_ready().await;

    let mut eds = EdsWatch::open(&cp, "pay.shop").await;
    eds.until(&["10.1.0.1:8080"]).await;
    api.apply(SLICES, slice(&["10.1.0.1", "10.1.0.2"]));
    eds.until(&["10.1.0.1:8080", "10.1.0.2:8080"]).await;
    api.delete(SLICES, "shop", "pay-1");
    eds.until(&[]).await;

    // The only replica leads and writes the route's status.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let accepted = api
            .get(ROUTES, "shop", "pay")
            .and_then(|o| o.pointer("/status/conditions/0/status").cloned());
        if accepted == Some(json!("True")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "route status never written: {}",
            cp.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let sources = cp.json("/debug/sources").await;
    let src = sources["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "kubernetes")
        .unwrap()
        .clone();
    assert_eq!(src["synced"], true, "{src}");
    let (_, metrics) = cp.get("/metrics").await;
    assert!(
        metrics.contains("weft_kubernetes_events_total"),
        "{metrics}"
    );
    assert!(metrics.contains("weft_kubernetes_leader 1"), "{metrics}");
}

#[tokio::test]
async fn kube_flags_are_checked_at_startup() {
    let out = Command::new(env!("CARGO_BIN_EXE_weft-control-plane"))
        .args(["--kubernetes", "--kube-namespaces", "Not_A_Namespace"])
        .args([
            "--xds-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Not_A_Namespace"),
        "{out:?}"
    );
}
