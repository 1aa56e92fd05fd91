//! weftctl against the real control plane: proxies (tonic ADS clients standing in for Envoy)
//! show as SYNCED, a NACK turns the type NACKED with the proxy's reason, registered and file
//! instances are listed, and what does not exist exits 1 with the server's message.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use common::{CDS, Cp, DeltaProxy, EDS, LDS, RDS, SotwProxy};
use weft_proto::registry::v1::registration_client::RegistrationClient;
use weft_proto::registry::v1::{Endpoint, RegisterRequest};

const REGISTRY: &str = "\
services:
  - name: web
    protocol: http
    endpoints:
      - {address: 127.0.0.1, port: 18081, zone: z1}
      - {address: 127.0.0.1, port: 18082, zone: z2, weight: 3}
";

const REGISTRY_MORE: &str = "\
services:
  - name: web
    protocol: http
    endpoints:
      - {address: 127.0.0.1, port: 18081, zone: z1}
      - {address: 127.0.0.1, port: 18082, zone: z2, weight: 3}
      - {address: 127.0.0.1, port: 18083, zone: z2}
";

const REASON: &str = "Error adding/updating cluster load assignment web: rejected by the e2e test";

/// The `status` table row of `node`.
fn row<'a>(table: &'a str, node: &str) -> Option<&'a str> {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(node))
}

#[tokio::test]
async fn status_and_config_follow_proxies_from_synced_to_nacked() {
    let cp = Cp::start("status", REGISTRY).await;
    let mut proxy = SotwProxy::connect(&cp, "proxy-e2e").await;
    proxy.subscribe(CDS, &[]).await;
    proxy.subscribe(EDS, &["web"]).await;
    proxy.subscribe(LDS, &[]).await;
    proxy.subscribe(RDS, &["weft_http"]).await;
    // A Delta stream that asked for clusters only: the other types show as `-`.
    let _delta = DeltaProxy::connect(&cp, "delta-e2e", CDS).await;

    let run = cp
        .weftctl_until(&["status"], "both proxies SYNCED", |r| {
            r.code == 0
                && row(&r.stdout, "proxy-e2e").is_some_and(|l| l.matches("SYNCED").count() == 4)
                && row(&r.stdout, "delta-e2e").is_some_and(|l| l.contains("SYNCED"))
        })
        .await;
    let sotw = row(&run.stdout, "proxy-e2e").unwrap();
    assert!(
        sotw.contains("SotW ADS") && sotw.contains("envoy"),
        "{sotw}"
    );
    let delta: Vec<&str> = row(&run.stdout, "delta-e2e")
        .unwrap()
        .split_whitespace()
        .collect();
    // NODE STREAM Delta ADS FLAVOUR, CDS as `SYNCED <version> <age>`, then `-` three times.
    assert_eq!(&delta[2..4], ["Delta", "ADS"], "{delta:?}");
    assert_eq!(delta[5], "SYNCED", "{delta:?}");
    assert_eq!(&delta[8..], ["-", "-", "-"], "{delta:?}");
    assert!(
        run.stdout.contains("No resource is rejected."),
        "{}",
        run.stdout
    );
    let json = cp.weftctl(&["-o", "json", "status"]);
    assert_eq!(json.code, 0, "{json:?}");
    let clients = json.json()["clients"].as_array().unwrap().clone();
    assert_eq!(clients.len(), 2, "{clients:?}");

    let config = cp.weftctl(&["config", "proxy-e2e"]);
    assert_eq!(config.code, 0, "{config:?}");
    let web_eds = config
        .stdout
        .lines()
        .find(|l| l.starts_with("EDS") && l.split_whitespace().nth(1) == Some("web"))
        .unwrap_or_else(|| panic!("no EDS web row: {}", config.stdout));
    assert!(web_eds.contains("SYNCED"), "{web_eds}");

    // A registry edit reaches the proxy, which rejects it.
    cp.write_registry(REGISTRY_MORE);
    let r = proxy.next_of(EDS).await;
    proxy.nack(&r, REASON).await;
    let run = cp
        .weftctl_until(&["status"], "EDS NACKED", |r| {
            row(&r.stdout, "proxy-e2e").is_some_and(|l| l.contains("NACKED"))
        })
        .await;
    let cells: Vec<&str> = row(&run.stdout, "proxy-e2e")
        .unwrap()
        .split_whitespace()
        .collect();
    // NODE STREAM SotW ADS envoy | CDS: 3 words | EDS: NACKED ...
    assert_eq!(cells[8], "NACKED", "{cells:?}");
    let rejected = run
        .stdout
        .split_once("Rejected resources:\n")
        .map(|(_, t)| t)
        .unwrap_or_else(|| panic!("no rejected resources: {}", run.stdout));
    let line = rejected
        .lines()
        .find(|l| l.starts_with("proxy-e2e"))
        .unwrap_or_else(|| panic!("{rejected}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!((words[2], words[3]), ("EDS", "web"), "{line}");
    assert!(line.ends_with(REASON), "{line}");

    let config = cp.weftctl(&["config", "proxy-e2e", "--type", "eds"]);
    assert_eq!(config.code, 0, "{config:?}");
    assert!(!config.stdout.contains("\nCDS"), "{}", config.stdout);
    let web_eds = config
        .stdout
        .lines()
        .find(|l| l.starts_with("EDS") && l.split_whitespace().nth(1) == Some("web"))
        .unwrap_or_else(|| panic!("no EDS web row: {}", config.stdout));
    assert!(
        web_eds.contains("NACKED") && web_eds.ends_with(REASON),
        "{web_eds}"
    );
    let json = cp.weftctl(&["-o", "json", "config", "proxy-e2e", "-t", "eds"]);
    let doc = json.json();
    let types = doc["streams"][0]["types"].as_object().unwrap();
    assert_eq!(types.keys().collect::<Vec<_>>(), [EDS], "{doc}");
    assert_eq!(types[EDS]["resources"][0]["rejected"]["reason"], REASON);

    let unknown = cp.weftctl(&["config", "no-such-node"]);
    assert_eq!(unknown.code, 1, "{unknown:?}");
    assert_eq!(
        unknown.stderr,
        "weftctl: no connected xDS client has node id `no-such-node` (see /debug/clients)\n"
    );
}

#[tokio::test]
async fn endpoints_lists_file_and_registered_instances() {
    let cp = Cp::start("endpoints", REGISTRY).await;
    let mut reg = RegistrationClient::connect(cp.xds_url()).await.unwrap();
    reg.register(RegisterRequest {
        service: "pay".into(),
        instance_id: "pay-1".into(),
        endpoint: Some(Endpoint {
            address: "127.0.0.1".into(),
            port: 7001,
            zone: "z9".into(),
            metadata: [("version".to_string(), "v2".to_string())].into(),
            ..Default::default()
        }),
        ttl_seconds: 60,
        protocol: "grpc".into(),
    })
    .await
    .unwrap();

    let all = cp
        .weftctl_until(&["endpoints"], "pay registered", |r| {
            r.stdout.lines().any(|l| l.starts_with("pay "))
        })
        .await;
    assert_eq!(all.code, 0, "{all:?}");
    let rows: Vec<Vec<&str>> = all
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            vec!["SERVICE", "PROTOCOL", "INSTANCES", "HEALTHY", "SOURCES"],
            vec!["pay", "grpc", "1", "1", "registration"],
            vec!["web", "http", "2", "2", "file"],
        ],
        "{}",
        all.stdout
    );

    let pay = cp.weftctl(&["endpoints", "pay"]);
    assert_eq!(pay.code, 0, "{pay:?}");
    let line = pay
        .stdout
        .lines()
        .find(|l| l.starts_with("127.0.0.1:7001"))
        .unwrap_or_else(|| panic!("{}", pay.stdout));
    assert_eq!(
        line.split_whitespace().collect::<Vec<_>>(),
        [
            "127.0.0.1:7001",
            "1",
            "z9",
            "healthy",
            "registration",
            "pay-1",
            "version=v2"
        ]
    );
    let web = cp.weftctl(&["endpoints", "web"]);
    assert!(
        web.stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == [
                    "127.0.0.1:18082",
                    "3",
                    "z2",
                    "healthy",
                    "file",
                    "127.0.0.1:18082",
                    "-"
                ]),
        "{}",
        web.stdout
    );
    let json = cp.weftctl(&["-o", "json", "endpoints", "web"]).json();
    assert_eq!(
        json["services"][0]["instances"].as_array().unwrap().len(),
        2
    );

    let unknown = cp.weftctl(&["endpoints", "nope"]);
    assert_eq!(unknown.code, 1, "{unknown:?}");
    assert_eq!(
        unknown.stderr,
        "weftctl: no service `nope` in the registry (see /debug/endpoints for every service)\n"
    );
}
