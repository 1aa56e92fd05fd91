//! `weft-sidecar` W3C trace context end to end: client sidecar -> server sidecar -> backend,
//! checking what the backend sees (`x-seen-traceparent` etc. from the demo backend) and the
//! spans both sidecars export to an in-test OTLP/gRPC collector.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use weft_tests::*;

const CONVERGE: Duration = Duration::from_secs(20);
const SPANS: Duration = Duration::from_secs(15);

/// A `traceparent` split into its fields, checked to be a valid version-00 one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tp {
    version: String,
    trace_id: String,
    parent_id: String,
    flags: String,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn parse_tp(v: &str) -> Result<Tp> {
    let parts: Vec<&str> = v.split('-').collect();
    ensure!(parts.len() == 4, "traceparent `{v}` does not have 4 fields");
    let tp = Tp {
        version: parts[0].into(),
        trace_id: parts[1].into(),
        parent_id: parts[2].into(),
        flags: parts[3].into(),
    };
    ensure!(tp.version == "00", "traceparent `{v}`: version is not 00");
    ensure!(
        is_hex(&tp.trace_id, 32) && tp.trace_id.bytes().any(|b| b != b'0'),
        "traceparent `{v}`: bad trace id"
    );
    ensure!(
        is_hex(&tp.parent_id, 16) && tp.parent_id.bytes().any(|b| b != b'0'),
        "traceparent `{v}`: bad parent id"
    );
    ensure!(is_hex(&tp.flags, 2), "traceparent `{v}`: bad flags");
    Ok(tp)
}

fn members(v: &str) -> Vec<String> {
    v.split(',')
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .collect()
}

struct Setup {
    otlp: OtlpReceiver,
    _b: Backends,
    _cp: ControlPlane,
    _server: Sidecar,
    client: Sidecar,
}

impl Setup {
    async fn start(ctx: &TestCtx) -> Result<Self> {
        let otlp = OtlpReceiver::start().await?;
        let b = Backends::start(ctx, &[("web-1", Kind::Http)]).await?;
        let cp = ControlPlane::start(ctx, "").await?;
        let server = Sidecar::start(
            ctx,
            SidecarArgs::server(&cp, "web-1", "web", b.port("web-1")?)
                .health("http:/healthz")
                .otlp(&otlp.endpoint()),
        )
        .await?;
        let client = Sidecar::start(
            ctx,
            SidecarArgs::client(&cp, "client")?
                .variant(Variant::Sotw)
                .otlp(&otlp.endpoint()),
        )
        .await?;
        let s = Self {
            otlp,
            _b: b,
            _cp: cp,
            _server: server,
            client,
        };
        eventually("traffic reaches web-1", CONVERGE, async || {
            let r = s.client.request("web", "/", &[]).await?;
            ensure!(r.status == 200, "{} {}", r.status, r.body.trim());
            Ok(())
        })
        .await?;
        Ok(s)
    }

    /// One request through both sidecars; the reply (from the backend).
    async fn send(&self, headers: &[(&str, &str)]) -> Result<HttpReply> {
        let r = self.client.request("web", "/", headers).await?;
        ensure!(
            r.status == 200 && r.backend() == Some("web-1"),
            "request with {headers:?}: {} {}",
            r.status,
            r.body.trim()
        );
        Ok(r)
    }

    /// What the backend saw as `traceparent`, parsed and checked valid.
    async fn seen_tp(&self, headers: &[(&str, &str)]) -> Result<(Tp, HttpReply)> {
        let r = self.send(headers).await?;
        let v = r
            .headers
            .get("x-seen-traceparent")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| anyhow!("the backend saw no traceparent (sent {headers:?})"))?;
        Ok((parse_tp(v)?, r))
    }

    /// Waits until the collector holds `n` spans of `trace_id`.
    async fn spans_of(&self, trace_id: &str, n: usize) -> Result<Vec<ReceivedSpan>> {
        eventually(
            &format!("{n} spans of trace {trace_id} are exported"),
            SPANS,
            async || {
                let spans = self.otlp.trace(trace_id);
                ensure!(spans.len() >= n, "{} so far: {spans:#?}", spans.len());
                Ok(())
            },
        )
        .await?;
        // Give stragglers a moment: there must not be more than `n`.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let spans = self.otlp.trace(trace_id);
        ensure!(
            spans.len() == n,
            "trace {trace_id}: expected {n} spans, got {}: {spans:#?}",
            spans.len()
        );
        Ok(spans)
    }
}

fn header<'a>(r: &'a HttpReply, name: &str) -> Option<&'a str> {
    r.headers.get(name).and_then(|v| v.to_str().ok())
}

/// Checks the two spans of one request: the client sidecar's outbound (client) span, child of
/// `caller` (None: a root), and the server sidecar's inbound (server) span, its child, whose id
/// is the parent the backend saw.
fn check_hop_spans(spans: &[ReceivedSpan], caller: Option<&str>, seen: &Tp) -> Result<()> {
    let client = spans
        .iter()
        .find(|s| s.service_name.as_deref() == Some("client"))
        .ok_or_else(|| anyhow!("no span with service.name=client: {spans:#?}"))?;
    let server = spans
        .iter()
        .find(|s| s.service_name.as_deref() == Some("web"))
        .ok_or_else(|| anyhow!("no span with service.name=web: {spans:#?}"))?;
    ensure!(
        client.parent_span_id.as_deref() == caller,
        "the client sidecar's span should be a child of {caller:?}: {client:#?}"
    );
    ensure!(
        server.parent_span_id.as_deref() == Some(client.span_id.as_str()),
        "the server sidecar's span should be a child of the client sidecar's span: \
         client {client:#?} server {server:#?}"
    );
    ensure!(
        seen.parent_id == server.span_id,
        "the backend's parent id {} should be the server sidecar's span {}",
        seen.parent_id,
        server.span_id
    );
    ensure!(
        client.kind == 3 && server.kind == 2,
        "span kinds: client sidecar {} (want 3 = CLIENT), server sidecar {} (want 2 = SERVER)",
        client.kind,
        server.kind
    );
    ensure!(
        client.name.contains("web") && server.name.contains("web"),
        "span names should name the service: {:?} / {:?}",
        client.name,
        server.name
    );
    Ok(())
}

const T1: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const P1: &str = "00f067aa0ba902b7";

async fn propagation(ctx: &TestCtx) -> Result<()> {
    let s = Setup::start(ctx).await?;

    // 1. A valid traceparent: same trace, a new parent (the server sidecar's span), sampled;
    //    tracestate and baggage untouched.
    let tp = format!("00-{T1}-{P1}-01");
    let ts = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";
    let baggage = "userId=alice,serverNode=DF%2028,isProduction=false";
    let (seen, r) = s
        .seen_tp(&[
            ("traceparent", &tp),
            ("tracestate", ts),
            ("baggage", baggage),
        ])
        .await?;
    ensure!(seen.trace_id == T1, "trace id changed: {seen:?}");
    ensure!(
        seen.parent_id != P1,
        "the parent id was not replaced: {seen:?}"
    );
    ensure!(seen.flags == "01", "sampled flag lost: {seen:?}");
    ensure!(
        header(&r, "x-seen-tracestate").map(members) == Some(members(ts)),
        "tracestate changed: {:?}",
        header(&r, "x-seen-tracestate")
    );
    ensure!(
        header(&r, "x-seen-baggage") == Some(baggage),
        "baggage changed: {:?}",
        header(&r, "x-seen-baggage")
    );
    let spans = s.spans_of(T1, 2).await?;
    check_hop_spans(&spans, Some(P1), &seen)?;
    for sp in &spans {
        ensure!(
            sp.attributes.values().any(|v| v == "200"),
            "span has no 200 status attribute: {sp:#?}"
        );
    }

    // 2. No traceparent: a new, sampled trace whose first span is a root.
    let (fresh, _) = s.seen_tp(&[]).await?;
    ensure!(
        fresh.flags == "01",
        "a new trace should be sampled: {fresh:?}"
    );
    let spans = s.spans_of(&fresh.trace_id, 2).await?;
    check_hop_spans(&spans, None, &fresh)?;

    // 3. Invalid traceparents: each one restarts the trace.
    let zeros_trace = "0".repeat(32);
    let invalid = [
        ("bad hex", format!("00-{}zz-{P1}-01", &T1[..30])),
        (
            "upper-case hex",
            format!("00-{}-{P1}-01", T1.to_uppercase()),
        ),
        ("version ff", format!("ff-{T1}-{P1}-01")),
        ("all-zero trace id", format!("00-{zeros_trace}-{P1}-01")),
        ("all-zero parent id", format!("00-{T1}-0000000000000000-01")),
        ("too short", format!("00-{T1}-{P1}")),
        (
            "version 00 with extra fields",
            format!("00-{T1}-{P1}-01-extra"),
        ),
        ("garbage", "not a traceparent".to_string()),
    ];
    for (what, value) in &invalid {
        let (seen, _) = s
            .seen_tp(&[("traceparent", value.as_str())])
            .await
            .map_err(|e| e.context(format!("invalid traceparent ({what}): {value}")))?;
        ensure!(
            seen.trace_id != T1 && seen.trace_id != zeros_trace,
            "invalid traceparent ({what}) `{value}` was not replaced by a new trace: {seen:?}"
        );
    }
    // Two traceparent headers are invalid too.
    let other = format!("00-{}-{P1}-01", "a".repeat(32));
    let (seen, _) = s
        .seen_tp(&[("traceparent", &tp), ("traceparent", &other)])
        .await?;
    ensure!(
        seen.trace_id != T1 && seen.trace_id != "a".repeat(32),
        "two traceparent headers should start a new trace: {seen:?}"
    );

    // 4. A future version with extra fields is accepted (first four fields) and sent on as 00.
    let t2 = "0af7651916cd43dd8448eb211c80319c";
    let (seen, _) = s
        .seen_tp(&[(
            "traceparent",
            &format!("01-{t2}-b7ad6b7169203331-01-extra-stuff"),
        )])
        .await?;
    ensure!(
        seen.trace_id == t2,
        "a future-version traceparent was not continued: {seen:?}"
    );

    // 5. An unsampled caller stays unsampled.
    let t3 = "11111111111111111111111111111111";
    let (seen, _) = s
        .seen_tp(&[("traceparent", &format!("00-{t3}-{P1}-00"))])
        .await?;
    ensure!(
        seen.trace_id == t3 && seen.flags == "00",
        "the sampled flag should stay off: {seen:?}"
    );

    // 6. tracestate: more than 32 members are cut to 32 (the leftmost kept); invalid members
    //    are dropped, valid ones kept.
    let many: Vec<String> = (0..40).map(|i| format!("k{i}=v{i}")).collect();
    let (_, r) = s
        .seen_tp(&[("traceparent", &tp), ("tracestate", &many.join(","))])
        .await?;
    let got = header(&r, "x-seen-tracestate")
        .map(members)
        .unwrap_or_default();
    ensure!(
        got.len() == 32,
        "a 40-member tracestate should be cut to 32, the backend saw {}: {got:?}",
        got.len()
    );
    ensure!(
        got == many[..32],
        "the first 32 members should be kept in order: {got:?}"
    );
    let (_, r) = s
        .seen_tp(&[
            ("traceparent", &tp),
            ("tracestate", "good=1,BAD KEY=2,other=3"),
        ])
        .await?;
    let got = header(&r, "x-seen-tracestate")
        .map(members)
        .unwrap_or_default();
    ensure!(
        got.contains(&"good=1".to_string()) && got.contains(&"other=3".to_string()),
        "valid tracestate members were dropped: {got:?}"
    );
    ensure!(
        !got.iter().any(|m| m.contains("BAD")),
        "an invalid tracestate member was passed on: {got:?}"
    );

    // The sidecars count what they exported.
    for sc in [&s.client] {
        let m = sc.metrics().await?;
        let exported = prom_value(&m, "weft_sidecar_spans_exported_total", &[])
            .or_else(|| prom_value(&m, "weft_sidecar_spans_exported", &[]))
            .unwrap_or(0.0);
        ensure!(exported >= 2.0, "{} exported {exported} spans", sc.name);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_trace_context_propagates_and_spans_are_exported() {
    let ctx = TestCtx::new("sidecar_tracing").unwrap();
    let r = propagation(&ctx).await;
    ctx.finish(r);
}
