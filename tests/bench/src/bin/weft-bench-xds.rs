//! `weft-bench-xds`: the control plane under M simulated Envoys (see `weft_bench::xds`).
//!
//! For each client count M and each variant (SotW, Delta) it starts a fresh release control
//! plane reading S services of E endpoints from a registry file, with etcd and the embedded
//! registration API as change sources, and measures: convergence (registry change -> the last
//! client's ACK of it), RSS per idle client, encodes per change, and pushes per second and CPU
//! per 1,000 pushes under continuous churn. A separate phase with one SotW and one Delta client
//! on the same control plane measures bytes per change, interleaved by construction.
//!
//! ```sh
//! cargo build --release -p weft-control-plane -p weft-bench
//! ulimit -n 20000   # enough for 10,000 clients: one socket each here and in the control plane
//! WEFT_BIN_PROFILE=release target/release/weft-bench-xds            # ~2.5 minutes on 2 CPUs
//! WEFT_BIN_PROFILE=release target/release/weft-bench-xds --quick    # smoke run, ~30 s
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde::Serialize;
use weft_bench::procstat;
use weft_bench::report::{Latency, Table, fmt_bytes, fmt_us, median, publish};
use weft_bench::xds::{Fleet, Kind, Record, Variant, check_nofile};
use weft_proto::registry::v1::registration_client::RegistrationClient;
use weft_proto::registry::v1::{Endpoint as RegEndpoint, RegisterRequest};
use weft_tests::{ControlPlane, Etcd, TestCtx};

#[derive(Debug, Parser)]
#[command(name = "weft-bench-xds", about)]
struct Cli {
    /// Smoke run: 20 clients, 50 services, 3 changes per source, 3 s of churn.
    #[arg(long)]
    quick: bool,
    /// Client counts to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    clients: Vec<usize>,
    /// Variants to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "sotw,delta")]
    variants: Vec<Variant>,
    /// Services in the registry of the convergence, churn and memory runs.
    #[arg(long, default_value_t = 100)]
    services: usize,
    /// Endpoints per service in those runs.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Services in the bytes-per-change phase (one change among this many).
    #[arg(long, default_value_t = 1_000)]
    bytes_services: usize,
    /// Endpoints per service in the bytes-per-change phase.
    #[arg(long, default_value_t = 4)]
    bytes_endpoints: usize,
    /// Do not pin the control plane to CPU 1 and this load client to CPU 0 (pinning keeps the
    /// client's work from being counted as the control plane's latency).
    #[arg(long)]
    no_pin: bool,
    /// Changes per source (registration API, etcd) for convergence.
    #[arg(long, default_value_t = 10)]
    changes: usize,
    /// Changes per source at the largest client counts (>= 5,000), where one SotW change
    /// costs seconds.
    #[arg(long, default_value_t = 4)]
    changes_large: usize,
    /// Seconds of continuous churn per run.
    #[arg(long, default_value_t = 8)]
    churn_secs: u64,
    /// Time between two churn changes, in milliseconds.
    #[arg(long, default_value_t = 20)]
    churn_interval_ms: u64,
    /// The control plane's --debounce.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    debounce: Duration,
    /// The control plane's --debounce-max.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    debounce_max: Duration,
    /// Changes in the bytes-per-change phase (per kind).
    #[arg(long, default_value_t = 5)]
    byte_changes: usize,
}

#[derive(Debug, Serialize)]
struct Params {
    clients: Vec<usize>,
    variants: Vec<Variant>,
    services: usize,
    endpoints: usize,
    bytes_services: usize,
    bytes_endpoints: usize,
    pinned: bool,
    changes: usize,
    changes_large: usize,
    churn_secs: u64,
    churn_interval_ms: u64,
    debounce_ms: u128,
    debounce_max_ms: u128,
    byte_changes: usize,
    quick: bool,
}

#[derive(Debug, Serialize)]
struct Convergence {
    source: &'static str,
    /// Per change: time to the last client's ACK (µs).
    last_client_us: Vec<u64>,
    /// Per change: time to the median client's ACK (µs).
    median_client_us: Vec<u64>,
    last: Latency,
    /// Mean change-to-ACK time the control plane measured itself
    /// (`weft_xds_convergence_seconds`), over every client and change of this source (µs).
    server_mean_us: u64,
}

#[derive(Debug, Serialize)]
struct Run {
    clients: usize,
    variant: Variant,
    sync_s: f64,
    rss_idle_bytes: u64,
    rss_clients_bytes: u64,
    rss_per_client_bytes: f64,
    /// Streams reset before they synced and opened again.
    sync_retries: u64,
    convergence: Vec<Convergence>,
    encodes_per_change: f64,
    changed_resources_per_change: f64,
    churn_changes_per_s: f64,
    pushes_per_s: f64,
    cpu_s_per_1000_pushes: f64,
    cp_cpu_percent_churn: f64,
}

#[derive(Debug, Serialize)]
struct Bytes {
    change: &'static str,
    /// Medians over the changes, bytes per client.
    sotw_first_response: f64,
    delta_first_response: f64,
    sotw_total: f64,
    delta_total: f64,
}

#[derive(Debug, Serialize)]
struct Raw {
    params: Params,
    runs: Vec<Run>,
    bytes: Vec<Bytes>,
}

fn service(i: usize) -> String {
    format!("svc-{i:05}")
}

fn registry_yaml(services: usize, endpoints: usize) -> String {
    let mut y = String::from("services:\n");
    for i in 0..services {
        y.push_str(&format!("  - name: {}\n    endpoints:\n", service(i)));
        for j in 0..endpoints {
            y.push_str(&format!(
                "      - {{address: 10.{}.{}.{}, port: 8080}}\n",
                i / 256,
                i % 256,
                j + 1
            ));
        }
    }
    y
}

/// Where registry changes come from.
struct Changer {
    reg: RegistrationClient<tonic::transport::Channel>,
    etcd: etcd_client::Client,
    prefix: String,
    n: u32,
}

impl Changer {
    async fn new(cp: &ControlPlane, etcd: &Etcd, prefix: &str) -> Result<Self> {
        let reg = RegistrationClient::connect(format!("http://127.0.0.1:{}", cp.xds_port))
            .await
            .context("connecting to the registration API")?;
        Ok(Self {
            reg,
            etcd: etcd.client().await?,
            prefix: prefix.to_string(),
            n: 0,
        })
    }

    /// One instance of `svc` moves to a new port through the registration API: one changed
    /// ClusterLoadAssignment.
    async fn register(&mut self, svc: &str) -> Result<()> {
        self.n += 1;
        self.reg
            .register(RegisterRequest {
                service: svc.to_string(),
                instance_id: format!("bench-reg-{svc}"),
                endpoint: Some(RegEndpoint {
                    address: "10.250.0.1".into(),
                    port: 10_000 + self.n % 50_000,
                    ..Default::default()
                }),
                ttl_seconds: 3600,
                protocol: String::new(),
            })
            .await
            .context("Register")?;
        Ok(())
    }

    /// The same through an etcd put.
    async fn etcd_instance(&mut self, svc: &str) -> Result<()> {
        self.n += 1;
        let key = format!("{}/services/{svc}/bench-etcd", self.prefix);
        let value = format!(
            r#"{{"address":"10.251.0.1","port":{}}}"#,
            10_000 + self.n % 50_000
        );
        self.etcd.put(key, value, None).await.context("etcd put")?;
        Ok(())
    }

    /// A policy on `svc` changes its balancing algorithm: one changed Cluster.
    async fn etcd_policy(&mut self, svc: &str) -> Result<()> {
        self.n += 1;
        let lb = if self.n.is_multiple_of(2) {
            "random"
        } else {
            "least_request"
        };
        let name = format!("bench-{svc}");
        let key = format!("{}/policies/{name}", self.prefix);
        let value = format!(r#"{{"name":"{name}","service":"{svc}","lb":"{lb}"}}"#);
        self.etcd.put(key, value, None).await.context("etcd put")?;
        Ok(())
    }
}

async fn start_cp(
    ctx: &TestCtx,
    cli: &Cli,
    etcd: &Etcd,
    prefix: &str,
    yaml: &str,
) -> Result<ControlPlane> {
    let extra: Vec<String> = [
        "--etcd-endpoints",
        &etcd.url,
        "--etcd-prefix",
        prefix,
        "--debounce",
        &format!("{}ms", cli.debounce.as_millis()),
        "--debounce-max",
        &format!("{}ms", cli.debounce_max.as_millis()),
        // The file never changes during a run: do not spend CPU polling it.
        "--file-poll-interval",
        "1h",
    ]
    .map(String::from)
    .to_vec();
    let mut cp = ControlPlane::start_with_args(ctx, Some(yaml), &extra).await?;
    if cli.pin() {
        let pid = pid_of(&mut cp)?;
        pin(pid, 1)?;
    }
    Ok(cp)
}

/// Moves every thread of `pid` to one CPU (`taskset`, so no affinity syscalls here).
fn pin(pid: u32, cpu: usize) -> Result<()> {
    let out = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .output()
        .context("running taskset (util-linux); pass --no-pin to run without it")?;
    if !out.status.success() {
        bail!(
            "taskset failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Cli {
    /// Decided once, before this process pins itself: afterwards it sees one CPU.
    fn pin(&self) -> bool {
        !self.no_pin
    }
}

/// The control plane's own convergence histogram: (sum of seconds, count).
async fn server_convergence(cp: &ControlPlane) -> Result<(f64, f64)> {
    let sum = cp
        .metric_value("weft_xds_convergence_seconds_sum", &[])
        .await?
        .unwrap_or(0.0);
    let count = cp
        .metric_value("weft_xds_convergence_seconds_count", &[])
        .await?
        .unwrap_or(0.0);
    Ok((sum, count))
}

fn pid_of(cp: &mut ControlPlane) -> Result<u32> {
    cp.proc().pid().context("the control plane has no pid")
}

async fn encodes(cp: &ControlPlane) -> Result<f64> {
    cp.metric_value("weft_xds_cache_encodes_total", &[])
        .await?
        .context("no weft_xds_cache_encodes_total in /metrics")
}

/// Per client, the ACK time of its first response of `kind` carrying the watched name, since
/// `t0`.
fn convergence_of(records: &[Vec<Record>], kind: Kind, t0: Instant) -> Vec<Duration> {
    records
        .iter()
        .filter_map(|rs| {
            rs.iter()
                .find(|r| r.kind == kind && r.watched && r.arrived >= t0)
                .map(|r| r.acked.saturating_duration_since(t0))
        })
        .collect()
}

/// One change, then wait for every client to ACK it. Returns (last client, median client).
async fn one_change(
    fleet: &mut Fleet,
    changer: &mut Changer,
    source: &str,
    svc: &str,
    settle: Duration,
) -> Result<(Duration, Duration)> {
    fleet.take_records();
    fleet.watch(Kind::Eds, svc);
    let t0 = Instant::now();
    match source {
        "registration" => changer.register(svc).await?,
        _ => changer.etcd_instance(svc).await?,
    }
    fleet
        .wait_watched(Duration::from_secs(120))
        .await
        .with_context(|| format!("waiting for a {source} change of {svc}"))?;
    let mut conv = convergence_of(&fleet.take_records(), Kind::Eds, t0);
    conv.sort();
    let last = conv.last().copied().unwrap_or_default();
    let mid = conv.get(conv.len() / 2).copied().unwrap_or_default();
    tokio::time::sleep(settle).await;
    Ok((last, mid))
}

async fn run_one(
    ctx: &TestCtx,
    cli: &Cli,
    etcd: &Etcd,
    yaml: &str,
    m: usize,
    variant: Variant,
    run_no: usize,
) -> Result<Run> {
    let prefix = format!("/weft-bench-{run_no}");
    let mut cp = start_cp(ctx, cli, etcd, &prefix, yaml).await?;
    let pid = pid_of(&mut cp)?;
    let mut changer = Changer::new(&cp, etcd, &prefix).await?;
    // Let start-up allocations settle before the baseline.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = procstat::rss_bytes(pid)?;
    let target = format!("127.0.0.1:{}", cp.xds_port).parse()?;
    let started = Instant::now();
    let mut fleet = Fleet::start(target, variant, m).await?;
    fleet.wait_synced(Duration::from_secs(300)).await?;
    let sync_s = started.elapsed().as_secs_f64();
    let retries = fleet
        .shared
        .retries
        .load(std::sync::atomic::Ordering::Relaxed);
    if retries > 0 {
        eprintln!("  {retries} streams were reset while connecting and opened again");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_clients = procstat::rss_bytes(pid)?;
    let rss_per_client = (rss_clients as f64 - rss_idle as f64) / m as f64;
    eprintln!(
        "  {m} {} clients synced in {sync_s:.1}s; RSS {} -> {} ({}/client)",
        variant.as_str(),
        fmt_bytes(rss_idle as f64),
        fmt_bytes(rss_clients as f64),
        fmt_bytes(rss_per_client)
    );

    // Convergence, the two sources interleaved; each change on a different service.
    let changes = if m >= 5_000 {
        cli.changes_large
    } else {
        cli.changes
    };
    let settle = cli.debounce.max(Duration::from_millis(100)) + Duration::from_millis(100);
    let enc_before = encodes(&cp).await?;
    let mut samples: [(Vec<u64>, Vec<u64>); 2] = Default::default();
    let mut server: [(f64, f64); 2] = Default::default();
    let sources = ["registration", "etcd"];
    for i in 0..changes {
        for (s, source) in sources.iter().enumerate() {
            let svc = service((i * 2 + s) * 37 % cli.services);
            let before = server_convergence(&cp).await?;
            let (last, mid) = one_change(&mut fleet, &mut changer, source, &svc, settle).await?;
            let after = server_convergence(&cp).await?;
            server[s].0 += after.0 - before.0;
            server[s].1 += after.1 - before.1;
            samples[s].0.push(last.as_micros() as u64);
            samples[s].1.push(mid.as_micros() as u64);
        }
    }
    let n_changes = (changes * sources.len()) as f64;
    let encodes_per_change = (encodes(&cp).await? - enc_before) / n_changes;
    let convergence: Vec<Convergence> = sources
        .iter()
        .zip(samples)
        .zip(server)
        .map(|((source, (last, mid)), (sum, count))| Convergence {
            server_mean_us: if count > 0.0 {
                (sum / count * 1e6) as u64
            } else {
                0
            },
            source,
            last: Latency::of_durations(
                &last
                    .iter()
                    .map(|us| Duration::from_micros(*us))
                    .collect::<Vec<_>>(),
            ),
            last_client_us: last,
            median_client_us: mid,
        })
        .collect();
    for c in &convergence {
        eprintln!(
            "  convergence via {}: p50 {} p99 {} max {} (server-side mean {})",
            c.source,
            fmt_us(c.last.p50_us as f64),
            fmt_us(c.last.p99_us as f64),
            fmt_us(c.last.max_us as f64),
            fmt_us(c.server_mean_us as f64)
        );
    }

    // Continuous churn through the registration API, round robin over the services.
    fleet
        .shared
        .record
        .store(false, std::sync::atomic::Ordering::Relaxed);
    fleet.take_records();
    let responses = &fleet.shared.responses;
    let before = responses.load(std::sync::atomic::Ordering::Relaxed);
    let cpu_before = procstat::cpu_time(pid)?;
    let t0 = Instant::now();
    let churn = Duration::from_secs(cli.churn_secs);
    let mut issued = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(cli.churn_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while t0.elapsed() < churn {
        tick.tick().await;
        changer
            .register(&service(issued * 13 % cli.services))
            .await?;
        issued += 1;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = procstat::cpu_time(pid)?.saturating_sub(cpu_before);
    let pushes = responses.load(std::sync::atomic::Ordering::Relaxed) - before;
    let pushes_per_s = pushes as f64 / elapsed;
    let cpu_s_per_1000 = if pushes == 0 {
        f64::NAN
    } else {
        cpu.as_secs_f64() * 1000.0 / pushes as f64
    };
    eprintln!(
        "  churn: {issued} changes in {elapsed:.1}s, {pushes_per_s:.0} pushes/s, {cpu_s_per_1000:.3} CPU s per 1000 pushes"
    );
    fleet.stop().await;
    cp.proc().kill().await?;
    Ok(Run {
        clients: m,
        variant,
        sync_s,
        rss_idle_bytes: rss_idle,
        rss_clients_bytes: rss_clients,
        rss_per_client_bytes: rss_per_client,
        sync_retries: retries,
        convergence,
        encodes_per_change,
        // One ClusterLoadAssignment per flavour (envoy, grpc): the cache builds both whether
        // or not a client of each is connected.
        changed_resources_per_change: 2.0,
        churn_changes_per_s: issued as f64 / elapsed,
        pushes_per_s,
        cpu_s_per_1000_pushes: cpu_s_per_1000,
        cp_cpu_percent_churn: cpu.as_secs_f64() / elapsed * 100.0,
    })
}

/// Bytes per change: one SotW and one Delta client on the same control plane see every change.
async fn bytes_phase(ctx: &TestCtx, cli: &Cli, etcd: &Etcd) -> Result<Vec<Bytes>> {
    let yaml = &registry_yaml(cli.bytes_services, cli.bytes_endpoints);
    let prefix = "/weft-bench-bytes";
    let mut cp = start_cp(ctx, cli, etcd, prefix, yaml).await?;
    let mut changer = Changer::new(&cp, etcd, prefix).await?;
    let target = format!("127.0.0.1:{}", cp.xds_port).parse()?;
    let mut sotw = Fleet::start(target, Variant::Sotw, 1).await?;
    let mut delta = Fleet::start(target, Variant::Delta, 1).await?;
    sotw.wait_synced(Duration::from_secs(60)).await?;
    delta.wait_synced(Duration::from_secs(60)).await?;
    // Long enough for a cluster change's forced endpoint re-send to arrive too.
    let settle = cli.debounce + Duration::from_millis(300);
    let mut out = Vec::new();
    for (change, kind) in [
        ("one Cluster of N changed (CDS)", Kind::Cds),
        ("one endpoint of one of N services changed (EDS)", Kind::Eds),
    ] {
        // [sotw, delta] x [first response, total]
        let mut v: [[Vec<f64>; 2]; 2] = Default::default();
        for i in 0..cli.byte_changes {
            let svc = service(i * 101 % cli.bytes_services);
            sotw.take_records();
            delta.take_records();
            sotw.watch(kind, &svc);
            delta.watch(kind, &svc);
            let t0 = Instant::now();
            match kind {
                Kind::Cds => changer.etcd_policy(&svc).await?,
                Kind::Eds => changer.register(&svc).await?,
            }
            sotw.wait_watched(Duration::from_secs(30)).await?;
            delta.wait_watched(Duration::from_secs(30)).await?;
            tokio::time::sleep(settle).await;
            for (j, f) in [&sotw, &delta].into_iter().enumerate() {
                let recs: Vec<Record> = f
                    .take_records()
                    .into_iter()
                    .flatten()
                    .filter(|r| r.arrived >= t0)
                    .collect();
                let first = recs
                    .iter()
                    .find(|r| r.kind == kind && r.watched)
                    .map(|r| f64::from(r.bytes))
                    .unwrap_or(f64::NAN);
                let total: f64 = recs.iter().map(|r| f64::from(r.bytes)).sum();
                v[j][0].push(first);
                v[j][1].push(total);
            }
        }
        out.push(Bytes {
            change,
            sotw_first_response: median(&v[0][0]),
            delta_first_response: median(&v[1][0]),
            sotw_total: median(&v[0][1]),
            delta_total: median(&v[1][1]),
        });
    }
    sotw.stop().await;
    delta.stop().await;
    cp.proc().kill().await?;
    Ok(out)
}

fn markdown(p: &Params, runs: &[Run], bytes: &[Bytes]) -> String {
    let mut md = String::from("## xDS control plane\n\n");
    md.push_str(&format!(
        "{} services of {} endpoints each (registry file) for convergence, churn and memory; changes through the embedded \
         registration API (gRPC `Register`) and etcd puts. Control plane: release build, \
         `--debounce {}ms --debounce-max {}ms`. Clients: in-tree load client behaving like Envoy \
         on ADS (wildcard CDS, EDS for every cluster, ACK per response), each with its own \
         HTTP/2 connection; {}.{}\n\n",
        p.services,
        p.endpoints,
        p.debounce_ms,
        p.debounce_max_ms,
        if p.pinned {
            "the control plane is pinned to CPU 1 and the load client (and etcd, started by it) \
             to CPU 0"
        } else {
            "client and control plane share the machine's CPUs"
        },
        if p.quick {
            " **Quick smoke run: numbers mean little.**"
        } else {
            ""
        }
    ));
    md.push_str(&format!(
        "### Convergence\n\nRegistry change (the call that makes it) -> the **last** client's \
         ACK of the response carrying it, over {} changes per source ({} at >= 5,000 clients), \
         each on a different service. Target: p99 <= debounce + 50 ms = {} ms at 1,000 \
         clients, <= 1 s at 10,000.\n\n",
        p.changes,
        p.changes_large,
        p.debounce_ms + 50
    ));
    let mut t = Table::new(&[
        "clients",
        "variant",
        "source",
        "p50",
        "p99",
        "max",
        "median client (median)",
        "server-side mean",
        "target p99",
    ]);
    for r in runs {
        for c in &r.convergence {
            let target = match r.clients {
                m if m >= 10_000 => "<= 1 s".to_string(),
                m if m >= 1_000 => format!("<= {} ms", p.debounce_ms + 50),
                _ => "-".to_string(),
            };
            let med = median(
                &c.median_client_us
                    .iter()
                    .map(|x| *x as f64)
                    .collect::<Vec<_>>(),
            );
            t.row(vec![
                r.clients.to_string(),
                r.variant.as_str().into(),
                c.source.into(),
                fmt_us(c.last.p50_us as f64),
                fmt_us(c.last.p99_us as f64),
                fmt_us(c.last.max_us as f64),
                fmt_us(med),
                fmt_us(c.server_mean_us as f64),
                target,
            ]);
        }
    }
    md.push_str(&t.to_markdown());
    md.push_str(&format!(
        "\n### Churn, memory, encodes\n\nChurn: one registration change every {} ms for {} s, \
         round robin over the services (debounce coalesces them). Pushes = responses received \
         by all clients. CPU = the control plane's user+system time over the churn window. \
         RSS per client = (RSS with M idle synced clients - RSS with none) / M. Encodes per \
         change from `weft_xds_cache_encodes_total`; each change alters one \
         ClusterLoadAssignment in each of the two flavours (envoy, grpc), so 2 is the target.\n\n",
        p.churn_interval_ms, p.churn_secs
    ));
    let mut t = Table::new(&[
        "clients",
        "variant",
        "sync all",
        "pushes/s",
        "CPU s / 1,000 pushes",
        "CP CPU (churn)",
        "RSS / idle client (target <= 30 KB)",
        "encodes / change (target 2)",
    ]);
    for r in runs {
        t.row(vec![
            r.clients.to_string(),
            r.variant.as_str().into(),
            format!("{:.1} s", r.sync_s),
            format!("{:.0}", r.pushes_per_s),
            format!("{:.3}", r.cpu_s_per_1000_pushes),
            format!("{:.0}%", r.cp_cpu_percent_churn),
            fmt_bytes(r.rss_per_client_bytes),
            format!("{:.2}", r.encodes_per_change),
        ]);
    }
    md.push_str(&t.to_markdown());
    md.push_str(&format!(
        "\n### Bytes on the wire per change, Delta vs SotW\n\nProtobuf-encoded size of the \
         responses one client receives for one change among {} services of {} endpoints (gRPC \
         and HTTP/2 framing excluded), median of {} changes; both clients on the same control \
         plane, so the variants see the same changes. \"First\" is the response carrying the \
         change; \"total\" adds what follows it (a changed cluster's endpoints are re-sent). \
         Target for the CDS change: Delta/SotW <= 1/500.\n\n",
        p.bytes_services, p.bytes_endpoints, p.byte_changes
    ));
    let mut t = Table::new(&[
        "change",
        "SotW first",
        "Delta first",
        "Delta/SotW first",
        "SotW total",
        "Delta total",
        "Delta/SotW total",
    ]);
    for b in bytes {
        t.row(vec![
            b.change.into(),
            fmt_bytes(b.sotw_first_response),
            fmt_bytes(b.delta_first_response),
            format!("1/{:.0}", b.sotw_first_response / b.delta_first_response),
            fmt_bytes(b.sotw_total),
            fmt_bytes(b.delta_total),
            format!("1/{:.0}", b.sotw_total / b.delta_total),
        ]);
    }
    md.push_str(&t.to_markdown());
    md
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut cli = Cli::parse();
    if cli.quick {
        cli.clients = vec![20];
        cli.services = 50;
        cli.endpoints = 2;
        cli.changes = 3;
        cli.changes_large = 3;
        cli.churn_secs = 3;
        cli.byte_changes = 3;
        cli.bytes_services = 50;
        cli.bytes_endpoints = 2;
    }
    if cli.services == 0 || cli.clients.is_empty() {
        bail!("need at least one service and one client count");
    }
    let max_m = cli.clients.iter().copied().max().unwrap_or(0) as u64;
    check_nofile(max_m + 1_000)?;
    if std::thread::available_parallelism().is_ok_and(|n| n.get() < 2) {
        cli.no_pin = true;
    }
    if cli.pin() {
        pin(std::process::id(), 0)?;
    }
    let ctx = TestCtx::new("bench-xds")?;
    let etcd = Etcd::start(&ctx).await?;
    let yaml = registry_yaml(cli.services, cli.endpoints);
    let started = Instant::now();

    eprintln!(
        "bytes per change ({} services, 1 SotW + 1 Delta client)",
        cli.bytes_services
    );
    let bytes = bytes_phase(&ctx, &cli, &etcd).await?;
    let mut runs = Vec::new();
    let mut run_no = 0;
    for &m in &cli.clients {
        for &variant in &cli.variants {
            run_no += 1;
            eprintln!("{m} clients, {}", variant.as_str());
            runs.push(run_one(&ctx, &cli, &etcd, &yaml, m, variant, run_no).await?);
        }
    }
    let params = Params {
        clients: cli.clients.clone(),
        variants: cli.variants.clone(),
        services: cli.services,
        endpoints: cli.endpoints,
        bytes_services: cli.bytes_services,
        bytes_endpoints: cli.bytes_endpoints,
        pinned: cli.pin(),
        changes: cli.changes,
        changes_large: cli.changes_large,
        churn_secs: cli.churn_secs,
        churn_interval_ms: cli.churn_interval_ms,
        debounce_ms: cli.debounce.as_millis(),
        debounce_max_ms: cli.debounce_max.as_millis(),
        byte_changes: cli.byte_changes,
        quick: cli.quick,
    };
    let md = markdown(&params, &runs, &bytes);
    publish(
        "xds",
        &md,
        &Raw {
            params,
            runs,
            bytes,
        },
    )?;
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}
