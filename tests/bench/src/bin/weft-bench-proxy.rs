//! `weft-bench-proxy`: the cost of one hop through `weft-sidecar` beside one hop through Envoy,
//! both configured by our control plane, against the same minimal backend reached directly.
//!
//! Each path is driven with HTTP/1.1 keep-alive (1 KiB POST bodies and responses) and gRPC
//! unary (`weft.demo.v1.Echo`): latency at a fixed rate (open loop), the proxy's CPU per
//! request during that run, saturation throughput with the proxy on one core (wrk for HTTP, the
//! in-tree closed loop for gRPC), and the proxy's RSS idle and with 1,000 endpoints behind a
//! service. Paths are interleaved (direct, sidecar, Envoy, direct, …) so slow drift on a shared
//! machine spreads over all of them, and medians over rounds are reported.
//!
//! Placement: this process, the backend (`weft-bench-proxy backend`, a child), the control
//! plane and wrk run on CPU 0; the proxy under test (every thread) on CPU 1. Envoy runs with
//! `--concurrency 1`, the sidecar with `TOKIO_WORKER_THREADS=1`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use tokio::process::Command;
use weft_bench::load::{self, FixedRate, LoadResult, Target};
use weft_bench::report::{self, Latency, Table, fmt_bytes, fmt_us, median};
use weft_bench::{backend, procstat};
use weft_tests::{
    ControlPlane, Envoy, Proc, Sidecar, SidecarArgs, TestCtx, Variant, free_port, wait_for_port,
};

/// The service the HTTP load goes to, and the gRPC one.
const HTTP_SERVICE: &str = "bench";
const GRPC_SERVICE: &str = "bench-grpc";
/// The service that only holds many endpoints, for the RSS measurement.
const BIG_SERVICE: &str = "big";

#[derive(Parser, Debug)]
#[command(about = "Sidecar data path beside Envoy: latency, CPU, saturation, RSS")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve the benchmark backend (started by the benchmark itself as a child process).
    Backend {
        #[arg(long)]
        http: SocketAddr,
        #[arg(long)]
        grpc: SocketAddr,
    },
}

#[derive(Args, Debug, Clone, Serialize)]
struct RunArgs {
    /// Smoke run: one round of short runs. The numbers mean little.
    #[arg(long)]
    quick: bool,
    /// Rounds over all paths (direct, sidecar, Envoy, direct, …).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Requests per second of the fixed-rate (latency and CPU) runs.
    #[arg(long, default_value_t = 1_000)]
    rate: u32,
    /// Measured seconds of each fixed-rate run.
    #[arg(long, default_value_t = 6.0)]
    fixed_secs: f64,
    /// Unmeasured warm-up seconds before each fixed-rate run.
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
    /// Seconds of each saturation run (wrk: whole seconds).
    #[arg(long, default_value_t = 4.0)]
    saturation_secs: f64,
    /// Concurrent connections (wrk, HTTP) and concurrent calls on one HTTP/2 connection (gRPC)
    /// in saturation runs.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Request and response body size for HTTP (bytes).
    #[arg(long, default_value_t = backend::BODY_BYTES)]
    body_bytes: usize,
    /// Endpoints behind one service for the RSS measurement.
    #[arg(long, default_value_t = 1_000)]
    endpoints: usize,
    /// CPU for this process, the backend, the control plane and wrk.
    #[arg(long, default_value_t = 0)]
    load_cpu: usize,
    /// CPU for the proxy under test.
    #[arg(long, default_value_t = 1)]
    proxy_cpu: usize,
    /// Paths to run (comma-separated): direct, sidecar, envoy.
    #[arg(long, value_delimiter = ',', default_value = "direct,sidecar,envoy")]
    paths: Vec<String>,
    /// Protocols to run (comma-separated): http, grpc.
    #[arg(long, value_delimiter = ',', default_value = "http,grpc")]
    protocols: Vec<String>,
    /// Skip the saturation runs.
    #[arg(long)]
    no_saturation: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Cmd::Backend { http, grpc }) = cli.cmd {
        // One thread: the backend's cost stays small and the same for every path.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        return rt.block_on(backend::run(http, grpc));
    }
    let mut args = cli.run;
    if args.quick {
        args.rounds = 1;
        args.fixed_secs = 2.0;
        args.warmup_secs = 0.5;
        args.saturation_secs = 2.0;
    }
    ensure!(
        std::env::var("WEFT_BIN_PROFILE").as_deref() == Ok("release"),
        "set WEFT_BIN_PROFILE=release (as `make bench` does) after \
         `cargo build --release -p weft-control-plane -p weft-sidecar -p weft-bench`: \
         debug binaries would measure the wrong thing"
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = cpus > args.load_cpu.max(args.proxy_cpu) && args.load_cpu != args.proxy_cpu;
    if pinned {
        // Before the runtime exists, so every thread this process and its children start
        // inherits the load CPU.
        pin(std::process::id(), args.load_cpu)?;
    } else {
        eprintln!("only {cpus} CPU(s): not pinning; proxy and load share cores");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(args, pinned))
}

/// Moves every thread of `pid` to `cpu` (`taskset -a -p`); threads started later inherit it.
fn pin(pid: u32, cpu: usize) -> Result<()> {
    let out = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .output()
        .context("running taskset (util-linux)")?;
    ensure!(
        out.status.success(),
        "taskset -a -p -c {cpu} {pid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The distinct `Cpus_allowed_list` values of `pid`'s threads, and how many threads it has.
fn affinity(pid: u32) -> Result<(Vec<String>, usize)> {
    let mut lists = Vec::new();
    let mut threads = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = std::fs::read_to_string(task?.path().join("status"))?;
        threads += 1;
        if let Some(l) = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        {
            let l = l.trim().to_string();
            if !lists.contains(&l) {
                lists.push(l);
            }
        }
    }
    Ok((lists, threads))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum PathKind {
    Direct,
    Sidecar,
    Envoy,
}

impl PathKind {
    fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Sidecar => "sidecar",
            PathKind::Envoy => "envoy",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "direct" => PathKind::Direct,
            "sidecar" => PathKind::Sidecar,
            "envoy" => PathKind::Envoy,
            _ => bail!("unknown path {s:?} (direct, sidecar, envoy)"),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Proto {
    Http,
    Grpc,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Http => "HTTP/1.1",
            Proto::Grpc => "gRPC",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "http" => Proto::Http,
            "grpc" => Proto::Grpc,
            _ => bail!("unknown protocol {s:?} (http, grpc)"),
        })
    }
}

/// Where one path takes its traffic in, and the pid whose cost is measured.
#[derive(Debug, Clone, Copy)]
struct Hop {
    kind: PathKind,
    http_port: u16,
    grpc_port: u16,
    pid: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
struct FixedRun {
    round: usize,
    path: PathKind,
    protocol: Proto,
    result: LoadResult,
    /// Requests sent including the warm-up (the CPU reading covers both).
    requests_total: u64,
    proxy_cpu_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
struct SaturationRun {
    round: usize,
    path: PathKind,
    protocol: Proto,
    /// Successful requests per second.
    rps: f64,
    errors: u64,
    elapsed_s: f64,
    latency: Option<Latency>,
    proxy_cpu_s: Option<f64>,
    /// Proxy CPU seconds per second: 1.0 means the proxy's core was the limit.
    proxy_cpu_busy: Option<f64>,
}

/// Label, reading, and the sidecar's limit in MB (if the issue sets one).
type RssRow = (String, fn(&Rss) -> u64, Option<f64>);

#[derive(Debug, Clone, Serialize, Default)]
struct Rss {
    idle_bytes: u64,
    endpoints_bytes: u64,
    /// Peak (VmHWM) at the end of the run, after all the load.
    peak_after_load_bytes: u64,
    threads: usize,
    cpus_allowed: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Raw {
    params: RunArgs,
    pinned: bool,
    rss: Vec<(PathKind, Rss)>,
    fixed: Vec<FixedRun>,
    saturation: Vec<SaturationRun>,
    notes: Vec<String>,
}

async fn bench(args: RunArgs, pinned: bool) -> Result<()> {
    let started = Instant::now();
    let paths: Vec<PathKind> = args
        .paths
        .iter()
        .map(|p| PathKind::parse(p))
        .collect::<Result<_>>()?;
    let protocols: Vec<Proto> = args
        .protocols
        .iter()
        .map(|p| Proto::parse(p))
        .collect::<Result<_>>()?;
    let ctx = TestCtx::new("bench-proxy")?;
    let result = run(&ctx, &args, pinned, &paths, &protocols).await;
    if result.is_err() {
        ctx.dump_logs();
    }
    let raw = result?;
    let md = render(&args, &raw, &paths, &protocols, started.elapsed());
    report::publish("proxy", &md, &raw)
}

async fn run(
    ctx: &TestCtx,
    args: &RunArgs,
    pinned: bool,
    paths: &[PathKind],
    protocols: &[Proto],
) -> Result<Raw> {
    let mut notes = Vec::new();
    let (be_http, be_grpc) = (free_port()?, free_port()?);
    let mut cmd = Command::new(std::env::current_exe().context("locating this binary")?);
    cmd.args([
        "backend",
        "--http",
        &format!("127.0.0.1:{be_http}"),
        "--grpc",
        &format!("127.0.0.1:{be_grpc}"),
    ]);
    let mut backend_proc = Proc::spawn(ctx, "backend", cmd, false, false)?;
    wait_for_port(be_http, Duration::from_secs(10)).await?;
    wait_for_port(be_grpc, Duration::from_secs(10)).await?;

    let cp = ControlPlane::start(ctx, &registry_yaml(be_http, be_grpc, 0)).await?;

    let mut hops = Vec::new();
    if paths.contains(&PathKind::Direct) {
        hops.push(Hop {
            kind: PathKind::Direct,
            http_port: be_http,
            grpc_port: be_grpc,
            pid: None,
        });
    }
    let mut sidecar = None;
    if paths.contains(&PathKind::Sidecar) {
        // A client-only sidecar: the benchmark is its app, calling out through it.
        let sc_args = SidecarArgs::client(&cp, "sidecar")?.env("TOKIO_WORKER_THREADS", "1");
        let s = Sidecar::start(ctx, sc_args).await?;
        let pid = s.pid().context("the sidecar has no pid")?;
        hops.push(Hop {
            kind: PathKind::Sidecar,
            http_port: s.outbound_port(),
            grpc_port: s.outbound_port(),
            pid: Some(pid),
        });
        sidecar = Some(s);
    }
    let mut envoy = None;
    if paths.contains(&PathKind::Envoy) {
        let mut e = Envoy::start(ctx, &cp, Variant::Delta, "bench").await?;
        let pid = e.proc().pid().context("Envoy has no pid")?;
        hops.push(Hop {
            kind: PathKind::Envoy,
            http_port: e.listener_port,
            grpc_port: e.listener_port,
            pid: Some(pid),
        });
        envoy = Some(e);
    }
    // Keep the configured order (direct, sidecar, envoy) whatever order --paths gave.
    hops.sort_by_key(|h| h.kind as u8);
    for hop in &hops {
        if let (Some(pid), true) = (hop.pid, pinned) {
            pin(pid, args.proxy_cpu)?;
        }
    }
    for hop in &hops {
        for proto in protocols {
            wait_serving(hop, *proto, args)
                .await
                .with_context(|| format!("{} never served {}", hop.kind.name(), proto.name()))?;
        }
    }

    // Memory before any load: idle, then with many endpoints behind one more service.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut rss: Vec<(PathKind, Rss)> = Vec::new();
    for hop in &hops {
        if let Some(pid) = hop.pid {
            let r = Rss {
                idle_bytes: procstat::rss_bytes(pid)?,
                ..Rss::default()
            };
            rss.push((hop.kind, r));
        }
    }
    if args.endpoints > 0 && !rss.is_empty() {
        cp.write_registry(&registry_yaml(be_http, be_grpc, args.endpoints))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut done = true;
            if let Some(s) = &sidecar {
                done &= s.endpoints(BIG_SERVICE).await?.len() == args.endpoints;
            }
            if let Some(e) = &envoy {
                done &=
                    envoy_hosts(&e.admin_get("/clusters").await?, BIG_SERVICE) == args.endpoints;
            }
            if done {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the proxies did not get {} endpoints of `{BIG_SERVICE}` within 60 s",
                args.endpoints
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Let whatever the update allocated temporarily be freed before reading.
        tokio::time::sleep(Duration::from_secs(1)).await;
        for (kind, r) in &mut rss {
            if let Some(pid) = hops.iter().find(|h| h.kind == *kind).and_then(|h| h.pid) {
                r.endpoints_bytes = procstat::rss_bytes(pid)?;
            }
        }
    }

    let mut fixed = Vec::new();
    let mut saturation = Vec::new();
    let script = ctx.path("post.lua");
    std::fs::write(&script, wrk_script(HTTP_SERVICE, args.body_bytes))?;
    for round in 0..args.rounds {
        for hop in &hops {
            for proto in protocols {
                let f = fixed_run(hop, *proto, args, round).await?;
                eprintln!(
                    "round {round} {:<7} {:<8} fixed {} rps: p50 {} p99 {} errors {} cpu {:?}",
                    hop.kind.name(),
                    proto.name(),
                    args.rate,
                    fmt_us(f.result.latency.p50_us as f64),
                    fmt_us(f.result.latency.p99_us as f64),
                    f.result.errors,
                    f.proxy_cpu_s
                );
                fixed.push(f);
            }
            if args.no_saturation {
                continue;
            }
            for proto in protocols {
                let s = saturation_run(hop, *proto, args, round, &script).await?;
                eprintln!(
                    "round {round} {:<7} {:<8} saturation: {:.0} rps errors {} proxy busy {:?}",
                    hop.kind.name(),
                    proto.name(),
                    s.rps,
                    s.errors,
                    s.proxy_cpu_busy
                );
                saturation.push(s);
            }
        }
    }

    for (kind, r) in &mut rss {
        if let Some(pid) = hops.iter().find(|h| h.kind == *kind).and_then(|h| h.pid) {
            r.peak_after_load_bytes = procstat::peak_rss_bytes(pid)?;
            let (lists, threads) = affinity(pid)?;
            r.cpus_allowed = lists;
            r.threads = threads;
        }
    }
    let errors: u64 = fixed.iter().map(|f| f.result.errors).sum::<u64>()
        + saturation.iter().map(|s| s.errors).sum::<u64>();
    if errors > 0 {
        notes.push(format!(
            "{errors} requests failed over the whole run (see the JSON)"
        ));
    }
    backend_proc.ensure_running()?;
    if let Some(s) = &mut sidecar {
        s.proc().ensure_running()?;
        s.proc().kill().await?;
    }
    if let Some(e) = &mut envoy {
        e.proc().ensure_running()?;
        e.proc().kill().await?;
    }
    backend_proc.kill().await?;
    drop(cp);
    Ok(Raw {
        params: args.clone(),
        pinned,
        rss,
        fixed,
        saturation,
        notes,
    })
}

/// `bench` (HTTP) and `bench-grpc` (gRPC) on the backend; with `big > 0`, also `big` with that
/// many endpoints on addresses nothing listens on (nobody sends it traffic).
fn registry_yaml(http_port: u16, grpc_port: u16, big: usize) -> String {
    let mut y = format!(
        "services:\n  - name: {HTTP_SERVICE}\n    protocol: http\n    endpoints:\n      \
         - {{address: 127.0.0.1, port: {http_port}}}\n  - name: {GRPC_SERVICE}\n    \
         protocol: grpc\n    endpoints:\n      - {{address: 127.0.0.1, port: {grpc_port}}}\n"
    );
    if big > 0 {
        y.push_str(&format!(
            "  - name: {BIG_SERVICE}\n    protocol: http\n    endpoints:\n"
        ));
        for i in 0..big {
            y.push_str(&format!(
                "      - {{address: 10.77.{}.{}, port: 8080}}\n",
                i / 250,
                i % 250 + 1
            ));
        }
    }
    y
}

/// Hosts of `cluster` in Envoy's `/clusters` text (one `::health_flags::` line per host).
fn envoy_hosts(clusters: &str, cluster: &str) -> usize {
    let prefix = format!("{cluster}::");
    clusters
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains("::health_flags::"))
        .count()
}

fn target(hop: &Hop, proto: Proto, args: &RunArgs) -> Target {
    match proto {
        Proto::Http => Target::Http {
            addr: SocketAddr::from(([127, 0, 0, 1], hop.http_port)),
            host: HTTP_SERVICE.into(),
            path: "/".into(),
            body: Bytes::from(vec![b'x'; args.body_bytes]),
        },
        Proto::Grpc => Target::Grpc {
            addr: SocketAddr::from(([127, 0, 0, 1], hop.grpc_port)),
            authority: GRPC_SERVICE.into(),
        },
    }
}

/// Waits until a short burst over `hop` succeeds without errors (routes may arrive after the
/// proxy says it is ready).
async fn wait_serving(hop: &Hop, proto: Proto, args: &RunArgs) -> Result<()> {
    let t = target(hop, proto, args);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = match load::closed_loop(
            &t,
            1,
            Duration::from_millis(200),
            Duration::from_secs(2),
        )
        .await
        {
            Ok(r) if r.errors == 0 && r.sent > 0 => return Ok(()),
            Ok(r) => format!(
                "{} of {} failed, statuses {:?}",
                r.errors, r.sent, r.statuses
            ),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!("last attempt: {last}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn fixed_run(hop: &Hop, proto: Proto, args: &RunArgs, round: usize) -> Result<FixedRun> {
    let t = target(hop, proto, args);
    let cfg = FixedRate {
        rate: args.rate,
        duration: Duration::from_secs_f64(args.fixed_secs),
        warmup: Duration::from_secs_f64(args.warmup_secs),
        timeout: Duration::from_secs(5),
        thresholds: vec![Duration::from_millis(1), Duration::from_millis(10)],
    };
    let (result, cpu) = match hop.pid {
        Some(pid) => {
            let (r, cpu) = procstat::cpu_during(pid, load::fixed_rate(&t, &cfg)).await?;
            (r, Some(cpu.as_secs_f64()))
        }
        None => (load::fixed_rate(&t, &cfg).await?, None),
    };
    let warmup_requests = (args.warmup_secs * f64::from(args.rate)).round() as u64;
    Ok(FixedRun {
        round,
        path: hop.kind,
        protocol: proto,
        requests_total: result.sent + warmup_requests,
        result,
        proxy_cpu_s: cpu,
    })
}

async fn saturation_run(
    hop: &Hop,
    proto: Proto,
    args: &RunArgs,
    round: usize,
    script: &Path,
) -> Result<SaturationRun> {
    let cpu_before = hop.pid.map(procstat::cpu_time).transpose()?;
    let (rps, errors, elapsed_s, latency) = match proto {
        Proto::Http => {
            let w = wrk(hop.http_port, script, args).await?;
            (w.rps, w.errors, w.elapsed_s, w.latency)
        }
        Proto::Grpc => {
            let r = load::closed_loop(
                &target(hop, proto, args),
                args.concurrency,
                Duration::from_secs_f64(args.saturation_secs),
                Duration::from_secs(5),
            )
            .await?;
            (r.throughput, r.errors, r.elapsed_s, Some(r.latency))
        }
    };
    let cpu = match (hop.pid, cpu_before) {
        (Some(pid), Some(before)) => Some(
            procstat::cpu_time(pid)?
                .saturating_sub(before)
                .as_secs_f64(),
        ),
        _ => None,
    };
    Ok(SaturationRun {
        round,
        path: hop.kind,
        protocol: proto,
        rps,
        errors,
        elapsed_s,
        latency,
        proxy_cpu_s: cpu,
        proxy_cpu_busy: cpu.map(|c| c / elapsed_s.max(1e-9)),
    })
}

fn wrk_script(host: &str, body_bytes: usize) -> String {
    format!(
        "wrk.method = \"POST\"\nwrk.body = string.rep(\"x\", {body_bytes})\n\
         wrk.headers[\"Host\"] = \"{host}\"\n\
         wrk.headers[\"Content-Type\"] = \"application/octet-stream\"\n"
    )
}

struct WrkResult {
    rps: f64,
    errors: u64,
    elapsed_s: f64,
    latency: Option<Latency>,
}

/// wrk (one thread, on the load CPU like this process) against `port` for the saturation
/// duration, rounded up to whole seconds as wrk wants.
async fn wrk(port: u16, script: &Path, args: &RunArgs) -> Result<WrkResult> {
    let secs = args.saturation_secs.ceil().max(1.0) as u64;
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{}", args.concurrency),
            &format!("-d{secs}s"),
            "--timeout",
            "5s",
            "--latency",
            "-s",
        ])
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}/"))
        .kill_on_drop(true)
        .output()
        .await
        .context("running wrk (Debian: apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "wrk failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_wrk(&text, secs as f64)
}

fn parse_wrk(text: &str, elapsed_s: f64) -> Result<WrkResult> {
    let mut rps = None;
    let mut errors = 0;
    let mut lat = Latency::default();
    let mut have_lat = false;
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = Some(v.trim().parse::<f64>().context("wrk Requests/sec")?);
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += v.trim().parse::<u64>().context("wrk Non-2xx")?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            for part in v.split(',') {
                if let Some(n) = part.split_whitespace().nth(1) {
                    errors += n.parse::<u64>().unwrap_or(0);
                }
            }
        } else if let Some((pct, v)) = line.split_once('%')
            && let Ok(pct) = pct.trim().parse::<u32>()
            && let Some(us) = wrk_duration_us(v.trim())
        {
            have_lat = true;
            match pct {
                50 => lat.p50_us = us,
                90 => lat.p90_us = us,
                99 => lat.p99_us = us,
                _ => {}
            }
        }
    }
    let rps = rps.context("wrk printed no Requests/sec")?;
    lat.count = (rps * elapsed_s) as u64;
    Ok(WrkResult {
        rps,
        errors,
        elapsed_s,
        latency: have_lat.then_some(lat),
    })
}

/// `812.00us`, `1.23ms`, `2.00s` -> microseconds.
fn wrk_duration_us(s: &str) -> Option<u64> {
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| (v * scale).round() as u64)
}

// === Report ===

fn fixed_of(raw: &Raw, path: PathKind, proto: Proto) -> Vec<&FixedRun> {
    raw.fixed
        .iter()
        .filter(|f| f.path == path && f.protocol == proto)
        .collect()
}

fn sat_of(raw: &Raw, path: PathKind, proto: Proto) -> Vec<&SaturationRun> {
    raw.saturation
        .iter()
        .filter(|s| s.path == path && s.protocol == proto)
        .collect()
}

/// Median over rounds of `f(run) - f(direct run of the same round)`.
fn added(raw: &Raw, path: PathKind, proto: Proto, f: impl Fn(&Latency) -> u64) -> Option<f64> {
    let direct = fixed_of(raw, PathKind::Direct, proto);
    let diffs: Vec<f64> = fixed_of(raw, path, proto)
        .iter()
        .filter_map(|r| {
            let d = direct.iter().find(|d| d.round == r.round)?;
            Some(f(&r.result.latency) as f64 - f(&d.result.latency) as f64)
        })
        .collect();
    (!diffs.is_empty()).then(|| median(&diffs))
}

fn cpu_per_1k(raw: &Raw, path: PathKind, proto: Proto) -> Option<f64> {
    let v: Vec<f64> = fixed_of(raw, path, proto)
        .iter()
        .filter_map(|r| Some(r.proxy_cpu_s? / (r.requests_total.max(1) as f64 / 1000.0)))
        .collect();
    (!v.is_empty()).then(|| median(&v))
}

fn sat_rps(raw: &Raw, path: PathKind, proto: Proto) -> Option<f64> {
    let v: Vec<f64> = sat_of(raw, path, proto).iter().map(|s| s.rps).collect();
    (!v.is_empty()).then(|| median(&v))
}

fn sat_busy(raw: &Raw, path: PathKind, proto: Proto) -> Option<f64> {
    let v: Vec<f64> = sat_of(raw, path, proto)
        .iter()
        .filter_map(|s| s.proxy_cpu_busy)
        .collect();
    (!v.is_empty()).then(|| median(&v))
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "–".to_string(), f)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "–",
    }
}

fn render(
    args: &RunArgs,
    raw: &Raw,
    paths: &[PathKind],
    protocols: &[Proto],
    took: Duration,
) -> String {
    let mut md = String::from("## Sidecar data path (`weft-bench-proxy`)\n\n");
    md.push_str(&format!(
        "One hop through `weft-sidecar` (`TOKIO_WORKER_THREADS=1`) and one through Envoy \
         (`--concurrency 1`), both configured by the control plane over Delta ADS, against the \
         same minimal backend reached directly. HTTP/1.1 keep-alive POSTs with {} B bodies \
         answered with {} B, and gRPC unary `weft.demo.v1.Echo` (1 KiB replies). The proxy \
         under test runs on CPU {}; the load generator, wrk, backend and control plane on CPU \
         {}{}. Medians over {} interleaved round(s) ({}); run took {:.0} s.\n\n",
        args.body_bytes,
        backend::BODY_BYTES,
        args.proxy_cpu,
        args.load_cpu,
        if raw.pinned {
            ""
        } else {
            " (**not pinned**: too few CPUs)"
        },
        args.rounds,
        paths
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(", "),
        took.as_secs_f64()
    ));

    md.push_str(&format!(
        "### Latency at {} requests/s (open loop, from each request's scheduled start; {} s \
         measured after {} s warm-up)\n\n",
        args.rate, args.fixed_secs, args.warmup_secs
    ));
    let mut t = Table::new(&[
        "protocol",
        "path",
        "p50",
        "p99",
        "p99.9",
        "added p50",
        "added p99",
        "target (added p99 ≤ 0.2 ms)",
    ]);
    for proto in protocols {
        for path in paths {
            let runs = fixed_of(raw, *path, *proto);
            let m = |f: fn(&Latency) -> u64| {
                median(
                    &runs
                        .iter()
                        .map(|r| f(&r.result.latency) as f64)
                        .collect::<Vec<_>>(),
                )
            };
            let (a50, a99) = if *path == PathKind::Direct {
                (None, None)
            } else {
                (
                    added(raw, *path, *proto, |l| l.p50_us),
                    added(raw, *path, *proto, |l| l.p99_us),
                )
            };
            let target = if *path == PathKind::Sidecar {
                verdict(a99.map(|a| a <= 200.0))
            } else {
                ""
            };
            t.row(vec![
                proto.name().into(),
                path.name().into(),
                fmt_us(m(|l| l.p50_us)),
                fmt_us(m(|l| l.p99_us)),
                fmt_us(m(|l| l.p999_us)),
                opt(a50, fmt_us),
                opt(a99, fmt_us),
                target.into(),
            ]);
        }
    }
    md.push_str(&t.to_markdown());

    md.push_str(&format!(
        "\n### Proxy CPU per 1,000 requests (during the {} rps runs, warm-up included)\n\n",
        args.rate
    ));
    let mut t = Table::new(&[
        "protocol",
        "sidecar",
        "Envoy",
        "sidecar / Envoy",
        "target (≤ 0.25×)",
    ]);
    for proto in protocols {
        let s = cpu_per_1k(raw, PathKind::Sidecar, *proto);
        let e = cpu_per_1k(raw, PathKind::Envoy, *proto);
        let r = ratio(s, e);
        let ms = |v: f64| format!("{:.1} ms", v * 1000.0);
        t.row(vec![
            proto.name().into(),
            opt(s, ms),
            opt(e, ms),
            opt(r, |v| format!("{v:.2}×")),
            verdict(r.map(|r| r <= 0.25)).into(),
        ]);
    }
    md.push_str(&t.to_markdown());

    if !args.no_saturation {
        md.push_str(&format!(
            "\n### Saturation, proxy on one core ({} s per run; HTTP: wrk, 1 thread, {} \
             connections; gRPC: {} concurrent calls on one HTTP/2 connection)\n\n",
            args.saturation_secs, args.concurrency, args.concurrency
        ));
        let mut t = Table::new(&[
            "protocol",
            "direct",
            "sidecar",
            "Envoy",
            "sidecar / Envoy",
            "target (≥ 2×)",
            "proxy CPU busy (sidecar / Envoy)",
        ]);
        for proto in protocols {
            let rps = |p| sat_rps(raw, p, *proto);
            let r = ratio(rps(PathKind::Sidecar), rps(PathKind::Envoy));
            let f = |v: f64| format!("{v:.0}/s");
            let busy = |p| opt(sat_busy(raw, p, *proto), |v| format!("{:.0}%", v * 100.0));
            t.row(vec![
                proto.name().into(),
                opt(rps(PathKind::Direct), f),
                opt(rps(PathKind::Sidecar), f),
                opt(rps(PathKind::Envoy), f),
                opt(r, |v| format!("{v:.2}×")),
                verdict(r.map(|r| r >= 2.0)).into(),
                format!("{} / {}", busy(PathKind::Sidecar), busy(PathKind::Envoy)),
            ]);
        }
        md.push_str(&t.to_markdown());
        md.push_str(
            "\nA proxy CPU busy well below 100% means the load CPU (generator and backend \
             sharing one core), not the proxy, was the limit: the ratio then understates the \
             faster proxy.\n",
        );
    }

    md.push_str("\n### Memory (RSS)\n\n");
    let get = |k: PathKind, f: fn(&Rss) -> u64| {
        raw.rss
            .iter()
            .find(|(p, _)| *p == k)
            .map(|(_, r)| f(r) as f64)
    };
    let mut t = Table::new(&[
        "",
        "sidecar",
        "Envoy",
        "sidecar / Envoy",
        "target (sidecar)",
    ]);
    let rows: [RssRow; 3] = [
        ("idle".into(), |r| r.idle_bytes, Some(12.0)),
        (
            format!("{} endpoints behind a service", args.endpoints),
            |r| r.endpoints_bytes,
            Some(25.0),
        ),
        (
            "peak after all load (VmHWM)".into(),
            |r| r.peak_after_load_bytes,
            None,
        ),
    ];
    for (label, f, limit_mb) in rows {
        let s = get(PathKind::Sidecar, f);
        let e = get(PathKind::Envoy, f);
        let target = match limit_mb {
            Some(mb) => format!(
                "≤ {mb:.0} MB: {}",
                verdict(s.map(|s| s <= mb * 1_000_000.0))
            ),
            None => String::new(),
        };
        t.row(vec![
            label,
            opt(s, fmt_bytes),
            opt(e, fmt_bytes),
            opt(ratio(s, e), |v| format!("{v:.2}×")),
            target,
        ]);
    }
    md.push_str(&t.to_markdown());
    for (kind, r) in &raw.rss {
        md.push_str(&format!(
            "\n{}: {} threads, allowed CPUs {}.",
            kind.name(),
            r.threads,
            r.cpus_allowed.join(" | ")
        ));
    }
    md.push('\n');
    for n in &raw.notes {
        md.push_str(&format!("\nNote: {n}\n"));
    }
    md
}
