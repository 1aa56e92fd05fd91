#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The generator: file names, header, write-then-check, and the binary's `--check` exit
//! status.

use std::path::PathBuf;
use std::process::Command;

use weft_crds::generate::{HEADER, check, render_all, write_all};

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("weft-crds-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn files_have_the_header_and_their_crd_names() {
    let files = render_all().unwrap();
    let names: Vec<&str> = files.iter().map(|f| f.file_name.as_str()).collect();
    assert_eq!(
        names,
        [
            "trafficroutes.mesh.weft.dev.yaml",
            "trafficpolicies.mesh.weft.dev.yaml",
            "externalservices.mesh.weft.dev.yaml",
        ]
    );
    for f in &files {
        assert!(f.content.starts_with(HEADER), "{}", f.file_name);
        let doc: serde_json::Value = serde_yaml_ng::from_str(&f.content).unwrap();
        assert_eq!(doc["kind"], "CustomResourceDefinition");
        assert_eq!(
            format!("{}.yaml", doc["metadata"]["name"].as_str().unwrap()),
            f.file_name
        );
    }
}

#[test]
fn write_then_check_then_detect_drift() {
    let dir = temp_dir("lib");
    assert_eq!(check(&dir).unwrap().len(), 3, "missing files are stale");
    assert_eq!(write_all(&dir).unwrap().len(), 3);
    assert!(check(&dir).unwrap().is_empty());
    assert!(
        write_all(&dir).unwrap().is_empty(),
        "identical files are left alone"
    );
    let f = dir.join("trafficpolicies.mesh.weft.dev.yaml");
    std::fs::write(&f, "# edited by hand\n").unwrap();
    assert_eq!(check(&dir).unwrap(), vec![f]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn binary_check_exits_1_naming_stale_files() {
    let bin = env!("CARGO_BIN_EXE_weft-crds");
    let dir = temp_dir("bin");
    let out = Command::new(bin).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let ok = Command::new(bin).arg("--check").arg(&dir).output().unwrap();
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");

    let f = dir.join("externalservices.mesh.weft.dev.yaml");
    std::fs::write(&f, "stale\n").unwrap();
    let stale = Command::new(bin).arg("--check").arg(&dir).output().unwrap();
    assert_eq!(stale.status.code(), Some(1), "{stale:?}");
    let err = String::from_utf8(stale.stderr).unwrap();
    assert!(err.contains(&f.display().to_string()), "{err}");
    assert!(err.contains("make crds"), "{err}");
    assert!(!err.contains("trafficroutes"), "{err}");

    let bad = Command::new(bin).arg("--frobnicate").output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}
