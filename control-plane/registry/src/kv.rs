//! The key layout shared by key-value sources (etcd, Consul KV), and decoding of their values.
//!
//! Under a prefix: `services/<service>/<instance-id>` (an instance, where the store holds
//! instances: etcd, not Consul, whose instances come from its catalog), `service-config/<service>`
//! (`{protocol: grpc}`), `routes/<name>` and `policies/<name>`. Values go through the shared
//! schema, so a key means the same thing in every store; a route's or policy's `name` must
//! match its key. Errors are reasons without the key, which callers list the error under.

use serde::Deserialize;

use crate::hub::{Object, ObjectKey};
use crate::model::Protocol;
use crate::schema::{self, MAX_VALUE_BYTES, SchemaErrors};

/// What a key names, by its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyShape {
    Instance { service: String, id: String },
    ServiceConfig(String),
    Route(String),
    Policy(String),
}

impl KeyShape {
    /// The hub object the key names (so a previously valid value can be removed when the key
    /// turns invalid).
    pub fn object_key(&self) -> ObjectKey {
        match self {
            KeyShape::Instance { service, id } => ObjectKey::Instance {
                service: service.clone(),
                id: id.clone(),
            },
            KeyShape::ServiceConfig(s) => ObjectKey::Service(s.clone()),
            KeyShape::Route(n) => ObjectKey::Route(n.clone()),
            KeyShape::Policy(n) => ObjectKey::Policy(n.clone()),
        }
    }
}

/// Whether instance keys (`services/<service>/<id>`) belong to the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instances {
    /// The store holds instances (etcd).
    Held,
    /// Instances come from elsewhere (Consul's catalog); instance keys are errors.
    Elsewhere,
}

/// Reads a key's shape. `prefix` has no trailing `/`.
pub fn decode_key(prefix: &str, key: &str, instances: Instances) -> Result<KeyShape, String> {
    let rest = key
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| format!("key is not under the prefix {prefix}/"))?;
    let parts: Vec<&str> = rest.split('/').collect();
    let name = |what: &str, n: &str| {
        if schema::is_valid_name(n) {
            Ok(n.to_string())
        } else {
            Err(format!(
                "{what} name {n:?} is invalid (1-253 of [A-Za-z0-9._-], alphanumeric at both ends)"
            ))
        }
    };
    match (parts.as_slice(), instances) {
        (["services", svc, id], Instances::Held) => {
            let service = name("service", svc)?;
            // Ids are chosen by registrars (UUIDs, `host:port`, pod names): any text without
            // control characters, bounded like a name.
            if id.is_empty() || id.len() > 253 || id.chars().any(char::is_control) {
                return Err(format!(
                    "instance id {id:?} is invalid (1-253 characters, no control characters)"
                ));
            }
            Ok(KeyShape::Instance {
                service,
                id: id.to_string(),
            })
        }
        (["service-config", svc], _) => Ok(KeyShape::ServiceConfig(name("service", svc)?)),
        (["routes", n], _) => Ok(KeyShape::Route(name("route", n)?)),
        (["policies", n], _) => Ok(KeyShape::Policy(name("policy", n)?)),
        (_, Instances::Held) => Err(format!(
            "unknown key shape: expected {prefix}/services/<service>/<instance-id>, \
             {prefix}/service-config/<service>, {prefix}/routes/<name> or {prefix}/policies/<name>"
        )),
        (_, Instances::Elsewhere) => Err(format!(
            "unknown key shape: expected {prefix}/service-config/<service>, \
             {prefix}/routes/<name> or {prefix}/policies/<name> (instances come from the catalog)"
        )),
    }
}

/// The value of `<prefix>/service-config/<service>`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceConfig {
    #[serde(default)]
    protocol: Protocol,
}

/// Decodes a value (JSON or YAML) for a key of the given shape; `key` is the origin named in
/// parse errors.
pub fn decode_value(key: &str, shape: &KeyShape, value: &[u8]) -> Result<Object, String> {
    // Checked on bytes, before any copy or parse, so one huge value costs nothing more.
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "value is {} bytes, over the limit of {MAX_VALUE_BYTES} bytes",
            value.len()
        ));
    }
    let text = std::str::from_utf8(value).map_err(|e| format!("value is not UTF-8: {e}"))?;
    match shape {
        KeyShape::Instance { service, id } => schema::parse_endpoint(key, text)
            .map(|endpoint| Object::Instance {
                service: service.clone(),
                id: id.clone(),
                endpoint,
            })
            .map_err(reasons),
        KeyShape::ServiceConfig(name) => schema::decode::<ServiceConfig>(key, text)
            .map(|c| Object::Service {
                name: name.clone(),
                protocol: c.protocol,
            })
            .map_err(reasons),
        KeyShape::Route(name) => {
            let r = schema::parse_route(key, text).map_err(reasons)?;
            if &r.name != name {
                return Err(format!(
                    "name: route name {:?} differs from the key's name {name:?}",
                    r.name
                ));
            }
            Ok(Object::Route(r))
        }
        KeyShape::Policy(name) => {
            let p = schema::parse_policy(key, text).map_err(reasons)?;
            if &p.name != name {
                return Err(format!(
                    "name: policy name {:?} differs from the key's name {name:?}",
                    p.name
                ));
            }
            Ok(Object::Policy(p))
        }
    }
}

/// Schema errors without their origin: errors are already listed under the key.
pub fn reasons(errs: SchemaErrors) -> String {
    errs.0
        .iter()
        .map(|e| format!("{}: {}", e.path, e.reason))
        .collect::<Vec<_>>()
        .join("; ")
}
