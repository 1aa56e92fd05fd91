//! Turning a custom resource's spec into the registry value it describes, validated by the
//! registry's own rules (`weft_registry::schema`), with errors that name the object and the
//! field inside it (`TrafficRoute default/web: spec.rules[0].backends[1].weight: ...`).
//!
//! The spec is converted to the registry type, serialised, and handed to the registry's public
//! `parse_*`/`validate_document`, so a CRD can never accept what a registry file would refuse
//! (nor the reverse): there is one validator, not two that drift.

use std::fmt;

use kube::{Resource, ResourceExt};
use weft_registry::model::{Policy, RegistryDoc, Route, ServiceSpec};
use weft_registry::schema::{self, SchemaError, is_valid_name};

use crate::types::{
    ExternalService, ExternalServiceSpec, TrafficPolicy, TrafficPolicySpec, TrafficRoute,
    TrafficRouteSpec,
};

/// One problem with one field of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    /// Path from the object's root: `spec.rules[0].backends[1].weight`, `metadata.name`, or
    /// `spec` for the spec as a whole.
    pub field: String,
    pub reason: String,
}

/// Everything wrong with one object; `problems` is never empty. Displays one line per
/// problem: `<Kind> <namespace>/<name>: <field>: <reason>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub problems: Vec<FieldProblem>,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{} {}/{}: {}: {}",
                self.kind, self.namespace, self.name, p.field, p.reason
            )?;
        }
        Ok(())
    }
}

impl ValidationError {
    /// The problems without the object prefix, one per line: what an `Accepted=False`
    /// condition's message says (the condition already sits on the object).
    pub fn message(&self) -> String {
        self.problems
            .iter()
            .map(|p| format!("{}: {}", p.field, p.reason))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn new(kind: &'static str, namespace: &str, name: &str, problems: Vec<FieldProblem>) -> Self {
        Self {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
            problems,
        }
    }

    fn one(kind: &'static str, namespace: &str, name: &str, field: &str, reason: String) -> Self {
        Self::new(
            kind,
            namespace,
            name,
            vec![FieldProblem {
                field: field.to_string(),
                reason,
            }],
        )
    }

    /// Re-roots the registry's field paths (relative to the registry value, or to `prefix`
    /// inside a document) at the object: the value's `name` is the object's `metadata.name`,
    /// everything else lives under `spec`.
    fn from_schema(
        kind: &'static str,
        namespace: &str,
        name: &str,
        prefix: &str,
        errs: Vec<SchemaError>,
    ) -> Self {
        let problems = errs
            .into_iter()
            .map(|e| FieldProblem {
                field: object_path(&e.path, prefix),
                reason: e.reason,
            })
            .collect();
        Self::new(kind, namespace, name, problems)
    }
}

fn object_path(path: &str, prefix: &str) -> String {
    let rel = if prefix.is_empty() {
        path
    } else if let Some(rest) = path.strip_prefix(prefix) {
        rest.strip_prefix('.').unwrap_or(rest)
    } else {
        path
    };
    match rel {
        "" | "." => "spec".to_string(),
        "name" => "metadata.name".to_string(),
        _ => format!("spec.{rel}"),
    }
}

/// The registry name of a `TrafficRoute` or `TrafficPolicy`: `<namespace>.<name>`. Namespaces
/// cannot contain `.`, so distinct objects never share a name, and objects of a kind in
/// different namespaces never collide.
pub fn registry_name(namespace: &str, name: &str) -> String {
    format!("{namespace}.{name}")
}

/// The registry service an `ExternalService` declares: `<name>.<namespace>`, the same shape
/// as a Kubernetes Service's DNS name (`payments.shop`), which is what routes and clients
/// address it by.
pub fn service_name(namespace: &str, name: &str) -> String {
    format!("{name}.{namespace}")
}

/// Kubernetes allows longer names than the registry (a 63-character namespace plus a
/// 253-character name); the registry caps names at 253 characters because they become Envoy
/// resource names and Host values. Such objects are refused, naming `metadata.name`, rather
/// than silently shortened into names that could collide.
fn checked_name(
    kind: &'static str,
    namespace: &str,
    name: &str,
    registry: String,
) -> Result<String, ValidationError> {
    if is_valid_name(&registry) {
        Ok(registry)
    } else {
        Err(ValidationError::one(
            kind,
            namespace,
            name,
            "metadata.name",
            format!(
                "registry name `{registry}` (from namespace and name) is not a valid registry \
                 name: at most 253 letters, digits, `-`, `.` or `_`, starting and ending with a \
                 letter or digit"
            ),
        ))
    }
}

fn origin(kind: &str, namespace: &str, name: &str) -> String {
    format!("{kind} {namespace}/{name}")
}

fn to_json<T: serde::Serialize>(
    kind: &'static str,
    namespace: &str,
    name: &str,
    value: &T,
) -> Result<String, ValidationError> {
    serde_json::to_string(value).map_err(|e| {
        ValidationError::one(kind, namespace, name, "spec", format!("cannot encode: {e}"))
    })
}

/// Validates a `TrafficRoute`'s spec and returns the registry route it describes, named
/// [`registry_name`]`(namespace, name)`.
pub fn validate_route(
    name: &str,
    namespace: &str,
    spec: &TrafficRouteSpec,
) -> Result<Route, ValidationError> {
    let kind = "TrafficRoute";
    let reg = checked_name(kind, namespace, name, registry_name(namespace, name))?;
    let json = to_json(kind, namespace, name, &spec.to_route(reg))?;
    schema::parse_route(&origin(kind, namespace, name), &json)
        .map_err(|e| ValidationError::from_schema(kind, namespace, name, "", e.0))
}

/// Validates a `TrafficPolicy`'s spec and returns the registry policy it describes, named
/// [`registry_name`]`(namespace, name)`.
pub fn validate_policy(
    name: &str,
    namespace: &str,
    spec: &TrafficPolicySpec,
) -> Result<Policy, ValidationError> {
    let kind = "TrafficPolicy";
    let reg = checked_name(kind, namespace, name, registry_name(namespace, name))?;
    let json = to_json(kind, namespace, name, &spec.to_policy(reg))?;
    schema::parse_policy(&origin(kind, namespace, name), &json)
        .map_err(|e| ValidationError::from_schema(kind, namespace, name, "", e.0))
}

/// Validates an `ExternalService`'s spec and returns the registry service it declares, named
/// [`service_name`]`(namespace, name)`. Checks each endpoint as `parse_endpoint` does, and
/// that no `address:port` appears twice.
pub fn validate_external_service(
    name: &str,
    namespace: &str,
    spec: &ExternalServiceSpec,
) -> Result<ServiceSpec, ValidationError> {
    let kind = "ExternalService";
    let reg = checked_name(kind, namespace, name, service_name(namespace, name))?;
    // A one-service document: the registry checks a service's endpoints (and their
    // uniqueness) only as part of a document.
    let doc = RegistryDoc {
        services: vec![spec.to_service(reg)],
        ..RegistryDoc::default()
    };
    let json = to_json(kind, namespace, name, &doc)?;
    match schema::parse_document(&origin(kind, namespace, name), &json) {
        Ok(mut doc) => match doc.services.pop() {
            Some(s) => Ok(s),
            None => Err(ValidationError::one(
                kind,
                namespace,
                name,
                "spec",
                "the registry dropped the service while decoding it".to_string(),
            )),
        },
        Err(e) => Err(ValidationError::from_schema(
            kind,
            namespace,
            name,
            "services[0]",
            e.0,
        )),
    }
}

/// Decodes one object of kind `K` from its JSON (as a `DynamicObject` or raw watch event
/// carries it), naming the field that does not fit, e.g.
/// `TrafficPolicy default/web: spec.lb: unknown variant `fastest`, ...`. The API server's
/// schema already refuses most such values; this covers objects written before a CRD upgrade,
/// and lets a source skip one bad object instead of failing a whole list.
pub fn decode<K>(value: serde_json::Value) -> Result<K, ValidationError>
where
    K: Resource<DynamicType = ()> + serde::de::DeserializeOwned,
{
    let kind = kind_name(&K::kind(&()));
    let meta = |key: &str| {
        value
            .get("metadata")
            .and_then(|m| m.get(key))
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let (namespace, name) = (meta("namespace"), meta("name"));
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let field = if field.is_empty() || field == "." {
            "."
        } else {
            field.as_str()
        };
        ValidationError::one(kind, &namespace, &name, field, e.into_inner().to_string())
    })
}

/// The static kind name for the kinds this crate defines (so errors can hold `&'static str`).
fn kind_name(kind: &str) -> &'static str {
    match kind {
        "TrafficRoute" => "TrafficRoute",
        "TrafficPolicy" => "TrafficPolicy",
        "ExternalService" => "ExternalService",
        _ => "object",
    }
}

/// Namespace and name of an object; a namespaced object read from the API always has both.
fn ns_name<K: Resource>(obj: &K) -> (String, String) {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

impl TrafficRoute {
    /// [`validate_route`] with the object's own namespace and name.
    pub fn validate(&self) -> Result<Route, ValidationError> {
        let (ns, name) = ns_name(self);
        validate_route(&name, &ns, &self.spec)
    }
}

impl TrafficPolicy {
    /// [`validate_policy`] with the object's own namespace and name.
    pub fn validate(&self) -> Result<Policy, ValidationError> {
        let (ns, name) = ns_name(self);
        validate_policy(&name, &ns, &self.spec)
    }
}

impl ExternalService {
    /// [`validate_external_service`] with the object's own namespace and name.
    pub fn validate(&self) -> Result<ServiceSpec, ValidationError> {
        let (ns, name) = ns_name(self);
        validate_external_service(&name, &ns, &self.spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_rooted_at_the_object() {
        assert_eq!(object_path(".", ""), "spec");
        assert_eq!(object_path("name", ""), "metadata.name");
        assert_eq!(object_path("rules[0].timeout", ""), "spec.rules[0].timeout");
        assert_eq!(object_path("services[0]", "services[0]"), "spec");
        assert_eq!(
            object_path("services[0].name", "services[0]"),
            "metadata.name"
        );
        assert_eq!(
            object_path("services[0].endpoints[1].port", "services[0]"),
            "spec.endpoints[1].port"
        );
    }
}
