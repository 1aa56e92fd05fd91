//! Real Envoy (SotW and Delta ADS) against the control plane: endpoints follow the registry
//! file, weighted routes follow it, and Envoy never rejects an update.

use std::time::Duration;

use anyhow::{Result, ensure};
use weft_tests::*;

const CONVERGE: Duration = Duration::from_secs(10);

fn registry(b: &Backends, web: &[&str], split: Option<(u32, u32)>) -> Result<String> {
    let mut y = String::from("services:\n");
    y.push_str(&b.service_yaml("web", "http", web)?);
    y.push_str(&b.service_yaml("web-a", "http", &["web-a-1"])?);
    y.push_str(&b.service_yaml("web-b", "http", &["web-b-1"])?);
    if let Some((a, bw)) = split {
        y.push_str(&format!(
            "routes:\n  - name: web-split\n    service: web\n    rules:\n      - match: {{path_prefix: /}}\n        backends: [{{service: web-a, weight: {a}}}, {{service: web-b, weight: {bw}}}]\n"
        ));
    }
    Ok(y)
}

/// Sprays batches of `batch` requests through Envoy until `pred` holds (see
/// [`weft_tests::converge`]: any failure in any batch fails the test).
async fn converge(
    envoy: &Envoy,
    what: &str,
    batch: usize,
    pred: impl Fn(&Tally) -> bool,
) -> Result<()> {
    weft_tests::converge(
        what,
        CONVERGE,
        async || envoy.spray("web", "/", batch).await,
        pred,
    )
    .await
}

async fn scenario(ctx: &TestCtx, variant: Variant) -> Result<()> {
    let b = Backends::start(
        ctx,
        &[
            ("web-1", Kind::Http),
            ("web-2", Kind::Http),
            ("web-3", Kind::Http),
            ("web-a-1", Kind::Http),
            ("web-b-1", Kind::Http),
        ],
    )
    .await?;
    let all = ["web-1", "web-2", "web-3"];
    let cp = ControlPlane::start(ctx, &registry(&b, &all, None)?).await?;
    let node = format!("envoy-e2e-{}", variant.name());
    let envoy = Envoy::start(ctx, &cp, variant, &node).await?;

    // The route config may land just after LIVE: wait for the first 200.
    eventually("Envoy routes Host: web", CONVERGE, async || {
        let r = envoy.http_get("web", "/").await?;
        ensure!(r.status == 200, "status {}: {}", r.status, r.body);
        Ok(())
    })
    .await?;

    // 1. Round robin over all three.
    let t = envoy.spray("web", "/", 60).await?;
    ensure!(t.errors == 0, "requests failed: {t}");
    for name in all {
        ensure!(t.get(name) >= 5, "{name} got too little traffic: {t}");
    }

    // 2. Remove web-3: within 10 s it gets nothing, and nothing fails meanwhile.
    cp.write_registry(&registry(&b, &["web-1", "web-2"], None)?)?;
    converge(&envoy, "web-3 gets no traffic", 20, |t| t.get("web-3") == 0).await?;
    let t = envoy.spray("web", "/", 40).await?;
    ensure!(t.errors == 0 && t.get("web-3") == 0, "after removal: {t}");
    ensure!(
        t.get("web-1") >= 5 && t.get("web-2") >= 5,
        "after removal: {t}"
    );

    // 3. Add it back: it gets traffic again.
    cp.write_registry(&registry(&b, &all, None)?)?;
    converge(&envoy, "web-3 gets traffic again", 20, |t| {
        t.get("web-3") > 0
    })
    .await?;

    // 4. A weighted route, then flipped weights: traffic follows.
    for (wa, wb, major) in [(100, 1, "web-a-1"), (1, 100, "web-b-1")] {
        cp.write_registry(&registry(&b, &all, Some((wa, wb)))?)?;
        let what = format!("traffic follows web-a {wa} / web-b {wb}");
        converge(&envoy, &what, 30, |t| t.get(major) >= 27).await?;
        let t = envoy.spray("web", "/", 60).await?;
        ensure!(t.errors == 0, "split {wa}/{wb}: {t}");
        ensure!(
            t.get(major) >= 54,
            "split {wa}/{wb}: {major} should take ~99%: {t}"
        );
        ensure!(
            t.get("web-1") + t.get("web-2") + t.get("web-3") == 0,
            "split {wa}/{wb}: the route's own endpoints must get nothing: {t}"
        );
    }

    // 5. Envoy rejected nothing along the way.
    let stats = envoy.stats().await?;
    for must in [
        "cluster_manager.cds.update_rejected",
        "listener_manager.lds.update_rejected",
    ] {
        ensure!(stats.contains_key(must), "Envoy has no stat {must}");
    }
    let rejected: Vec<_> = stats
        .iter()
        .filter(|(k, _)| k.ends_with(".update_rejected"))
        .collect();
    ensure!(
        rejected.iter().any(|(k, _)| k.contains(".rds.")),
        "no RDS update_rejected stat: Envoy never got a RouteConfiguration? {rejected:?}"
    );
    ensure!(
        rejected.iter().all(|(_, v)| **v == 0),
        "Envoy rejected updates: {rejected:?}"
    );
    ensure!(
        stats
            .get("cluster_manager.cds.update_success")
            .copied()
            .unwrap_or(0)
            >= 1,
        "no successful CDS update"
    );
    Ok(())
}

#[tokio::test]
async fn envoy_sotw_follows_the_registry() {
    let ctx = TestCtx::new("envoy_sotw").unwrap_or_else(|e| panic!("{e:#}"));
    let r = scenario(&ctx, Variant::Sotw).await;
    ctx.finish(r);
}

#[tokio::test]
async fn envoy_delta_follows_the_registry() {
    let ctx = TestCtx::new("envoy_delta").unwrap_or_else(|e| panic!("{e:#}"));
    let r = scenario(&ctx, Variant::Delta).await;
    ctx.finish(r);
}
