//! The `weft_sidecar_*` panels of the chart's Grafana dashboard
//! (charts/weft/dashboards/weft.json) against a real `weft-sidecar`: every metric they read
//! must be one the sidecar exposes, read the way its type allows, with labels its series
//! carry; and every family the sidecar exposes must be on the dashboard. The control plane's
//! panels are control-plane/app/tests/dashboard.rs's business; both use the same checker.
//!
//! prometheus-client prints nothing for a labelled family without series, so the test makes
//! one of each through a client sidecar: requests to a service with a dead endpoint and a
//! retry policy (requests, latency, retries, connect errors), to one with a rate limit of one
//! request (rate limited), to one whose circuit breaker allows no request (overloaded), and
//! to an unknown host.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../control-plane/app/tests/support/dashboard.rs"]
mod dashboard;

use std::time::Duration;

use anyhow::{Result, ensure};
use dashboard::Exposition;
use weft_tests::*;

const CONVERGE: Duration = Duration::from_secs(20);

/// Families the sidecar exposes that the dashboard deliberately leaves out, and why.
const NOT_ON_DASHBOARD: &[(&str, &str)] = &[];

fn is_sidecar(name: &str) -> bool {
    name.starts_with("weft_sidecar_")
}

async fn sidecar_metrics_match_the_dashboard(ctx: &TestCtx) -> Result<()> {
    let dash = dashboard::load(&dashboard::dashboard_path(&repo_root()));
    let queries = dashboard::queries(&dash);
    let b = Backends::start(ctx, &[("web-1", Kind::Http)]).await?;
    let web = b.endpoint_yaml("web-1")?;
    let dead = free_port()?;
    let registry = format!(
        "services:
  - name: web
    protocol: http
    endpoints:
      - {web}
      - {{address: 127.0.0.1, port: {dead}}}
  - name: limited
    protocol: http
    endpoints: [{web}]
  - name: closed
    protocol: http
    endpoints: [{web}]
routes:
  - name: web-retries
    service: web
    rules:
      - retries: {{attempts: 3, on: [connect-failure]}}
policies:
  - {{name: web-lb, service: web, lb: round_robin}}
  - {{name: limited-rl, service: limited, rate_limit: {{requests: 1, per: 1m}}}}
  - {{name: closed-cb, service: closed, circuit_breakers: {{max_requests: 0}}}}
"
    );
    let cp = ControlPlane::start(ctx, &registry).await?;
    let client = Sidecar::start(ctx, SidecarArgs::client(&cp, "client")?).await?;

    eventually("web answers through the sidecar", CONVERGE, async || {
        let r = client.request("web", "/", &[]).await?;
        ensure!(r.status == 200, "{} {}", r.status, r.body.trim());
        Ok(())
    })
    .await?;
    // Round robin over a live and a dead endpoint: every other first try fails to connect
    // and is retried.
    let t = client.spray("web", "/", 10).await?;
    ensure!(t.errors == 0, "web through retries: {t}");
    for (host, want) in [("limited", 200), ("limited", 429), ("closed", 503)] {
        let r = client.request(host, "/", &[]).await?;
        ensure!(
            r.status == want,
            "{host}: {} {}, expected {want}",
            r.status,
            r.body.trim()
        );
    }
    let r = client.request("no-such-service", "/", &[]).await?;
    ensure!(
        r.status == 404,
        "unknown host: {} {}",
        r.status,
        r.body.trim()
    );

    let families = [
        "weft_sidecar_requests_total",
        "weft_sidecar_request_duration_seconds_bucket",
        "weft_sidecar_retries_total",
        "weft_sidecar_upstream_errors_total",
        "weft_sidecar_rate_limited_total",
        "weft_sidecar_overloaded_total",
    ];
    let text = eventually("every labelled family has a series", CONVERGE, async || {
        let text = client.metrics().await?;
        let e = Exposition::parse(&text);
        let missing: Vec<&str> = families
            .iter()
            .copied()
            .filter(|n| !e.series.contains_key(*n))
            .collect();
        ensure!(missing.is_empty(), "no series yet: {missing:?}\n{text}");
        Ok(text)
    })
    .await?;
    let exposed = Exposition::parse(&text);

    let report = dashboard::check(&queries, &exposed, "the sidecar", &is_sidecar);
    let mut problems = report.problems.clone();
    for (family, kind) in &exposed.families {
        if !is_sidecar(family) {
            // The control plane test takes every other name as its own.
            problems.push(format!(
                "the sidecar exposes `{family}`, outside weft_sidecar_*: the dashboard tests \
                 split metrics between the binaries by that prefix"
            ));
            continue;
        }
        if report.used_families.contains(family)
            || NOT_ON_DASHBOARD.iter().any(|(f, _)| f == family)
        {
            continue;
        }
        problems.push(format!(
            "the sidecar exposes the {kind} `{family}`, but no dashboard panel reads it: add a \
             panel to charts/weft/dashboards/weft.json, or list it in NOT_ON_DASHBOARD with the \
             reason"
        ));
    }
    ensure!(
        !report.checked.is_empty(),
        "the dashboard reads no weft_sidecar_* metric at all"
    );
    eprintln!(
        "dashboard: {} sidecar metric names checked against {} exposed families",
        report.checked.len(),
        exposed.families.len()
    );
    ensure!(
        problems.is_empty(),
        "the dashboard does not match the sidecar:\n  {}",
        problems.join("\n  ")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_sidecar_query_reads_what_the_sidecar_exposes() {
    let ctx = TestCtx::new("dashboard_sidecar").unwrap();
    let r = sidecar_metrics_match_the_dashboard(&ctx).await;
    ctx.finish(r);
}
