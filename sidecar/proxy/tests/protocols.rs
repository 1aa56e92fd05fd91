//! HTTP/2: h2c prior knowledge and gRPC (tonic) through the outbound proxy, trailers intact.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use weft_proto::demo::v1::echo_client::EchoClient;
use weft_proto::demo::v1::echo_server::{Echo, EchoServer};
use weft_proto::demo::v1::{EchoReply, EchoRequest};

#[tokio::test]
async fn h2c_prior_knowledge_reaches_an_h2c_backend() {
    let b = backend("h2-backend").await;
    let yaml = format!(
        "services:\n  - name: h2svc\n    protocol: grpc\n    endpoints:\n{}",
        endpoints(&[&b])
    );
    let sc = outbound(mesh_config(&yaml)).await;
    let stream = TcpStream::connect(sc.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    for path in ["/a", "/b?x=1"] {
        let req = http::Request::get(format!("http://h2svc{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.headers()["x-version"], "HTTP/2.0", "h2c upstream");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"h2-backend");
    }
    let (version, headers) = b.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(version, http::Version::HTTP_2);
    assert_eq!(
        headers["host"], "h2svc",
        "the original authority travels in host"
    );

    // An HTTP/1.1 client to the same HTTP/2 cluster works too.
    let r = get(&client(), sc.addr, "h2svc", "/", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-version"], "HTTP/2.0");
}

struct EchoSvc {
    name: String,
    unavailable: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Echo for EchoSvc {
    async fn echo(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(tonic::Status::unavailable("going away"));
        }
        let message = request.into_inner().message;
        if message == "fail" {
            return Err(tonic::Status::not_found("no such thing"));
        }
        Ok(tonic::Response::new(EchoReply {
            message,
            backend: self.name.clone(),
        }))
    }
}

struct GrpcBackend {
    addr: SocketAddr,
    unavailable: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Drop for GrpcBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn grpc_backend(name: &str) -> GrpcBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let unavailable = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let svc = EchoSvc {
        name: name.to_string(),
        unavailable: unavailable.clone(),
        calls: calls.clone(),
    };
    let s = stop.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(svc))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                s.cancelled_owned(),
            )
            .await
            .unwrap();
    });
    GrpcBackend {
        addr,
        unavailable,
        calls,
        stop,
    }
}

async fn echo_client(proxy: SocketAddr, service: &str) -> EchoClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{proxy}"))
        .unwrap()
        .origin(format!("http://{service}").parse().unwrap())
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    EchoClient::new(channel)
}

#[tokio::test]
async fn grpc_call_goes_through_with_trailers_intact() {
    let g = grpc_backend("echo-1").await;
    let yaml = format!(
        "services:\n  - name: echo\n    protocol: grpc\n    endpoints:\n      - {{ address: 127.0.0.1, port: {} }}\n",
        g.addr.port()
    );
    let sc = outbound(mesh_config(&yaml)).await;
    let mut c = echo_client(sc.addr, "echo").await;
    for i in 0..3 {
        let reply = c
            .echo(EchoRequest {
                message: format!("hello {i}"),
            })
            .await
            .expect("echo through the proxy")
            .into_inner();
        assert_eq!(reply.backend, "echo-1");
        assert_eq!(reply.message, format!("hello {i}"));
    }
    let err = c
        .echo(EchoRequest {
            message: "fail".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(err.message(), "no such thing");
    assert_eq!(g.calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn grpc_unavailable_is_retried_on_another_backend() {
    let down = grpc_backend("echo-down").await;
    down.unavailable.store(true, Ordering::SeqCst);
    let up = grpc_backend("echo-up").await;
    let yaml = format!(
        "services:\n  - name: echo\n    protocol: grpc\n    endpoints:\n      - {{ address: 127.0.0.1, port: {} }}\n      - {{ address: 127.0.0.1, port: {} }}\nroutes:\n  - name: r\n    service: echo\n    rules:\n      - retries: {{ attempts: 2, on: [unavailable] }}\npolicies:\n  - {{ name: p, service: echo, lb: round_robin }}\n",
        down.addr.port(),
        up.addr.port()
    );
    let sc = outbound(mesh_config(&yaml)).await;
    let mut c = echo_client(sc.addr, "echo").await;
    for _ in 0..6 {
        let reply = c
            .echo(EchoRequest {
                message: "x".into(),
            })
            .await
            .expect("retried onto the healthy backend")
            .into_inner();
        assert_eq!(reply.backend, "echo-up");
    }
    assert!(down.calls.load(Ordering::SeqCst) >= 1);
}
