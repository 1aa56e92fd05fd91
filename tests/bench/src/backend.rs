//! Minimal benchmark backends (see `weft-bench-proxy`): an HTTP/1.1 server that reads the
//! request body and answers a fixed 1 KiB body, and a `weft.demo.v1.Echo` gRPC server that
//! answers a 1 KiB message.
//!
//! They exist so that the backend costs little and exactly the same on every path a benchmark
//! compares (direct, through the sidecar, through Envoy): the demo backend does more per
//! request (control endpoints, named replies, health service) than a proxy benchmark should
//! measure. What they do not do: anything configurable per request.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use weft_proto::demo::v1::echo_server::{Echo, EchoServer};
use weft_proto::demo::v1::{EchoReply, EchoRequest};

/// Size of every response body (HTTP) and reply message (gRPC).
pub const BODY_BYTES: usize = 1024;

/// The response body: one allocation shared by every response.
fn body() -> Bytes {
    Bytes::from(vec![b'x'; BODY_BYTES])
}

/// Serves HTTP/1.1 keep-alive on `listener` until the task is dropped.
pub async fn serve_http(listener: TcpListener) -> Result<()> {
    let reply = body();
    loop {
        let (stream, _) = listener.accept().await.context("accepting")?;
        // Small responses on keep-alive connections: without this, Nagle plus delayed ACKs
        // would add up to 40 ms to some of them, on the direct path as on the proxied ones.
        let _ = stream.set_nodelay(true);
        let reply = reply.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let reply = reply.clone();
                async move {
                    // Read the whole request, as a real app would before answering.
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(Response::new(Full::new(reply)))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

struct EchoService {
    reply: String,
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(
        &self,
        _request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        Ok(tonic::Response::new(EchoReply {
            message: self.reply.clone(),
            backend: "bench".into(),
        }))
    }
}

/// Serves `weft.demo.v1.Echo` (h2c) on `listener` until the task is dropped.
pub async fn serve_grpc(listener: TcpListener) -> Result<()> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(EchoServer::new(EchoService {
            reply: "x".repeat(BODY_BYTES),
        }))
        .serve_with_incoming(incoming)
        .await
        .context("serving gRPC")
}

/// Binds both and serves them until one fails.
pub async fn run(http: SocketAddr, grpc: SocketAddr) -> Result<()> {
    let h = TcpListener::bind(http)
        .await
        .with_context(|| format!("binding {http}"))?;
    let g = TcpListener::bind(grpc)
        .await
        .with_context(|| format!("binding {grpc}"))?;
    tokio::select! {
        r = serve_http(h) => r,
        r = serve_grpc(g) => r,
    }
}
