//! The inbound proxy: requests from the mesh to the app on loopback, protocol kept.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::access_log::{Direction, Finisher, RequestLog};
use crate::body::ProxyBody;
use crate::client::{UpstreamClient, upstream_request};
use crate::errors::{UpstreamError, local_response};
use crate::headers::{append_forwarded_for, authority_of, strip_hop_by_hop};
use crate::metrics::ErrorLabels;
use crate::replay::ReplayBody;
use crate::{InboundOptions, Mesh};

pub(crate) struct Inbound {
    pub mesh: Arc<Mesh>,
    pub opts: InboundOptions,
    pub h1: UpstreamClient,
    pub h2: UpstreamClient,
}

pub(crate) async fn handle(
    inbound: Arc<Inbound>,
    req: Request<Incoming>,
    remote: SocketAddr,
) -> Response<ProxyBody> {
    let mesh = &inbound.mesh;
    let (mut parts, body) = req.into_parts();
    let ctx = weft_trace_context::start_span(&parts.headers, mesh.opts.sample_new_traces);
    let mut log = RequestLog::new(Direction::Inbound, &parts, ctx);
    log.service = mesh.opts.service.clone();
    let authority = authority_of(&parts).unwrap_or_default();
    log.authority = authority.clone();
    let app = inbound.opts.app;
    log.upstream = Some(app);
    let http2 = parts.version == Version::HTTP_2 || inbound.opts.app_http2;
    strip_hop_by_hop(&mut parts.headers);
    append_forwarded_for(&mut parts.headers, remote.ip());
    weft_trace_context::inject(&log.ctx, &mut parts.headers);
    let body = ReplayBody::once(body.map_err(Into::into).boxed_unsync());
    let client = if http2 { &inbound.h2 } else { &inbound.h1 };
    let result = match upstream_request(&parts, &authority, app, http2, body) {
        Ok(req) => client
            .request(req)
            .await
            .map_err(|e| UpstreamError::from_client(app, e)),
        Err(source) => Err(UpstreamError::Request { addr: app, source }),
    };
    let telemetry = Arc::clone(&mesh.telemetry);
    match result {
        Ok(resp) => {
            let (mut rp, body) = resp.into_parts();
            strip_hop_by_hop(&mut rp.headers);
            rp.version = Version::HTTP_11;
            log.status = rp.status.as_u16();
            let body = body.map_err(Into::into).boxed_unsync();
            Response::from_parts(
                rp,
                ProxyBody::new(body, Finisher { telemetry, log }, Vec::new()),
            )
        }
        Err(e) => {
            telemetry
                .metrics
                .upstream_errors
                .get_or_create(&ErrorLabels {
                    service: mesh.opts.service.clone(),
                    kind: e.kind(),
                })
                .inc();
            let (status, code) = match &e {
                UpstreamError::Request { .. } => (StatusCode::BAD_REQUEST, "bad_request"),
                _ => (StatusCode::BAD_GATEWAY, "upstream_connect"),
            };
            let code = match &e {
                UpstreamError::Reset { .. } | UpstreamError::RefusedStream { .. } => {
                    "upstream_reset"
                }
                _ => code,
            };
            tracing::debug!(error = %e, "forwarding to the app failed");
            log.status = status.as_u16();
            log.error = Some(code);
            let (rp, body) = local_response(status, code, &e.to_string()).into_parts();
            Response::from_parts(
                rp,
                ProxyBody::new(body, Finisher { telemetry, log }, Vec::new()),
            )
        }
    }
}
