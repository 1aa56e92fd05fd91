//! The inbound proxy (forwarding, trace context, draining) and both listeners' robustness.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use weft_proxy::{InboundOptions, ProxyOptions};

struct Inbound {
    addr: std::net::SocketAddr,
    drain: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    sidecar_spans: std::sync::Arc<Spans>,
    _registry: prometheus_client::registry::Registry,
}

async fn inbound(app: &Backend) -> Inbound {
    let (mesh, registry, spans) = new_mesh(ProxyOptions {
        service: "app".into(),
        ..Default::default()
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let drain = CancellationToken::new();
    let task = tokio::spawn(weft_proxy::serve_inbound(
        listener,
        InboundOptions {
            app: app.addr,
            app_http2: false,
        },
        mesh,
        drain.clone(),
    ));
    Inbound {
        addr,
        drain,
        task,
        sidecar_spans: spans,
        _registry: registry,
    }
}

#[tokio::test]
async fn inbound_forwards_with_a_server_span_and_forwarded_for() {
    let app = backend("app").await;
    let ib = inbound(&app).await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = get(&client(), ib.addr, "app", "/in", &[("traceparent", tp)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "app");
    let h = app.last_headers();
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["host"], "app");
    let seen = h["traceparent"].to_str().unwrap().to_string();
    assert!(seen.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
    assert!(!seen.contains("00f067aa0ba902b7"));
    assert!(eventually(|| !ib.sidecar_spans.0.lock().unwrap().is_empty()).await);
    let s = ib.sidecar_spans.0.lock().unwrap()[0].clone();
    assert_eq!(s.kind, weft_proxy::SpanKind::Server);
    assert_eq!(s.name, "inbound app");
    assert!(seen.contains(&s.context.span_id.to_string()));
    assert_eq!(s.context.parent_id.unwrap().to_string(), "00f067aa0ba902b7");
}

#[tokio::test]
async fn inbound_app_unreachable_is_502() {
    let app = backend("app").await;
    let ib = inbound(&app).await;
    drop(app);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = get(&client(), ib.addr, "app", "/", &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.weft_error(), "upstream_connect");
}

#[tokio::test]
async fn drain_finishes_in_flight_requests_then_refuses_connections() {
    let app = backend("app").await;
    let ib = inbound(&app).await;
    let c = client();
    let addr = ib.addr;
    let c1 = c.clone();
    let slow =
        tokio::spawn(async move { get(&c1, addr, "app", "/slow", &[("x-delay-ms", "800")]).await });
    assert!(eventually(|| app.hits() == 1).await);
    ib.drain.cancel();
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200, "the in-flight request completes");
    tokio::time::timeout(Duration::from_secs(10), ib.task)
        .await
        .expect("serve_inbound returns once in-flight requests are done")
        .unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "new connections are refused after drain"
    );
}

async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn garbage_and_huge_headers_get_errors_and_the_listener_keeps_serving() {
    let b = backend("web-1").await;
    let yaml = format!(
        "services:\n  - name: web\n    endpoints:\n{}",
        endpoints(&[&b])
    );
    let sc = outbound(mesh_config(&yaml)).await;
    let resp = raw(sc.addr, b"\x16\x03\x01garbage garbage\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp:?}");

    let huge = "a".repeat(100 * 1024);
    let req = format!("GET / HTTP/1.1\r\nHost: web\r\nX-Huge: {huge}\r\n\r\n");
    let resp = raw(sc.addr, req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp:?}");

    let resp = raw(sc.addr, b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 400"), "no Host: {resp:?}");

    // Random binary after an h2 preface must not hurt either.
    let mut junk = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    junk.extend((0..512u32).map(|i| (i * 37 % 251) as u8));
    let _ = tokio::time::timeout(Duration::from_secs(1), raw(sc.addr, &junk)).await;

    let r = get(&client(), sc.addr, "web", "/", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "web-1");
}

#[tokio::test]
async fn outbound_shutdown_finishes_in_flight_requests() {
    let b = backend("web-1").await;
    let yaml = format!(
        "services:\n  - name: web\n    endpoints:\n{}",
        endpoints(&[&b])
    );
    let mut sc = outbound(mesh_config(&yaml)).await;
    let addr = sc.addr;
    let c = client();
    let slow =
        tokio::spawn(async move { get(&c, addr, "web", "/", &[("x-delay-ms", "500")]).await });
    assert!(eventually(|| b.hits() == 1).await);
    sc.stop.cancel();
    assert_eq!(slow.await.unwrap().status, 200);
    tokio::time::timeout(Duration::from_secs(10), sc.task.take().unwrap())
        .await
        .unwrap()
        .unwrap();
}
