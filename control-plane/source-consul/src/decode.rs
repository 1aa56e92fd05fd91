//! Consul's JSON into registry objects: health entries into instances (health mapping,
//! address, zone, weight, protocol) and KV pairs into routes, policies and service configs.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::Deserialize;
use weft_registry::kv::{self, decode_value, reasons};
use weft_registry::schema;
use weft_registry::{Endpoint, Health, Object, ObjectKey, Protocol};

/// How a check in `warning` counts (`--consul-warning-as`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WarningAs {
    /// Warning is degraded but serving (Consul's own DNS keeps such instances).
    #[default]
    Healthy,
    Unhealthy,
}

/// One element of `/v1/health/service/<name>`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct HealthEntry {
    pub(crate) node: NodeJson,
    pub(crate) service: ServiceJson,
    #[serde(default)]
    pub(crate) checks: Option<Vec<CheckJson>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct NodeJson {
    #[serde(default)]
    pub(crate) node: String,
    #[serde(default)]
    pub(crate) address: String,
    #[serde(default)]
    pub(crate) meta: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ServiceJson {
    #[serde(rename = "ID")]
    pub(crate) id: String,
    #[serde(default)]
    pub(crate) tags: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) address: String,
    #[serde(default)]
    pub(crate) port: u64,
    #[serde(default)]
    pub(crate) meta: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub(crate) weights: Option<WeightsJson>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct WeightsJson {
    #[serde(default)]
    pub(crate) passing: i64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct CheckJson {
    #[serde(rename = "CheckID", default)]
    pub(crate) check_id: String,
    #[serde(default)]
    pub(crate) status: String,
}

/// One element of `/v1/kv/<prefix>?recurse`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct KvPair {
    pub(crate) key: String,
    /// Base64; null for an empty value.
    #[serde(default)]
    pub(crate) value: Option<String>,
}

impl HealthEntry {
    pub(crate) fn tags(&self) -> &[String] {
        self.service.tags.as_deref().unwrap_or(&[])
    }

    /// The hub's instance id: Consul service ids are unique per agent only (and default to the
    /// service name), so the node is part of it.
    pub(crate) fn instance_id(&self) -> String {
        format!("{}/{}", self.node.node, self.service.id)
    }

    /// Whether this instance says the service speaks gRPC (`Meta.protocol` or a `grpc` tag),
    /// HTTP (`Meta.protocol = http`), or nothing.
    pub(crate) fn protocol(&self) -> Option<Protocol> {
        let meta = self
            .service
            .meta
            .as_ref()
            .and_then(|m| m.get("protocol"))
            .map(|p| p.to_ascii_lowercase());
        match meta.as_deref() {
            Some("grpc") => Some(Protocol::Grpc),
            _ if self.tags().iter().any(|t| t == "grpc") => Some(Protocol::Grpc),
            Some("http") => Some(Protocol::Http),
            _ => None,
        }
    }
}

/// All of the instance's checks together (node checks included, as Consul returns them): any
/// critical (or unknown status, or maintenance) makes it unhealthy; warnings count as
/// `warning_as` says; only passing checks, or none, make it healthy.
pub(crate) fn aggregate_health(checks: &[CheckJson], warning_as: WarningAs) -> Health {
    let mut warning = false;
    for c in checks {
        match c.status.as_str() {
            "passing" => {}
            "warning" => warning = true,
            // `critical`, and anything Consul might add later: failing safe means not routing.
            _ => return Health::Unhealthy,
        }
    }
    if warning && warning_as == WarningAs::Unhealthy {
        Health::Unhealthy
    } else {
        Health::Healthy
    }
}

/// One health entry into an instance; `Err` says why the entry cannot be used.
pub(crate) fn instance(
    service: &str,
    entry: &HealthEntry,
    warning_as: WarningAs,
) -> Result<Object, String> {
    let address = if entry.service.address.is_empty() {
        entry.node.address.clone()
    } else {
        entry.service.address.clone()
    };
    let port = u16::try_from(entry.service.port)
        .map_err(|_| format!("port: {} is not a valid port", entry.service.port))?;
    let weight = match &entry.service.weights {
        Some(w) if w.passing > 0 => u32::try_from(w.passing)
            .map_err(|_| format!("weight: {} is out of range", w.passing))?,
        Some(w) if w.passing < 0 => return Err(format!("weight: {} is negative", w.passing)),
        _ => 1,
    };
    let zone = entry
        .service
        .meta
        .as_ref()
        .and_then(|m| m.get("zone"))
        .or_else(|| entry.node.meta.as_ref().and_then(|m| m.get("zone")))
        .filter(|z| !z.is_empty())
        .cloned();
    let endpoint = Endpoint {
        address,
        port,
        weight,
        zone,
        health: aggregate_health(entry.checks.as_deref().unwrap_or(&[]), warning_as),
        metadata: entry.service.meta.clone().unwrap_or_default(),
    };
    // Validated by the same code as every other source's endpoints (IP literal, port, weight).
    let text = serde_json::to_string(&endpoint).map_err(|e| e.to_string())?;
    let endpoint = schema::parse_endpoint(&entry.instance_id(), &text).map_err(reasons)?;
    Ok(Object::Instance {
        service: service.to_string(),
        id: entry.instance_id(),
        endpoint,
    })
}

/// One KV pair: `Ok(None)` for a folder key (`a/b/`, as the Consul UI creates), which is not
/// data; `Err((reason, object))` names why it was rejected and what it would have named.
pub(crate) fn decode_pair(
    prefix: &str,
    pair: &KvPair,
) -> Result<Option<Object>, (String, Option<ObjectKey>)> {
    let raw = match &pair.value {
        None => Vec::new(),
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| (format!("value is not valid base64: {e}"), None))?,
    };
    if pair.key.ends_with('/') && raw.is_empty() {
        return Ok(None);
    }
    let shape =
        kv::decode_key(prefix, &pair.key, kv::Instances::Elsewhere).map_err(|r| (r, None))?;
    decode_value(&pair.key, &shape, &raw)
        .map(Some)
        .map_err(|r| (r, Some(shape.object_key())))
}

/// One decoded entry of a body: the value, or the key it is reported under and why it was
/// refused.
#[doc(hidden)]
pub type Entry<T> = Result<T, (String, String)>;

/// A `/v1/health/service/<name>` body as the source decodes it: each entry's instance, or its
/// error key (`health/<service>/<instance id>`) and why it was refused. Public so the fuzz
/// targets (tests/fuzz) reach it without a Consul.
#[doc(hidden)]
pub fn decode_health_body(
    service: &str,
    body: &[u8],
    warning_as: WarningAs,
) -> Result<Vec<Entry<Object>>, serde_json::Error> {
    let entries: Vec<HealthEntry> = serde_json::from_slice(body)?;
    Ok(entries
        .iter()
        .map(|e| {
            instance(service, e, warning_as)
                .map_err(|reason| (format!("health/{service}/{}", e.instance_id()), reason))
        })
        .collect())
}

/// A `/v1/kv/<prefix>?recurse` body as the source decodes it: per pair the object (`None` for
/// a folder key), or the pair's key and why it was refused.
#[doc(hidden)]
pub fn decode_kv_body(
    prefix: &str,
    body: &[u8],
) -> Result<Vec<Entry<Option<Object>>>, serde_json::Error> {
    let pairs: Vec<KvPair> = serde_json::from_slice(body)?;
    Ok(pairs
        .iter()
        .map(|p| decode_pair(prefix, p).map_err(|(reason, _)| (p.key.clone(), reason)))
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn check(status: &str) -> CheckJson {
        CheckJson {
            check_id: "c".into(),
            status: status.into(),
        }
    }

    #[test]
    fn health_mapping() {
        let w = WarningAs::Healthy;
        assert_eq!(aggregate_health(&[], w), Health::Healthy);
        assert_eq!(
            aggregate_health(&[check("passing"), check("passing")], w),
            Health::Healthy
        );
        assert_eq!(
            aggregate_health(&[check("passing"), check("warning")], w),
            Health::Healthy
        );
        assert_eq!(
            aggregate_health(&[check("warning")], WarningAs::Unhealthy),
            Health::Unhealthy
        );
        assert_eq!(
            aggregate_health(&[check("warning"), check("critical")], w),
            Health::Unhealthy
        );
        assert_eq!(
            aggregate_health(&[check("maintenance")], w),
            Health::Unhealthy
        );
    }

    fn entry(json: serde_json::Value) -> HealthEntry {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn instance_fields() {
        let e = entry(serde_json::json!({
            "Node": {"Node": "n1", "Address": "10.0.0.9", "Meta": {"zone": "node-zone"}},
            "Service": {"ID": "web-1", "Service": "web", "Tags": null, "Address": "", "Port": 8080,
                        "Meta": null, "Weights": {"Passing": 5, "Warning": 1}},
            "Checks": [{"CheckID": "serfHealth", "Status": "passing"}]
        }));
        let Object::Instance { id, endpoint, .. } =
            instance("web", &e, WarningAs::Healthy).unwrap()
        else {
            panic!()
        };
        assert_eq!(id, "n1/web-1");
        assert_eq!(endpoint.address, "10.0.0.9");
        assert_eq!(endpoint.port, 8080);
        assert_eq!(endpoint.weight, 5);
        assert_eq!(endpoint.zone.as_deref(), Some("node-zone"));
        assert_eq!(e.protocol(), None);

        let e = entry(serde_json::json!({
            "Node": {"Node": "n1", "Address": "10.0.0.9"},
            "Service": {"ID": "g", "Address": "db.internal", "Port": 1, "Tags": ["grpc"]},
        }));
        assert!(
            instance("web", &e, WarningAs::Healthy)
                .unwrap_err()
                .contains("address")
        );
        assert_eq!(e.protocol(), Some(Protocol::Grpc));
        let e = entry(serde_json::json!({
            "Node": {"Node": "n1", "Address": "10.0.0.9"},
            "Service": {"ID": "g", "Port": 0, "Meta": {"protocol": "http", "zone": "z"}},
        }));
        assert!(
            instance("web", &e, WarningAs::Healthy)
                .unwrap_err()
                .contains("port")
        );
        assert_eq!(e.protocol(), Some(Protocol::Http));
    }

    #[test]
    fn bodies_decode_per_entry() {
        let body = br#"[{"Node":{"Node":"n1","Address":"10.0.0.9"},"Service":{"ID":"a","Port":80}},
                        {"Node":{"Node":"n1","Address":"10.0.0.9"},"Service":{"ID":"b","Port":0}}]"#;
        let entries = decode_health_body("web", body, WarningAs::Healthy).unwrap();
        assert!(matches!(&entries[0], Ok(Object::Instance { id, .. }) if id == "n1/a"));
        assert!(
            matches!(&entries[1], Err((key, why)) if key == "health/web/n1/b" && why.contains("port"))
        );
        assert!(decode_health_body("web", b"{", WarningAs::Healthy).is_err());
        let kv = br#"[{"Key":"weft/routes/","Value":null},{"Key":"weft/x","Value":"e30="}]"#;
        let pairs = decode_kv_body("weft", kv).unwrap();
        assert_eq!(pairs[0], Ok(None));
        assert!(matches!(&pairs[1], Err((key, _)) if key == "weft/x"));
    }

    #[test]
    fn kv_keys_and_values() {
        let pair = |k: &str, v: &[u8]| KvPair {
            key: k.into(),
            value: Some(base64::engine::general_purpose::STANDARD.encode(v)),
        };
        assert_eq!(
            decode_pair(
                "weft",
                &KvPair {
                    key: "weft/routes/".into(),
                    value: None
                }
            )
            .unwrap(),
            None
        );
        let ok = decode_pair(
            "weft",
            &pair("weft/service-config/echo", br#"{"protocol":"grpc"}"#),
        );
        assert_eq!(
            ok.unwrap(),
            Some(Object::Service {
                name: "echo".into(),
                protocol: Protocol::Grpc
            })
        );
        let (why, obj) = decode_pair("weft", &pair("weft/routes/r1", b"{nope")).unwrap_err();
        assert!(!why.is_empty());
        assert_eq!(obj, Some(ObjectKey::Route("r1".into())));
        let (why, obj) = decode_pair("weft", &pair("weft/other/x", b"{}")).unwrap_err();
        assert!(why.contains("unknown key shape"), "{why}");
        assert_eq!(obj, None);
        let (why, _) = decode_pair(
            "weft",
            &KvPair {
                key: "weft/routes/r".into(),
                value: Some("!!".into()),
            },
        )
        .unwrap_err();
        assert!(why.contains("base64"), "{why}");
    }
}
