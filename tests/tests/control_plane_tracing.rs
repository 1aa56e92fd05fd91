//! `weft-control-plane --otlp-endpoint`: a registry change is one `config.change` span, and each
//! response it causes is an `xds.push` span, its child, ending at the proxy's ACK (or, with an
//! error status and Envoy's message, at its NACK). Against a real SotW and a real Delta Envoy
//! and an in-test OTLP/gRPC collector. Also: spans still queued at shutdown are flushed, a bad
//! endpoint stops startup, and without an endpoint nothing is sent anywhere (not even to the
//! standard `OTEL_EXPORTER_OTLP_*` endpoints).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use weft_tests::otlp::{Collector, FullSpan, STATUS_ERROR};
use weft_tests::*;

const SPANS: Duration = Duration::from_secs(20);
const SOTW: &str = "trace-sotw";
const DELTA: &str = "trace-delta";
/// A regex Envoy refuses for its RE2 program size (see nack.rs), unless its runtime raises the
/// limit.
const BIG_REGEX: &str = "/nack-[a-z]{300}";

fn registry(b: &Backends, web: &[&str], bad_route: bool) -> Result<String> {
    let mut y = format!("services:\n{}", b.service_yaml("web", "http", web)?);
    if bad_route {
        y.push_str(&format!(
            "routes:\n  - name: bad-regex\n    service: web\n    rules:\n      - match: {{path_regex: \"{BIG_REGEX}\"}}\n"
        ));
    }
    Ok(y)
}

fn is_change(s: &FullSpan) -> bool {
    s.span.name == "config.change"
}

fn is_push(s: &FullSpan) -> bool {
    s.span.name == "xds.push"
}

/// The pushes recorded as children of `change`.
fn children<'a>(spans: &'a [FullSpan], change: &FullSpan) -> Vec<&'a FullSpan> {
    spans
        .iter()
        .filter(|s| {
            is_push(s)
                && s.span.trace_id == change.span.trace_id
                && s.span.parent_span_id.as_deref() == Some(change.span.span_id.as_str())
        })
        .collect()
}

fn push_to<'a>(pushes: &[&'a FullSpan], node: &str, type_url: &str) -> Option<&'a FullSpan> {
    pushes
        .iter()
        .copied()
        .find(|s| s.attr("xds.node_id") == Some(node) && s.attr("xds.type_url") == Some(type_url))
}

/// Checks what every push span carries, whatever its outcome.
fn check_push(p: &FullSpan, node: &str, variant: &str, change: &FullSpan) -> Result<()> {
    ensure!(
        p.attr("xds.variant") == Some(variant)
            && p.attr("xds.flavor") == Some("envoy")
            && p.attr("xds.initial") == Some("false")
            && p.attr("xds.version").is_some_and(|v| !v.is_empty())
            && p.attr("xds.nonce").is_some_and(|v| !v.is_empty()),
        "push to {node}: attributes {p:#?}"
    );
    ensure!(
        p.span.service_name.as_deref() == Some("weft-control-plane"),
        "push to {node}: resource {:?}",
        p.span.resource
    );
    ensure!(
        p.start_unix_nano >= change.start_unix_nano && p.end_unix_nano > p.start_unix_nano,
        "push to {node}: start {} end {} (change started {})",
        p.start_unix_nano,
        p.end_unix_nano,
        change.start_unix_nano
    );
    Ok(())
}

/// Waits for a `config.change` span matching `pred` whose children include, for every node, a
/// push of `type_url` (spans are exported once they end, i.e. once the proxy answered).
async fn change_with_pushes(
    otlp: &Collector,
    what: &str,
    type_url: &str,
    pred: impl Fn(&FullSpan) -> bool,
) -> Result<(FullSpan, Vec<FullSpan>)> {
    eventually(what, SPANS, async || {
        let spans = otlp.spans();
        let changes: Vec<&FullSpan> = spans.iter().filter(|s| is_change(s) && pred(s)).collect();
        for c in &changes {
            let kids = children(&spans, c);
            if [SOTW, DELTA]
                .iter()
                .all(|n| push_to(&kids, n, type_url).is_some())
            {
                return Ok(((*c).clone(), kids.into_iter().cloned().collect()));
            }
        }
        let names: Vec<(&str, Option<&str>, Option<&str>)> = spans
            .iter()
            .map(|s| {
                (
                    s.span.name.as_str(),
                    s.attr("xds.node_id"),
                    s.attr("xds.type_url"),
                )
            })
            .collect();
        Err(anyhow!(
            "{} matching changes, none with a {type_url} push to both Envoys yet; spans so far: \
             {names:?}",
            changes.len()
        ))
    })
    .await
}

async fn pushes_fan_out(ctx: &TestCtx) -> Result<()> {
    let otlp = Collector::start().await?;
    let b = Backends::start(ctx, &[("web-1", Kind::Http), ("web-2", Kind::Http)]).await?;
    let cp = ControlPlane::start_with_args(
        ctx,
        Some(&registry(&b, &["web-1"], false)?),
        &["--otlp-endpoint".to_string(), otlp.endpoint()],
    )
    .await?;
    // The SotW Envoy's runtime accepts the big regex, so only the Delta one NACKs it.
    let admin = free_port()?;
    let lenient = format!(
        "{}\nlayered_runtime:\n  layers:\n    - name: static\n      static_layer:\n        re2.max_program_size.error_level: 1000000\n",
        render_bootstrap(Variant::Sotw, SOTW, admin, cp.xds_port)?
    );
    let sotw = Envoy::start_with_bootstrap(
        ctx,
        &format!("envoy-{SOTW}"),
        &lenient,
        admin,
        cp.envoy_http_port,
    )
    .await?;
    let delta = Envoy::start(ctx, &cp, Variant::Delta, DELTA).await?;
    for e in [&sotw, &delta] {
        eventually("Envoy routes Host: web", SPANS, async || {
            let r = e.http_get("web", "/").await?;
            ensure!(r.status == 200, "{} {}", r.status, r.body);
            Ok(())
        })
        .await?;
    }

    // Startup: the first translation is a change too, and each Envoy's first fetch of it is a
    // root span of its own, linked to that change (not a child: it did not cause the fetch).
    let initial = eventually("the startup config.change is exported", SPANS, async || {
        otlp.spans()
            .into_iter()
            .find(|s| is_change(s) && s.attr("weft.change.initial") == Some("true"))
            .ok_or_else(|| anyhow!("not yet: {:?}", otlp.spans()))
    })
    .await?;
    ensure!(
        initial.span.parent_span_id.is_none()
            && initial.span.service_name.as_deref() == Some("weft-control-plane"),
        "startup change: {initial:#?}"
    );
    let first_fetches = eventually(
        "each Envoy's first CDS fetch is exported",
        SPANS,
        async || {
            let spans = otlp.spans();
            let found: Vec<FullSpan> = [SOTW, DELTA]
                .iter()
                .filter_map(|n| {
                    spans.iter().find(|s| {
                        is_push(s)
                            && s.attr("xds.node_id") == Some(n)
                            && s.attr("xds.type_url") == Some(TYPE_CLUSTER)
                    })
                })
                .cloned()
                .collect();
            ensure!(found.len() == 2, "found {found:#?}");
            Ok(found)
        },
    )
    .await?;
    for f in &first_fetches {
        ensure!(
            f.span.parent_span_id.is_none()
                && f.attr("xds.initial") == Some("true")
                && f.links == vec![(initial.span.trace_id.clone(), initial.span.span_id.clone())],
            "a first fetch should be a root linked to the startup change {}: {f:#?}",
            initial.span.span_id
        );
    }

    // 1. An endpoint added: one change, rebuilding one service's endpoints (encoded once per
    //    flavour), whose children are exactly one EDS push per Envoy, each ended by its ACK.
    cp.write_registry(&registry(&b, &["web-1", "web-2"], false)?)?;
    let (change, pushes) = change_with_pushes(
        &otlp,
        "the endpoint change and its EDS pushes are exported",
        TYPE_ENDPOINT,
        |s| s.attr("weft.rebuilt.endpoint_services") == Some("1"),
    )
    .await?;
    eprintln!("config.change: {change:#?}\npushes: {pushes:#?}");
    for (k, v) in [
        ("weft.change.initial", "false"),
        ("weft.rebuilt.clusters", "false"),
        ("weft.rebuilt.listeners", "false"),
        ("weft.rebuilt.routes", "false"),
        ("weft.removed.endpoint_services", "0"),
        ("weft.resources.encoded", "2"),
    ] {
        ensure!(change.attr(k) == Some(v), "config.change {k}: {change:#?}");
    }
    for k in [
        "weft.registry.generation",
        "weft.duration_us",
        "weft.change.waited_ms",
    ] {
        ensure!(
            change.attr(k).is_some_and(|v| v.parse::<u64>().is_ok()),
            "config.change {k}: {change:#?}"
        );
    }
    ensure!(
        change.span.parent_span_id.is_none() && change.status_code == 0,
        "config.change should be a root with no error: {change:#?}"
    );
    // Settle, then count: nothing but the two EDS responses went out for this change.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let all = otlp.spans();
    let kids = children(&all, &change);
    ensure!(
        kids.len() == 2,
        "an endpoint change should make exactly one push per Envoy: {kids:#?}"
    );
    for (node, variant) in [(SOTW, "sotw"), (DELTA, "delta")] {
        let p = push_to(&kids, node, TYPE_ENDPOINT)
            .ok_or_else(|| anyhow!("no EDS push to {node}: {kids:#?}"))?;
        check_push(p, node, variant, &change)?;
        ensure!(
            p.attr("xds.outcome") == Some("ack") && p.status_code == 0,
            "EDS push to {node} should end with its ACK: {p:#?}"
        );
        ensure!(
            p.attr("xds.resources") == Some("1"),
            "EDS push to {node} should carry web's assignment: {p:#?}"
        );
    }

    // 2. A route the Delta Envoy rejects: its RDS push ends with the NACK, as an error carrying
    //    Envoy's message; the SotW Envoy's is ACKed.
    cp.write_registry(&registry(&b, &["web-1", "web-2"], true)?)?;
    let (change, pushes) = change_with_pushes(
        &otlp,
        "the route change and its RDS pushes are exported",
        TYPE_ROUTE,
        |s| s.attr("weft.rebuilt.routes") == Some("true"),
    )
    .await?;
    eprintln!("config.change: {change:#?}\npushes: {pushes:#?}");
    let refs: Vec<&FullSpan> = pushes.iter().collect();
    let nacked = push_to(&refs, DELTA, TYPE_ROUTE).expect("waited for");
    check_push(nacked, DELTA, "delta", &change)?;
    ensure!(
        nacked.status_code == STATUS_ERROR
            && nacked.status_message.contains("RE2 program size")
            && nacked.attr("xds.outcome") == Some("nack"),
        "the Delta Envoy's RDS push should be an error with Envoy's NACK message: {nacked:#?}"
    );
    let acked = push_to(&refs, SOTW, TYPE_ROUTE).expect("waited for");
    check_push(acked, SOTW, "sotw", &change)?;
    ensure!(
        acked.status_code == 0 && acked.attr("xds.outcome") == Some("ack"),
        "the SotW Envoy accepts the route (raised RE2 limit): {acked:#?}"
    );
    // The control plane agrees on who rejected what.
    let clients = cp.clients_of(DELTA).await?;
    ensure!(
        clients.first().is_some_and(|c| c["state"] == "NACKED"),
        "/debug/clients for {DELTA}: {clients:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_change_is_traced_to_every_proxys_ack_or_nack() {
    let ctx = TestCtx::new("control_plane_tracing").unwrap();
    let r = pushes_fan_out(&ctx).await;
    ctx.finish(r);
}

fn sigterm(cp: &mut ControlPlane) -> Result<()> {
    let pid = cp
        .proc()
        .pid()
        .ok_or_else(|| anyhow!("the control plane has already exited"))?;
    let st = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()?;
    ensure!(st.success(), "kill -TERM {pid}: {st}");
    Ok(())
}

async fn flush_on_shutdown(ctx: &TestCtx) -> Result<()> {
    let otlp = Collector::start().await?;
    // Batches wait ten minutes: a span can only reach the collector through the flush on exit.
    let mut cp = ControlPlane::start_with_env(
        ctx,
        Some("services: []\n"),
        &["--otlp-endpoint".to_string(), otlp.endpoint()],
        &[("OTEL_BSP_SCHEDULE_DELAY", "600000")],
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(
        otlp.spans().is_empty(),
        "spans were exported before shutdown despite OTEL_BSP_SCHEDULE_DELAY: {:#?}",
        otlp.spans()
    );
    sigterm(&mut cp)?;
    let st = cp.proc().wait(Duration::from_secs(15)).await?;
    ensure!(st.success(), "control plane exit: {st}");
    let spans = otlp.spans();
    ensure!(
        spans
            .iter()
            .any(|s| is_change(s) && s.attr("weft.change.initial") == Some("true")),
        "the startup config.change was not flushed on exit: {spans:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_queued_at_shutdown_are_flushed() {
    let ctx = TestCtx::new("control_plane_tracing_flush").unwrap();
    let r = flush_on_shutdown(&ctx).await;
    ctx.finish(r);
}

async fn nothing_without_endpoint(ctx: &TestCtx) -> Result<()> {
    let otlp = Collector::start().await?;
    let b = Backends::start(ctx, &[("web-1", Kind::Http), ("web-2", Kind::Http)]).await?;
    // The OpenTelemetry variables a stray exporter would read all point at the collector, and
    // WEFT_OTLP_ENDPOINT is set but empty: none of it may turn export on.
    let mut cp = ControlPlane::start_with_env(
        ctx,
        Some(&registry(&b, &["web-1"], false)?),
        &[],
        &[
            ("WEFT_OTLP_ENDPOINT", ""),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp.endpoint()),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &otlp.endpoint()),
        ],
    )
    .await?;
    let envoy = Envoy::start(ctx, &cp, Variant::Delta, "trace-off").await?;
    cp.write_registry(&registry(&b, &["web-1", "web-2"], false)?)?;
    eventually("Envoy reaches web-2", SPANS, async || {
        let t = envoy.spray("web", "/", 10).await?;
        ensure!(t.get("web-2") > 0, "{t}");
        Ok(())
    })
    .await?;
    // Longer than the export delay, and then the flush on exit.
    tokio::time::sleep(Duration::from_secs(2)).await;
    sigterm(&mut cp)?;
    let st = cp.proc().wait(Duration::from_secs(15)).await?;
    ensure!(st.success(), "control plane exit: {st}");
    ensure!(
        otlp.connections() == 0 && otlp.exports() == 0,
        "without --otlp-endpoint the control plane connected {} times and exported {} times",
        otlp.connections(),
        otlp.exports()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_exported_or_attempted() {
    let ctx = TestCtx::new("control_plane_tracing_off").unwrap();
    let r = nothing_without_endpoint(&ctx).await;
    ctx.finish(r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_endpoint_stops_startup_naming_the_flag() {
    let mut args = ControlPlane::args(free_port().unwrap(), free_port().unwrap(), 15001, None);
    args.extend(["--otlp-endpoint".to_string(), "collector:4317".to_string()]);
    let (st, _, stderr) = run_control_plane_to_exit(&args, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(st.code(), Some(64), "exit status {st}; stderr: {stderr}");
    assert!(
        stderr.contains("--otlp-endpoint `collector:4317`") && stderr.contains("http://"),
        "stderr should name the flag and the form it takes: {stderr}"
    );
}
