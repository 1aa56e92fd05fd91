//! `weftctl validate` against what the control plane itself says: the same bad registry files
//! given to `weft-control-plane --registry-file` make it exit 64 with problem lines that
//! weftctl must print word for word; CRD YAML is judged as the Kubernetes source judges it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Scratch, control_plane_bin, free_port, weftctl};

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
        .display()
        .to_string()
}

/// The problem lines the control plane prints on stderr when it refuses to start on `files`.
fn server_problems(files: &[&PathBuf]) -> Vec<String> {
    let mut cmd = Command::new(control_plane_bin());
    cmd.args(["--xds-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())]);
    for f in files {
        cmd.arg("--registry-file").arg(f);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    let (_, problems) = stderr
        .split_once("weft-control-plane: invalid configuration:\n")
        .unwrap_or_else(|| panic!("{stderr}"));
    problems.lines().map(str::to_string).collect()
}

/// weftctl's problem lines: everything but the closing summary.
fn weftctl_problems(stdout: &str) -> Vec<String> {
    let mut lines: Vec<String> = stdout.lines().map(str::to_string).collect();
    let summary = lines.pop().unwrap_or_default();
    assert!(summary.starts_with("invalid: "), "{stdout}");
    lines
}

#[test]
fn good_registry_files_and_crds_exit_0_with_one_ok_line_each() {
    let files = [
        repo("examples/demo/registry.yaml"),
        repo("control-plane/crds/examples/trafficroute.yaml"),
        repo("control-plane/crds/examples/trafficpolicy.yaml"),
        repo("control-plane/crds/examples/externalservice.yaml"),
    ];
    let args: Vec<&str> = ["validate"]
        .into_iter()
        .chain(files.iter().map(String::as_str))
        .collect();
    let run = weftctl(&args);
    assert_eq!(run.code, 0, "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines,
        [
            format!(
                "{}: ok: registry file: 3 services, 7 endpoints, 1 route, 2 policies",
                files[0]
            ),
            format!("{}: ok: TrafficRoute shop/web-api", files[1]),
            format!("{}: ok: TrafficPolicy shop/web-resilience", files[2]),
            format!("{}: ok: ExternalService shop/payments", files[3]),
        ]
    );
    let json = weftctl(&[&["-o", "json"], &args[..]].concat()).json();
    assert_eq!(json["ok"], true);
    assert_eq!(json["problems"].as_array().unwrap().len(), 0);
    assert_eq!(json["files"][0]["registry"]["services"], 3);
}

#[test]
fn a_bad_registry_file_exits_1_with_the_servers_lines() {
    let dir = Scratch::new("validate-bad");
    let bad = dir.write(
        "bad.yaml",
        "\
services:
  - name: web
    endpoints:
      - {address: 10.0.0.1, port: 0}
      - {address: 10.0.0.1, port: 0}
  - name: \"bad name!\"
    endpoints: []
routes:
  - name: r
    service: web
    rules:
      - backends: [{service: web, weight: 0}]
",
    );
    let run = weftctl(&["validate", bad.to_str().unwrap()]);
    assert_eq!(run.code, 1, "{run:?}");
    let mine = weftctl_problems(&run.stdout);
    assert_eq!(mine.len(), 5, "{}", run.stdout);
    assert_eq!(mine, server_problems(&[&bad]));
    assert!(
        mine.contains(&format!(
            "{}: services[0].endpoints[0].port: port 0 is not a valid port (use 1-65535)",
            bad.display()
        )),
        "{mine:?}"
    );

    // A decoding error (with its line and column) reads the same too.
    let undecodable = dir.write(
        "undecodable.yaml",
        "services:\n  - name: web\n    endpoints: [{address: 10.0.0.1, port: 80}]\n    \
         protocol: carrier-pigeon\n",
    );
    let run = weftctl(&["validate", undecodable.to_str().unwrap()]);
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        weftctl_problems(&run.stdout),
        server_problems(&[&undecodable])
    );

    let json = weftctl(&["-o", "json", "validate", bad.to_str().unwrap()]);
    assert_eq!(json.code, 1);
    let doc = json.json();
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["problems"][0]["field"], "services[0].endpoints[0].port");
    assert_eq!(doc["problems"][0]["file"], bad.display().to_string());
}

#[test]
fn registry_files_are_validated_as_one_set() {
    let dir = Scratch::new("validate-set");
    let a = dir.write(
        "a.yaml",
        "services: [{name: web, endpoints: [{address: 10.0.0.1, port: 80}]}]\n",
    );
    let b = dir.write(
        "b.yaml",
        "services: [{name: web, endpoints: [{address: 10.0.0.2, port: 80}]}]\n",
    );
    for f in [&a, &b] {
        assert_eq!(weftctl(&["validate", f.to_str().unwrap()]).code, 0);
    }
    let run = weftctl(&["validate", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert_eq!(run.code, 1, "{run:?}");
    let mine = weftctl_problems(&run.stdout);
    assert_eq!(mine, server_problems(&[&a, &b]));
    assert!(
        mine[0].contains("service `web` is also defined in"),
        "{mine:?}"
    );
}

#[test]
fn bad_crd_yaml_exits_1_naming_object_and_field() {
    let dir = Scratch::new("validate-crd");
    let crds = dir.write(
        "crds.yaml",
        "\
apiVersion: mesh.weft.dev/v1alpha1
kind: TrafficRoute
metadata: {name: web-api}
spec:
  service: web
  rules:
    - backends: [{service: web, weight: 0}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec: {}
---
apiVersion: mesh.weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: p, namespace: shop}
spec: {service: web.shop, lb: fastest}
",
    );
    let file = crds.display().to_string();
    let run = weftctl(&["validate", &file]);
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        weftctl_problems(&run.stdout),
        [
            format!(
                "{file}: document 1: TrafficRoute default/web-api: spec.rules[0].backends[0].weight: \
                 weight 0 is out of range 1..=100000"
            ),
            format!(
                "{file}: document 3: TrafficPolicy shop/p: spec.lb: unknown variant `fastest`, \
                 expected one of `round_robin`, `weighted_round_robin`, `random`, \
                 `least_request`, `peak_ewma`, `ring_hash`, `maglev`"
            ),
        ]
    );
    // The namespace of objects that name none is --namespace's.
    let run = weftctl(&["validate", "-n", "shop", &file]);
    assert!(
        run.stdout.contains("TrafficRoute shop/web-api: "),
        "{}",
        run.stdout
    );
    let doc = weftctl(&["-o", "json", "validate", &file]).json();
    assert_eq!(doc["files"][0]["kind"], "crd");
    assert_eq!(doc["files"][0]["skipped"][0], "apps/v1 Deployment web");
    assert_eq!(doc["problems"][1]["object"], "TrafficPolicy shop/p");
    assert_eq!(doc["problems"][1]["field"], "spec.lb");
}

#[test]
fn an_unreadable_file_is_a_problem() {
    let run = weftctl(&["validate", "/nonexistent/registry.yaml"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        run.stdout,
        "/nonexistent/registry.yaml: cannot read registry file: No such file or directory (os \
         error 2)\ninvalid: 1 problem in 1 of 1 file\n"
    );
}
