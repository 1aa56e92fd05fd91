//! A config Envoy rejects (a route regex over Envoy's RE2 program-size limit, which the
//! registry schema cannot know about): the control plane records the NACK per client and per
//! resource (state NACKED, the rejected RouteConfiguration with Envoy's reason, the recent-NACK
//! log, the rejection gauge), does not resend in a loop, other resources keep flowing, and
//! Envoy keeps serving the last good config.

use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use serde_json::Value;
use weft_tests::*;

fn registry(b: &Backends, bad_route: bool) -> Result<String> {
    registry_with(b, bad_route, &["web-1"])
}

fn registry_with(b: &Backends, bad_route: bool, web: &[&str]) -> Result<String> {
    let mut y = String::from("services:\n");
    y.push_str(&b.service_yaml("web", "http", web)?);
    if bad_route {
        y.push_str(&regex_route_yaml(
            "bad-regex",
            "web",
            &regex_envoy_rejects("nack"),
        ));
    }
    Ok(y)
}

/// The RouteConfiguration state of `node`'s stream in /debug/clients.
async fn route_state(cp: &ControlPlane, node: &str) -> Result<Value> {
    let clients = cp.clients_of(node).await?;
    clients
        .iter()
        .find_map(|c| c.get("types").and_then(|t| t.get(TYPE_ROUTE)).cloned())
        .ok_or_else(|| {
            anyhow!("no {TYPE_ROUTE} state for node {node} in /debug/clients: {clients:?}")
        })
}

fn pushes(state: &Value) -> Result<u64> {
    state
        .get("pushes")
        .and_then(Value::as_u64)
        .ok_or_else(|| anyhow!("no `pushes` in {state}"))
}

async fn scenario(ctx: &TestCtx, variant: Variant) -> Result<()> {
    let b = Backends::start(ctx, &[("web-1", Kind::Http), ("web-2", Kind::Http)]).await?;
    let cp = ControlPlane::start(ctx, &registry(&b, false)?).await?;
    let node = format!("envoy-nack-{}", variant.name());
    let envoy = Envoy::start(ctx, &cp, variant, &node).await?;
    envoy.wait_routes("web", Some("web-1")).await?;
    let before = route_state(&cp, &node).await?;
    ensure!(
        before.get("last_nack").is_none_or(Value::is_null),
        "a NACK before any bad config: {before}"
    );

    // The bad route: Envoy must NACK the RouteConfiguration.
    cp.write_registry(&registry(&b, true)?)?;
    let nacked = eventually(
        "the control plane records Envoy's NACK",
        Duration::from_secs(10),
        async || {
            let st = route_state(&cp, &node).await?;
            let msg = st
                .get("last_nack")
                .and_then(|n| n.get("message"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            ensure!(!msg.is_empty(), "no last_nack with a message yet: {st}");
            Ok(st)
        },
    )
    .await?;
    eprintln!("NACK recorded: {}", nacked["last_nack"]);

    // Per resource: the RouteConfiguration is the one rejected, with Envoy's reason; the
    // stream and the type say NACKED.
    ensure!(nacked["state"] == "NACKED", "RDS state: {nacked}");
    let rejected = nacked["rejected"]
        .as_array()
        .ok_or_else(|| anyhow!("no `rejected` list: {nacked}"))?;
    ensure!(
        rejected.len() == 1
            && rejected[0]["name"] == "weft_http"
            && rejected[0]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("RE2 program size")),
        "rejected resources: {rejected:?}"
    );
    let client = &cp.clients_of(&node).await?[0];
    ensure!(client["state"] == "NACKED", "client state: {client}");
    let log: Value = serde_json::from_str(&cp.admin_get("/debug/nacks").await?)?;
    let entry = &log["nacks"][0];
    ensure!(
        entry["node_id"] == node.as_str()
            && entry["type_url"] == TYPE_ROUTE
            && entry["resources"] == serde_json::json!(["weft_http"]),
        "/debug/nacks: {log}"
    );
    let gauge = cp
        .metric_value(
            "weft_xds_rejected_resources",
            &[("type_url", TYPE_ROUTE), ("resource", "weft_http")],
        )
        .await?;
    ensure!(
        gauge == Some(1.0),
        "weft_xds_rejected_resources = {gauge:?}"
    );
    // What an alert on `weft_xds_sync_state_streams{state="NACKED"} > 0` sees.
    let nacked_streams = cp
        .metric_value(
            "weft_xds_sync_state_streams",
            &[("type_url", TYPE_ROUTE), ("state", "NACKED")],
        )
        .await?;
    ensure!(
        nacked_streams == Some(1.0),
        "weft_xds_sync_state_streams{{RDS,NACKED}} = {nacked_streams:?}"
    );
    let config: Value = serde_json::from_str(
        &cp.admin_get(&format!("/debug/proxy_config?node={node}"))
            .await?,
    )?;
    let routes = &config["streams"][0]["types"][TYPE_ROUTE]["resources"][0];
    ensure!(
        routes["name"] == "weft_http" && routes["state"] == "NACKED",
        "/debug/proxy_config RDS: {routes}"
    );

    let nacks = cp
        .metric_value(
            "weft_xds_nacks_total",
            &[("variant", variant.name()), ("type_url", TYPE_ROUTE)],
        )
        .await?
        .unwrap_or(0.0);
    ensure!(
        nacks > 0.0,
        "weft_xds_nacks_total{{variant={},type_url=RDS}} = {nacks}",
        variant.name()
    );

    // No resend loop: the push count for RDS stands still.
    let p1 = pushes(&route_state(&cp, &node).await?)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let p2 = pushes(&route_state(&cp, &node).await?)?;
    ensure!(
        p1 == p2,
        "RDS pushes kept growing after the NACK: {p1} -> {p2} (resend loop)"
    );

    // Envoy still serves with the last good config.
    let t = envoy.spray("web", "/", 10).await?;
    ensure!(
        t.errors == 0 && t.get("web-1") == 10,
        "traffic after the NACK: {t}"
    );

    // Other resources keep flowing: a new endpoint (EDS) reaches Envoy while its routes
    // stay rejected.
    cp.write_registry(&registry_with(&b, true, &["web-1", "web-2"])?)?;
    eventually(
        "Envoy routes to web-2 while the RouteConfiguration is still rejected",
        Duration::from_secs(10),
        async || {
            let t = envoy.spray("web", "/", 20).await?;
            ensure!(t.errors == 0 && t.get("web-2") > 0, "{t}");
            Ok(())
        },
    )
    .await?;
    let st = route_state(&cp, &node).await?;
    ensure!(st["state"] == "NACKED", "RDS after the EDS change: {st}");
    ensure!(
        pushes(&st)? == p2,
        "the rejected RouteConfiguration was re-sent after an endpoint change: {st}"
    );

    // And Envoy really rejected it.
    let stats = envoy.stats().await?;
    let rds_rejected: u64 = stats
        .iter()
        .filter(|(k, _)| k.contains(".rds.") && k.ends_with(".update_rejected"))
        .map(|(_, v)| *v)
        .sum();
    ensure!(
        rds_rejected > 0,
        "Envoy's RDS update_rejected is 0: it never rejected the config"
    );

    // Fixing the registry clears it: the next version is ACKed, the state is SYNCED, nothing
    // is rejected any more.
    cp.write_registry(&registry(&b, false)?)?;
    eventually(
        "Envoy ACKs the fixed RouteConfiguration",
        Duration::from_secs(10),
        async || {
            let st = route_state(&cp, &node).await?;
            let sent = st.get("last_sent_version").and_then(Value::as_str);
            let acked = st.get("last_acked_version").and_then(Value::as_str);
            ensure!(
                sent.is_some() && sent == acked,
                "sent {sent:?}, acked {acked:?}: {st}"
            );
            ensure!(pushes(&st)? > p2, "no new RDS push after the fix: {st}");
            ensure!(st["state"] == "SYNCED", "RDS state after the fix: {st}");
            let mut by_state = Vec::new();
            for state in ["SYNCED", "NACKED"] {
                let labels = [("type_url", TYPE_ROUTE), ("state", state)];
                by_state.push(
                    cp.metric_value("weft_xds_sync_state_streams", &labels)
                        .await?,
                );
            }
            let (synced, nacked) = (by_state[0], by_state[1]);
            ensure!(
                synced == Some(1.0) && nacked == Some(0.0),
                "weft_xds_sync_state_streams for RDS after the fix: SYNCED {synced:?}, NACKED {nacked:?}"
            );
            ensure!(
                st["rejected"] == serde_json::json!([]),
                "still rejected: {st}"
            );
            Ok(())
        },
    )
    .await?;
    let t = envoy.spray("web", "/", 10).await?;
    ensure!(
        t.errors == 0 && t.get("web-1") == 10,
        "traffic after the fix: {t}"
    );
    Ok(())
}

#[tokio::test]
async fn envoy_sotw_nack_is_recorded_and_not_resent() {
    let ctx = TestCtx::new("nack_sotw").unwrap_or_else(|e| panic!("{e:#}"));
    let r = scenario(&ctx, Variant::Sotw).await;
    ctx.finish(r);
}

#[tokio::test]
async fn envoy_delta_nack_is_recorded_and_not_resent() {
    let ctx = TestCtx::new("nack_delta").unwrap_or_else(|e| panic!("{e:#}"));
    let r = scenario(&ctx, Variant::Delta).await;
    ctx.finish(r);
}
