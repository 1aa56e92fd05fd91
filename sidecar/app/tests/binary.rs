//! The binary as a user runs it: its flags, its refusals (exit 64 naming the flag), and one full
//! start beside the real control plane and a small app: ready, registered, configured, carrying
//! a request outbound -> control plane's routes -> inbound -> app, and leaving cleanly on
//! SIGTERM. (The mesh-wide end-to-end suite lives in /tests.)
//!
//! Needs the control plane binary built beside this one: `cargo build -p weft-control-plane`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIDECAR: &str = env!("CARGO_BIN_EXE_weft-sidecar");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process, killed on drop whatever happens in the test, with its stderr in a file.
struct Proc {
    child: Child,
    dir: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, files: &[(&str, &str)]) -> Proc {
        let dir = std::env::temp_dir().join(format!("weft-sidecar-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, content) in files {
            std::fs::write(dir.join(file), content).unwrap();
        }
        cmd.current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("stderr.log")).unwrap(),
            ));
        clear_weft_env(&mut cmd);
        Proc {
            child: cmd.spawn().unwrap(),
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// Waits for the process to exit on its own.
    async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "did not exit within {within:?}: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The flags under test must not be overridden by a `WEFT_*` variable of whoever runs them.
fn clear_weft_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("WEFT_") {
            cmd.env_remove(k);
        }
    }
}

/// GET over a fresh HTTP/1.1 connection: (status, body). (0, "") when nothing answers.
async fn get(port: u16, path: &str, host: &str) -> (u16, String) {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return (0, String::new());
    };
    let req = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut out = String::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await;
    if read.is_err() {
        return (0, String::new());
    }
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

async fn get_json(port: u16, path: &str) -> serde_json::Value {
    let (status, body) = get(port, path, "admin").await;
    if status != 200 {
        return serde_json::Value::Null;
    }
    serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
}

/// Polls `check` until it returns true; fails with `what` and the logs otherwise.
async fn until<F, Fut>(what: &str, within: Duration, logs: &[&Proc], mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        if Instant::now() >= deadline {
            let logs: Vec<String> = logs.iter().map(|p| p.log()).collect();
            panic!(
                "{what}: not within {within:?}\n--- logs ---\n{}",
                logs.join("\n---\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the sidecar with `args` expecting it to exit by itself; returns (code, stderr).
fn run_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(SIDECAR);
    cmd.args(args);
    let mut p = Proc::spawn(&format!("exit-{}", free_port()), cmd, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            return (s.code(), p.log());
        }
        assert!(
            Instant::now() < deadline,
            "weft-sidecar {args:?} kept running: {}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn help_mentions_every_flag() {
    let out = Command::new(SIDECAR).arg("--help").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--service",
        "--app-port",
        "--app-address",
        "--app-protocol",
        "--app-health",
        "--health-interval",
        "--health-timeout",
        "--health-rise",
        "--health-fall",
        "--inbound-listen",
        "--outbound-listen",
        "--admin-listen",
        "--control-plane",
        "--xds-variant",
        "--register",
        "--etcd-ca",
        "--etcd-cert",
        "--etcd-key",
        "--registration-ttl",
        "--instance-id",
        "--advertise-address",
        "--zone",
        "--weight",
        "--metadata",
        "--otlp-endpoint",
        "--drain-delay",
        "--shutdown-grace",
        "--log-format",
    ] {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}:\n{help}"
        );
        let env = format!(
            "WEFT_{}",
            flag.trim_start_matches("--")
                .replace('-', "_")
                .to_uppercase()
        );
        assert!(
            help.contains(&env),
            "--help does not mention {env}:\n{help}"
        );
    }
}

#[test]
fn bad_flags_exit_64_naming_the_flag() {
    let (admin, inbound, outbound) = (free_port(), free_port(), free_port());
    let admin = format!("127.0.0.1:{admin}");
    let inbound = format!("127.0.0.1:{inbound}");
    let outbound = format!("127.0.0.1:{outbound}");
    let base = [
        "--service",
        "shop",
        "--app-port",
        "8080",
        "--control-plane",
        "http://127.0.0.1:1",
        "--admin-listen",
        &admin,
        "--inbound-listen",
        &inbound,
        "--outbound-listen",
        &outbound,
    ];
    let cases: &[(&[&str], &str)] = &[
        (&["--register", "zookeeper://127.0.0.1:2181"], "--register"),
        (&["--app-health", "udp"], "--app-health"),
        (&["--app-health", "http:no-slash"], "--app-health"),
        (&["--health-interval", "5 parsecs"], "--health-interval"),
        (&["--drain-delay", "soon"], "--drain-delay"),
        (&["--app-protocol", "thrift"], "--app-protocol"),
        (&["--metadata", "novalue"], "--metadata"),
        (&["--health-rise", "0"], "--health-rise"),
        (&["--etcd-ca", "/ca.pem"], "--etcd-ca"),
    ];
    for (extra, flag) in cases {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        let (code, stderr) = run_to_exit(&args);
        assert_eq!(code, Some(64), "{extra:?} should exit 64: {stderr}");
        assert!(
            stderr.contains(flag),
            "{extra:?}: message does not name {flag}: {stderr}"
        );
    }
    // A bad --control-plane, and a missing required flag, are refused the same way.
    let (code, stderr) = run_to_exit(&[
        "--service",
        "shop",
        "--app-port",
        "1",
        "--control-plane",
        "cp:18000",
    ]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("--control-plane"), "{stderr}");
    let (code, stderr) = run_to_exit(&["--app-port", "1", "--control-plane", "http://127.0.0.1:1"]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("--service"), "{stderr}");
}

/// A tiny HTTP/1.1 app that says which path it saw.
async fn start_app() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let body = format!("app saw {} {}", req.method(), req.uri().path());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    port
}

fn control_plane_binary() -> PathBuf {
    let path = Path::new(SIDECAR)
        .parent()
        .unwrap()
        .join("weft-control-plane");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p weft-control-plane` first",
        path.display()
    );
    path
}

fn registered(regs: &serde_json::Value, service: &str) -> Vec<serde_json::Value> {
    regs["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|i| i["service"] == service)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_beside_an_app_and_the_control_plane_and_drains_on_sigterm() {
    let app_port = start_app().await;

    let (xds, cp_admin) = (free_port(), free_port());
    let mut cmd = Command::new(control_plane_binary());
    cmd.args(["--xds-listen", &format!("127.0.0.1:{xds}")])
        .args(["--admin-listen", &format!("127.0.0.1:{cp_admin}")])
        .args(["--envoy-http-address", "127.0.0.1"])
        .args(["--debounce", "10ms", "--debounce-max", "100ms"])
        .args(["--registry-file", "registry.yaml"]);
    // A service from a file, so the sidecar has more than its own to learn about.
    let cp = Proc::spawn(
        "cp",
        cmd,
        &[(
            "registry.yaml",
            "services: [{name: other, endpoints: [{address: 127.0.0.1, port: 9}]}]\n",
        )],
    );
    until(
        "control plane ready",
        Duration::from_secs(30),
        &[&cp],
        || async move { get(cp_admin, "/readyz", "x").await.0 == 200 },
    )
    .await;

    let (admin, inbound, outbound) = (free_port(), free_port(), free_port());
    let mut cmd = Command::new(SIDECAR);
    cmd.args(["--service", "shop", "--instance-id", "shop-test"])
        .args(["--app-port", &app_port.to_string()])
        .args(["--control-plane", &format!("http://127.0.0.1:{xds}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--inbound-listen", &format!("127.0.0.1:{inbound}")])
        .args(["--outbound-listen", &format!("127.0.0.1:{outbound}")])
        .args(["--health-interval", "200ms", "--registration-ttl", "5s"])
        .args(["--drain-delay", "300ms", "--shutdown-grace", "10s"])
        .args(["--metadata", "team=checkout", "--log-format", "text"]);
    let mut sc = Proc::spawn("sidecar", cmd, &[]);
    let logs = || [&cp, &sc];

    until(
        "sidecar ready",
        Duration::from_secs(30),
        &logs(),
        || async move { get(admin, "/readyz", "x").await.0 == 200 },
    )
    .await;

    // Registered with the inbound port: callers reach the app through its sidecar.
    until(
        "registered in the control plane",
        Duration::from_secs(20),
        &logs(),
        || async move {
            let regs = get_json(cp_admin, "/debug/registrations").await;
            registered(&regs, "shop")
                .iter()
                .any(|i| i["instance_id"] == "shop-test" && i["port"] == inbound)
        },
    )
    .await;

    until(
        "clusters in /debug/config",
        Duration::from_secs(20),
        &logs(),
        || async move {
            let cfg = get_json(admin, "/debug/config").await;
            let clusters = cfg["xds"]["resources"]["clusters"].clone();
            let has = |n: &str| {
                clusters
                    .as_array()
                    .is_some_and(|a| a.iter().any(|c| c == n))
            };
            has("shop") && has("other") && cfg["xds"]["synced"] == true
        },
    )
    .await;

    // App -> outbound -> (routes, EDS) -> inbound -> app.
    until(
        "a request through the mesh",
        Duration::from_secs(20),
        &logs(),
        || async move {
            let (status, body) = get(outbound, "/hello", "shop").await;
            status == 200 && body.contains("app saw GET /hello")
        },
    )
    .await;

    let metrics = get(admin, "/metrics", "x").await.1;
    for m in [
        "weft_sidecar_xds_connected 1",
        "weft_sidecar_registered 1",
        "weft_sidecar_app_healthy 1",
    ] {
        assert!(metrics.contains(m), "{m} missing:\n{metrics}");
    }

    let status = Command::new("kill")
        .args(["-TERM", &sc.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = sc.wait_exit(Duration::from_secs(15)).await;
    assert!(exit.success(), "exit status {exit:?}: {}", sc.log());

    until(
        "registration removed",
        Duration::from_secs(5),
        &[&cp, &sc],
        || async move {
            let regs = get_json(cp_admin, "/debug/registrations").await;
            regs["instances"].is_array() && registered(&regs, "shop").is_empty()
        },
    )
    .await;
}
