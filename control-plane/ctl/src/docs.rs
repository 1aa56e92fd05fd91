//! The admin port's JSON documents, as weftctl reads them (`docs/admin.md`).
//!
//! Every field is optional or defaulted and unknown fields are ignored, so a control plane a
//! version older or newer than weftctl still renders: a missing field shows as `-` or `?`
//! rather than failing the whole command. `-o json` never goes through these types; it prints
//! the server's document as received.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

/// `null` and absent both mean "empty" for lists and maps: the server writes `null` for some
/// empty values, and a serde default alone accepts only absence.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `GET /debug/clients`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Clients {
    #[serde(deserialize_with = "nullable")]
    pub clients: Vec<Client>,
}

/// One xDS stream.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Client {
    pub stream_id: u64,
    pub node_id: String,
    pub cluster: String,
    pub user_agent: String,
    /// `envoy` or `grpc`: which translation the stream is served.
    pub flavor: String,
    /// `sotw` or `delta`.
    pub variant: String,
    /// `ads`, or the per-type service (`cds`, `eds`, ...).
    pub service: String,
    pub connected_unix_ms: Option<i64>,
    /// Worst state over the stream's types.
    pub state: Option<String>,
    /// Keyed by type URL.
    #[serde(deserialize_with = "nullable")]
    pub types: BTreeMap<String, TypeState>,
}

/// One type on one stream.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct TypeState {
    pub wildcard: bool,
    #[serde(deserialize_with = "nullable")]
    pub subscriptions: Vec<String>,
    pub pushes: u64,
    pub acks: u64,
    pub nacks: u64,
    pub last_sent_version: Option<String>,
    pub last_acked_version: Option<String>,
    pub pending_nonce: Option<String>,
    pub state: Option<String>,
    pub state_since_unix_ms: Option<i64>,
    pub current_version: Option<String>,
    pub last_sent_unix_ms: Option<i64>,
    pub last_ack_unix_ms: Option<i64>,
    #[serde(deserialize_with = "nullable")]
    pub rejected: Vec<Rejection>,
}

/// A resource a client currently rejects. In `/debug/clients` it carries the resource's
/// `name`; in `/debug/proxy_config` it sits on the resource and has none.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Rejection {
    pub name: String,
    pub version: Option<String>,
    pub reason: String,
    pub at_unix_ms: Option<i64>,
}

/// `GET /debug/proxy_config?node=<id>`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ProxyConfig {
    pub node_id: String,
    #[serde(deserialize_with = "nullable")]
    pub streams: Vec<StreamConfig>,
}

/// What one stream of the node was sent.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct StreamConfig {
    pub stream_id: u64,
    pub variant: String,
    pub flavor: String,
    pub service: String,
    /// Keyed by type URL.
    #[serde(deserialize_with = "nullable")]
    pub types: BTreeMap<String, TypeConfig>,
}

/// One type of one stream.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct TypeConfig {
    pub state: Option<String>,
    pub current_version: Option<String>,
    pub last_acked_version: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub resources: Vec<ResourceConfig>,
}

/// One resource as the client holds it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ResourceConfig {
    pub name: String,
    /// The version last sent to the client: what it holds, unless it rejected it.
    pub version: Option<String>,
    /// The cache's current version; `None` once the resource was removed.
    pub current_version: Option<String>,
    pub state: Option<String>,
    pub bytes: Option<u64>,
    /// Debug text of the current resource, when the server includes it.
    pub resource: Option<String>,
    pub rejected: Option<Rejection>,
}

/// `GET /debug/endpoints[?service=<name>]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Endpoints {
    #[serde(deserialize_with = "nullable")]
    pub services: Vec<Service>,
}

/// One service of the merged registry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Service {
    pub name: String,
    pub protocol: String,
    #[serde(deserialize_with = "nullable")]
    pub instances: Vec<Instance>,
}

/// One instance of a service.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Instance {
    pub id: String,
    pub source: String,
    pub address: String,
    pub port: u64,
    pub weight: Option<u64>,
    pub zone: Option<String>,
    pub health: String,
    #[serde(deserialize_with = "nullable")]
    pub metadata: BTreeMap<String, serde_json::Value>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn nulls_and_absent_fields_decode_as_empty() {
        let doc: Clients =
            serde_json::from_str(r#"{"clients": [{"node_id": "n", "types": null, "extra": 1}]}"#)
                .unwrap();
        assert_eq!(doc.clients[0].node_id, "n");
        assert!(doc.clients[0].types.is_empty());
        assert!(doc.clients[0].state.is_none());
        let doc: Clients = serde_json::from_str("{}").unwrap();
        assert!(doc.clients.is_empty());
    }
}
