//! The Grafana dashboard the chart ships (charts/weft/dashboards/weft.json) against the real
//! control plane: every metric its queries read must be one the binary exposes, read the way
//! its type allows (counters through rate/increase), with labels its series carry; and every
//! family the binary exposes must be on the dashboard (or in [`NOT_ON_DASHBOARD`]). The
//! `weft_sidecar_*` panels are held against a real sidecar by tests/tests/dashboard_sidecar.rs.
//!
//! prometheus-client prints nothing for a labelled family without series, not even `# TYPE`,
//! so the test makes one of each: a SotW client that ACKs CDS and NACKs EDS (and stays
//! connected, so rejected resources are current), a stream with an unknown type URL, a stream
//! whose node is over `--xds-max-node-bytes`, and one registration. A second control plane,
//! pointed at an etcd, a Consul and a Kubernetes API that are not there, exposes the source
//! metrics: they are registered at startup, connected or not.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;
#[path = "support/dashboard.rs"]
mod dashboard;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cp, EDS, free_port};
use dashboard::{Exposition, Query};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_proto::registry::v1::registration_client::RegistrationClient;
use weft_proto::registry::v1::{Endpoint, RegisterRequest};

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

const REGISTRY: &str = "services:
  - name: web
    protocol: http
    endpoints:
      - {address: 127.0.0.1, port: 18081}
";

/// Families the control plane exposes that the dashboard deliberately leaves out, and why.
/// Adding a metric means adding a panel, or a line here.
const NOT_ON_DASHBOARD: &[(&str, &str)] = &[];

fn is_control_plane(name: &str) -> bool {
    !name.starts_with("weft_sidecar_")
}

fn repo_root() -> &'static Path {
    // control-plane/app -> the repository root.
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn node(id: &str) -> Option<Node> {
    Some(Node {
        id: id.into(),
        cluster: "dashboard".into(),
        user_agent_name: "envoy".into(),
        ..Default::default()
    })
}

/// A SotW ADS client that ACKs every CDS response and NACKs every EDS response, until
/// dropped.
struct Client {
    _tx: mpsc::Sender<DiscoveryRequest>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    async fn open(cp: &Cp) -> Client {
        let (tx, rx) = mpsc::channel(16);
        let mut ads = AggregatedDiscoveryServiceClient::connect(cp.url())
            .await
            .unwrap();
        for (type_url, names) in [(CDS, vec![]), (EDS, vec!["web".to_string()])] {
            tx.send(DiscoveryRequest {
                node: node("dashboard-client"),
                type_url: type_url.into(),
                resource_names: names,
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let mut stream = ads
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let reply = tx.clone();
        let task = tokio::spawn(async move {
            while let Ok(Some(r)) = stream.message().await {
                let mut req = DiscoveryRequest {
                    node: node("dashboard-client"),
                    type_url: r.type_url.clone(),
                    response_nonce: r.nonce.clone(),
                    ..Default::default()
                };
                if r.type_url == EDS {
                    req.resource_names = vec!["web".into()];
                    req.error_detail = Some(RpcStatus {
                        code: 3,
                        message: "rejected by the dashboard test".into(),
                        details: vec![],
                    });
                } else {
                    req.version_info = r.version_info.clone();
                }
                if reply.send(req).await.is_err() {
                    return;
                }
            }
        });
        Client { _tx: tx, task }
    }
}

/// Opens an ADS stream whose first request is `req` and waits (a little) for the server to
/// end it.
async fn doomed_stream(cp: &Cp, req: DiscoveryRequest) {
    let (tx, rx) = mpsc::channel(1);
    tx.send(req).await.unwrap();
    let Ok(mut ads) = AggregatedDiscoveryServiceClient::connect(cp.url()).await else {
        return;
    };
    let attempt = async {
        if let Ok(resp) = ads
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
        {
            let mut s = resp.into_inner();
            while let Ok(Some(_)) = s.message().await {}
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), attempt).await;
}

/// A control plane with etcd, Consul and Kubernetes sources whose servers are not there: it
/// never gets ready, but serves /metrics.
async fn with_absent_sources() -> Cp {
    let dir =
        std::env::temp_dir().join(format!("weft-app-dashboard-sources-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let nowhere = || format!("http://127.0.0.1:{}", free_port());
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: absent\n\
             clusters:\n- name: absent\n  cluster:\n    server: {}\n\
             contexts:\n- name: absent\n  context:\n    cluster: absent\n    user: absent\n\
             users:\n- name: absent\n  user: {{}}\n",
            nowhere()
        ),
    )
    .unwrap();
    let (xds, admin) = (free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_weft-control-plane"))
        .args(["--xds-listen", &format!("127.0.0.1:{xds}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--etcd-endpoints", &nowhere()])
        .args(["--consul-addr", &nowhere()])
        .args(["--kubernetes", "--kube-lease-namespace", "default"])
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAME", "dashboard-test")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("stderr.log")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let cp = Cp {
        child,
        xds,
        admin,
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while cp.get("/healthz").await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "control plane with absent sources never served /healthz: {}",
            cp.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cp
}

async fn metrics(cp: &Cp) -> String {
    let (status, body) = cp.get("/metrics").await;
    assert_eq!(status, 200, "/metrics: {body}");
    body
}

/// Waits until each of `names` has a series: the events above reach the metrics
/// asynchronously (a NACK is counted when the server reads it).
async fn until_series(cp: &Cp, names: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = metrics(cp).await;
        let e = Exposition::parse(&text);
        let missing: Vec<&&str> = names
            .iter()
            .filter(|n| !e.series.contains_key(**n))
            .collect();
        if missing.is_empty() {
            return text;
        }
        if Instant::now() > deadline {
            panic!(
                "these series never appeared, so the test cannot check the dashboard's use of \
                 them: {missing:?}\n/metrics:\n{text}\nlog:\n{}",
                cp.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_reads_what_the_control_plane_exposes() {
    let started = Instant::now();
    let dash = dashboard::load(&dashboard::dashboard_path(repo_root()));
    let mut problems = dashboard::lint(&dash);
    let queries = dashboard::queries(&dash);

    let (cp, sources) = tokio::join!(
        Cp::start(
            "dashboard",
            Some(REGISTRY),
            &["--xds-max-node-bytes", "1024"]
        ),
        with_absent_sources()
    );
    let _client = Client::open(&cp).await;
    RegistrationClient::connect(cp.url())
        .await
        .unwrap()
        .register(RegisterRequest {
            service: "pay".into(),
            instance_id: "pay-1".into(),
            endpoint: Some(Endpoint {
                address: "127.0.0.1".into(),
                port: 7001,
                ..Default::default()
            }),
            ttl_seconds: 30,
            protocol: String::new(),
        })
        .await
        .unwrap();
    doomed_stream(
        &cp,
        DiscoveryRequest {
            node: node("dashboard-bad-type"),
            type_url: "type.googleapis.com/weft.test.NotAType".into(),
            ..Default::default()
        },
    )
    .await;
    doomed_stream(
        &cp,
        DiscoveryRequest {
            node: node(&"n".repeat(2000)),
            type_url: CDS.into(),
            ..Default::default()
        },
    )
    .await;
    let text = until_series(
        &cp,
        &[
            "weft_xds_streams",
            "weft_xds_streams_opened_total",
            "weft_xds_subscribed_streams",
            "weft_xds_pushes_total",
            "weft_xds_acks_total",
            "weft_xds_nacks_total",
            "weft_xds_stream_errors_total",
            "weft_xds_streams_refused_total",
            "weft_xds_rejected_resources",
            "weft_xds_resource_rejections_total",
        ],
    )
    .await;
    let mut exposed = Exposition::parse(&text);
    exposed.merge(&metrics(&sources).await);

    let report = dashboard::check(&queries, &exposed, "the control plane", &is_control_plane);
    problems.extend(report.problems.iter().cloned());
    for (family, kind) in &exposed.families {
        if !is_control_plane(family) || report.used_families.contains(family) {
            continue;
        }
        if NOT_ON_DASHBOARD.iter().any(|(f, _)| f == family) {
            continue;
        }
        problems.push(format!(
            "the control plane exposes the {kind} `{family}`, but no dashboard panel reads it: \
             add a panel to charts/weft/dashboards/weft.json, or list it in NOT_ON_DASHBOARD \
             with the reason"
        ));
    }
    eprintln!(
        "dashboard: {} queries, {} control plane metric names checked against {} exposed \
         families, in {:?}",
        queries.len(),
        report.checked.len(),
        exposed.families.len(),
        started.elapsed()
    );
    assert!(
        problems.is_empty(),
        "the dashboard does not match the control plane:\n  {}",
        problems.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------
// The checker itself: it must find what it is there to find.

fn q(expr: &str, legend: &str) -> Query {
    Query {
        place: "test".into(),
        expr: expr.into(),
        legend: Some(legend.into()),
        reads_labels: Vec::new(),
        labels_only: false,
    }
}

#[test]
fn analyse_finds_metrics_labels_functions_and_variables() {
    let a = dashboard::analyse(
        r#"histogram_quantile(0.99, sum by (le, service) (rate(weft_x_seconds_bucket{job=~"$job", code=~"5.."}[$__rate_interval])))
           / on (service) group_left count(label_replace(weft_g{a="b"}, "type", "$1", "type_url", ".*[.](\\w+)$") > 0) or vector(0)"#,
    )
    .unwrap();
    let names: Vec<(&str, Option<&str>, Option<&str>)> = a
        .selectors
        .iter()
        .map(|s| (s.name.as_str(), s.function.as_deref(), s.range.as_deref()))
        .collect();
    assert_eq!(
        names,
        [
            (
                "weft_x_seconds_bucket",
                Some("rate"),
                Some("$__rate_interval")
            ),
            ("weft_g", Some("label_replace"), None),
        ]
    );
    let labels: Vec<&str> = a.selectors[0]
        .matchers
        .iter()
        .map(|m| m.label.as_str())
        .collect();
    assert_eq!(labels, ["job", "code"]);
    assert_eq!(a.grouping, ["le", "service", "service"]);
    assert_eq!(a.created, ["type"]);
    assert_eq!(a.variables, ["job", "__rate_interval"]);
    assert!(a.aggregates);
    assert!(dashboard::analyse("sum(rate(x[5m])").is_err());
    assert!(dashboard::analyse("{job=\"a\"}").is_err());
}

#[test]
fn check_reports_wrong_names_types_and_labels() {
    let exposed = Exposition::parse(
        "# TYPE weft_c counter\nweft_c_total{kind=\"a\"} 1\n\
         # TYPE weft_g gauge\nweft_g{service=\"s\"} 1\n\
         # TYPE weft_h histogram\nweft_h_bucket{le=\"1\"} 0\nweft_h_sum 0\nweft_h_count 0\n# EOF\n",
    );
    let all = |_: &str| true;
    let good = [
        q(
            "sum by (kind) (rate(weft_c_total[$__rate_interval]))",
            "{{kind}}",
        ),
        q("sum by (service) (weft_g)", "{{service}}"),
        q("weft_g", "{{service}} {{instance}}"),
        q(
            "histogram_quantile(0.5, sum by (le) (rate(weft_h_bucket[$__rate_interval])))",
            "p50",
        ),
        q("sum(up{job=~\"$job\"})", ""),
    ];
    let r = dashboard::check(&good, &exposed, "it", &all);
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(
        r.used_families.iter().collect::<Vec<_>>(),
        ["weft_c", "weft_g", "weft_h"]
    );
    let bad = [
        (
            "rate(weft_c[$__rate_interval])",
            "",
            "does not expose `weft_c`",
        ),
        ("weft_c_total", "", "read it with rate()"),
        ("rate(weft_g[$__rate_interval])", "", "means nothing"),
        ("rate(weft_c_total[5m])", "", "range `[5m]`"),
        (
            "rate(weft_c_total{service=\"x\"}[$__rate_interval])",
            "",
            "no label `service`",
        ),
        ("sum by (nope) (weft_g)", "", "groups by `nope`"),
        ("sum(weft_g)", "{{service}}", "legend names `{{service}}`"),
        ("weft_h_sum", "", "read it with rate()"),
        ("weft_missing", "", "does not expose `weft_missing`"),
    ];
    for (expr, legend, want) in bad {
        let r = dashboard::check(&[q(expr, legend)], &exposed, "it", &all);
        assert!(
            r.problems.iter().any(|p| p.contains(want)),
            "`{expr}`: expected a problem containing {want:?}, got {:?}",
            r.problems
        );
    }
}
