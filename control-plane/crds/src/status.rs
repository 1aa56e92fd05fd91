//! Status shared by the three kinds: `observedGeneration` and standard Kubernetes conditions.
//!
//! Condition types follow Gateway API's: `Accepted` (the spec is valid and in the registry),
//! `ResolvedRefs` (every service it names exists) and `Programmed` (no connected proxy rejects
//! the xDS resources built from it). Conditions are the real
//! `meta/v1 Condition`, so `kubectl wait --for=condition=Accepted` and generic tooling work.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Condition type: the spec passed validation and is in the registry.
pub const ACCEPTED: &str = "Accepted";
/// Condition type: every service the object refers to exists in the registry.
pub const RESOLVED_REFS: &str = "ResolvedRefs";

/// Condition type: no connected proxy rejects (NACKs) the xDS resources built from the object.
pub const PROGRAMMED: &str = "Programmed";

/// Reason for `Accepted=True`.
pub const REASON_ACCEPTED: &str = "Accepted";
/// Reason for `Accepted=False`: validation failed; the message lists every problem.
pub const REASON_INVALID: &str = "Invalid";
/// Reason for `ResolvedRefs=True`.
pub const REASON_RESOLVED_REFS: &str = "ResolvedRefs";
/// Reason for `ResolvedRefs=False`: a referenced service is not (yet) in the registry.
pub const REASON_BACKEND_NOT_FOUND: &str = "BackendNotFound";

/// Reason for `Programmed=True`.
pub const REASON_PROGRAMMED: &str = "Programmed";
/// Reason for `Programmed=False`: proxies reject a resource built from the object; the message
/// names the resource, the proxies and their error.
pub const REASON_REJECTED_BY_PROXIES: &str = "RejectedByProxies";

/// Longest condition message the API server accepts (`maxLength` of `meta/v1 Condition`).
pub const MAX_MESSAGE_LEN: usize = 32768;

/// Status of every Weft custom resource.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`, `ResolvedRefs` and `Programmed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

impl ObjectStatus {
    /// A status for `generation` holding `conditions`.
    pub fn new(generation: Option<i64>, conditions: Vec<Condition>) -> Self {
        Self {
            observed_generation: generation,
            conditions,
        }
    }

    /// The condition of type `type_`, if present.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// A condition of type `type_`, with `lastTransitionTime` now. `ok` maps to status `True` or
/// `False`. Messages longer than the API server allows are cut (at a character boundary).
pub fn condition(
    type_: &str,
    generation: Option<i64>,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
) -> Condition {
    let mut message = message.into();
    if message.len() > MAX_MESSAGE_LEN {
        let mut end = MAX_MESSAGE_LEN;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    Condition {
        type_: type_.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time: Time(Timestamp::now()),
    }
}

/// An `Accepted` condition.
pub fn accepted(
    generation: Option<i64>,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
) -> Condition {
    condition(ACCEPTED, generation, ok, reason, message)
}

/// A `Programmed` condition.
pub fn programmed(
    generation: Option<i64>,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
) -> Condition {
    condition(PROGRAMMED, generation, ok, reason, message)
}

/// A `ResolvedRefs` condition.
pub fn resolved_refs(
    generation: Option<i64>,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
) -> Condition {
    condition(RESOLVED_REFS, generation, ok, reason, message)
}

/// Adds `new` to `conditions` or replaces the condition of its type, like apimachinery's
/// `meta.SetStatusCondition`: when the status did not change, the old `lastTransitionTime` is
/// kept, so the time says when the condition last flipped rather than when it was last
/// written. Returns whether anything changed (so callers can skip a no-op status patch).
pub fn set_condition(conditions: &mut Vec<Condition>, new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        None => {
            conditions.push(new);
            true
        }
        Some(old) => {
            let mut new = new;
            if old.status == new.status {
                new.last_transition_time = old.last_transition_time.clone();
            }
            if *old == new {
                false
            } else {
                *old = new;
                true
            }
        }
    }
}

/// The OpenAPI schema of `meta/v1 Condition` (as upstream CRDs carry it), written out because
/// k8s-openapi's `schemars` feature would rebuild k8s-openapi for the whole workspace. A list
/// map keyed by `type`, so server-side apply merges conditions per type.
fn conditions_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "description": "Accepted, ResolvedRefs and Programmed.",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "description": "Condition contains details for one aspect of the current state of this API Resource.",
            "required": ["lastTransitionTime", "message", "reason", "status", "type"],
            "properties": {
                "lastTransitionTime": {
                    "type": "string",
                    "format": "date-time",
                    "description": "When the condition last changed status."
                },
                "message": {
                    "type": "string",
                    "maxLength": MAX_MESSAGE_LEN,
                    "description": "Human-readable details; for Accepted=False every validation problem, one per line."
                },
                "observedGeneration": {
                    "type": "integer",
                    "format": "int64",
                    "minimum": 0,
                    "description": "The metadata.generation the condition was set for."
                },
                "reason": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 1024,
                    "pattern": "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
                    "description": "Machine-readable CamelCase reason."
                },
                "status": {
                    "type": "string",
                    "enum": ["True", "False", "Unknown"],
                    "description": "True, False or Unknown."
                },
                "type": {
                    "type": "string",
                    "maxLength": 316,
                    "pattern": "^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
                    "description": "Accepted, ResolvedRefs or Programmed."
                }
            }
        }
    })
}
