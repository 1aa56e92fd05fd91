//! The outbound proxy end to end on loopback: routing, balancing, retries, timeouts, circuit
//! breaking, rate limiting, outlier detection, trace context.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;

#[tokio::test]
async fn routes_by_host_and_port_and_refuses_unknown_hosts() {
    let w = backend("web-1").await;
    let a = backend("api-1").await;
    let yaml = format!(
        "services:\n  - name: web\n    endpoints:\n{}  - name: api\n    endpoints:\n{}",
        endpoints(&[&w]),
        endpoints(&[&a])
    );
    let sc = outbound(mesh_config(&yaml)).await;
    let c = client();
    for host in ["web", "web:8080", "WEB"] {
        let r = get(&c, sc.addr, host, "/", &[]).await;
        assert_eq!(r.status, 200, "{host}");
        assert_eq!(r.body, "web-1", "{host}");
    }
    let r = get(&c, sc.addr, "api:80", "/x?y=1", &[]).await;
    assert_eq!(r.body, "api-1");

    let r = get(&c, sc.addr, "nope", "/", &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.weft_error(), "no_route");
    assert!(r.body.starts_with("weft: "), "{}", r.body);
    assert!(r.body.ends_with('\n'));
    assert_eq!(sc.metric("weft_sidecar_no_route_total"), 1.0);
    let m = sc.metrics();
    assert!(
        m.contains(
            r#"weft_sidecar_requests_total{direction="outbound",service="web",code="200"} 3"#
        ),
        "{m}"
    );
}

#[tokio::test]
async fn round_robin_spreads_over_three_backends() {
    let bs = [
        backend("b1").await,
        backend("b2").await,
        backend("b3").await,
    ];
    let yaml = format!(
        "services:\n  - name: web\n    endpoints:\n{}policies:\n  - {{ name: p, service: web, lb: round_robin }}\n",
        endpoints(&[&bs[0], &bs[1], &bs[2]])
    );
    let sc = outbound(mesh_config(&yaml)).await;
    let c = client();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let r = get(&c, sc.addr, "web", "/", &[]).await;
        assert_eq!(r.status, 200);
        *counts.entry(r.body).or_default() += 1;
    }
    for b in &bs {
        let n = counts.get(&b.name).copied().unwrap_or(0);
        assert!((5..=15).contains(&n), "{counts:?}");
    }
}

#[tokio::test]
async fn weighted_round_robin_follows_weights() {
    let light = backend("light").await;
    let heavy = backend("heavy").await;
    let yaml = format!(
        "services:\n  - name: web\n    endpoints:\n      - {{ address: 127.0.0.1, port: {}, weight: 1 }}\n      - {{ address: 127.0.0.1, port: {}, weight: 3 }}\npolicies:\n  - {{ name: p, service: web, lb: weighted_round_robin }}\n",
        light.addr.port(),
        heavy.addr.port()
    );
    let sc = outbound(mesh_config(&yaml)).await;
    let c = client();
    for _ in 0..40 {
        assert_eq!(get(&c, sc.addr, "web", "/", &[]).await.status, 200);
    }
    let (l, h) = (light.hits(), heavy.hits());
    assert_eq!(l + h, 40);
    assert!((5..=15).contains(&l), "light {l} heavy {h}");
}

fn retry_yaml(bs: &[&Backend], retries: &str, extra: &str) -> String {
    format!(
        "services:\n  - name: web\n    endpoints:\n{}routes:\n  - name: r\n    service: web\n    rules:\n      - retries: {retries}\n{extra}policies:\n  - {{ name: p, service: web, lb: round_robin }}\n",
        endpoints(bs)
    )
}

#[tokio::test]
async fn retries_turn_a_503_into_a_200_from_another_backend() {
    let bad = backend("bad").await;
    bad.set(Mode::Status(503));
    let good1 = backend("good1").await;
    let good2 = backend("good2").await;
    let yaml = retry_yaml(
        &[&bad, &good1, &good2],
        "{ attempts: 2, on: [gateway-error] }",
        "",
    );
    let sc = outbound(mesh_config(&yaml)).await;
    let c = client();
    for _ in 0..12 {
        let r = get(&c, sc.addr, "web", "/", &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_ne!(r.body, "bad");
    }
    assert!(bad.hits() >= 1, "the failing backend was never tried");
    let retries = sc.metric(r#"weft_sidecar_retries_total{service="web"}"#);
    assert!(retries >= 1.0, "{}", sc.metrics());
    assert_eq!(retries as usize, bad.hits());
}

#[tokio::test]
async fn retries_retry_posts_with_their_body() {
    let bad = backend("bad").await;
    bad.set(Mode::Status(503));
    let good = backend("good").await;
    let yaml = retry_yaml(&[&bad, &good], "{ attempts: 1, on: [5xx] }", "");
    let sc = outbound(mesh_config(&yaml)).await;
    let c = client();
    for _ in 0..4 {
        let req = http::Request::post(format!("http://{}/submit", sc.addr))
            .header("host", "web")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"payload",
            )))
            .unwrap();
        let resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert!(bad.hits() >= 1);
    let seen = good.seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .all(|(_, h)| h.get("content-length").map(|v| v.as_bytes()) == Some(b"7")),
        "{seen:?}"
    );
}

#[tokio::test]
async fn no_retry_beyond_num_retries() {
    let bs = [
        backend("b1").await,
        backend("b2").await,
        backend("b3").await,
    ];
    for b in &bs {
        b.set(Mode::Status(503));
    }
    let yaml = retry_yaml(&[&bs[0], &bs[1], &bs[2]], "{ attempts: 1, on: [5xx] }", "");
    let sc = outbound(mesh_config(&yaml)).await;
    let c = client();
    let r = get(&c, sc.addr, "web", "/", &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.weft_error(), "", "the upstream's own 503 is returned");
    let hits: usize = bs.iter().map(Backend::hits).sum();
    assert_eq!(hits, 2, "one try and one retry");
    let distinct = bs.iter().filter(|b| b.hits() > 0).count();
    assert_eq!(distinct, 2, "the retry avoids the endpoint already tried");
}

#[tokio::test]
async fn route_timeout_gives_504() {
    let slow = backend("slow").await;
    slow.set(Mode::Delay(Duration::from_secs(3)));
    let yaml = format!(
        "services:\n  - name: web\n    endpoints:\n{}routes:\n  - name: r\n    service: web\n    rules:\n      - timeout: 300ms\n",
        endpoints(&[&slow])
    );
    let sc = outbound(mesh_config(&yaml)).await;
    let c = client();
    let t = Instant::now();
    let r = get(&c, sc.addr, "web", "/", &[]).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.weft_error(), "timeout");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(t.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn per_try_timeout_retries_then_gives_504() {
    let s1 = backend("s1").await;
    let s2 = backend("s2").await;
    s1.set(Mode::Delay(Duration::from_secs(3)));
    s2.set(Mode::Delay(Duration::from_secs(3)));
    let yaml = retry_yaml(
        &[&s1, &s2],
        "{ attempts: 1, per_try_timeout: 200ms, on: [5xx] }",
        "        timeout: 5s\n",
    );
    let sc = outbound(mesh_config(&yaml)).await;
    let c = client();
    let t = Instant::now();
    let r = get(&c, sc.addr, "web", "/", &[]).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.weft_error(), "timeout");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(eventually(|| s1.hits() + s2.hits() == 2).await);
    assert_eq!(
        sc.metric(r#"weft_sidecar_upstream_errors_total{service="web",kind="timeout"}"#),
        2.0
    );
}

#[tokio::test]
async fn per_try_timeout_moves_to_a_fast_backend() {
    let slow = backend("slow").await;
    slow.set(Mode::Delay(Duration::from_secs(3)));
    let fast = backend("fast").await;
    let yaml = retry_yaml(
        &[&slow, &fast],
        "{ attempts: 1, per_try_timeout: 200ms, on: [5xx] }",
        "",
    );
    let sc = outbound(mesh_config(&yaml)).await;
    let c = client();
    for _ in 0..4 {
        let r = get(&c, sc.addr, "web", "/", &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "fast");
    }
}

#[tokio::test]
async fn connect_failure_is_502_and_retried_elsewhere() {
    // A port nobody listens on: bind, note it, close.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let yaml = format!(
        "services:\n  - name: down\n    endpoints:\n      - {{ address: 127.0.0.1, port: {dead} }}\n"
    );
    let sc = outbound(mesh_config(&yaml)).await;
    let c = client();
    let r = get(&c, sc.addr, "down", "/", &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.weft_error(), "upstream_connect");

    let good = backend("good").await;
    let yaml = format!(
        "services:\n  - name: web\n    endpoints:\n      - {{ address: 127.0.0.1, port: {dead} }}\n{}routes:\n  - name: r\n    service: web\n    rules:\n      - retries: {{ attempts: 2, on: [connect-failure] }}\npolicies:\n  - {{ name: p, service: web, lb: round_robin }}\n",
        endpoints(&[&good])
    );
    sc.mesh.apply(mesh_config(&yaml));
    for _ in 0..4 {
        let r = get(&c, sc.addr, "web", "/", &[]).await;
        assert_eq!(r.status, 200);
    }
}

#[tokio::test]
async fn backend_closing_the_connection_is_a_502() {
    let b = backend("closer").await;
    b.set(Mode::Close);
    let yaml = format!(
        "services:\n  - name: web\n    endpoints:\n{}",
        endpoints(&[&b])
    );
    let sc = outbound(mesh_config(&yaml)).await;
    let c = client();
    let r = get(&c, sc.addr, "web", "/", &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.weft_error(), "upstream_reset");
    // And the proxy keeps serving.
    b.set(Mode::Ok);
    let r = get(&c, sc.addr, "web", "/", &[]).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn circuit_breaker_max_requests_rejects_the_second_concurrent_request() {
    let slow = backend("slow").await;
    let yaml = format!(
        "services:\n  - name: web\n    endpoints:\n{}policies:\n  - {{ name: p, service: web, circuit_breakers: {{ max_requests: 1 }} }}\n",
        endpoints(&[&slow])
    );
    let sc = outbound(mesh_config(&yaml)).await;
    let c = client();
    let addr = sc.addr;
    let c1 = c.clone();
    let first =
        tokio::spawn(async move { get(&c1, addr, "web", "/", &[("x-delay-ms", "1000")]).await });
    assert!(eventually(|| slow.hits() == 1).await);
    let r = get(&c, sc.addr, "web", "/", &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.weft_error(), "overloaded");
    assert_eq!(r.headers.get("x-weft-overloaded").unwrap(), "true");
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(
        sc.metric(r#"weft_sidecar_overloaded_total{service="web"}"#),
        1.0
    );
    // The slot is free again.
    assert_eq!(get(&c, sc.addr, "web", "/", &[]).await.status, 200);
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    let b = backend("b").await;
    let yaml = format!(
        "services:\n  - name: web\n    endpoints:\n{}policies:\n  - {{ name: p, service: web, rate_limit: {{ requests: 2, per: 10s }} }}\n",
        endpoints(&[&b])
    );
    let sc = outbound(mesh_config(&yaml)).await;
    let c = client();
    assert_eq!(get(&c, sc.addr, "web", "/", &[]).await.status, 200);
    assert_eq!(get(&c, sc.addr, "web", "/", &[]).await.status, 200);
    let r = get(&c, sc.addr, "web", "/", &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.weft_error(), "rate_limited");
    let after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=10).contains(&after), "{after}");
    assert_eq!(b.hits(), 2);
    assert_eq!(
        sc.metric(r#"weft_sidecar_rate_limited_total{service="web"}"#),
        1.0
    );
}

#[tokio::test]
async fn outlier_detection_ejects_a_backend_returning_500s() {
    let bad = backend("bad").await;
    bad.set(Mode::Status(500));
    let g1 = backend("g1").await;
    let g2 = backend("g2").await;
    let yaml = format!(
        "services:\n  - name: web\n    endpoints:\n{}policies:\n  - name: p\n    service: web\n    lb: round_robin\n    outlier_detection: {{ consecutive_5xx: 3, base_ejection_time: 30s, max_ejection_percent: 50 }}\n",
        endpoints(&[&bad, &g1, &g2])
    );
    let sc = outbound(mesh_config(&yaml)).await;
    let c = client();
    let mut errors = 0;
    for _ in 0..30 {
        if get(&c, sc.addr, "web", "/", &[]).await.status == 500 {
            errors += 1;
        }
    }
    assert_eq!(errors, 3, "ejected after three consecutive 5xx");
    assert_eq!(bad.hits(), 3);
    let dbg = sc.mesh.debug_endpoints();
    let eps = dbg["web"]["endpoints"].as_array().unwrap();
    let ejected: Vec<_> = eps.iter().filter(|e| e["ejected"] == true).collect();
    assert_eq!(ejected.len(), 1, "{dbg}");
    assert_eq!(ejected[0]["addr"], bad.addr.to_string());
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn traceparent_parts(v: &str) -> (String, String, String) {
    let p: Vec<&str> = v.split('-').collect();
    assert_eq!(p.len(), 4, "{v}");
    assert_eq!(p[0], "00");
    (p[1].to_string(), p[2].to_string(), p[3].to_string())
}

#[tokio::test]
async fn trace_context_makes_a_child_span_per_hop() {
    let b = backend("b").await;
    let yaml = format!(
        "services:\n  - name: web\n    endpoints:\n{}",
        endpoints(&[&b])
    );
    let sc = outbound(mesh_config(&yaml)).await;
    let c = client();
    let tp = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    let r = get(
        &c,
        sc.addr,
        "web",
        "/traced",
        &[("traceparent", &tp), ("tracestate", "vendor=x")],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = b.last_headers();
    let (tid, sid, flags) = traceparent_parts(seen["traceparent"].to_str().unwrap());
    assert_eq!(tid, TRACE_ID);
    assert_ne!(sid, CLIENT_SPAN);
    assert_eq!(flags, "01");
    assert_eq!(seen["tracestate"], "vendor=x");

    assert!(eventually(|| !sc.spans().is_empty()).await);
    let spans = sc.spans();
    assert_eq!(spans.len(), 1);
    let s = &spans[0];
    assert_eq!(s.kind, weft_proxy::SpanKind::Client);
    assert_eq!(s.context.trace_id.to_string(), TRACE_ID);
    assert_eq!(s.context.span_id.to_string(), sid);
    assert_eq!(s.context.parent_id.unwrap().to_string(), CLIENT_SPAN);
    assert_eq!(s.name, "outbound web");
    let attr = |k: &str| {
        s.attributes
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(attr("http.response.status_code").as_deref(), Some("200"));
    assert_eq!(attr("url.path").as_deref(), Some("/traced"));
    assert_eq!(attr("server.address"), Some(b.addr.to_string()));
    assert!(s.end >= s.start);
}

#[tokio::test]
async fn invalid_traceparent_starts_a_new_trace() {
    let b = backend("b").await;
    let yaml = format!(
        "services:\n  - name: web\n    endpoints:\n{}",
        endpoints(&[&b])
    );
    let sc = outbound(mesh_config(&yaml)).await;
    let c = client();
    let bad = format!("00-{}-{CLIENT_SPAN}-01", "0".repeat(32));
    let r = get(&c, sc.addr, "web", "/", &[("traceparent", &bad)]).await;
    assert_eq!(r.status, 200);
    let seen = b.last_headers();
    let (tid, sid, _) = traceparent_parts(seen["traceparent"].to_str().unwrap());
    assert_ne!(tid, "0".repeat(32));
    assert_ne!(sid, CLIENT_SPAN);
    assert!(eventually(|| !sc.spans().is_empty()).await);
    let s = &sc.spans()[0];
    assert_eq!(s.context.trace_id.to_string(), tid);
    assert!(s.context.parent_id.is_none());
}

#[tokio::test]
async fn apply_keeps_balancer_state_and_drops_removed_clusters() {
    let b = backend("b").await;
    let yaml = format!(
        "services:\n  - name: web\n    endpoints:\n{}  - name: other\n    endpoints:\n{}",
        endpoints(&[&b]),
        endpoints(&[&b])
    );
    let sc = outbound(mesh_config(&yaml)).await;
    let dbg = sc.mesh.debug_config();
    assert!(dbg["clusters"]["other"].is_object(), "{dbg}");
    let vhs = dbg["virtual_hosts"].as_array().unwrap();
    assert!(vhs.iter().any(|v| v == "web"), "{dbg}");
    let yaml = format!(
        "services:\n  - name: web\n    endpoints:\n{}",
        endpoints(&[&b])
    );
    sc.mesh.apply(mesh_config(&yaml));
    let dbg = sc.mesh.debug_endpoints();
    assert!(dbg.get("other").is_none(), "{dbg}");
    assert_eq!(dbg["web"]["endpoints"].as_array().unwrap().len(), 1);
    let c = client();
    assert_eq!(get(&c, sc.addr, "other", "/", &[]).await.status, 404);
    assert_eq!(get(&c, sc.addr, "web", "/", &[]).await.status, 200);
}

#[tokio::test]
async fn active_health_checks_take_a_failing_endpoint_out() {
    let sick = backend("sick").await;
    sick.set(Mode::Status(500));
    let well = backend("well").await;
    let yaml = format!(
        "services:\n  - name: web\n    endpoints:\n{}policies:\n  - name: p\n    service: web\n    lb: round_robin\n    health_check: {{ path: /healthz, interval: 100ms, timeout: 500ms, unhealthy_threshold: 1, healthy_threshold: 1 }}\n",
        endpoints(&[&sick, &well])
    );
    let sc = outbound(mesh_config(&yaml)).await;
    let mesh = sc.mesh.clone();
    let sick_addr = sick.addr.to_string();
    assert!(
        eventually(|| {
            let d = mesh.debug_endpoints();
            d["web"]["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["addr"] == sick_addr.as_str() && e["active_healthy"] == false)
        })
        .await,
        "{}",
        sc.mesh.debug_endpoints()
    );
    let c = client();
    for _ in 0..6 {
        let r = get(&c, sc.addr, "web", "/", &[]).await;
        assert_eq!(
            r.body, "well",
            "only health probes reach the sick endpoint now"
        );
    }
}

#[tokio::test]
async fn service_without_endpoints_is_503_no_healthy_upstream() {
    let sc = outbound(mesh_config("services:\n  - name: empty\n")).await;
    let r = get(&client(), sc.addr, "empty", "/", &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.weft_error(), "no_healthy_upstream");
    assert!(r.body.starts_with("weft: "));
}
