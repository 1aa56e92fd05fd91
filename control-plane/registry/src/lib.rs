//! The one registry model every Weft source feeds.
//!
//! What it does:
//! - [`model`]: the shared schema (services, endpoints, routes, policies) that every source
//!   decodes into (today registry files and the registration API; the etcd, Consul and
//!   Kubernetes sources are to use it too), and the merged [`Registry`] the translator reads.
//! - [`schema`]: decoding (YAML or JSON) and validation with errors that name origin, field path
//!   and reason.
//! - [`kv`]: the key layout key-value sources (etcd, Consul KV) share, and value decoding.
//! - [`hub`]: merges the sources' events (`Init/InitApply/InitDone/Apply/Delete`) into one
//!   registry, tracks readiness (every source's first full sync) and per-key errors.
//!
//! What it does not do: any I/O. Sources live in their own crates and push events here;
//! translation to Envoy resources lives in `weft-translate`.

pub mod hub;
pub mod kv;
pub mod model;
pub mod schema;

pub use hub::{
    Hub, Mirror, Object, ObjectKey, RegistrySnapshot, SourceEvent, SourceHandle, SourceStatus,
};
pub use model::*;
pub use schema::{SchemaError, SchemaErrors, parse_document};
