#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The stand-in's own semantics: blocking queries, TTL expiry, reaping, KV, tokens.

use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use weft_consul_standin::{ConsulStandIn, StandInOptions};

struct Reply {
    status: u16,
    index: Option<u64>,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

async fn call(method: &str, url: &str, body: &str, token: Option<&str>) -> Reply {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = hyper::Request::builder().method(method).uri(url);
    if let Some(t) = token {
        req = req.header("X-Consul-Token", t);
    }
    let resp = client
        .request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let index = resp
        .headers()
        .get("X-Consul-Index")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        index,
        body,
    }
}

async fn get(url: &str) -> Reply {
    call("GET", url, "", None).await
}

async fn put(url: &str, body: &str) -> Reply {
    call("PUT", url, body, None).await
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn register_and_health_view() {
    let c = ConsulStandIn::start().await.unwrap();
    let r = put(
        &format!("{}/v1/agent/service/register", c.url()),
        &json!({"ID": "web-1", "Name": "web", "Tags": ["grpc"], "Address": "10.0.0.1", "Port": 8080,
                "Meta": {"zone": "a"}, "Weights": {"Passing": 7, "Warning": 1},
                "Check": {"TTL": "30s"}})
        .to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // TTL checks start critical, named service:<id>.
    assert_eq!(c.agent_checks()["service:web-1"]["Status"], "critical");
    assert_eq!(c.agent_services()["web-1"]["Port"], 8080);

    let services = get(&format!("{}/v1/catalog/services", c.url())).await;
    assert_eq!(services.json()["web"], json!(["grpc"]));
    assert!(services.json().get("consul").is_some());

    let h = get(&format!("{}/v1/health/service/web", c.url())).await;
    let v = h.json();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["Service"]["Address"], "10.0.0.1");
    assert_eq!(v[0]["Service"]["Weights"]["Passing"], 7);
    assert_eq!(v[0]["Node"]["Address"], "127.0.0.1");
    let ids: Vec<_> = v[0]["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["CheckID"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, vec!["serfHealth", "service:web-1"]);
    let passing = get(&format!("{}/v1/health/service/web?passing", c.url())).await;
    assert_eq!(passing.json(), json!([]));

    put(
        &format!("{}/v1/agent/check/pass/service:web-1", c.url()),
        "",
    )
    .await;
    let passing = get(&format!("{}/v1/health/service/web?passing=true", c.url())).await;
    assert_eq!(passing.json().as_array().unwrap().len(), 1);

    // Several checks are named service:<id>:<n>; HTTP checks need an interval.
    let r = put(
        &format!("{}/v1/agent/service/register", c.url()),
        &json!({"ID": "api-1", "Name": "api", "Port": 1,
                "Checks": [{"HTTP": "http://127.0.0.1:1/h", "Interval": "10s", "Status": "passing"}, {"TTL": "5s"}]})
        .to_string(),
    )
    .await;
    assert_eq!(r.status, 200);
    let checks = c.agent_checks();
    assert_eq!(checks["service:api-1:1"]["Status"], "passing");
    assert_eq!(checks["service:api-1:1"]["Type"], "http");
    assert_eq!(checks["service:api-1:2"]["Type"], "ttl");
    let bad = put(
        &format!("{}/v1/agent/service/register", c.url()),
        &json!({"Name": "x", "Check": {"HTTP": "http://x"}}).to_string(),
    )
    .await;
    assert_eq!(bad.status, 400);
    // Only TTL checks take pass/warn/fail.
    let r = put(
        &format!("{}/v1/agent/check/fail/service:api-1:1", c.url()),
        "",
    )
    .await;
    assert_eq!(r.status, 500);
    c.set_check_status("service:api-1:1", "critical");
    assert_eq!(c.agent_checks()["service:api-1:1"]["Status"], "critical");

    let r = put(
        &format!("{}/v1/agent/service/deregister/api-1", c.url()),
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(c.agent_services().get("api-1").is_none());
    assert!(c.agent_checks().get("service:api-1:1").is_none());
    assert!(c.requests("/v1/health/service/web") >= 3);
}

#[tokio::test]
async fn blocking_query_wakes_on_change_and_times_out_otherwise() {
    let c = ConsulStandIn::start().await.unwrap();
    c.register_service(
        &json!({"ID": "a", "Name": "svc", "Check": {"TTL": "60s", "Status": "passing"}}),
    )
    .unwrap();
    let first = get(&format!("{}/v1/health/service/svc", c.url())).await;
    let idx = first.index.unwrap();
    assert!(idx >= 1);

    // Nothing changes: answers after `wait`, same index.
    let t = Instant::now();
    let r = get(&format!(
        "{}/v1/health/service/svc?index={idx}&wait=500ms",
        c.url()
    ))
    .await;
    assert!(
        t.elapsed() >= Duration::from_millis(450),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(r.index, Some(idx));

    // A change wakes it well before `wait`.
    let url = format!("{}/v1/health/service/svc?index={idx}&wait=20s", c.url());
    let waiter = tokio::spawn(async move { get(&url).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished());
    let t = Instant::now();
    c.set_check_status("service:a", "critical");
    let r = waiter.await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(r.index.unwrap() > idx);
    assert_eq!(r.json()[0]["Checks"][1]["Status"], "critical");

    // A TTL pass that changes nothing does not move the index.
    put(&format!("{}/v1/agent/check/pass/service:a", c.url()), "").await;
    let i1 = c.index();
    put(&format!("{}/v1/agent/check/pass/service:a", c.url()), "").await;
    assert_eq!(c.index(), i1);

    // Catalog blocking wakes on registration.
    let cat = get(&format!("{}/v1/catalog/services", c.url())).await;
    let url = format!(
        "{}/v1/catalog/services?index={}&wait=20s",
        c.url(),
        cat.index.unwrap()
    );
    let waiter = tokio::spawn(async move { get(&url).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.register_service(&json!({"Name": "other"})).unwrap();
    let r = waiter.await.unwrap();
    assert!(r.json().get("other").is_some());

    // reset_index: blocked queries return at once with a lower index.
    let h = get(&format!("{}/v1/health/service/svc", c.url())).await;
    let url = format!(
        "{}/v1/health/service/svc?index={}&wait=20s",
        c.url(),
        h.index.unwrap()
    );
    let waiter = tokio::spawn(async move { get(&url).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    c.reset_index(1);
    let r = waiter.await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(r.index.unwrap() < h.index.unwrap());
}

#[tokio::test]
async fn ttl_expiry_and_reaping() {
    let c = ConsulStandIn::start().await.unwrap();
    c.register_service(
        &json!({"ID": "t", "Name": "ttl", "Check": {"TTL": "300ms", "Status": "passing"}}),
    )
    .unwrap();
    assert_eq!(c.agent_checks()["service:t"]["Status"], "passing");
    eventually("TTL expiry", || {
        c.agent_checks()["service:t"]["Status"] == "critical"
    })
    .await;
    assert_eq!(c.agent_checks()["service:t"]["Output"], "TTL expired");

    c.register_service(&json!({"ID": "r", "Name": "reap",
        "Check": {"HTTP": "http://127.0.0.1:1/", "Interval": "10s", "Status": "passing", "DeregisterCriticalServiceAfter": "400ms"}})).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        c.agent_services().get("r").is_some(),
        "passing services are not reaped"
    );
    c.set_check_status("service:r", "critical");
    let t = Instant::now();
    eventually("reaping", || c.agent_services().get("r").is_none()).await;
    assert!(t.elapsed() >= Duration::from_millis(350));
}

#[tokio::test]
async fn maintenance_checks() {
    let c = ConsulStandIn::start().await.unwrap();
    c.register_service(
        &json!({"ID": "m", "Name": "maint", "Check": {"TTL": "60s", "Status": "passing"}}),
    )
    .unwrap();
    let r = put(
        &format!(
            "{}/v1/agent/service/maintenance/m?enable=true&reason=upgrade",
            c.url()
        ),
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        c.agent_checks()["_service_maintenance:m"]["Status"],
        "critical"
    );
    assert_eq!(
        c.agent_checks()["_service_maintenance:m"]["Notes"],
        "upgrade"
    );
    put(
        &format!("{}/v1/agent/service/maintenance/m?enable=false", c.url()),
        "",
    )
    .await;
    assert!(c.agent_checks().get("_service_maintenance:m").is_none());
    c.set_node_maintenance(true);
    let h = get(&format!("{}/v1/health/service/maint", c.url())).await;
    let ids: Vec<_> = h.json()[0]["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["CheckID"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.contains(&"_node_maintenance".to_string()));
}

#[tokio::test]
async fn kv_recurse_base64_and_blocking() {
    let c = ConsulStandIn::start().await.unwrap();
    let r = put(&format!("{}/v1/kv/weft/routes/a", c.url()), "{\"x\":1}").await;
    assert_eq!(r.json(), json!(true));
    put(&format!("{}/v1/kv/weft/policies/b", c.url()), "pol").await;
    put(&format!("{}/v1/kv/other/c", c.url()), "no").await;
    let r = get(&format!("{}/v1/kv/weft?recurse", c.url())).await;
    let v = r.json();
    let keys: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, vec!["weft/policies/b", "weft/routes/a"]);
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v[1]["Value"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw, b"{\"x\":1}");
    let raw = get(&format!("{}/v1/kv/weft/policies/b?raw", c.url())).await;
    assert_eq!(&raw.body[..], b"pol");
    assert_eq!(get(&format!("{}/v1/kv/missing", c.url())).await.status, 404);

    // Blocking on the prefix wakes on a delete under it, not on writes elsewhere.
    let idx = r.index.unwrap();
    let url = format!("{}/v1/kv/weft?recurse&index={idx}&wait=20s", c.url());
    let waiter = tokio::spawn(async move { get(&url).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.kv_put("other/d", "x");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished());
    let r = call(
        "DELETE",
        &format!("{}/v1/kv/weft/routes/a", c.url()),
        "",
        None,
    )
    .await;
    assert_eq!(r.json(), json!(true));
    let r = waiter.await.unwrap();
    assert!(r.index.unwrap() > idx);
    assert_eq!(r.json().as_array().unwrap().len(), 1);

    // cas=0 only creates.
    let r = put(&format!("{}/v1/kv/weft/policies/b?cas=0", c.url()), "y").await;
    assert_eq!(r.json(), json!(false));
}

#[tokio::test]
async fn token_and_restart_on_same_addr() {
    let opts = StandInOptions {
        token: Some("s3cret".into()),
        ..StandInOptions::default()
    };
    let c = ConsulStandIn::start_with("127.0.0.1:0".parse().unwrap(), opts)
        .await
        .unwrap();
    let r = get(&format!("{}/v1/catalog/services", c.url())).await;
    assert_eq!(r.status, 403);
    let r = call(
        "GET",
        &format!("{}/v1/catalog/services", c.url()),
        "",
        Some("s3cret"),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = call(
        "GET",
        &format!("{}/v1/catalog/services", c.url()),
        "",
        Some("wrong"),
    )
    .await;
    assert_eq!(r.status, 403);

    let addr = c.addr();
    c.register_service(&json!({"Name": "gone"})).unwrap();
    drop(c);
    let c = ConsulStandIn::start_on(addr).await.unwrap();
    assert_eq!(c.addr(), addr);
    let r = get(&format!("{}/v1/catalog/services", c.url())).await;
    assert!(r.json().get("gone").is_none(), "state is lost on restart");
}
