//! The AdmissionReview envelope. k8s-openapi has no `admission.k8s.io` types, so the few
//! fields the webhook reads and writes are declared here; unknown fields are ignored.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::InjectorConfig;
use crate::error::InjectError;
use crate::inject::{Outcome, plan};

const API_VERSION_V1: &str = "admission.k8s.io/v1";
/// v1beta1 has the same shape for everything used here; accepted so an old
/// `admissionReviewVersions` list does not break injection.
const API_VERSION_V1BETA1: &str = "admission.k8s.io/v1beta1";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewIn {
    api_version: Option<String>,
    request: Option<RequestIn>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RequestIn {
    pub uid: String,
    #[serde(default)]
    pub kind: Option<GroupVersionKind>,
    #[serde(default)]
    pub operation: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// Kept as JSON so that a pod k8s-openapi cannot decode still gets an answer with its uid.
    #[serde(default)]
    pub object: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct GroupVersionKind {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewOut {
    api_version: String,
    kind: &'static str,
    response: ResponseOut,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseOut {
    uid: String,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
}

/// Answers one AdmissionReview request (the webhook's whole decision, without I/O).
///
/// The response echoes the request's `uid` and is always `allowed: true`; when the pod is to
/// be injected it carries `patchType: JSONPatch` and the base64 RFC 6902 patch. Anything that
/// stops injection of an opted-in pod is reported in `warnings`.
///
/// Errors only when there is nothing to answer: the body is not an AdmissionReview request
/// with a `uid`, or its apiVersion is neither `admission.k8s.io/v1` nor `v1beta1`. The server
/// turns that into HTTP 400, which the API server treats as a webhook failure (and then
/// `failurePolicy` decides).
pub fn review(config: &InjectorConfig, body: &[u8]) -> Result<Vec<u8>, InjectError> {
    let parsed: ReviewIn = serde_json::from_slice(body).map_err(InjectError::BadReview)?;
    let api_version = match parsed.api_version.as_deref() {
        // The API server always sends it; a missing one is read as v1 rather than refused.
        None | Some(API_VERSION_V1) => API_VERSION_V1,
        Some(API_VERSION_V1BETA1) => API_VERSION_V1BETA1,
        Some(other) => return Err(InjectError::UnsupportedVersion(other.to_string())),
    };
    let request = parsed.request.ok_or(InjectError::NoRequest)?;
    let Outcome {
        patch,
        mut warnings,
    } = plan(config, &request);

    let patch = match patch {
        Some(ops) => match serde_json::to_vec(&ops) {
            Ok(bytes) => Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
            Err(e) => {
                warnings.push(format!(
                    "weft-injector: sidecar not injected: encoding patch: {e}"
                ));
                None
            }
        },
        None => None,
    };
    let out = ReviewOut {
        api_version: api_version.to_string(),
        kind: "AdmissionReview",
        response: ResponseOut {
            uid: request.uid,
            allowed: true,
            patch_type: patch.as_ref().map(|_| "JSONPatch"),
            patch,
            warnings,
        },
    };
    serde_json::to_vec(&out).map_err(InjectError::Encode)
}
