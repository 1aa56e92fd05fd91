//! `weft-demo-backend`: one process serving several tiny named backends for the demo and the
//! end-to-end tests.
//!
//! - `--http NAME=ADDR` (repeatable): HTTP/1.1 and h2c. Every request gets 200 with body
//!   `NAME\n` and header `x-backend: NAME`; `GET /healthz` gets 200 `ok`.
//! - `--grpc NAME=ADDR` (repeatable): `weft.demo.v1.Echo` (the reply names the backend) plus
//!   `grpc.health.v1.Health` reporting SERVING.
//!
//! Logs one line per listener once it is bound, and exits with status 0 on SIGINT or SIGTERM.

use std::convert::Infallible;
use std::net::SocketAddr;

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

async fn serve_http(name: String, listener: TcpListener) -> Result<()> {
    let name = Bytes::from(name);
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
    name: Bytes,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = hyper::header::HeaderValue::from_maybe_shared(name.clone())
        .unwrap_or_else(|_| hyper::header::HeaderValue::from_static("invalid-name"));
    let body = if req.method() == hyper::Method::GET && req.uri().path() == "/healthz" {
        Bytes::from_static(b"ok")
    } else {
        let mut b = name.to_vec();
        b.push(b'\n');
        Bytes::from(b)
    };
    let mut resp = Response::new(Full::new(body));
    resp.headers_mut().insert("x-backend", header);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    Ok(resp)
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
