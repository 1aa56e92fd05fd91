//! The Consul backend against the Consul stand-in (weft-consul-standin: agent services and
//! checks, TTL expiry, reaping), and against a recording HTTP server where the exact requests
//! matter (bodies, the token header, answers the stand-in cannot be made to give).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use weft_consul_standin::{ConsulStandIn, StandInOptions};
use weft_sidecar_register::{Backend, ConsulCheck, Health, Instance, Registration, Status};

const ID: &str = "host-1-8080";
const CHECK: &str = "service:host-1-8080";

fn backend(addr: String, deregister_after: Duration) -> Backend {
    Backend::Consul {
        addr,
        token: None,
        datacenter: None,
        ca: None,
        cert: None,
        key: None,
        check: ConsulCheck::Ttl,
        deregister_after: Some(deregister_after),
    }
}

fn instance(ttl: Duration) -> Instance {
    Instance {
        service: "echo".into(),
        instance_id: ID.into(),
        address: "127.0.0.1".parse().unwrap(),
        port: 8080,
        weight: 3,
        zone: Some("z1".into()),
        protocol: "grpc".into(),
        metadata: BTreeMap::from([("version".to_string(), "v1".to_string())]),
        ttl,
    }
}

fn service(consul: &ConsulStandIn) -> Option<Value> {
    consul.agent_services().get(ID).cloned()
}

fn check(consul: &ConsulStandIn) -> Option<Value> {
    consul.agent_checks().get(CHECK).cloned()
}

fn check_status(consul: &ConsulStandIn) -> Option<String> {
    check(consul).map(|c| c["Status"].as_str().unwrap_or_default().to_string())
}

/// Polls every 20 ms until `f` holds; panics with `what` after `limit`.
async fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_status(
    reg: &Registration,
    limit: Duration,
    what: &str,
    f: impl Fn(&Status) -> bool,
) -> Status {
    let mut rx = reg.status();
    match tokio::time::timeout(limit, async {
        rx.wait_for(|s| f(s)).await.map(|s| s.clone())
    })
    .await
    {
        Ok(s) => s.unwrap(),
        Err(_) => panic!(
            "timed out after {limit:?}: {what}; status {:?}",
            *reg.status().borrow()
        ),
    }
}

#[tokio::test]
async fn registers_only_when_healthy_with_the_whole_entry() {
    let consul = ConsulStandIn::start().await.unwrap();
    let reg = Registration::spawn(
        backend(consul.url(), Duration::from_secs(20)),
        instance(Duration::from_secs(3)),
    );
    reg.set_health(Health::Unhealthy);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(service(&consul).is_none(), "registered before healthy");
    assert_eq!(consul.requests("/v1/agent/service/register"), 0);

    reg.set_health(Health::Healthy);
    let st = wait_status(&reg, Duration::from_secs(5), "registered", |s| s.registered).await;
    assert_eq!(st.registrations, 1);
    assert_eq!(st.health, Some(Health::Healthy));
    assert_eq!(st.last_error, None);
    // Read before the first update (1 s away) can have set it: this is the initial status.
    assert_eq!(check_status(&consul).as_deref(), Some("passing"));

    let svc = service(&consul).expect("not in the agent's services");
    assert_eq!(svc["ID"], ID);
    assert_eq!(svc["Service"], "echo");
    assert_eq!(svc["Address"], "127.0.0.1");
    assert_eq!(svc["Port"], 8080);
    assert_eq!(svc["Tags"], json!(["weft", "grpc"]));
    assert_eq!(
        svc["Meta"],
        json!({"version": "v1", "zone": "z1", "protocol": "grpc"})
    );
    assert_eq!(svc["Weights"], json!({"Passing": 3, "Warning": 1}));

    let c = check(&consul).expect("no check");
    assert_eq!(c["ServiceID"], ID);
    assert_eq!(c["Type"], "ttl");
    assert_eq!(c["Definition"]["DeregisterCriticalServiceAfter"], "20s");
    let ours = consul
        .agent_checks()
        .as_object()
        .unwrap()
        .values()
        .filter(|c| c["ServiceID"] == ID)
        .count();
    assert_eq!(ours, 1, "one check per instance");

    reg.deregister(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn health_changes_reach_the_check_at_once() {
    let consul = ConsulStandIn::start().await.unwrap();
    // A long TTL: updates are due only every 10 s, so anything sooner is the push.
    let reg = Registration::spawn(
        backend(consul.url(), Duration::from_secs(60)),
        instance(Duration::from_secs(30)),
    );
    reg.set_health(Health::Healthy);
    wait_status(&reg, Duration::from_secs(5), "registered", |s| s.registered).await;
    assert_eq!(check_status(&consul).as_deref(), Some("passing"));

    let limit = Duration::from_secs(1);
    reg.set_health(Health::Unhealthy);
    eventually(limit, "critical when unhealthy", || {
        check_status(&consul).as_deref() == Some("critical")
    })
    .await;
    reg.set_health(Health::Draining);
    eventually(limit, "critical, output draining, when draining", || {
        check(&consul).is_some_and(|c| c["Status"] == "critical" && c["Output"] == "draining")
    })
    .await;
    reg.set_health(Health::Healthy);
    eventually(limit, "passing when healthy again", || {
        check_status(&consul).as_deref() == Some("passing")
    })
    .await;
    let st = wait_status(&reg, limit, "health in status", |s| {
        s.health == Some(Health::Healthy)
    })
    .await;
    assert_eq!(st.registrations, 1, "re-registered on a health change");
    assert_eq!(consul.requests("/v1/agent/service/register"), 1);
    reg.deregister(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn updates_keep_the_ttl_check_passing() {
    let consul = ConsulStandIn::start().await.unwrap();
    let reg = Registration::spawn(
        backend(consul.url(), Duration::from_secs(2)),
        instance(Duration::from_secs(1)),
    );
    reg.set_health(Health::Healthy);
    wait_status(&reg, Duration::from_secs(5), "registered", |s| s.registered).await;
    // Three TTLs, sampled often: the check must never lapse to critical.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(
            check_status(&consul).as_deref(),
            Some("passing"),
            "TTL check lapsed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let updates = consul.requests(&format!("/v1/agent/check/update/{CHECK}"));
    // One per TTL/3 (~333 ms) over ~3 s: about 9; far more would be spinning.
    assert!((6..=20).contains(&updates), "{updates} check updates");
    assert_eq!(reg.status().borrow().registrations, 1);
    reg.deregister(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn a_killed_sidecar_goes_critical_then_is_reaped() {
    let consul = ConsulStandIn::start().await.unwrap();
    let reg = Registration::spawn(
        backend(consul.url(), Duration::from_secs(2)),
        instance(Duration::from_secs(1)),
    );
    reg.set_health(Health::Healthy);
    wait_status(&reg, Duration::from_secs(5), "registered", |s| s.registered).await;
    assert_eq!(check_status(&consul).as_deref(), Some("passing"));

    drop(reg);
    let dropped = Instant::now();
    eventually(
        Duration::from_secs(4),
        "check critical after its TTL",
        || check_status(&consul).as_deref() == Some("critical"),
    )
    .await;
    let critical = dropped.elapsed();
    assert!(
        critical >= Duration::from_millis(600),
        "critical after {critical:?}, before the TTL"
    );
    assert!(service(&consul).is_some(), "reaped at once");
    eventually(Duration::from_secs(8), "reaped", || {
        service(&consul).is_none() && check(&consul).is_none()
    })
    .await;
    let reaped = dropped.elapsed();
    assert!(
        reaped >= critical + Duration::from_millis(1500),
        "reaped {reaped:?} after the drop, critical since {critical:?}: \
         DeregisterCriticalServiceAfter is 2 s"
    );
}

#[tokio::test]
async fn an_agent_restart_leads_to_registering_again() {
    let consul = ConsulStandIn::start().await.unwrap();
    let addr = consul.addr();
    let reg = Registration::spawn(
        backend(consul.url(), Duration::from_secs(20)),
        instance(Duration::from_secs(1)),
    );
    reg.set_health(Health::Healthy);
    wait_status(&reg, Duration::from_secs(5), "registered", |s| s.registered).await;

    drop(consul);
    // Down for a moment: errors are retried, not fatal.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let consul = start_on(addr).await;
    assert!(service(&consul).is_none(), "restarted agent kept state");
    eventually(Duration::from_secs(5), "registered again", || {
        service(&consul).is_some()
    })
    .await;
    assert_eq!(check_status(&consul).as_deref(), Some("passing"));
    let st = wait_status(&reg, Duration::from_secs(2), "second registration", |s| {
        s.registered && s.registrations == 2
    })
    .await;
    assert_eq!(st.last_error, None);
    let svc = service(&consul).unwrap();
    assert_eq!(svc["Service"], "echo");
    assert_eq!(svc["Port"], 8080);

    reg.deregister(Duration::from_secs(5)).await.unwrap();
    assert!(service(&consul).is_none());
}

/// The old port may take a moment to be free again.
async fn start_on(addr: std::net::SocketAddr) -> ConsulStandIn {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ConsulStandIn::start_on(addr).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot restart on {addr}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test]
async fn deregistration_removes_the_service_and_its_check() {
    let consul = ConsulStandIn::start().await.unwrap();
    let reg = Registration::spawn(
        backend(consul.url(), Duration::from_secs(20)),
        instance(Duration::from_secs(3)),
    );
    reg.set_health(Health::Healthy);
    wait_status(&reg, Duration::from_secs(5), "registered", |s| s.registered).await;
    let status = reg.status();
    reg.deregister(Duration::from_secs(5)).await.unwrap();
    assert!(service(&consul).is_none(), "service left after deregister");
    assert!(check(&consul).is_none(), "check left after deregister");
    assert_eq!(
        consul.requests(&format!("/v1/agent/service/deregister/{ID}")),
        1
    );
    assert!(!status.borrow().registered);
}

#[tokio::test]
async fn deregistering_before_healthy_sends_nothing() {
    let consul = ConsulStandIn::start().await.unwrap();
    let reg = Registration::spawn(
        backend(consul.url(), Duration::from_secs(20)),
        instance(Duration::from_secs(3)),
    );
    reg.set_health(Health::Unhealthy);
    reg.deregister(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        consul.requests(&format!("/v1/agent/service/deregister/{ID}")),
        0
    );
}

#[tokio::test]
async fn an_acl_protected_agent_takes_the_token_and_refuses_without_it() {
    let consul = ConsulStandIn::start_with(
        "127.0.0.1:0".parse().unwrap(),
        StandInOptions {
            token: Some("s3cret".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();

    let without = Registration::spawn(
        backend(consul.url(), Duration::from_secs(20)),
        instance(Duration::from_secs(3)),
    );
    without.set_health(Health::Healthy);
    let st = wait_status(&without, Duration::from_secs(5), "refused", |s| {
        s.last_error.is_some()
    })
    .await;
    assert!(!st.registered);
    let err = st.last_error.unwrap();
    assert!(err.contains("403"), "{err}");
    assert!(service(&consul).is_none());
    drop(without);

    let mut b = backend(consul.url(), Duration::from_secs(20));
    if let Backend::Consul { token, .. } = &mut b {
        *token = Some("s3cret".into());
    }
    let with = Registration::spawn(b, instance(Duration::from_secs(1)));
    with.set_health(Health::Healthy);
    wait_status(&with, Duration::from_secs(5), "registered", |s| {
        s.registered
    })
    .await;
    assert!(service(&consul).is_some());
    // Updates are authorized too: the check stays passing past its TTL.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(check_status(&consul).as_deref(), Some("passing"));
    assert_eq!(with.status().borrow().last_error, None);
    with.deregister(Duration::from_secs(5)).await.unwrap();
    assert!(service(&consul).is_none());
}

// ----- against a recording server -----

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Recorded {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

type Answer = Box<dyn Fn(&Recorded) -> u16 + Send + Sync>;

/// A keep-alive HTTP/1.1 server that records every request and answers with the status
/// `answer` picks (empty body). Its task ends with the test's runtime.
struct Recorder {
    url: String,
    seen: Arc<Mutex<Vec<Recorded>>>,
}

impl Recorder {
    async fn start(answer: Answer) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(answer);
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, log.clone(), answer.clone()));
            }
        });
        Recorder { url, seen }
    }

    fn requests(&self) -> Vec<Recorded> {
        self.seen.lock().unwrap().clone()
    }

    fn find(&self, method: &str, path_prefix: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == method && r.path.starts_with(path_prefix))
            .collect()
    }
}

async fn serve(mut conn: TcpStream, log: Arc<Mutex<Vec<Recorded>>>, answer: Arc<Answer>) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or_default().split(' ');
        let method = first.next().unwrap_or_default().to_string();
        let path = first.next().unwrap_or_default().to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.parse().unwrap());
        let body_start = head_end + 4;
        while buf.len() < body_start + len {
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = String::from_utf8_lossy(&buf[body_start..body_start + len]).into_owned();
        buf.drain(..body_start + len);
        let req = Recorded {
            method,
            path,
            headers,
            body,
        };
        let status = answer(&req);
        log.lock().unwrap().push(req);
        let resp = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
        if conn.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn sends_the_documented_registration_and_the_token() {
    let rec = Recorder::start(Box::new(|_| 200)).await;
    let mut b = backend(rec.url.clone(), Duration::from_secs(90));
    if let Backend::Consul { token, .. } = &mut b {
        *token = Some("s3cret".into());
    }
    let reg = Registration::spawn(b, instance(Duration::from_secs(3)));
    reg.set_health(Health::Healthy);
    wait_status(&reg, Duration::from_secs(5), "registered", |s| s.registered).await;
    reg.set_health(Health::Draining);
    wait_status(&reg, Duration::from_secs(2), "draining pushed", |s| {
        s.health == Some(Health::Draining)
    })
    .await;
    reg.deregister(Duration::from_secs(5)).await.unwrap();

    let regs = rec.find("PUT", "/v1/agent/service/register");
    assert_eq!(regs.len(), 1, "{:?}", rec.requests());
    assert_eq!(
        regs[0].path,
        "/v1/agent/service/register?replace-existing-checks=true"
    );
    assert_eq!(regs[0].header("content-type"), Some("application/json"));
    assert_eq!(
        regs[0].json(),
        json!({
            "ID": ID,
            "Name": "echo",
            "Address": "127.0.0.1",
            "Port": 8080,
            "Tags": ["weft", "grpc"],
            "Meta": {"version": "v1", "zone": "z1", "protocol": "grpc"},
            "Weights": {"Passing": 3, "Warning": 1},
            "Check": {
                "CheckID": CHECK,
                "Name": "echo health (weft sidecar)",
                "TTL": "3s",
                "DeregisterCriticalServiceAfter": "90s",
                "Status": "passing",
            },
        })
    );
    let updates = rec.find("PUT", "/v1/agent/check/update/service:host-1-8080");
    assert_eq!(
        updates.last().unwrap().json(),
        json!({"Status": "critical", "Output": "draining"})
    );
    assert_eq!(
        rec.find("PUT", "/v1/agent/service/deregister/host-1-8080")
            .len(),
        1
    );
    // Every request carries the token; none names a datacenter.
    for r in rec.requests() {
        assert_eq!(r.header("x-consul-token"), Some("s3cret"), "{r:?}");
        assert!(!r.path.contains("dc="), "{r:?}");
    }
}

#[tokio::test]
async fn no_token_no_header_and_the_default_deregister_after() {
    let rec = Recorder::start(Box::new(|_| 200)).await;
    let mut b = backend(rec.url.clone(), Duration::ZERO);
    if let Backend::Consul {
        deregister_after,
        datacenter,
        ..
    } = &mut b
    {
        *deregister_after = None;
        *datacenter = Some("dc2".into());
    }
    let reg = Registration::spawn(b, instance(Duration::from_secs(30)));
    reg.set_health(Health::Healthy);
    wait_status(&reg, Duration::from_secs(5), "registered", |s| s.registered).await;
    reg.deregister(Duration::from_secs(5)).await.unwrap();
    let regs = rec.find("PUT", "/v1/agent/service/register");
    // 3 x 30 s TTL.
    assert_eq!(
        regs[0].json()["Check"]["DeregisterCriticalServiceAfter"],
        "90s"
    );
    for r in rec.requests() {
        assert_eq!(r.header("x-consul-token"), None, "{r:?}");
        assert!(!r.path.contains("dc="), "{r:?}");
    }
}

#[tokio::test]
async fn an_http_check_is_polled_through_the_service_and_re_registered_when_unknown() {
    // The agent "forgets" the service after the first lookup.
    let lookups = Arc::new(Mutex::new(0u32));
    let n = lookups.clone();
    let rec = Recorder::start(Box::new(move |r| {
        if r.method == "GET" && r.path == "/v1/agent/service/host-1-8080" {
            let mut n = n.lock().unwrap();
            *n += 1;
            if *n == 2 {
                return 404;
            }
        }
        200
    }))
    .await;
    let mut b = backend(rec.url.clone(), Duration::from_secs(120));
    if let Backend::Consul { check, .. } = &mut b {
        *check = ConsulCheck::Http {
            url: "http://127.0.0.1:8080/healthz".into(),
            interval: Duration::from_millis(1500),
        };
    }
    let reg = Registration::spawn(b, instance(Duration::from_secs(1)));
    reg.set_health(Health::Healthy);
    wait_status(&reg, Duration::from_secs(5), "registered twice", |s| {
        s.registered && s.registrations == 2
    })
    .await;
    reg.deregister(Duration::from_secs(5)).await.unwrap();

    let regs = rec.find("PUT", "/v1/agent/service/register");
    assert_eq!(regs.len(), 2);
    assert_eq!(
        regs[0].json()["Check"],
        json!({
            "CheckID": CHECK,
            "Name": "echo health (weft sidecar)",
            "HTTP": "http://127.0.0.1:8080/healthz",
            "Interval": "1500ms",
            "DeregisterCriticalServiceAfter": "120s",
            "Status": "passing",
        })
    );
    // Consul runs this check: the sidecar never updates it.
    assert!(rec.find("PUT", "/v1/agent/check/").is_empty());
}

#[tokio::test]
async fn a_grpc_check_starts_critical_when_registered_while_unhealthy() {
    // The only way to register while not healthy: the agent loses us after we went unhealthy.
    let rec = Recorder::start(Box::new(|r| if r.method == "GET" { 404 } else { 200 })).await;
    let mut b = backend(rec.url.clone(), Duration::from_secs(120));
    if let Backend::Consul { check, .. } = &mut b {
        *check = ConsulCheck::Grpc {
            target: "127.0.0.1:8080".into(),
            interval: Duration::from_secs(5),
        };
    }
    let reg = Registration::spawn(b, instance(Duration::from_secs(1)));
    reg.set_health(Health::Healthy);
    wait_status(&reg, Duration::from_secs(5), "registered", |s| s.registered).await;
    reg.set_health(Health::Unhealthy);
    wait_status(&reg, Duration::from_secs(5), "registered again", |s| {
        s.registrations >= 2 && s.health == Some(Health::Unhealthy)
    })
    .await;
    reg.deregister(Duration::from_secs(5)).await.unwrap();
    let regs = rec.find("PUT", "/v1/agent/service/register");
    assert_eq!(regs[0].json()["Check"]["GRPC"], "127.0.0.1:8080");
    assert_eq!(regs[0].json()["Check"]["Interval"], "5s");
    assert_eq!(regs[0].json()["Check"]["Status"], "passing");
    assert_eq!(regs.last().unwrap().json()["Check"]["Status"], "critical");
}

#[tokio::test]
async fn agent_errors_are_retried_and_reported() {
    // Registration fails with 500 three times, then works.
    let calls = Arc::new(Mutex::new(0u32));
    let n = calls.clone();
    let rec = Recorder::start(Box::new(move |r| {
        if r.path.starts_with("/v1/agent/service/register") {
            let mut n = n.lock().unwrap();
            *n += 1;
            if *n <= 3 {
                return 500;
            }
        }
        200
    }))
    .await;
    let reg = Registration::spawn(
        backend(rec.url.clone(), Duration::from_secs(20)),
        instance(Duration::from_secs(1)),
    );
    reg.set_health(Health::Healthy);
    let st = wait_status(&reg, Duration::from_secs(3), "error reported", |s| {
        s.last_error.is_some()
    })
    .await;
    let err = st.last_error.unwrap();
    assert!(
        err.contains(&rec.url) && err.contains("/v1/agent/service/register") && err.contains("500"),
        "{err}"
    );
    let st = wait_status(&reg, Duration::from_secs(5), "registered", |s| s.registered).await;
    assert_eq!(st.registrations, 1);
    assert_eq!(st.last_error, None);
    reg.deregister(Duration::from_secs(5)).await.unwrap();
}
