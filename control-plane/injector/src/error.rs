/// Why the webhook could not answer at all. Problems with the pod itself are not errors: they
/// become warnings in an `allowed: true` response (see [`crate::review`]).
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// The body is not JSON, or not an AdmissionReview with a `request.uid`.
    #[error("body is not an AdmissionReview request: {0}")]
    BadReview(serde_json::Error),
    #[error("AdmissionReview has no request")]
    NoRequest,
    #[error("unsupported AdmissionReview apiVersion `{0}` (expected admission.k8s.io/v1)")]
    UnsupportedVersion(String),
    #[error("encoding the AdmissionReview response: {0}")]
    Encode(serde_json::Error),
    /// The webhook's certificate or key could not be read, parsed, or do not match.
    #[error(transparent)]
    Tls(#[from] weft_identity::TlsError),
}
