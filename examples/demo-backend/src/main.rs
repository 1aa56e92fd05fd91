//! `weft-demo-backend`: one process serving several tiny named backends for the demo and the
//! end-to-end tests.
//!
//! - `--http NAME=ADDR` (repeatable): HTTP/1.1 and h2c. Every request gets 200 with body
//!   `NAME\n` and header `x-backend: NAME`; `GET /healthz` gets 200 `ok`. The request's
//!   `traceparent`, `tracestate` and `baggage` come back as `x-seen-traceparent`,
//!   `x-seen-tracestate` and `x-seen-baggage`, so a test sees what the last hop sent.
//! - Runtime controls, per HTTP backend, so a test can make one misbehave without restarting
//!   it (`POST`, answered `200 ok`):
//!   `/control/health?status=fail|pass` (`/healthz` answers 503 while failing),
//!   `/control/fail?status=503` (every other request answers that status; `status=0` stops),
//!   `/control/delay?ms=2000` (every other request waits that long first; `ms=0` stops).
//! - `--grpc NAME=ADDR` (repeatable): `weft.demo.v1.Echo` (the reply names the backend) plus
//!   `grpc.health.v1.Health` reporting SERVING.
//!
//! Logs one line per listener once it is bound, and exits with status 0 on SIGINT or SIGTERM.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tonic::transport::server::TcpIncoming;
use weft_proto::demo::v1::echo_server::{Echo, EchoServer};
use weft_proto::demo::v1::{EchoReply, EchoRequest};

#[derive(Debug, Parser)]
#[command(name = "weft-demo-backend", version, about)]
struct Cli {
    /// An HTTP backend, `NAME=ADDR` (e.g. `web-1=127.0.0.1:18081`). Repeatable.
    #[arg(long = "http", value_name = "NAME=ADDR", value_parser = parse_spec)]
    http: Vec<Spec>,
    /// A gRPC Echo backend, `NAME=ADDR` (e.g. `echo-1=127.0.0.1:50051`). Repeatable.
    #[arg(long = "grpc", value_name = "NAME=ADDR", value_parser = parse_spec)]
    grpc: Vec<Spec>,
}

#[derive(Debug, Clone)]
struct Spec {
    name: String,
    addr: SocketAddr,
}

fn parse_spec(s: &str) -> Result<Spec, String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not NAME=ADDR"))?;
    if name.is_empty() {
        return Err(format!("`{s}`: the name is empty"));
    }
    let addr = addr
        .parse()
        .map_err(|e| format!("`{addr}` is not an IP:PORT address: {e}"))?;
    Ok(Spec {
        name: name.to_string(),
        addr,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    if cli.http.is_empty() && cli.grpc.is_empty() {
        bail!("nothing to serve: give at least one --http NAME=ADDR or --grpc NAME=ADDR");
    }

    let mut tasks = JoinSet::new();
    // Bind everything first so a port conflict fails the whole process before it says it is up.
    for spec in cli.http {
        let listener = TcpListener::bind(spec.addr)
            .await
            .with_context(|| format!("binding http backend {} on {}", spec.name, spec.addr))?;
        let local = listener.local_addr()?;
        tracing::info!(backend = %spec.name, kind = "http", addr = %local, "listening");
        tasks.spawn(serve_http(spec.name, listener));
    }
    for spec in cli.grpc {
        let listener = TcpListener::bind(spec.addr)
            .await
            .with_context(|| format!("binding grpc backend {} on {}", spec.name, spec.addr))?;
        let local = listener.local_addr()?;
        tracing::info!(backend = %spec.name, kind = "grpc", addr = %local, "listening");
        tasks.spawn(serve_grpc(spec.name, listener));
    }

    tokio::select! {
        res = shutdown_signal() => {
            res?;
            tracing::info!("signal received, exiting");
            tasks.abort_all();
            Ok(())
        }
        Some(joined) = tasks.join_next() => {
            match joined {
                Ok(Ok(())) => bail!("a listener stopped unexpectedly"),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(e).context("a listener task failed"),
            }
        }
    }
}

async fn shutdown_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// A backend's runtime behaviour, changed through `/control/*`.
#[derive(Debug)]
struct Behaviour {
    name: Bytes,
    healthy: AtomicBool,
    /// Status every request gets instead of 200; 0 = behave.
    fail_status: AtomicU16,
    delay_ms: AtomicU64,
}

async fn serve_http(name: String, listener: TcpListener) -> Result<()> {
    let name = Arc::new(Behaviour {
        name: Bytes::from(name),
        healthy: AtomicBool::new(true),
        fail_status: AtomicU16::new(0),
        delay_ms: AtomicU64::new(0),
    });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let name = name.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle_http(name.clone(), req));
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

async fn handle_http(
    b: Arc<Behaviour>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    if req.method() == hyper::Method::POST && path.starts_with("/control/") {
        return Ok(control(&b, path, req.uri().query().unwrap_or("")));
    }
    let (status, body) = if req.method() == hyper::Method::GET && path == "/healthz" {
        if b.healthy.load(Ordering::Relaxed) {
            (200, Bytes::from_static(b"ok"))
        } else {
            (503, Bytes::from_static(b"failing\n"))
        }
    } else {
        let delay = b.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let mut body = b.name.to_vec();
        body.push(b'\n');
        match b.fail_status.load(Ordering::Relaxed) {
            0 => (200, Bytes::from(body)),
            s => (s, Bytes::from(body)),
        }
    };
    let mut resp = reply(status, body);
    let name = hyper::header::HeaderValue::from_maybe_shared(b.name.clone())
        .unwrap_or_else(|_| hyper::header::HeaderValue::from_static("invalid-name"));
    resp.headers_mut().insert("x-backend", name);
    for (seen, header) in [
        ("x-seen-traceparent", "traceparent"),
        ("x-seen-tracestate", "tracestate"),
        ("x-seen-baggage", "baggage"),
    ] {
        if let Some(v) = req.headers().get(header) {
            resp.headers_mut().insert(seen, v.clone());
        }
    }
    Ok(resp)
}

fn reply(status: u16, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    resp
}

/// Applies one `/control/*` request; unknown controls or values get 400 naming them.
fn control(b: &Behaviour, path: &str, query: &str) -> Response<Full<Bytes>> {
    let param = |key: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    };
    let done = match path {
        "/control/health" => match param("status").as_deref() {
            Some("fail") => {
                b.healthy.store(false, Ordering::Relaxed);
                true
            }
            Some("pass") => {
                b.healthy.store(true, Ordering::Relaxed);
                true
            }
            _ => false,
        },
        "/control/fail" => match param("status").and_then(|s| s.parse::<u16>().ok()) {
            Some(s) if s == 0 || (100..=599).contains(&s) => {
                b.fail_status.store(s, Ordering::Relaxed);
                true
            }
            _ => false,
        },
        "/control/delay" => match param("ms").and_then(|s| s.parse::<u64>().ok()) {
            Some(ms) => {
                b.delay_ms.store(ms, Ordering::Relaxed);
                true
            }
            None => false,
        },
        _ => false,
    };
    match done {
        true => {
            tracing::info!(backend = ?b.name, control = path, query, "behaviour changed");
            reply(200, Bytes::from_static(b"ok\n"))
        }
        false => reply(
            400,
            Bytes::from(format!("unknown control or value: {path}?{query}\n")),
        ),
    }
}

#[derive(Debug)]
struct EchoService {
    name: String,
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        Ok(tonic::Response::new(EchoReply {
            message: request.into_inner().message,
            backend: self.name.clone(),
        }))
    }
}

async fn serve_grpc(name: String, listener: TcpListener) -> Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<EchoServer<EchoService>>().await;
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(EchoServer::new(EchoService { name: name.clone() }))
        .serve_with_incoming(TcpIncoming::from(listener))
        .await
        .with_context(|| format!("grpc backend {name}"))
}
