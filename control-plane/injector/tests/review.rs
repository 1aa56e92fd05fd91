#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `review` against AdmissionReview fixtures: the patch is applied with an RFC 6902
//! implementation, as the API server would, and the result checked as a pod.

use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use weft_injector::{InjectError, InjectorConfig, review};

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Runs the review and checks the envelope every response must have.
fn run(config: &InjectorConfig, request: &Value) -> Value {
    let out = review(config, &serde_json::to_vec(request).unwrap()).unwrap();
    let out: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(out["apiVersion"], request["apiVersion"]);
    assert_eq!(out["kind"], "AdmissionReview");
    assert_eq!(out["response"]["uid"], request["request"]["uid"]);
    assert_eq!(out["response"]["allowed"], true);
    assert!(
        out.get("request").is_none(),
        "the request is not echoed: {out}"
    );
    out
}

/// The pod after the response's patch, or `None` when there is no patch.
fn patched(request: &Value, response: &Value) -> Option<Value> {
    let patch = response["response"].get("patch")?;
    assert_eq!(response["response"]["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(patch.as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut pod = request["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    // Still a pod Kubernetes can decode.
    let _: Pod = serde_json::from_value(pod.clone()).unwrap();
    Some(pod)
}

fn warnings(response: &Value) -> Vec<String> {
    response["response"]
        .get("warnings")
        .map(|w| serde_json::from_value(w.clone()).unwrap())
        .unwrap_or_default()
}

fn no_patch(response: &Value) {
    assert!(response["response"].get("patch").is_none(), "{response}");
    assert!(
        response["response"].get("patchType").is_none(),
        "{response}"
    );
}

fn sidecar(pod: &Value) -> Value {
    let found: Vec<&Value> = pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(
            pod["spec"]["initContainers"]
                .as_array()
                .into_iter()
                .flatten(),
        )
        .filter(|c| c["name"] == "weft-sidecar")
        .collect();
    assert_eq!(found.len(), 1, "{pod}");
    found[0].clone()
}

/// Env var name -> its literal value, or `fieldRef:<path>`.
fn env(container: &Value) -> std::collections::BTreeMap<String, String> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_string();
            let value = match e.get("value") {
                Some(v) => v.as_str().unwrap().to_string(),
                None => format!(
                    "fieldRef:{}",
                    e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap()
                ),
            };
            (name, value)
        })
        .collect()
}

#[test]
fn opted_in_pod_gets_the_sidecar() {
    let request = fixture("opted-in.json");
    let response = run(&InjectorConfig::default(), &request);
    assert!(warnings(&response).is_empty(), "{response}");
    let pod = patched(&request, &response).expect("a patch");

    // The app container is untouched and the sidecar comes after it.
    let containers = pod["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 2);
    assert_eq!(
        containers[0],
        request["request"]["object"]["spec"]["containers"][0]
    );
    let c = sidecar(&pod);
    assert_eq!(containers[1], c);
    assert!(pod["spec"].get("initContainers").is_none());

    assert_eq!(
        c["image"],
        format!("weft-sidecar:{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(c["imagePullPolicy"], "IfNotPresent");
    assert!(c.get("args").is_none() && c.get("command").is_none());
    assert!(c.get("restartPolicy").is_none());
    let env = env(&c);
    let expected = [
        ("WEFT_SERVICE", "web"),
        ("WEFT_APP_PORT", "8080"),
        ("WEFT_APP_HEALTH", "tcp"),
        ("WEFT_APP_PROTOCOL", "http"),
        (
            "WEFT_CONTROL_PLANE",
            "http://weft-control-plane.weft-system.svc:18000",
        ),
        ("WEFT_REGISTER", "control-plane"),
        ("WEFT_INBOUND_LISTEN", "0.0.0.0:15006"),
        ("WEFT_OUTBOUND_LISTEN", "127.0.0.1:15001"),
        ("WEFT_ADMIN_LISTEN", "0.0.0.0:15000"),
        ("WEFT_ADVERTISE_ADDRESS", "fieldRef:status.podIP"),
        ("WEFT_INSTANCE_ID", "fieldRef:metadata.name"),
        (
            "WEFT_ZONE",
            "fieldRef:metadata.labels['topology.kubernetes.io/zone']",
        ),
    ];
    let expected: std::collections::BTreeMap<String, String> = expected
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect();
    assert_eq!(env, expected);

    assert_eq!(
        c["ports"],
        json!([
            {"name": "weft-inbound", "containerPort": 15006, "protocol": "TCP"},
            {"name": "weft-admin", "containerPort": 15000, "protocol": "TCP"},
        ])
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], 15000);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], 15000);
    assert_eq!(c["startupProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(
        c["securityContext"],
        json!({
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        })
    );
    assert_eq!(
        c["resources"],
        json!({"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}})
    );

    // The marker is added next to the annotations already there.
    assert_eq!(
        pod["metadata"]["annotations"],
        json!({
            "kubectl.kubernetes.io/restartedAt": "2025-01-01T00:00:00Z",
            "mesh.weft.dev/injected": "true",
        })
    );
}

#[test]
fn a_pod_without_annotations_gets_the_map() {
    let mut request = fixture("opted-in.json");
    request["request"]["object"]["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    let response = run(&InjectorConfig::default(), &request);
    let pod = patched(&request, &response).unwrap();
    assert_eq!(
        pod["metadata"]["annotations"],
        json!({"mesh.weft.dev/injected": "true"})
    );
}

#[test]
fn injecting_twice_changes_nothing() {
    let request = fixture("opted-in.json");
    let config = InjectorConfig::default();
    let pod = patched(&request, &run(&config, &request)).unwrap();
    let mut again = request.clone();
    again["request"]["object"] = pod.clone();
    no_patch(&run(&config, &again));

    // The container alone (annotation stripped) is enough to tell.
    again["request"]["object"]["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    no_patch(&run(&config, &again));
}

#[test]
fn service_name_falls_back_to_app_then_generate_name() {
    let config = InjectorConfig::default();
    let mut request = fixture("opted-in.json");
    let labels = request["request"]["object"]["metadata"]["labels"]
        .as_object_mut()
        .unwrap();
    labels.remove("app.kubernetes.io/name");
    labels.insert("app".into(), json!("web-app"));
    let pod = patched(&request, &run(&config, &request)).unwrap();
    assert_eq!(env(&sidecar(&pod))["WEFT_SERVICE"], "web-app");

    // Neither label: the Deployment's name, from generateName less the template hash.
    request["request"]["object"]["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("app");
    let pod = patched(&request, &run(&config, &request)).unwrap();
    assert_eq!(env(&sidecar(&pod))["WEFT_SERVICE"], "web");

    // No name at all: a warning, no patch.
    let obj = request["request"]["object"]["metadata"]
        .as_object_mut()
        .unwrap();
    obj.remove("generateName");
    obj.insert("name".into(), json!("web-manual"));
    let response = run(&config, &request);
    no_patch(&response);
    assert!(
        warnings(&response)[0].contains("no service name"),
        "{response}"
    );
}

#[test]
fn not_opted_in_is_allowed_without_patch_or_warning() {
    let request = fixture("not-opted-in.json");
    let response = run(&InjectorConfig::default(), &request);
    no_patch(&response);
    assert!(warnings(&response).is_empty());

    // The same pod opts in under a differently configured label.
    let config = InjectorConfig {
        opt_in_label: "app".into(),
        opt_in_value: "batch".into(),
        ..Default::default()
    };
    let response = run(&config, &request);
    let pod = patched(&request, &response).unwrap();
    assert_eq!(env(&sidecar(&pod))["WEFT_SERVICE"], "batch");
}

#[test]
fn already_injected_is_left_alone() {
    let config = InjectorConfig::default();
    let request = fixture("already-injected.json");
    let response = run(&config, &request);
    no_patch(&response);
    assert!(warnings(&response).is_empty());

    let mut request = fixture("opted-in.json");
    request["request"]["object"]["metadata"]["annotations"]["mesh.weft.dev/injected"] =
        json!("true");
    no_patch(&run(&config, &request));
}

#[test]
fn host_network_is_skipped_with_a_warning() {
    let request = fixture("host-network.json");
    let response = run(&InjectorConfig::default(), &request);
    no_patch(&response);
    let w = warnings(&response);
    assert_eq!(w.len(), 1);
    assert!(
        w[0].starts_with("weft-injector: sidecar not injected"),
        "{w:?}"
    );
    assert!(w[0].contains("hostNetwork"), "{w:?}");
}

#[test]
fn annotations_override_service_port_health_protocol_and_zone() {
    let request = fixture("annotated.json");
    let response = run(&InjectorConfig::default(), &request);
    assert!(warnings(&response).is_empty(), "{response}");
    let pod = patched(&request, &response).unwrap();
    let env = env(&sidecar(&pod));
    assert_eq!(env["WEFT_SERVICE"], "echo");
    assert_eq!(env["WEFT_APP_PORT"], "18091");
    assert_eq!(env["WEFT_APP_HEALTH"], "grpc:weft.Echo");
    assert_eq!(env["WEFT_APP_PROTOCOL"], "grpc");
    assert_eq!(env["WEFT_ZONE"], "eu-west-1b");
}

#[test]
fn bad_annotations_are_warnings_not_broken_sidecars() {
    let config = InjectorConfig::default();
    for (key, value, needle) in [
        ("mesh.weft.dev/app-port", "http", "port number"),
        ("mesh.weft.dev/app-port", "0", "port number"),
        ("mesh.weft.dev/app-port", "70000", "port number"),
        ("mesh.weft.dev/app-port", "15006", "port 15006"),
        (
            "mesh.weft.dev/app-health",
            "htp:/x",
            "expected `http:/path`",
        ),
        (
            "mesh.weft.dev/app-health",
            "http:healthz",
            "must start with",
        ),
        ("mesh.weft.dev/app-protocol", "udp", "`http` or `grpc`"),
        ("mesh.weft.dev/service", " ", "must not be empty"),
    ] {
        let mut request = fixture("annotated.json");
        request["request"]["object"]["metadata"]["annotations"][key] = json!(value);
        let response = run(&config, &request);
        no_patch(&response);
        let w = warnings(&response);
        assert_eq!(w.len(), 1, "{key}={value}: {response}");
        assert!(
            w[0].contains(key) || key == "mesh.weft.dev/app-port",
            "{key}={value}: {w:?}"
        );
        assert!(w[0].contains(needle), "{key}={value}: {w:?}");
    }
}

#[test]
fn sidecar_ports_taken_by_the_app_are_a_warning() {
    let mut request = fixture("opted-in.json");
    request["request"]["object"]["spec"]["containers"][0]["ports"][1]["containerPort"] =
        json!(15000);
    let response = run(&InjectorConfig::default(), &request);
    no_patch(&response);
    assert!(warnings(&response)[0].contains("port 15000"), "{response}");
}

#[test]
fn no_container_port_and_no_annotation_is_a_warning() {
    let mut request = fixture("opted-in.json");
    request["request"]["object"]["spec"]["containers"][0]
        .as_object_mut()
        .unwrap()
        .remove("ports");
    let response = run(&InjectorConfig::default(), &request);
    no_patch(&response);
    assert!(warnings(&response)[0].contains("no app port"), "{response}");
}

#[test]
fn native_sidecar_goes_first_among_init_containers() {
    let config = InjectorConfig {
        native_sidecar: true,
        ..Default::default()
    };
    let request = fixture("annotated.json");
    let pod = patched(&request, &run(&config, &request)).unwrap();
    let init = pod["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(init.len(), 2);
    assert_eq!(init[0]["name"], "weft-sidecar");
    assert_eq!(init[0]["restartPolicy"], "Always");
    assert_eq!(init[1]["name"], "migrate");
    assert_eq!(pod["spec"]["containers"].as_array().unwrap().len(), 1);

    // No init containers yet: the list is created.
    let request = fixture("opted-in.json");
    let pod = patched(&request, &run(&config, &request)).unwrap();
    assert_eq!(pod["spec"]["initContainers"][0]["name"], "weft-sidecar");
    assert_eq!(pod["spec"]["containers"].as_array().unwrap().len(), 1);
}

#[test]
fn config_shapes_the_container() {
    let config = InjectorConfig {
        image: "registry.example/weft-sidecar:9.9.9".into(),
        image_pull_policy: None,
        control_plane: "http://cp.mesh.svc:18000".into(),
        log_format: Some("text".into()),
        zone_from_node_label: false,
        run_as_user: 1000,
        extra_env: vec![k8s_openapi::api::core::v1::EnvVar {
            name: "WEFT_OTLP_ENDPOINT".into(),
            value: Some("http://otel.observability.svc:4317".into()),
            value_from: None,
        }],
        ..Default::default()
    };
    let request = fixture("opted-in.json");
    let pod = patched(&request, &run(&config, &request)).unwrap();
    let c = sidecar(&pod);
    assert_eq!(c["image"], "registry.example/weft-sidecar:9.9.9");
    assert!(c.get("imagePullPolicy").is_none());
    assert_eq!(c["securityContext"]["runAsUser"], 1000);
    let env = env(&c);
    assert_eq!(env["WEFT_CONTROL_PLANE"], "http://cp.mesh.svc:18000");
    assert_eq!(env["WEFT_LOG_FORMAT"], "text");
    assert_eq!(
        env["WEFT_OTLP_ENDPOINT"],
        "http://otel.observability.svc:4317"
    );
    assert!(!env.contains_key("WEFT_ZONE"));
}

#[test]
fn only_pod_creation_is_mutated() {
    let config = InjectorConfig::default();
    let mut request = fixture("opted-in.json");
    request["request"]["operation"] = json!("UPDATE");
    let response = run(&config, &request);
    no_patch(&response);
    assert!(warnings(&response).is_empty());

    let mut request = fixture("opted-in.json");
    request["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let response = run(&config, &request);
    no_patch(&response);
    assert!(
        warnings(&response)[0].contains("Deployment.apps"),
        "{response}"
    );
}

#[test]
fn malformed_pod_is_allowed_with_a_warning() {
    let request = fixture("malformed-pod.json");
    let response = run(&InjectorConfig::default(), &request);
    no_patch(&response);
    assert!(
        warnings(&response)[0].contains("could not be decoded"),
        "{response}"
    );

    let mut request = fixture("opted-in.json");
    request["request"].as_object_mut().unwrap().remove("object");
    let response = run(&InjectorConfig::default(), &request);
    no_patch(&response);
    assert!(warnings(&response)[0].contains("no object"), "{response}");
}

#[test]
fn a_body_that_is_not_a_review_is_an_error() {
    let config = InjectorConfig::default();
    assert!(matches!(
        review(&config, b"not json"),
        Err(InjectError::BadReview(_))
    ));
    assert!(matches!(
        review(
            &config,
            br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}"#
        ),
        Err(InjectError::NoRequest)
    ));
    assert!(matches!(
        review(
            &config,
            br#"{"apiVersion": "admission.k8s.io/v1", "request": {"object": {}}}"#
        ),
        Err(InjectError::BadReview(_))
    ));
    let mut request = fixture("opted-in.json");
    request["apiVersion"] = json!("admission.k8s.io/v2");
    let err = review(&config, &serde_json::to_vec(&request).unwrap()).unwrap_err();
    assert!(err.to_string().contains("admission.k8s.io/v2"), "{err}");
}

#[test]
fn v1beta1_is_answered_in_kind() {
    let mut request = fixture("opted-in.json");
    request["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let response = run(&InjectorConfig::default(), &request);
    assert!(patched(&request, &response).is_some());
}
