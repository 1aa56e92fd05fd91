//! The xDS server: ADS and the per-type CDS/EDS/LDS/RDS services, each in SotW and Delta.
//!
//! What it does:
//! - [`state`]: the protocol rules (nonces, ACK/NACK, wildcard, subscriptions, Delta removals,
//!   `initial_resource_versions`, push order) as a pure state machine per stream.
//! - [`stream`](crate::stream): one task per stream, feeding requests and cache changes to it.
//! - [`codec`]: responses written from the cache's pre-encoded bytes (encode once per change,
//!   not once per stream); `body`: the response side of a stream, which keeps no buffer
//!   between responses.
//! - [`XdsServer`]: the tonic services, `/debug/clients` data, metrics, and drain on shutdown;
//!   per client and type its sync state (SYNCED / STALE / NACKED) and the resources it
//!   rejects, and the recent rejections.
//! - `csds`: CSDS, the same per-client state as `envoy.service.status.v3`.
//! - `trace`: an `xds.push` span per response sent, child of the change it carries, ended by
//!   the client's ACK or NACK (only when a subscriber enables [`TRACE_TARGET`]).
//!
//! What it does not do: translation or knowing where config came from. It serves whatever is
//! in the [`weft_xds_cache::Cache`], choosing a flavour per client with the classifier it is
//! given.

pub mod authz;
mod body;
pub mod codec;
mod csds;
mod limits;
pub mod metrics;
mod server;
pub mod state;
mod stream;
mod trace;

pub use authz::{Authorizer, spiffe_node_authorizer};
pub use csds::Csds;
pub use limits::XdsLimits;
pub use server::{
    Ads, Cds, Classifier, ClientStatus, Eds, Kind, Lds, NACK_LOG_LEN, NackEvent, Rds,
    RejectedResource, StreamResources, XdsServer, XdsService,
};
pub use state::{
    CLUSTER, ENDPOINT, LISTENER, ORDER, ROUTE, Rejection, ResourceStatus, SyncState, TypeResources,
    Variant,
};
pub use trace::TRACE_TARGET;
