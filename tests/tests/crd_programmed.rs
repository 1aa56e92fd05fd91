//! A TrafficRoute that real Envoys (SotW and Delta) reject gets `Programmed=False` with the
//! proxies and Envoy's reason in its status, and `Programmed=True` again once fixed.
//!
//! Kubernetes is the fake API server of control-plane/source-kubernetes/tests/common (a
//! stand-in following the list/watch and status-patch contract; no real cluster runs here),
//! found by the real control plane through a KUBECONFIG file.

#[path = "../../control-plane/source-kubernetes/tests/common/mod.rs"]
mod fake_api;

use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use fake_api::{FakeApi, ROUTES};
use serde_json::{Value, json};
use weft_tests::*;

fn route(path_match: Value) -> Value {
    json!({"metadata": {"name": "web-paths", "namespace": "shop"},
           "spec": {"service": "web", "rules": [{"match": path_match}]}})
}

/// The route's condition of type `type_` as last written.
fn condition(api: &FakeApi, type_: &str) -> Result<Value> {
    let obj = api
        .get(ROUTES, "shop", "web-paths")
        .ok_or_else(|| anyhow!("TrafficRoute shop/web-paths is gone"))?;
    obj.pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_).cloned())
        .ok_or_else(|| anyhow!("no {type_} condition yet: {obj}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_envoys_reject_is_not_programmed() {
    let ctx = TestCtx::new("crd_programmed").unwrap_or_else(|e| panic!("{e:#}"));
    let r = scenario(&ctx).await;
    ctx.finish(r);
}

async fn scenario(ctx: &TestCtx) -> Result<()> {
    let api = FakeApi::start().await;
    api.apply(ROUTES, route(json!({"path_prefix": "/"})));
    let kubeconfig = ctx.path("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig())?;
    let b = Backends::start(ctx, &[("web-1", Kind::Http)]).await?;
    let mut reg = String::from("services:\n");
    reg.push_str(&b.service_yaml("web", "http", &["web-1"])?);
    let kubeconfig = kubeconfig.display().to_string();
    let cp = ControlPlane::start_with_env(
        ctx,
        Some(&reg),
        &["--kubernetes".to_string()],
        &[("KUBECONFIG", &kubeconfig), ("POD_NAME", "cp-test")],
    )
    .await?;
    let sotw = Envoy::start(ctx, &cp, Variant::Sotw, "crd-sotw").await?;
    let delta = Envoy::start(ctx, &cp, Variant::Delta, "crd-delta").await?;
    for envoy in [&sotw, &delta] {
        envoy.wait_routes("web", Some("web-1")).await?;
    }
    eventually(
        "Accepted and Programmed",
        Duration::from_secs(20),
        async || {
            let a = condition(&api, "Accepted")?;
            let p = condition(&api, "Programmed")?;
            ensure!(a["status"] == "True" && p["status"] == "True", "{a}\n{p}");
            Ok(())
        },
    )
    .await?;

    // A regex Envoy refuses: both Envoys NACK the RouteConfiguration the route is part of.
    api.apply(
        ROUTES,
        route(json!({"path_regex": regex_envoy_rejects("crd")})),
    );
    let p = eventually("Programmed=False", Duration::from_secs(20), async || {
        let p = condition(&api, "Programmed")?;
        ensure!(p["status"] == "False", "{p}");
        let msg = p["message"].as_str().unwrap_or_default();
        ensure!(
            msg.contains("crd-delta") && msg.contains("crd-sotw"),
            "both proxies named: {p}"
        );
        Ok(p)
    })
    .await?;
    eprintln!("Programmed: {p}");
    ensure!(p["reason"] == "RejectedByProxies", "{p}");
    let msg = p["message"].as_str().unwrap_or_default();
    ensure!(
        msg.contains("RouteConfiguration weft_http") && msg.contains("RE2 program size"),
        "message names the resource and Envoy's reason: {msg}"
    );
    // Valid as far as the schema knows: still Accepted.
    let a = condition(&api, "Accepted")?;
    ensure!(a["status"] == "True", "{a}");
    // And Envoy keeps serving the last good routes.
    let t = sotw.spray("web", "/", 5).await?;
    ensure!(t.errors == 0 && t.get("web-1") == 5, "{t}");

    api.apply(ROUTES, route(json!({"path_prefix": "/"})));
    eventually(
        "Programmed=True after the fix",
        Duration::from_secs(20),
        async || {
            let p = condition(&api, "Programmed")?;
            ensure!(p["status"] == "True" && p["reason"] == "Programmed", "{p}");
            Ok(())
        },
    )
    .await?;
    Ok(())
}
