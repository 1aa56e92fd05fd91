//! Sidecar injection webhook: a Kubernetes mutating admission webhook that adds the
//! `weft-sidecar` container to pods that opt in with a label (issue 6).
//!
//! What it does:
//! - [`review`] turns one `admission.k8s.io/v1` AdmissionReview request into its response: for
//!   a pod that carries the opt-in label, is not injected yet and does not use the host's
//!   network, an RFC 6902 JSON patch that appends the sidecar container (env from the pod's
//!   labels and annotations, the downward API for pod IP, pod name and zone; probes on the
//!   sidecar's admin port; the restricted Pod Security Standard's security context) and marks
//!   the pod `mesh.weft.dev/injected: "true"`. In native sidecar mode the container goes first
//!   among the init containers instead, with `restartPolicy: Always`.
//! - [`serve`] answers `POST /mutate` over HTTPS (HTTP/1.1 and HTTP/2); [`tls_config`] loads
//!   the serving certificate from PEM files and picks up a rotated one within a minute.
//!
//! What it does NOT do:
//! - It never denies a pod. Every answer is `allowed: true`; what stops injection (a bad
//!   annotation, a port clash, host networking) becomes a warning `kubectl` shows, so a bug or
//!   a typo here can never block a rollout. Pair it with `failurePolicy: Ignore`.
//! - It does not intercept traffic: no init container, no iptables, no CNI. The app sends its
//!   outbound calls to the sidecar at `127.0.0.1:15001` itself, and Services must target the
//!   sidecar's inbound port 15006 for inbound traffic to go through it.
//! - It does not talk to the API server (no RBAC needed): everything comes from the
//!   AdmissionReview. In particular it cannot read the node's zone at admission time (the pod
//!   is not scheduled yet); the zone reaches the sidecar through the downward API at container
//!   start instead (see [`InjectorConfig::zone_from_node_label`]).
//! - It does not create the `MutatingWebhookConfiguration`, the Service or the certificate:
//!   the chart does (docs/injection.md).

mod config;
mod error;
mod inject;
mod review;
mod server;
mod tls;

pub use config::{
    ADMIN_PORT, ANNOTATION_APP_HEALTH, ANNOTATION_APP_PORT, ANNOTATION_APP_PROTOCOL,
    ANNOTATION_INJECTED, ANNOTATION_SERVICE, ANNOTATION_ZONE, DEFAULT_OPT_IN_LABEL,
    DEFAULT_OPT_IN_VALUE, INBOUND_PORT, InjectorConfig, OUTBOUND_PORT, SIDECAR_NAME, ZONE_LABEL,
};
pub use error::InjectError;
pub use review::review;
pub use server::{MAX_BODY_BYTES, serve};
pub use tls::{DEFAULT_RELOAD_INTERVAL, tls_config, tls_config_with_reload};
/// The rustls the webhook is built with (ring provider), for callers that build their own
/// `ServerConfig` for [`serve`].
pub use tokio_rustls::rustls;
