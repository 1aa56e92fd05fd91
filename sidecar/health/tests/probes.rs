//! Probes and checkers against real servers on 127.0.0.1: hyper HTTP, plain TCP, tonic-health.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;
use weft_health_check::{Checker, Probe, ProbeError, Schedule, Status, Verdict, probe_once};

/// Aborts the server task when the test ends, also on panic.
struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP/1.1 server: `/healthz` answers 200 while `healthy` is set, 503 otherwise; `/moved`
/// answers 302; every request's Host header must be the server's address (counted in `bad_host`).
async fn http_server(healthy: Arc<AtomicBool>, bad_host: Arc<AtomicU32>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let healthy = healthy.clone();
            let bad_host = bad_host.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let host = req
                        .headers()
                        .get(hyper::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_string);
                    if host != Some(addr.to_string()) {
                        bad_host.fetch_add(1, Ordering::SeqCst);
                    }
                    let status = match req.uri().path() {
                        "/moved" => 302,
                        "/healthz" if healthy.load(Ordering::SeqCst) => 200,
                        "/healthz" => 503,
                        _ => 404,
                    };
                    async move {
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from_static(b"ok")))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Server { addr, task }
}

/// A tonic-health server; returns the reporter to flip statuses with.
async fn grpc_server() -> (Server, tonic_health::server::HealthReporter) {
    let (reporter, service) = tonic_health::server::health_reporter();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (Server { addr, task }, reporter)
}

/// Accepts connections and holds them open without ever answering.
async fn silent_server() -> (Server, oneshot::Receiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted_tx, accepted) = oneshot::channel();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        let mut accepted_tx = Some(accepted_tx);
        loop {
            let (s, _) = listener.accept().await.unwrap();
            held.push(s);
            if let Some(tx) = accepted_tx.take() {
                let _ = tx.send(());
            }
        }
    });
    (Server { addr, task }, accepted)
}

/// A port nothing listens on (bound, then released).
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

fn http(path: &str) -> Probe {
    Probe::Http { path: path.into() }
}

const T: Duration = Duration::from_secs(2);

async fn wait_for_status(
    rx: &mut tokio::sync::watch::Receiver<Status>,
    what: &str,
    f: impl FnMut(&Status) -> bool,
) -> Status {
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        rx.wait_for(f).await.map(|s| s.clone())
    })
    .await;
    match got {
        Ok(s) => s.unwrap(),
        Err(_) => panic!("timed out waiting for {what}; last {:?}", *rx.borrow()),
    }
}

#[tokio::test]
async fn http_probe_passes_2xx_3xx_and_fails_other_statuses() {
    let healthy = Arc::new(AtomicBool::new(true));
    let bad_host = Arc::new(AtomicU32::new(0));
    let srv = http_server(healthy.clone(), bad_host.clone()).await;

    probe_once(&http("/healthz"), srv.addr, T).await.unwrap();
    probe_once(&http("/moved"), srv.addr, T).await.unwrap();

    healthy.store(false, Ordering::SeqCst);
    match probe_once(&http("/healthz"), srv.addr, T).await {
        Err(ProbeError::HttpStatus {
            status: 503,
            path,
            addr,
        }) => {
            assert_eq!(path, "/healthz");
            assert_eq!(addr, srv.addr);
        }
        other => panic!("want HTTP 503, got {other:?}"),
    }
    let e = probe_once(&http("/nope"), srv.addr, T).await.unwrap_err();
    assert!(e.to_string().contains("/nope answered 404"), "{e}");
    assert_eq!(
        bad_host.load(Ordering::SeqCst),
        0,
        "Host header not the address"
    );
}

#[tokio::test]
async fn http_checker_follows_rise_and_fall() {
    let healthy = Arc::new(AtomicBool::new(true));
    let srv = http_server(healthy.clone(), Arc::new(AtomicU32::new(0))).await;
    let checker = Checker::spawn(
        http("/healthz"),
        srv.addr,
        Schedule {
            interval: Duration::from_millis(50),
            timeout: T,
            rise: 3,
            fall: 2,
        },
    );
    let mut rx = checker.watch();

    // Unknown until three successes in a row.
    let st = wait_for_status(&mut rx, "first probe", |s| s.probes >= 1).await;
    assert_eq!(st.verdict, Verdict::Unknown, "{st:?}");
    let st = wait_for_status(&mut rx, "healthy", |s| s.verdict == Verdict::Healthy).await;
    assert_eq!(st.consecutive_successes, 3, "{st:?}");
    assert_eq!(st.probes, 3, "{st:?}");

    healthy.store(false, Ordering::SeqCst);
    let st = wait_for_status(&mut rx, "first failure", |s| s.consecutive_failures >= 1).await;
    assert_eq!(
        st.verdict,
        Verdict::Healthy,
        "one failure must not flip it: {st:?}"
    );
    let st = wait_for_status(&mut rx, "unhealthy", |s| s.verdict == Verdict::Unhealthy).await;
    assert_eq!(st.consecutive_failures, 2, "{st:?}");
    assert!(
        st.last_error.as_deref().is_some_and(|e| e.contains("503")),
        "{st:?}"
    );

    healthy.store(true, Ordering::SeqCst);
    let st = wait_for_status(&mut rx, "first success", |s| s.consecutive_successes >= 1).await;
    assert_eq!(st.verdict, Verdict::Unhealthy, "{st:?}");
    let st = wait_for_status(&mut rx, "healthy again", |s| s.verdict == Verdict::Healthy).await;
    assert_eq!(st.consecutive_successes, 3, "{st:?}");
    assert_eq!(st.last_error, None);

    // Dropping the checker stops probing: the channel closes.
    drop(checker);
    tokio::time::timeout(Duration::from_secs(5), async {
        while rx.changed().await.is_ok() {}
    })
    .await
    .expect("checker kept running after drop");
}

#[tokio::test]
async fn tcp_probe_connects_or_names_the_failure() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    probe_once(&Probe::Tcp, addr, T).await.unwrap();

    let closed = closed_port().await;
    match probe_once(&Probe::Tcp, closed, T).await {
        Err(e @ ProbeError::Connect { .. }) => {
            assert!(e.to_string().contains(&closed.to_string()), "{e}");
        }
        other => panic!("want a connect error, got {other:?}"),
    }

    let checker = Checker::spawn(
        Probe::Tcp,
        closed,
        Schedule {
            interval: Duration::from_millis(50),
            timeout: T,
            rise: 1,
            fall: 2,
        },
    );
    let mut rx = checker.watch();
    let st = wait_for_status(&mut rx, "unhealthy", |s| s.verdict == Verdict::Unhealthy).await;
    assert_eq!(st.probes, 2, "{st:?}");
}

#[tokio::test]
async fn grpc_probe_reads_the_serving_status() {
    let (srv, reporter) = grpc_server().await;
    // The whole server ("") is SERVING by default in tonic-health.
    probe_once(
        &Probe::Grpc {
            service: String::new(),
        },
        srv.addr,
        T,
    )
    .await
    .unwrap();

    let svc = Probe::Grpc {
        service: "my.Service".into(),
    };
    // Unknown service: tonic-health answers NOT_FOUND.
    let e = probe_once(&svc, srv.addr, T).await.unwrap_err();
    assert!(
        matches!(&e, ProbeError::GrpcStatus { status, .. } if status.contains("NotFound")),
        "{e}"
    );

    reporter
        .set_service_status("my.Service", ServingStatus::Serving)
        .await;
    probe_once(&svc, srv.addr, T).await.unwrap();

    reporter
        .set_service_status("my.Service", ServingStatus::NotServing)
        .await;
    let e = probe_once(&svc, srv.addr, T).await.unwrap_err();
    assert!(
        matches!(&e, ProbeError::GrpcStatus { status, .. } if status == "NOT_SERVING"),
        "{e}"
    );

    // And through a checker, both ways.
    let checker = Checker::spawn(
        svc,
        srv.addr,
        Schedule {
            interval: Duration::from_millis(50),
            timeout: T,
            rise: 2,
            fall: 2,
        },
    );
    let mut rx = checker.watch();
    wait_for_status(&mut rx, "unhealthy", |s| s.verdict == Verdict::Unhealthy).await;
    reporter
        .set_service_status("my.Service", ServingStatus::Serving)
        .await;
    wait_for_status(&mut rx, "healthy", |s| s.verdict == Verdict::Healthy).await;

    // A closed port is a connect failure.
    let closed = closed_port().await;
    let e = probe_once(
        &Probe::Grpc {
            service: String::new(),
        },
        closed,
        T,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, ProbeError::Connect { .. }), "{e}");
}

#[tokio::test]
async fn probes_time_out_against_a_server_that_never_answers() {
    let timeout = Duration::from_millis(300);
    for probe in [
        http("/healthz"),
        Probe::Grpc {
            service: String::new(),
        },
    ] {
        let (srv, accepted) = silent_server().await;
        let start = Instant::now();
        let r = probe_once(&probe, srv.addr, timeout).await;
        let took = start.elapsed();
        match r {
            Err(ProbeError::Timeout { addr, timeout: t }) => {
                assert_eq!(addr, srv.addr);
                assert_eq!(t, timeout);
            }
            other => panic!("{probe:?}: want a timeout, got {other:?}"),
        }
        assert!(took >= timeout, "{probe:?}: returned after {took:?}");
        assert!(took < Duration::from_secs(3), "{probe:?}: took {took:?}");
        // The probe really connected: this tests the answer's timeout, not the connect's.
        tokio::time::timeout(Duration::from_secs(1), accepted)
            .await
            .unwrap()
            .unwrap();
    }
}

#[tokio::test]
async fn none_is_healthy_at_once() {
    let checker = Checker::spawn(
        Probe::None,
        closed_port().await,
        Schedule {
            interval: Duration::from_millis(10),
            timeout: T,
            rise: 5,
            fall: 5,
        },
    );
    let mut rx = checker.watch();
    let st = wait_for_status(&mut rx, "healthy", |s| s.verdict == Verdict::Healthy).await;
    assert_eq!(st.probes, 0);
    probe_once(&Probe::None, closed_port().await, T)
        .await
        .unwrap();
}
