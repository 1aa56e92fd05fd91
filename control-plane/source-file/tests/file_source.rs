//! The file source against real files in a private temp directory and a real hub.

// Test helpers outside `#[test]` fns panic on setup failure on purpose: that is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use weft_registry::{Hub, SourceStatus};
use weft_source_file::{FileSource, FileSourceError};

/// A directory of its own under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "weft-source-file-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const ECHO: &str = "
services:
  - name: echo
    protocol: grpc
    endpoints:
      - {address: 127.0.0.1, port: 50051}
      - {address: 127.0.0.1, port: 50052, weight: 3}
routes:
  - name: echo-route
    service: echo
    rules: [{match: {path_prefix: /}}]
";

const WEB: &str = "
services:
  - name: web
    endpoints: [{address: 10.0.0.1, port: 8080}]
policies:
  - {name: web-lb, service: web, lb: least_request}
";

fn ports(hub: &Hub, service: &str) -> Vec<u16> {
    hub.current()
        .registry
        .services
        .get(service)
        .map(|s| s.instances.iter().map(|i| i.endpoint.port).collect())
        .unwrap_or_default()
}

fn file_status(hub: &Hub) -> SourceStatus {
    hub.sources()
        .into_iter()
        .find(|s| s.name == "file")
        .unwrap()
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn metrics_text(src: &FileSource) -> impl Fn() -> String + use<> {
    let mut reg = prometheus_client::registry::Registry::default();
    src.register_metrics(&mut reg);
    move || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        text
    }
}

/// Starts polling every 20ms; dropping the sender stops it.
fn spawn_run(src: FileSource) -> oneshot::Sender<()> {
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(src.run(Duration::from_millis(20), async {
        let _ = stopped.await;
    }));
    stop
}

fn load(paths: Vec<PathBuf>) -> (Arc<Hub>, Result<FileSource, FileSourceError>) {
    let hub = Hub::new();
    let src = FileSource::load(paths, hub.add_source("file"));
    (hub, src)
}

#[test]
fn load_valid_files_fills_the_hub() {
    let dir = TempDir::new();
    let a = dir.write("echo.yaml", ECHO);
    let b = dir.write("web.yaml", WEB);
    let (hub, src) = load(vec![a, b]);
    src.unwrap();
    assert!(hub.is_ready());
    let reg = hub.current().registry;
    assert_eq!(reg.services["echo"].protocol, weft_registry::Protocol::Grpc);
    assert_eq!(ports(&hub, "echo"), vec![50051, 50052]);
    assert_eq!(reg.services["echo"].instances[1].endpoint.weight, 3);
    assert_eq!(reg.services["echo"].instances[0].source, "file");
    assert_eq!(reg.services["echo"].instances[0].id, "127.0.0.1:50051");
    assert_eq!(ports(&hub, "web"), vec![8080]);
    assert!(reg.routes.contains_key("echo-route"));
    assert!(reg.policies.contains_key("web-lb"));
}

/// Loads one file with `text` and returns the error's Display text, which must name the file.
fn load_error(text: &str) -> String {
    let dir = TempDir::new();
    let p = dir.write("bad.yaml", text);
    let (hub, res) = load(vec![p.clone()]);
    let e = match res {
        Ok(_) => panic!("expected {text:?} to be rejected"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains(&p.display().to_string()), "file not named: {e}");
    // A refused load emits nothing, so the source never becomes synced.
    assert!(!hub.is_ready());
    e
}

fn assert_names(e: &str, field: &str, reason: &str) {
    assert!(e.contains(field), "field {field:?} not named: {e}");
    assert!(e.contains(reason), "reason {reason:?} not given: {e}");
}

#[test]
fn yaml_syntax_error() {
    let e = load_error("services: [\n  - name: x\n");
    assert_names(&e, "bad.yaml: services: ", "line 2 column 3");
}

#[test]
fn port_zero() {
    let e = load_error("services: [{name: a, endpoints: [{address: 127.0.0.1, port: 0}]}]");
    assert_names(
        &e,
        "services[0].endpoints[0].port",
        "port 0 is not a valid port",
    );
}

#[test]
fn port_70000() {
    let e = load_error("services: [{name: a, endpoints: [{address: 127.0.0.1, port: 70000}]}]");
    assert_names(&e, "services[0].endpoints[0].port", "70000");
}

#[test]
fn negative_weight() {
    let e =
        load_error("services: [{name: a, endpoints: [{address: 127.0.0.1, port: 1, weight: -1}]}]");
    assert_names(&e, "services[0].endpoints[0].weight", "-1");
}

#[test]
fn duplicate_endpoint() {
    let e = load_error(
        "services: [{name: a, endpoints: [{address: 127.0.0.1, port: 1}, {address: 127.0.0.1, port: 1}]}]",
    );
    assert_names(
        &e,
        "services[0].endpoints[1]",
        "duplicate endpoint 127.0.0.1:1",
    );
}

#[test]
fn unknown_lb_algorithm() {
    let e = load_error("policies: [{name: p, service: a, lb: fastest}]");
    assert_names(&e, "policies[0].lb", "unknown variant `fastest`");
}

#[test]
fn unknown_field() {
    let e =
        load_error("services: [{name: a, endpoints: [{address: 127.0.0.1, port: 1, wieght: 3}]}]");
    assert_names(&e, "services[0].endpoints[0]", "unknown field `wieght`");
}

#[test]
fn errors_of_every_file_are_reported() {
    let dir = TempDir::new();
    let a = dir.write(
        "a.yaml",
        "services: [{name: a, endpoints: [{address: x, port: 1}]}]",
    );
    let b = dir.write(
        "b.yaml",
        "services: [{name: b, endpoints: [{address: 10.0.0.1, port: 0}]}]",
    );
    let e = load(vec![a.clone(), b.clone()]).1.unwrap_err();
    let by_file = e.by_file();
    assert_eq!(by_file.len(), 2, "{e}");
    assert!(by_file[&a.display().to_string()].contains("services[0].endpoints[0].address"));
    assert!(by_file[&b.display().to_string()].contains("services[0].endpoints[0].port"));
}

#[test]
fn same_name_in_two_files_names_both_files() {
    let dir = TempDir::new();
    let a = dir.write("a.yaml", ECHO);
    let b = dir.write(
        "b.yaml",
        "services: [{name: other}, {name: echo, endpoints: [{address: 10.0.0.9, port: 1}]}]",
    );
    let e = load(vec![a.clone(), b.clone()]).1.unwrap_err();
    assert!(matches!(e, FileSourceError::Conflict { .. }), "{e:?}");
    let e = e.to_string();
    assert!(
        e.starts_with(&format!(
            "{}: services[1].name: service `echo`",
            b.display()
        )),
        "{e}"
    );
    assert!(
        e.contains(&format!("{} (services[0].name)", a.display())),
        "{e}"
    );

    let c = dir.write("c.yaml", "policies: [{name: other, service: web}]");
    let d = dir.write("d.yaml", WEB);
    let e = load(vec![c, d]).1.unwrap_err().to_string();
    assert!(
        e.contains("policies[0].service: a policy for service `web`"),
        "{e}"
    );

    let f = dir.write(
        "f.yaml",
        "routes: [{name: echo-route, service: x, rules: [{}]}]",
    );
    let e = load(vec![a, f]).1.unwrap_err().to_string();
    assert!(e.contains("routes[0].name: route `echo-route`"), "{e}");
}

#[test]
fn the_same_path_twice_is_one_file() {
    let dir = TempDir::new();
    let a = dir.write("a.yaml", ECHO);
    let (hub, res) = load(vec![a.clone(), a]);
    res.unwrap();
    assert_eq!(ports(&hub, "echo"), vec![50051, 50052]);
}

#[test]
fn missing_file_is_a_read_error_naming_it() {
    let dir = TempDir::new();
    let p = dir.0.join("absent.yaml");
    let e = load(vec![p.clone()]).1.unwrap_err();
    assert!(matches!(e, FileSourceError::Read { .. }), "{e:?}");
    assert!(
        e.to_string()
            .starts_with(&format!("{}: cannot read", p.display())),
        "{e}"
    );
}

#[tokio::test]
async fn hot_reload_applies_valid_changes_and_keeps_the_last_good_config() {
    let dir = TempDir::new();
    let path = dir.write("echo.yaml", ECHO);
    let (hub, src) = load(vec![path.clone()]);
    let src = src.unwrap();
    let metrics = metrics_text(&src);
    let _stop = spawn_run(src);

    // A valid change is applied.
    std::fs::write(
        &path,
        "services: [{name: echo, endpoints: [{address: 127.0.0.1, port: 6000}]}]",
    )
    .unwrap();
    wait_until("port 6000", || ports(&hub, "echo") == vec![6000]).await;
    assert!(!hub.current().registry.routes.contains_key("echo-route"));

    // An invalid one changes nothing, but shows up in the source status and metrics.
    let generation = hub.current().generation;
    std::fs::write(
        &path,
        "services: [{name: echo, endpoints: [{address: 127.0.0.1, port: 0}]}]",
    )
    .unwrap();
    let key = path.display().to_string();
    wait_until("error in source status", || {
        file_status(&hub).errors.contains_key(&key)
    })
    .await;
    let reason = &file_status(&hub).errors[&key];
    assert!(
        reason.contains("services[0].endpoints[0].port: port 0"),
        "{reason}"
    );
    assert_eq!(hub.current().generation, generation);
    assert_eq!(ports(&hub, "echo"), vec![6000]);
    let text = metrics();
    assert!(text.contains("weft_file_reload_errors_total 1"), "{text}");
    assert!(text.contains("weft_file_last_reload_success 0"), "{text}");

    // Fixing it applies the fix and clears the error.
    std::fs::write(
        &path,
        "services: [{name: echo, endpoints: [{address: 127.0.0.1, port: 7000}]}]",
    )
    .unwrap();
    wait_until("port 7000", || ports(&hub, "echo") == vec![7000]).await;
    wait_until("errors cleared", || file_status(&hub).errors.is_empty()).await;
    let text = metrics();
    assert!(text.contains("weft_file_reloads_total 3"), "{text}");
    assert!(text.contains("weft_file_reload_errors_total 1"), "{text}");
    assert!(text.contains("weft_file_last_reload_success 1"), "{text}");
}

#[tokio::test]
async fn unchanged_content_is_not_reloaded() {
    let dir = TempDir::new();
    let path = dir.write("echo.yaml", ECHO);
    let other = dir.write("web.yaml", WEB);
    let (hub, src) = load(vec![path.clone(), other.clone()]);
    let src = src.unwrap();
    let metrics = metrics_text(&src);
    let _stop = spawn_run(src);

    // Rewriting identical content must not count as a reload; a change to the second file
    // afterwards proves the poller was running all along.
    std::fs::write(&path, ECHO).unwrap();
    std::fs::write(&other, WEB.replace("8080", "8081")).unwrap();
    wait_until("port 8081", || ports(&hub, "web") == vec![8081]).await;
    let text = metrics();
    assert!(text.contains("weft_file_reloads_total 1"), "{text}");
}

#[tokio::test]
async fn file_replaced_by_rename_is_picked_up() {
    let dir = TempDir::new();
    let path = dir.write("echo.yaml", ECHO);
    let (hub, src) = load(vec![path.clone()]);
    let _stop = spawn_run(src.unwrap());

    // What editors and config-management tools do: write a sibling, rename it over the file.
    let tmp = dir.write(
        ".echo.yaml.tmp",
        "services: [{name: echo, endpoints: [{address: 127.0.0.1, port: 9000}]}]",
    );
    std::fs::rename(&tmp, &path).unwrap();
    wait_until("port 9000", || ports(&hub, "echo") == vec![9000]).await;
}

#[cfg(unix)]
#[tokio::test]
async fn configmap_symlink_swap_is_picked_up() {
    use std::os::unix::fs::symlink;

    // The kubelet's layout: `echo.yaml -> ..data/echo.yaml`, `..data -> ..<timestamp>`; an update
    // writes a new timestamped directory and renames a new `..data` link over the old one.
    let dir = TempDir::new();
    let v1 = dir.0.join("..v1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(v1.join("echo.yaml"), ECHO).unwrap();
    symlink("..v1", dir.0.join("..data")).unwrap();
    let path = dir.0.join("echo.yaml");
    symlink(Path::new("..data").join("echo.yaml"), &path).unwrap();

    let (hub, src) = load(vec![path]);
    let _stop = spawn_run(src.unwrap());
    assert_eq!(ports(&hub, "echo"), vec![50051, 50052]);

    let v2 = dir.0.join("..v2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(
        v2.join("echo.yaml"),
        "services: [{name: echo, endpoints: [{address: 127.0.0.1, port: 9100}]}]",
    )
    .unwrap();
    symlink("..v2", dir.0.join("..data_tmp")).unwrap();
    std::fs::rename(dir.0.join("..data_tmp"), dir.0.join("..data")).unwrap();
    wait_until("port 9100", || ports(&hub, "echo") == vec![9100]).await;
}
