//! HTTPS server for the webhook: `POST /mutate`.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;

use crate::InjectorConfig;
use crate::review::review;

/// Largest request body accepted. An AdmissionReview for a pod CREATE carries one pod; the
/// API server caps objects at about 1.5 MiB, so this leaves room without letting a client
/// make the webhook buffer arbitrary amounts.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// A client that connects and never finishes the handshake must not hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the webhook over TLS until `shutdown` resolves: `POST /mutate` answers an
/// AdmissionReview (200 with the response; 400 with a message when the body is not one; 413
/// over [`MAX_BODY_BYTES`]), other methods on `/mutate` get 405 and other paths 404. HTTP/1.1
/// and HTTP/2 (by ALPN, as [`crate::tls_config`] offers). Connections are independent: a bad
/// one never affects another or the listener. Connections open at shutdown finish on their own.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    config: Arc<InjectorConfig>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // Typically EMFILE: back off briefly instead of spinning.
                tracing::warn!(error = %e, "webhook accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let config = Arc::clone(&config);
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "webhook TLS handshake timed out");
                        return;
                    }
                };
            let svc = service_fn(move |req: Request<Incoming>| {
                let config = Arc::clone(&config);
                async move { Ok::<_, Infallible>(handle(&config, req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(%peer, error = %e, "webhook connection ended");
            }
        });
    }
}

async fn handle(config: &InjectorConfig, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/mutate" {
        return text(
            StatusCode::NOT_FOUND,
            "not found; the webhook is POST /mutate\n",
        );
    }
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
    }
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return if e.is::<http_body_util::LengthLimitError>() {
                text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("body over {MAX_BODY_BYTES} bytes\n"),
                )
            } else {
                text(StatusCode::BAD_REQUEST, format!("reading body: {e}\n"))
            };
        }
    };
    match review(config, &body) {
        Ok(json) => {
            let mut r = Response::new(Full::new(Bytes::from(json)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => {
            tracing::warn!(error = %e, "bad admission request");
            text(StatusCode::BAD_REQUEST, format!("{e}\n"))
        }
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
