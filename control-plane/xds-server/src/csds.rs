//! CSDS (`envoy.service.status.v3.ClientStatusDiscoveryService`) served by the control plane:
//! which config each connected xDS client was sent, and whether it accepted it.
//!
//! Envoy serves CSDS about itself; a control plane serving it about its clients is what
//! istiod does for `istioctl x proxy-status`, so standard CSDS tooling can ask one place
//! about a whole fleet. One `ClientConfig` per stream (an Envoy on per-type streams appears
//! once per stream), one `GenericXdsConfig` per resource.
//!
//! What it does not do: match on node metadata (`node_matchers[].node_metadatas` is refused
//! with INVALID_ARGUMENT rather than silently ignored), or report resources the control plane
//! no longer has the bytes of (a client holding an old version gets its version and STALE,
//! without `xds_config`).

use std::pin::Pin;
use std::time::Duration;

use envoy_types::pb::envoy::admin::v3::{ClientResourceStatus, UpdateFailureState};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::status::v3::client_config::GenericXdsConfig;
use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_server::{
    ClientStatusDiscoveryService, ClientStatusDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::status::v3::{
    ClientConfig, ClientStatusRequest, ClientStatusResponse, ConfigStatus,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{NodeMatcher, StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{Any, Timestamp};
use futures::Stream;
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::server::{StreamResources, XdsServer};
use crate::state::{ResourceStatus, SyncState};

/// The CSDS service over an [`XdsServer`]'s clients.
#[derive(Clone, Debug)]
pub struct Csds {
    xds: XdsServer,
}

impl XdsServer {
    /// The CSDS gRPC service, to add beside [`XdsServer::routes`].
    pub fn csds(&self) -> ClientStatusDiscoveryServiceServer<Csds> {
        ClientStatusDiscoveryServiceServer::new(Csds { xds: self.clone() })
    }
}

/// A compiled `NodeMatcher` list: a node matches if any matcher does (CSDS's OR semantics);
/// no matcher matches every node.
struct Matchers(Vec<IdMatcher>);

enum IdMatcher {
    Any,
    Exact(String, bool),
    Prefix(String, bool),
    Suffix(String, bool),
    Contains(String, bool),
    Regex(regex::Regex),
}

impl IdMatcher {
    fn new(m: &StringMatcher) -> Result<Self, Status> {
        use string_matcher::MatchPattern as P;
        let fold = |s: &str| {
            if m.ignore_case {
                s.to_lowercase()
            } else {
                s.to_string()
            }
        };
        Ok(match &m.match_pattern {
            None => IdMatcher::Any,
            Some(P::Exact(s)) => IdMatcher::Exact(fold(s), m.ignore_case),
            Some(P::Prefix(s)) => IdMatcher::Prefix(fold(s), m.ignore_case),
            Some(P::Suffix(s)) => IdMatcher::Suffix(fold(s), m.ignore_case),
            Some(P::Contains(s)) => IdMatcher::Contains(fold(s), m.ignore_case),
            Some(P::SafeRegex(r)) => {
                // Envoy's safe_regex is RE2 matched against the whole string.
                let re = regex::Regex::new(&format!("^(?:{})$", r.regex)).map_err(|e| {
                    Status::invalid_argument(format!(
                        "node_matchers: node_id.safe_regex `{}` does not compile: {e}",
                        r.regex
                    ))
                })?;
                IdMatcher::Regex(re)
            }
            Some(P::Custom(_)) => {
                return Err(Status::invalid_argument(
                    "node_matchers: node_id.custom string matchers are not supported",
                ));
            }
        })
    }

    fn matches(&self, id: &str) -> bool {
        let fold = |ci: bool| {
            if ci {
                id.to_lowercase()
            } else {
                id.to_string()
            }
        };
        match self {
            IdMatcher::Any => true,
            IdMatcher::Exact(s, ci) => fold(*ci) == *s,
            IdMatcher::Prefix(s, ci) => fold(*ci).starts_with(s.as_str()),
            IdMatcher::Suffix(s, ci) => fold(*ci).ends_with(s.as_str()),
            IdMatcher::Contains(s, ci) => fold(*ci).contains(s.as_str()),
            IdMatcher::Regex(re) => re.is_match(id),
        }
    }
}

impl Matchers {
    fn new(list: &[NodeMatcher]) -> Result<Self, Status> {
        let mut out = Vec::with_capacity(list.len());
        for m in list {
            if !m.node_metadatas.is_empty() {
                return Err(Status::invalid_argument(
                    "node_matchers: node_metadatas matchers are not supported by this control \
                     plane; match on node_id",
                ));
            }
            out.push(match &m.node_id {
                Some(id) => IdMatcher::new(id)?,
                None => IdMatcher::Any,
            });
        }
        Ok(Matchers(out))
    }

    fn matches(&self, id: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|m| m.matches(id))
    }
}

fn timestamp(unix_ms: u64) -> Timestamp {
    let d = Duration::from_millis(unix_ms);
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// The two CSDS statuses of one resource: the control plane's view (`ConfigStatus`) and the
/// client's (`ClientResourceStatus`).
fn statuses(r: &ResourceStatus) -> (ConfigStatus, ClientResourceStatus) {
    match (r.state, &r.version, &r.current_version) {
        (SyncState::Nacked, _, _) => (ConfigStatus::Error, ClientResourceStatus::Nacked),
        (_, None, None) => (ConfigStatus::Synced, ClientResourceStatus::DoesNotExist),
        (_, None, Some(_)) => (ConfigStatus::NotSent, ClientResourceStatus::Requested),
        (_, Some(_), _) if r.in_flight => (ConfigStatus::Stale, ClientResourceStatus::Requested),
        (SyncState::Synced, Some(_), _) => (ConfigStatus::Synced, ClientResourceStatus::Acked),
        (_, Some(_), _) => (ConfigStatus::Stale, ClientResourceStatus::Acked),
    }
}

/// One stream as a CSDS `ClientConfig`.
fn client_config(s: &StreamResources, contents: bool) -> ClientConfig {
    let mut generic = Vec::new();
    for (type_url, t) in &s.types {
        for r in &t.resources {
            let (config_status, client_status) = statuses(r);
            let xds_config = r.current.as_ref().filter(|_| contents).and_then(|c| {
                // The cache keeps each resource as an encoded Any; decoding it back is cheap
                // next to a status request and keeps CSDS off the push path.
                Any::decode(c.any.as_ref()).ok()
            });
            let error_state = r.rejected.as_ref().map(|rej| UpdateFailureState {
                failed_configuration: None,
                last_update_attempt: Some(timestamp(rej.at_unix_ms)),
                details: rej.reason.clone(),
                version_info: rej.version.clone(),
            });
            generic.push(GenericXdsConfig {
                type_url: type_url.clone(),
                name: r.name.clone(),
                version_info: r.version.clone().unwrap_or_default(),
                xds_config,
                last_updated: t.last_ack_unix_ms.map(timestamp),
                config_status: config_status as i32,
                client_status: client_status as i32,
                error_state,
                is_static_resource: false,
            });
        }
    }
    ClientConfig {
        node: Some(Node {
            id: s.node_id.clone(),
            cluster: s.cluster.clone(),
            user_agent_name: s.user_agent.clone(),
            ..Default::default()
        }),
        generic_xds_configs: generic,
        // Tells two streams of one node apart (an Envoy on per-type streams).
        client_scope: format!("{}/{}/{}", s.variant.as_str(), s.service, s.stream_id),
        ..Default::default()
    }
}

impl Csds {
    fn answer(
        &self,
        req: &ClientStatusRequest,
        peer: &weft_identity::PeerIdentity,
    ) -> Result<ClientStatusResponse, Status> {
        let matchers = Matchers::new(&req.node_matchers)?;
        let authorize = self.xds.authorizer();
        let streams = self.xds.streams_matching(|id| {
            // With mTLS on, a caller sees only the nodes its identity owns: the same rule as
            // for reading config over xDS, so CSDS reveals nothing xDS would not.
            matchers.matches(id) && authorize.as_ref().is_none_or(|a| a(peer, id).is_ok())
        });
        Ok(ClientStatusResponse {
            config: streams
                .iter()
                .map(|s| client_config(s, !req.exclude_resource_contents))
                .collect(),
        })
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ClientStatusResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ClientStatusDiscoveryService for Csds {
    type StreamClientStatusStream = ResponseStream;

    async fn stream_client_status(
        &self,
        request: Request<Streaming<ClientStatusRequest>>,
    ) -> Result<Response<Self::StreamClientStatusStream>, Status> {
        let peer = peer_of(&request);
        let mut requests = request.into_inner();
        let this = self.clone();
        let out = async_stream(move |tx| async move {
            loop {
                match requests.message().await {
                    Ok(Some(req)) => {
                        if tx.send(this.answer(&req, &peer)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(status) => {
                        tracing::debug!(%status, "CSDS stream ended");
                        return;
                    }
                }
            }
        });
        Ok(Response::new(out))
    }

    async fn fetch_client_status(
        &self,
        request: Request<ClientStatusRequest>,
    ) -> Result<Response<ClientStatusResponse>, Status> {
        let peer = peer_of(&request);
        self.answer(request.get_ref(), &peer).map(Response::new)
    }
}

fn peer_of<T>(req: &Request<T>) -> weft_identity::PeerIdentity {
    req.extensions()
        .get::<weft_identity::PeerInfo>()
        .map_or(weft_identity::PeerIdentity::Plain, |p| p.identity.clone())
}

/// A response stream fed by a task through a small channel: one answer per request, and the
/// task ends when the client hangs up.
fn async_stream<F, Fut>(f: F) -> ResponseStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<ClientStatusResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
