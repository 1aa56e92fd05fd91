//! `weft-bench-lb`: tail latency per balancing algorithm with one slow endpoint.
//!
//! N HTTP endpoints of one service (`weft-demo-backend`, straight from the registry file), one
//! of which answers every request after `--slow-ms`. An app (this process) offers `--rate`
//! requests per second, open loop, through its sidecar's outbound listener, once per `lb`
//! algorithm; each run gets a new sidecar, so it starts from a fresh balancer state, and has no
//! warm-up: how fast an algorithm learns to avoid the slow endpoint is part of what is measured.
//! Then the same through the real Envoy configured by the control plane (its round robin and
//! least request), as a reference.
//!
//! ```sh
//! cargo build --release -p weft-control-plane -p weft-sidecar -p weft-demo-backend -p weft-bench
//! WEFT_BIN_PROFILE=release target/release/weft-bench-lb            # ~3 minutes
//! WEFT_BIN_PROFILE=release target/release/weft-bench-lb --quick    # smoke run, ~40 s
//! ```

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use clap::Parser;
use serde::Serialize;
use weft_bench::load::{FixedRate, LoadResult, Target, fixed_rate};
use weft_bench::report::{Table, fmt_us, publish};
use weft_tests::{
    Backends, ControlPlane, Envoy, Kind, Sidecar, SidecarArgs, TestCtx, Variant, eventually,
};

#[derive(Debug, Parser)]
#[command(name = "weft-bench-lb", about)]
struct Cli {
    /// Smoke run: 200 req/s for 4 s per algorithm. Checks the benchmark works; the numbers
    /// mean little.
    #[arg(long)]
    quick: bool,
    /// Requests per second offered by the app.
    #[arg(long)]
    rate: Option<u32>,
    /// Measured seconds per algorithm.
    #[arg(long)]
    seconds: Option<u64>,
    /// Endpoints of the service, one of them slow.
    #[arg(long, default_value_t = 11)]
    endpoints: usize,
    /// How long the slow endpoint takes to answer each request, in milliseconds.
    #[arg(long, default_value_t = 2_000)]
    slow_ms: u64,
    /// The sidecar's algorithms to run (registry `lb` values), comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "round_robin,least_request,peak_ewma"
    )]
    algorithms: Vec<String>,
    /// Envoy's algorithms to run as a reference, comma-separated; `none` skips Envoy.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "round_robin,least_request"
    )]
    envoy: Vec<String>,
}

/// Every parameter of a run, published with the results.
#[derive(Debug, Serialize)]
struct Params {
    endpoints: usize,
    slow_endpoints: usize,
    slow_ms: u64,
    rate: u32,
    seconds: u64,
    warmup_s: u64,
    threshold_ms: u64,
    quick: bool,
}

#[derive(Debug, Serialize)]
struct Run {
    proxy: &'static str,
    lb: String,
    /// Requests slower than the threshold (a count, to go with the share).
    slow_requests: u64,
    result: LoadResult,
}

#[derive(Debug, Serialize)]
struct Raw {
    params: Params,
    runs: Vec<Run>,
}

const SERVICE: &str = "web";
const THRESHOLD: Duration = Duration::from_secs(1);
const CONVERGE: Duration = Duration::from_secs(20);

fn registry(backends: &Backends, names: &[String], lb: &str) -> Result<String> {
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    Ok(format!(
        "services:\n{}policies:\n  - name: {SERVICE}-lb\n    service: {SERVICE}\n    lb: {lb}\n",
        backends.service_yaml(SERVICE, "http", &refs)?
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    ensure!(cli.endpoints >= 2, "--endpoints must be at least 2");
    let params = Params {
        endpoints: cli.endpoints,
        slow_endpoints: 1,
        slow_ms: cli.slow_ms,
        rate: cli.rate.unwrap_or(if cli.quick { 200 } else { 1_000 }),
        seconds: cli.seconds.unwrap_or(if cli.quick { 4 } else { 25 }),
        warmup_s: 0,
        threshold_ms: THRESHOLD.as_millis() as u64,
        quick: cli.quick,
    };
    let load = FixedRate {
        rate: params.rate,
        duration: Duration::from_secs(params.seconds),
        // No warm-up: the first seconds of a fresh balancer are part of its tail. (A warm-up
        // would also leave a pause before the measured window while its slow requests finish.)
        warmup: Duration::ZERO,
        timeout: Duration::from_secs(10),
        thresholds: vec![THRESHOLD],
    };

    let ctx = TestCtx::new("bench-lb")?;
    let names: Vec<String> = (1..=cli.endpoints).map(|i| format!("web-{i}")).collect();
    let specs: Vec<(&str, Kind)> = names.iter().map(|n| (n.as_str(), Kind::Http)).collect();
    let backends = Backends::start(&ctx, &specs).await?;
    let slow = names.last().context("no endpoints")?;
    backends
        .control(slow, &format!("delay?ms={}", cli.slow_ms))
        .await?;
    let first_lb = cli
        .algorithms
        .first()
        .or(cli.envoy.first())
        .map_or("round_robin", String::as_str);
    let mut cp = ControlPlane::start(&ctx, &registry(&backends, &names, first_lb)?).await?;

    let mut runs = Vec::new();
    for lb in &cli.algorithms {
        cp.write_registry(&registry(&backends, &names, lb)?)?;
        let sidecar = fresh_sidecar(&ctx, &cp, lb, cli.endpoints).await?;
        let target = Target::Http {
            addr: ([127, 0, 0, 1], sidecar.outbound_port()).into(),
            host: SERVICE.into(),
            path: "/".into(),
            body: Bytes::new(),
        };
        eprintln!(
            "weft-sidecar, lb {lb}: {} req/s for {} s",
            params.rate, params.seconds
        );
        let result = fixed_rate(&target, &load).await?;
        runs.push(run("weft-sidecar", lb, result));
        stop_sidecar(sidecar).await?;
        cp.proc().ensure_running()?;
        // The slow endpoint's last requests of this run must not overlap the next one.
        tokio::time::sleep(Duration::from_millis(cli.slow_ms)).await;
    }
    let mut envoy_runs: Vec<&String> = cli.envoy.iter().filter(|l| *l != "none").collect();
    if let (false, Err(e)) = (envoy_runs.is_empty(), weft_tests::envoy_bin()) {
        // The sidecar's numbers stand on their own; the reference is a bonus.
        eprintln!("skipping the Envoy reference runs: {e:#}");
        envoy_runs.clear();
    }
    for lb in envoy_runs {
        cp.write_registry(&registry(&backends, &names, lb)?)?;
        let envoy = fresh_envoy(&ctx, &cp, lb, cli.endpoints).await?;
        let target = Target::Http {
            addr: ([127, 0, 0, 1], envoy.listener_port).into(),
            host: SERVICE.into(),
            path: "/".into(),
            body: Bytes::new(),
        };
        eprintln!(
            "Envoy, lb {lb}: {} req/s for {} s",
            params.rate, params.seconds
        );
        let result = fixed_rate(&target, &load).await?;
        runs.push(run("envoy", lb, result));
        drop(envoy);
        tokio::time::sleep(Duration::from_millis(cli.slow_ms)).await;
    }

    let markdown = render(&params, &runs);
    publish("lb", &markdown, &Raw { params, runs })
}

fn run(proxy: &'static str, lb: &str, result: LoadResult) -> Run {
    let share = result.slower_than.get(&1000).copied().unwrap_or(0.0);
    Run {
        proxy,
        lb: lb.to_string(),
        slow_requests: (share * result.latency.count as f64).round() as u64,
        result,
    }
}

/// A new client sidecar, once it balances `web` over every endpoint with `lb`. No request has
/// gone through it yet, so its balancer starts from nothing whatever config it saw first.
async fn fresh_sidecar(ctx: &TestCtx, cp: &ControlPlane, lb: &str, n: usize) -> Result<Sidecar> {
    let sidecar = Sidecar::start(ctx, SidecarArgs::client(cp, &format!("client-{lb}"))?).await?;
    eventually(
        &format!("the sidecar balances {SERVICE} with {lb} over {n} endpoints"),
        CONVERGE,
        async || {
            let algorithm = sidecar.algorithm(SERVICE).await?;
            ensure!(
                algorithm.as_deref() == Some(&format!("\"{lb}\"")),
                "algorithm {algorithm:?}"
            );
            let endpoints = sidecar.endpoints(SERVICE).await?.len();
            ensure!(endpoints == n, "{endpoints} endpoints");
            Ok(())
        },
    )
    .await?;
    Ok(sidecar)
}

async fn stop_sidecar(mut sidecar: Sidecar) -> Result<()> {
    sidecar.ensure_running()?;
    sidecar.kill().await
}

/// Envoy's name for the policy the control plane translates `lb` into (`None`: the default,
/// ROUND_ROBIN, which its JSON leaves out).
fn envoy_policy(lb: &str) -> Result<Option<&'static str>> {
    Ok(match lb {
        "round_robin" | "weighted_round_robin" => None,
        "least_request" | "peak_ewma" => Some("LEAST_REQUEST"),
        "random" => Some("RANDOM"),
        other => bail!("no Envoy reference run for lb {other}"),
    })
}

/// A new Envoy, once its cluster `web` has `lb`'s policy and every endpoint healthy. No
/// request has gone through it yet, so it starts fresh even if it saw an older policy first.
async fn fresh_envoy(ctx: &TestCtx, cp: &ControlPlane, lb: &str, n: usize) -> Result<Envoy> {
    let want = envoy_policy(lb)?;
    let envoy = Envoy::start(ctx, cp, Variant::Delta, &format!("bench-lb-{lb}")).await?;
    eventually(
        &format!("Envoy balances {SERVICE} with {lb} over {n} healthy endpoints"),
        CONVERGE,
        async || {
            let policy = envoy_cluster(&envoy, SERVICE).await?["lb_policy"].clone();
            ensure!(policy.as_str() == want, "lb_policy {policy}");
            let healthy = envoy
                .stat(&format!("cluster.{SERVICE}.membership_healthy"))
                .await?;
            ensure!(healthy == Some(n as u64), "healthy {healthy:?}");
            Ok(())
        },
    )
    .await?;
    Ok(envoy)
}

/// Envoy's `/config_dump` entry for dynamic cluster `name`.
async fn envoy_cluster(envoy: &Envoy, name: &str) -> Result<serde_json::Value> {
    let dump: serde_json::Value = serde_json::from_str(&envoy.admin_get("/config_dump").await?)
        .context("parsing Envoy's /config_dump")?;
    dump["configs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["dynamic_active_clusters"].as_array())
        .flatten()
        .map(|dc| &dc["cluster"])
        .find(|c| c["name"] == name)
        .cloned()
        .with_context(|| format!("cluster {name} not in Envoy's config dump"))
}

fn render(p: &Params, runs: &[Run]) -> String {
    let mut t = Table::new(&[
        "proxy", "lb", "requests", "errors", "> 1 s", "p50", "p99", "p99.9", "max",
    ]);
    for r in runs {
        let l = &r.result.latency;
        let share = r.result.slower_than.get(&1000).copied().unwrap_or(0.0);
        t.row(vec![
            r.proxy.to_string(),
            format!("`{}`", r.lb),
            r.result.sent.to_string(),
            r.result.errors.to_string(),
            format!("{:.3}% ({})", share * 100.0, r.slow_requests),
            fmt_us(l.p50_us as f64),
            fmt_us(l.p99_us as f64),
            fmt_us(l.p999_us as f64),
            fmt_us(l.max_us as f64),
        ]);
    }
    format!(
        "## Load balancing: tail latency with one slow endpoint\n\n\
         {} HTTP endpoints of one service (`weft-demo-backend`), {} of them answering every \
         request after {} ms. The app offers {} requests/s (open loop, latency from each \
         request's scheduled start) for {} s per algorithm through its `weft-sidecar`'s outbound \
         listener, or through Envoy configured by the control plane. Each run starts from a \
         fresh balancer (a new sidecar or Envoy) with no warm-up, so the time an algorithm \
         takes to learn is included. Target: at most 0.1% of requests slower than 1 s with \
         `peak_ewma` (P2C over peak EWMA, the default).{}\n\n{}",
        p.endpoints,
        p.slow_endpoints,
        p.slow_ms,
        p.rate,
        p.seconds,
        if p.quick {
            " **Quick run: the numbers mean little.**"
        } else {
            ""
        },
        t.to_markdown()
    )
}
