//! Real Envoy (SotW and Delta ADS) accepts and enforces the policies added for the sidecar:
//! local rate limits per service and per route rule answer 429 with `retry-after`, and a
//! cluster's retry budget, panic threshold, zone-aware config, max ejection time and Weft
//! metadata arrive as sent, without a single rejected update.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use weft_tests::*;

const CONVERGE: Duration = Duration::from_secs(10);

/// `web` is limited to 5 requests per 10s as a whole; `api` only on `/limited` (3 per 10s).
/// The 10s refill keeps a burst of requests from seeing a refill unless it straddles a tick.
fn registry(b: &Backends) -> Result<String> {
    let mut y = String::from("services:\n");
    y.push_str(&b.service_yaml("web", "http", &["web-1"])?);
    y.push_str(&b.service_yaml("api", "http", &["api-1"])?);
    y.push_str(
        r#"routes:
  - name: api-limits
    service: api
    rules:
      - match: {path_prefix: /limited}
        rate_limit: {requests: 3, per: 10s}
policies:
  - name: web-policy
    service: web
    lb: peak_ewma
    zone_aware: {}
    panic_threshold: 40
    rate_limit: {requests: 5, per: 10s}
    circuit_breakers:
      max_requests: 1000
      retry_budget: {percent: 25, min_concurrency: 4}
    outlier_detection: {consecutive_5xx: 5, base_ejection_time: 10s, max_ejection_time: 60s}
"#,
    );
    Ok(y)
}

/// What `n` back-to-back requests got: 200s (from a backend) and 429s, whose `retry-after`
/// values are collected; anything else fails.
#[derive(Debug, Default)]
struct Limited {
    ok: u32,
    limited: u32,
    retry_after: Vec<Option<String>>,
}

async fn burst(envoy: &Envoy, host: &str, path: &str, n: usize) -> Result<Limited> {
    let mut out = Limited::default();
    for i in 0..n {
        let r = envoy.http_get(host, path).await?;
        match r.status {
            200 => {
                ensure!(
                    r.backend().is_some(),
                    "request {i} to {host}{path}: 200 without x-backend: {}",
                    r.body
                );
                out.ok += 1;
            }
            429 => {
                out.limited += 1;
                out.retry_after.push(
                    r.headers
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string),
                );
            }
            s => bail!("request {i} to {host}{path}: status {s}: {}", r.body.trim()),
        }
    }
    Ok(out)
}

/// Envoy's `/config_dump` entry for dynamic cluster `name`.
async fn dumped_cluster(envoy: &Envoy, name: &str) -> Result<Value> {
    let text = envoy.admin_get("/config_dump").await?;
    let dump: Value = serde_json::from_str(&text).context("parsing /config_dump")?;
    let configs = dump["configs"]
        .as_array()
        .context("/config_dump without configs")?;
    for c in configs {
        if !c["@type"]
            .as_str()
            .is_some_and(|t| t.ends_with("ClustersConfigDump"))
        {
            continue;
        }
        for dc in c["dynamic_active_clusters"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if dc["cluster"]["name"] == name {
                return Ok(dc["cluster"].clone());
            }
        }
    }
    bail!("cluster {name} not in Envoy's config dump")
}

/// `v` as a number whether Envoy's JSON printed it as an integer or a float.
fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

async fn scenario(ctx: &TestCtx, variant: Variant) -> Result<()> {
    let b = Backends::start(ctx, &[("web-1", Kind::Http), ("api-1", Kind::Http)]).await?;
    let cp = ControlPlane::start(ctx, &registry(&b)?).await?;
    let node = format!("envoy-policies-{}", variant.name());
    let envoy = Envoy::start(ctx, &cp, variant, &node).await?;

    // Wait for routes on a path no limit applies to, so no token is spent waiting. `web` is in
    // the same RouteConfiguration, so its limit is in place too.
    eventually("Envoy routes Host: api", CONVERGE, async || {
        let r = envoy.http_get("api", "/open").await?;
        ensure!(r.status == 200, "status {}: {}", r.status, r.body);
        Ok(())
    })
    .await?;

    // 1. Per service: about 5 of 20 quick requests pass, the rest are 429 with retry-after.
    let web = burst(&envoy, "web", "/", 20).await?;
    ensure!(
        (4..=6).contains(&web.ok) && web.ok + web.limited == 20,
        "web: expected about 5 of 20 requests to pass: {web:?}"
    );
    ensure!(
        web.retry_after.iter().all(|v| v.as_deref() == Some("10")),
        "web: every 429 must carry retry-after: 10: {web:?}"
    );

    // 2. Per rule: /limited is limited to about 3, /open of the same service is not.
    let limited = burst(&envoy, "api", "/limited", 12).await?;
    ensure!(
        (2..=4).contains(&limited.ok) && limited.limited >= 8,
        "api /limited: expected about 3 of 12 requests to pass: {limited:?}"
    );
    ensure!(
        limited
            .retry_after
            .iter()
            .all(|v| v.as_deref() == Some("10")),
        "api /limited: every 429 must carry retry-after: 10: {limited:?}"
    );
    let open = burst(&envoy, "api", "/open", 12).await?;
    ensure!(
        open.ok == 12,
        "api /open must not be limited by /limited's rule: {open:?}"
    );

    // 3. The cluster arrived with every new field.
    let c = dumped_cluster(&envoy, "web").await?;
    let t = &c["circuit_breakers"]["thresholds"][0];
    ensure!(
        num(&t["retry_budget"]["budget_percent"]["value"]) == Some(25.0)
            && num(&t["retry_budget"]["min_retry_concurrency"]) == Some(4.0),
        "retry_budget: {t}"
    );
    let lb = &c["common_lb_config"];
    ensure!(
        num(&lb["healthy_panic_threshold"]["value"]) == Some(40.0),
        "healthy_panic_threshold: {lb}"
    );
    ensure!(
        num(&lb["zone_aware_lb_config"]["routing_enabled"]["value"]) == Some(100.0),
        "zone_aware_lb_config: {lb}"
    );
    ensure!(
        c["outlier_detection"]["max_ejection_time"] == "60s",
        "max_ejection_time: {}",
        c["outlier_detection"]
    );
    let weft = &c["metadata"]["filter_metadata"]["weft"];
    ensure!(
        weft["lb_algorithm"] == "peak_ewma" && num(&weft["zone_min_healthy_percent"]) == Some(70.0),
        "weft metadata: {weft}"
    );

    // 4. Envoy rejected nothing, and the limiter counted what it refused.
    let stats = envoy.stats().await?;
    let rejected: Vec<_> = stats
        .iter()
        .filter(|(k, _)| k.ends_with(".update_rejected"))
        .collect();
    for kind in [".cds.", ".lds.", ".rds."] {
        ensure!(
            rejected.iter().any(|(k, _)| k.contains(kind)),
            "no {kind} update_rejected stat: {rejected:?}"
        );
    }
    ensure!(
        rejected.iter().all(|(_, v)| **v == 0),
        "Envoy rejected updates: {rejected:?}"
    );
    let refused: u64 = stats
        .iter()
        .filter(|(k, _)| k.ends_with("http_local_rate_limit.rate_limited"))
        .map(|(_, v)| *v)
        .sum();
    ensure!(
        refused == u64::from(web.limited + limited.limited),
        "rate_limited stats say {refused}, the test saw {} 429s",
        web.limited + limited.limited
    );
    Ok(())
}

#[tokio::test]
async fn envoy_sotw_enforces_sidecar_policies() {
    let ctx = TestCtx::new("envoy_policies_sotw").unwrap_or_else(|e| panic!("{e:#}"));
    let r = scenario(&ctx, Variant::Sotw).await;
    ctx.finish(r);
}

#[tokio::test]
async fn envoy_delta_enforces_sidecar_policies() {
    let ctx = TestCtx::new("envoy_policies_delta").unwrap_or_else(|e| panic!("{e:#}"));
    let r = scenario(&ctx, Variant::Delta).await;
    ctx.finish(r);
}
