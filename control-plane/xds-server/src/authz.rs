//! Who may read config as which node: with mTLS on the gRPC port, each stream's peer identity
//! (from its client certificate) is checked against the node id of its first request, before
//! the stream gets anything.

use std::sync::Arc;

use tonic::Status;
use weft_identity::{PeerIdentity, PeerInfo};

use crate::server::Inner;

/// Decides whether a peer may receive config as node `node_id`; `Err` carries the reason.
pub type Authorizer = Arc<dyn Fn(&PeerIdentity, &str) -> Result<(), String> + Send + Sync>;

/// The SPIFFE rule of [`weft_identity::authorize_node`]: the peer needs a verified identity
/// owning the node id's service. A plain-text or unusable-certificate peer is refused.
pub fn spiffe_node_authorizer() -> Authorizer {
    Arc::new(|peer: &PeerIdentity, node_id: &str| {
        let identity = peer.verified()?;
        weft_identity::authorize_node(identity, node_id).map_err(|e| e.to_string())
    })
}

/// The peer of a request, as the connection's TLS handshake established it (`Plain` when the
/// server was not given a `weft_identity` incoming stream).
pub(crate) fn peer_of<B>(req: &tonic::codegen::http::Request<B>) -> PeerIdentity {
    req.extensions()
        .get::<PeerInfo>()
        .map_or(PeerIdentity::Plain, |p| p.identity.clone())
}

/// Checks the stream's first node against the authorizer, if one is set. A refusal is counted,
/// logged and returned as PERMISSION_DENIED naming the identity and the node id.
pub(crate) fn check(inner: &Inner, peer: &PeerIdentity, node_id: &str) -> Result<(), Status> {
    let Some(authorize) = inner.authorizer.get() else {
        return Ok(());
    };
    authorize(peer, node_id).map_err(|reason| {
        inner.metrics.streams_denied.inc();
        tracing::warn!(node = %node_id, %reason, "xDS stream refused: permission denied");
        Status::permission_denied(format!("node id `{node_id}` refused: {reason}"))
    })
}
