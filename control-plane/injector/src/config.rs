//! What the webhook injects, and the names it reads from pods.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Name of the injected container; a pod that already has a container (or init container) by
/// this name is left alone.
pub const SIDECAR_NAME: &str = "weft-sidecar";
/// Default opt-in label key; the pod opts in when it is [`DEFAULT_OPT_IN_VALUE`].
pub const DEFAULT_OPT_IN_LABEL: &str = "mesh.weft.dev/inject";
pub const DEFAULT_OPT_IN_VALUE: &str = "enabled";
/// Set to `"true"` on every pod the webhook patches; a pod that has it is left alone.
pub const ANNOTATION_INJECTED: &str = "mesh.weft.dev/injected";
/// Overrides the service name taken from the labels.
pub const ANNOTATION_SERVICE: &str = "mesh.weft.dev/service";
/// Overrides the app port taken from the first container's first `containerPort`.
pub const ANNOTATION_APP_PORT: &str = "mesh.weft.dev/app-port";
/// The sidecar's `--app-health` (default `tcp`).
pub const ANNOTATION_APP_HEALTH: &str = "mesh.weft.dev/app-health";
/// The sidecar's `--app-protocol` (`http` or `grpc`; default `http`).
pub const ANNOTATION_APP_PROTOCOL: &str = "mesh.weft.dev/app-protocol";
/// A fixed zone for the sidecar's `--zone`, instead of the node's.
pub const ANNOTATION_ZONE: &str = "mesh.weft.dev/zone";
/// Well-known node label that the `PodTopologyLabels` admission plugin copies onto pods.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Sidecar ports. Fixed rather than configurable: Services and NetworkPolicies are written
/// against them, and a pod's app must not use them.
pub const INBOUND_PORT: u16 = 15006;
pub const OUTBOUND_PORT: u16 = 15001;
pub const ADMIN_PORT: u16 = 15000;

/// What to inject. `Default` gives the chart's defaults; override fields with struct update
/// syntax (`InjectorConfig { image, ..Default::default() }`).
#[derive(Debug, Clone)]
pub struct InjectorConfig {
    /// The sidecar image, e.g. `registry.example/weft-sidecar:0.1.0`.
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`; `None` leaves Kubernetes' default (which depends
    /// on the tag).
    pub image_pull_policy: Option<String>,
    /// The control plane's xDS/registration port as the sidecar reaches it (`WEFT_CONTROL_PLANE`).
    pub control_plane: String,
    /// Requests and limits of the sidecar container.
    pub resources: ResourceRequirements,
    /// `json` or `text` (`WEFT_LOG_FORMAT`); `None` keeps the sidecar's default (`json`).
    pub log_format: Option<String>,
    /// More env vars for the sidecar (e.g. `WEFT_OTLP_ENDPOINT`, `RUST_LOG`). One with the
    /// name of an env var the webhook sets replaces it.
    pub extra_env: Vec<EnvVar>,
    /// The pod opts in when its label `opt_in_label` equals `opt_in_value`.
    pub opt_in_label: String,
    pub opt_in_value: String,
    /// Inject as a Kubernetes native sidecar (an init container with `restartPolicy: Always`,
    /// Kubernetes 1.29+) instead of a regular container. Native: the sidecar starts before the
    /// app (its outbound listener is up when the app starts) and does not keep a Job's pod
    /// alive; but on deletion the app is stopped first, so the sidecar's drain (which tells
    /// callers to go elsewhere) starts only after the app is gone. Regular (default): both get
    /// SIGTERM together, so the drain overlaps the app's own shutdown.
    pub native_sidecar: bool,
    /// Set `WEFT_ZONE` from the pod's `topology.kubernetes.io/zone` label through the downward
    /// API. The label is copied from the node onto the pod when it is bound by the
    /// `PodTopologyLabels` admission plugin (Kubernetes 1.33 alpha, 1.35 beta); without it the
    /// variable is empty and the sidecar runs without a zone. The `mesh.weft.dev/zone`
    /// annotation wins over this.
    pub zone_from_node_label: bool,
    /// UID and GID the sidecar runs as (non-root; the image's `nonroot` user).
    pub run_as_user: i64,
}

impl Default for InjectorConfig {
    fn default() -> Self {
        let quantities = |pairs: &[(&str, &str)]| {
            Some(
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), Quantity((*v).to_string())))
                    .collect::<BTreeMap<_, _>>(),
            )
        };
        InjectorConfig {
            image: format!("weft-sidecar:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: Some("IfNotPresent".into()),
            control_plane: "http://weft-control-plane.weft-system.svc:18000".into(),
            // No CPU limit: CFS throttling adds latency to every proxied request; memory is
            // limited so a leak is contained to the pod.
            resources: ResourceRequirements {
                requests: quantities(&[("cpu", "50m"), ("memory", "64Mi")]),
                limits: quantities(&[("memory", "256Mi")]),
                ..Default::default()
            },
            log_format: None,
            extra_env: Vec::new(),
            opt_in_label: DEFAULT_OPT_IN_LABEL.into(),
            opt_in_value: DEFAULT_OPT_IN_VALUE.into(),
            native_sidecar: false,
            zone_from_node_label: true,
            run_as_user: 65532,
        }
    }
}
