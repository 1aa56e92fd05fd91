//! The decision (inject or not, and why not) and the patch.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, Pod, Probe, SeccompProfile, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

use crate::config::{
    ADMIN_PORT, ANNOTATION_APP_HEALTH, ANNOTATION_APP_PORT, ANNOTATION_APP_PROTOCOL,
    ANNOTATION_INJECTED, ANNOTATION_SERVICE, ANNOTATION_ZONE, INBOUND_PORT, InjectorConfig,
    OUTBOUND_PORT, SIDECAR_NAME, ZONE_LABEL,
};
use crate::review::RequestIn;

const ADMIN_PORT_NAME: &str = "weft-admin";
const INBOUND_PORT_NAME: &str = "weft-inbound";

/// What to answer: a patch or none, and warnings for the user.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub patch: Option<Vec<Value>>,
    pub warnings: Vec<String>,
}

/// Why an opted-in pod is not injected. Each is shown to the user as a warning.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Skip {
    #[error("the request is for {0}, not a Pod (check the webhook's rules)")]
    NotAPod(String),
    #[error("the request has no object")]
    NoObject,
    #[error("the pod could not be decoded: {0}")]
    BadPod(serde_json::Error),
    #[error("the pod has no spec")]
    NoSpec,
    #[error(
        "the pod uses hostNetwork: its ports would clash with every other injected pod on the node"
    )]
    HostNetwork,
    #[error(
        "no service name: set the label app.kubernetes.io/name or app, or the annotation {ANNOTATION_SERVICE}"
    )]
    NoService,
    #[error(
        "no app port: declare a containerPort on the first container or set the annotation {ANNOTATION_APP_PORT}"
    )]
    NoAppPort,
    #[error("annotation {key}=`{value}`: {reason}")]
    BadAnnotation {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("port {0} is used by the app, but the sidecar needs it")]
    PortClash(u16),
    #[error("the port name {0} is used by the app, but the sidecar needs it")]
    PortNameClash(&'static str),
    #[error("encoding the sidecar container: {0}")]
    Encode(serde_json::Error),
}

impl Outcome {
    fn skip(reason: &Skip, pod: &str) -> Outcome {
        tracing::warn!(pod, %reason, "sidecar not injected");
        Outcome {
            patch: None,
            warnings: vec![truncate(
                format!("weft-injector: sidecar not injected: {reason}"),
                MAX_WARNING_CHARS,
            )],
        }
    }
}

/// The API server may cut long warnings short, and a user's annotation value or a decode
/// error can be long; the full text is in the log.
const MAX_WARNING_CHARS: usize = 240;

fn truncate(mut s: String, max_chars: usize) -> String {
    if let Some((at, _)) = s.char_indices().nth(max_chars) {
        s.truncate(at);
        s.push('…');
    }
    s
}

pub(crate) fn plan(config: &InjectorConfig, request: &RequestIn) -> Outcome {
    let who = format!(
        "{}/{}",
        request.namespace.as_deref().unwrap_or(""),
        request.name.as_deref().unwrap_or("")
    );
    if let Some(kind) = &request.kind
        && !(kind.group.is_empty() && kind.kind == "Pod")
    {
        let what = if kind.group.is_empty() {
            kind.kind.clone()
        } else {
            format!("{}.{}", kind.kind, kind.group)
        };
        return Outcome::skip(&Skip::NotAPod(what), &who);
    }
    // Containers cannot be added to a running pod; only CREATE can be mutated usefully.
    if request
        .operation
        .as_deref()
        .is_some_and(|op| op != "CREATE")
    {
        return Outcome::default();
    }
    let Some(object) = &request.object else {
        return Outcome::skip(&Skip::NoObject, &who);
    };
    // Check the opt-in on the raw JSON first: a pod that did not opt in gets no warning even
    // if k8s-openapi cannot decode it.
    let opted_in = object
        .pointer("/metadata/labels")
        .and_then(|labels| labels.get(&config.opt_in_label))
        .and_then(Value::as_str)
        == Some(config.opt_in_value.as_str());
    if !opted_in {
        return Outcome::default();
    }
    let pod: Pod = match serde_json::from_value(object.clone()) {
        Ok(pod) => pod,
        Err(e) => return Outcome::skip(&Skip::BadPod(e), &who),
    };
    if already_injected(&pod) {
        tracing::debug!(pod = who, "already injected");
        return Outcome::default();
    }
    match patch(config, &pod) {
        Ok(ops) => {
            tracing::info!(pod = who, "injecting the sidecar");
            Outcome {
                patch: Some(ops),
                warnings: Vec::new(),
            }
        }
        Err(reason) => Outcome::skip(&reason, &who),
    }
}

fn already_injected(pod: &Pod) -> bool {
    if annotation(pod, ANNOTATION_INJECTED).is_some() {
        return true;
    }
    pod.spec.as_ref().is_some_and(|spec| {
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| c.name == SIDECAR_NAME)
    })
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn label<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// Service name: annotation, then the recommended label, then `app`, then the workload's name
/// recovered from `generateName`.
fn service_name(pod: &Pod) -> Result<String, Skip> {
    if let Some(name) = annotation(pod, ANNOTATION_SERVICE) {
        let name = name.trim();
        if name.is_empty() {
            return Err(Skip::BadAnnotation {
                key: ANNOTATION_SERVICE,
                value: name.to_string(),
                reason: "must not be empty".into(),
            });
        }
        return Ok(name.to_string());
    }
    if let Some(name) = label(pod, "app.kubernetes.io/name").or_else(|| label(pod, "app")) {
        return Ok(name.to_string());
    }
    generate_name_stem(pod).ok_or(Skip::NoService)
}

/// `web-5d4f8b9c7-` with `pod-template-hash: 5d4f8b9c7` (a Deployment's pod) gives `web`;
/// `agent-` (a DaemonSet's) gives `agent`.
fn generate_name_stem(pod: &Pod) -> Option<String> {
    let stem = pod.metadata.generate_name.as_deref()?.trim_end_matches('-');
    let stem = match label(pod, "pod-template-hash") {
        Some(hash) => stem
            .strip_suffix(hash)
            .and_then(|s| s.strip_suffix('-'))
            .unwrap_or(stem),
        None => stem,
    };
    (!stem.is_empty()).then(|| stem.to_string())
}

fn app_port(pod: &Pod) -> Result<u16, Skip> {
    if let Some(value) = annotation(pod, ANNOTATION_APP_PORT) {
        return match value.trim().parse::<u16>() {
            Ok(port) if port != 0 => Ok(port),
            _ => Err(Skip::BadAnnotation {
                key: ANNOTATION_APP_PORT,
                value: value.to_string(),
                reason: "expected a port number, 1 to 65535".into(),
            }),
        };
    }
    pod.spec
        .as_ref()
        .and_then(|spec| spec.containers.first())
        .and_then(|c| c.ports.as_ref())
        .and_then(|ports| ports.first())
        .and_then(|p| u16::try_from(p.container_port).ok())
        .filter(|&p| p != 0)
        .ok_or(Skip::NoAppPort)
}

/// Checked with the sidecar's own parser, so a typo is a warning now rather than a sidecar
/// that exits 64 in a crash loop.
fn app_health(pod: &Pod) -> Result<String, Skip> {
    let Some(value) = annotation(pod, ANNOTATION_APP_HEALTH) else {
        return Ok("tcp".into());
    };
    match value.parse::<weft_health_check::Probe>() {
        Ok(_) => Ok(value.to_string()),
        Err(e) => Err(Skip::BadAnnotation {
            key: ANNOTATION_APP_HEALTH,
            value: value.to_string(),
            reason: format!(
                "{} (expected `http:/path`, `tcp`, `grpc`, `grpc:SERVICE` or `none`)",
                e.reason
            ),
        }),
    }
}

fn app_protocol(pod: &Pod) -> Result<&'static str, Skip> {
    match annotation(pod, ANNOTATION_APP_PROTOCOL) {
        None | Some("http") => Ok("http"),
        Some("grpc") => Ok("grpc"),
        Some(other) => Err(Skip::BadAnnotation {
            key: ANNOTATION_APP_PROTOCOL,
            value: other.to_string(),
            reason: "expected `http` or `grpc`".into(),
        }),
    }
}

/// The sidecar's fixed ports must be free in the pod's network namespace (shared by all
/// containers). Only declared ports can be checked; the docs say which ports to keep free.
fn check_ports(pod: &Pod, app_port: u16) -> Result<(), Skip> {
    let taken = [INBOUND_PORT, OUTBOUND_PORT, ADMIN_PORT];
    if taken.contains(&app_port) {
        return Err(Skip::PortClash(app_port));
    }
    let Some(spec) = &pod.spec else {
        return Ok(());
    };
    let ports = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.ports.iter().flatten());
    for p in ports {
        if let Some(&port) = taken.iter().find(|&&t| i32::from(t) == p.container_port) {
            return Err(Skip::PortClash(port));
        }
        for name in [ADMIN_PORT_NAME, INBOUND_PORT_NAME] {
            if p.name.as_deref() == Some(name) {
                return Err(Skip::PortNameClash(name));
            }
        }
    }
    Ok(())
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_field(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: None,
                field_path: field_path.into(),
            }),
            ..Default::default()
        }),
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(ADMIN_PORT)),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Default::default()
    }
}

pub(crate) fn sidecar_container(config: &InjectorConfig, pod: &Pod) -> Result<Container, Skip> {
    let spec = pod.spec.as_ref().ok_or(Skip::NoSpec)?;
    if spec.host_network == Some(true) {
        return Err(Skip::HostNetwork);
    }
    let service = service_name(pod)?;
    let app_port = app_port(pod)?;
    let health = app_health(pod)?;
    let protocol = app_protocol(pod)?;
    check_ports(pod, app_port)?;

    let mut env_vars = vec![
        env("WEFT_SERVICE", service),
        env("WEFT_APP_PORT", app_port.to_string()),
        env("WEFT_APP_HEALTH", health),
        env("WEFT_APP_PROTOCOL", protocol),
        env("WEFT_CONTROL_PLANE", config.control_plane.clone()),
        env("WEFT_REGISTER", "control-plane"),
        // Kubelet probes and other sidecars reach the pod IP, so inbound and admin listen on
        // all addresses; outbound stays on loopback, for this pod's app only.
        env("WEFT_INBOUND_LISTEN", format!("0.0.0.0:{INBOUND_PORT}")),
        env("WEFT_OUTBOUND_LISTEN", format!("127.0.0.1:{OUTBOUND_PORT}")),
        env("WEFT_ADMIN_LISTEN", format!("0.0.0.0:{ADMIN_PORT}")),
        // Resolved by the kubelet at container start, when the pod has its IP and its final
        // name (a ReplicaSet's pod has only generateName at admission).
        env_field("WEFT_ADVERTISE_ADDRESS", "status.podIP"),
        env_field("WEFT_INSTANCE_ID", "metadata.name"),
    ];
    if let Some(zone) = annotation(pod, ANNOTATION_ZONE).filter(|z| !z.is_empty()) {
        env_vars.push(env("WEFT_ZONE", zone));
    } else if config.zone_from_node_label {
        // Empty when the label is absent; the sidecar then registers no zone.
        env_vars.push(env_field(
            "WEFT_ZONE",
            &format!("metadata.labels['{ZONE_LABEL}']"),
        ));
    }
    if let Some(format) = &config.log_format {
        env_vars.push(env("WEFT_LOG_FORMAT", format.clone()));
    }
    for extra in &config.extra_env {
        match env_vars.iter_mut().find(|e| e.name == extra.name) {
            Some(existing) => *existing = extra.clone(),
            None => env_vars.push(extra.clone()),
        }
    }

    let uid = config.run_as_user;
    Ok(Container {
        name: SIDECAR_NAME.into(),
        image: Some(config.image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        env: Some(env_vars),
        ports: Some(vec![
            ContainerPort {
                name: Some(INBOUND_PORT_NAME.into()),
                container_port: i32::from(INBOUND_PORT),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some(ADMIN_PORT_NAME.into()),
                container_port: i32::from(ADMIN_PORT),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        // Until /healthz answers, liveness is not checked; for a native sidecar this is also
        // what holds the app back until the sidecar's listeners are up.
        startup_probe: Some(http_probe("/healthz", 1, 60)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        resources: Some(config.resources.clone()),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(uid),
            run_as_group: Some(uid),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        // The sidecar explains a bad flag on stderr and exits 64; show that in `kubectl
        // describe` without anyone having to fetch logs.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        restart_policy: config.native_sidecar.then(|| "Always".to_string()),
        ..Default::default()
    })
}

/// JSON Pointer escaping (RFC 6901) for a map key used as a path segment.
fn pointer_segment(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

pub(crate) fn patch(config: &InjectorConfig, pod: &Pod) -> Result<Vec<Value>, Skip> {
    let container = sidecar_container(config, pod)?;
    let container = serde_json::to_value(&container).map_err(Skip::Encode)?;
    let mut ops = Vec::new();
    // "add" onto a missing parent fails the whole patch, so a missing map or list is added
    // whole.
    let spec = pod.spec.as_ref().ok_or(Skip::NoSpec)?;
    if config.native_sidecar {
        // First, so it is up before any other init container that might call through it.
        if spec.init_containers.as_ref().is_none_or(Vec::is_empty) {
            ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [container]}));
        } else {
            ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": container}));
        }
    } else {
        ops.push(json!({"op": "add", "path": "/spec/containers/-", "value": container}));
    }
    match &pod.metadata.annotations {
        None => {
            let annotations = BTreeMap::from([(ANNOTATION_INJECTED, "true")]);
            ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": annotations}));
        }
        Some(_) => ops.push(json!({
            "op": "add",
            "path": format!("/metadata/annotations/{}", pointer_segment(ANNOTATION_INJECTED)),
            "value": "true",
        })),
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn generate_name_stem_strips_the_template_hash() {
        let p = pod(json!({
            "metadata": {"generateName": "web-5d4f8b9c7-", "labels": {"pod-template-hash": "5d4f8b9c7"}},
            "spec": {"containers": []}
        }));
        assert_eq!(generate_name_stem(&p).as_deref(), Some("web"));
        let p = pod(json!({"metadata": {"generateName": "agent-"}, "spec": {"containers": []}}));
        assert_eq!(generate_name_stem(&p).as_deref(), Some("agent"));
        let p = pod(json!({"metadata": {"name": "bare"}, "spec": {"containers": []}}));
        assert_eq!(generate_name_stem(&p), None);
    }

    #[test]
    fn long_warnings_are_cut() {
        assert_eq!(truncate("abc".into(), 3), "abc");
        assert_eq!(truncate("abcd".into(), 3), "abc…");
        assert_eq!(truncate("ééé".into(), 2), "éé…");
        let outcome = Outcome::skip(
            &Skip::BadAnnotation {
                key: ANNOTATION_APP_PORT,
                value: "x".repeat(1000),
                reason: "expected a port number".into(),
            },
            "ns/pod",
        );
        assert_eq!(outcome.warnings[0].chars().count(), MAX_WARNING_CHARS + 1);
    }

    #[test]
    fn pointer_segments_are_escaped() {
        assert_eq!(
            pointer_segment("mesh.weft.dev/injected"),
            "mesh.weft.dev~1injected"
        );
        assert_eq!(pointer_segment("a~b/c"), "a~0b~1c");
    }

    #[test]
    fn port_clashes_are_found_by_number_and_name() {
        let p = pod(
            json!({"spec": {"containers": [{"name": "app", "ports": [{"containerPort": 15000}]}]}}),
        );
        assert!(matches!(check_ports(&p, 8080), Err(Skip::PortClash(15000))));
        let p = pod(
            json!({"spec": {"containers": [{"name": "app", "ports": [{"containerPort": 9000, "name": "weft-admin"}]}]}}),
        );
        assert!(matches!(
            check_ports(&p, 8080),
            Err(Skip::PortNameClash("weft-admin"))
        ));
        let p = pod(json!({"spec": {"containers": [{"name": "app"}]}}));
        assert!(matches!(
            check_ports(&p, 15001),
            Err(Skip::PortClash(15001))
        ));
        assert!(check_ports(&p, 8080).is_ok());
    }

    #[test]
    fn extra_env_replaces_by_name() {
        let config = InjectorConfig {
            extra_env: vec![env("WEFT_REGISTER", "none"), env("RUST_LOG", "debug")],
            ..Default::default()
        };
        let p = pod(json!({
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]}
        }));
        let c = sidecar_container(&config, &p).unwrap();
        let env = c.env.unwrap();
        let register: Vec<_> = env.iter().filter(|e| e.name == "WEFT_REGISTER").collect();
        assert_eq!(register.len(), 1);
        assert_eq!(register[0].value.as_deref(), Some("none"));
        assert!(env.iter().any(|e| e.name == "RUST_LOG"));
    }
}
