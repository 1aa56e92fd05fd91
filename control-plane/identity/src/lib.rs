//! Workload identity for Weft's mTLS: who a peer of the gRPC port (xDS and registration) is,
//! and what it may read or register.
//!
//! What it does:
//! - [`SpiffeId`] / [`Identity`]: parses `spiffe://<trust-domain>/<path>` and reads the
//!   workload `(trust domain, namespace, service)` from path pairs `ns/<namespace>` and
//!   `svc/<service>` (Consul's `/ns/default/dc/dc1/svc/web` works; Istio's
//!   `/ns/<ns>/sa/<service-account>` too, the service account standing for the service).
//! - [`identity_from_chain`]: the identity of a verified peer; the leaf must carry exactly one
//!   URI SAN, a SPIFFE ID in the configured trust domain.
//! - [`authorize_node`] / [`authorize_service`]: the node-id rule. The node id's service part
//!   (before the first `~`, or the whole id) must be `<service>.<namespace>`, or `<service>`
//!   when the namespace is `default`; a registration's `service` field follows the same rule.
//! - [`tls`]: rustls configs (ring provider only) whose serving certificate is re-read when its
//!   files change; the mTLS server config requires a client certificate signed by the client CA.
//! - [`incoming`](incoming::incoming): the gRPC port's connections with the TLS handshake done
//!   before tonic sees them, under a timeout and a bound on concurrent handshakes; each carries
//!   a [`PeerInfo`] that tonic puts in the request extensions.
//!
//! What it does not do: issue or renew certificates (cert-manager, SPIRE or a CA script does),
//! check revocation, or protect the admin port.

pub mod authz;
pub mod incoming;
pub mod peer;
pub mod spiffe;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tls;

pub use authz::{Denied, authorize_node, authorize_service, node_service, owned_services};
pub use incoming::{Conn, PeerIdentity, PeerInfo, TlsIncoming};
pub use peer::{PeerError, identity_from_chain};
pub use spiffe::{Identity, SpiffeError, SpiffeId, TrustDomain};
pub use tls::{ClientTlsFiles, ServerTlsFiles, TlsError};
/// The rustls this crate is built with (ring provider).
pub use tokio_rustls::rustls;
