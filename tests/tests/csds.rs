//! CSDS against real Envoys, asked by a standard CSDS client (grpcio with PyPI `xds-protos`,
//! tests/clients/python/csds_client.py): per resource, what each Envoy holds and whether it
//! accepted it, with the resources unpacked into Envoy's own message types.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use serde_json::Value;
use weft_tests::*;

fn registry(b: &Backends, bad_route: bool) -> Result<String> {
    let mut y = String::from("services:\n");
    y.push_str(&b.service_yaml("web", "http", &["web-1"])?);
    if bad_route {
        y.push_str(&regex_route_yaml(
            "bad-regex",
            "web",
            &regex_envoy_rejects("csds"),
        ));
    }
    Ok(y)
}

async fn csds(cp: &ControlPlane, prefix: &str) -> Result<Value> {
    let script = repo_root().join("tests/clients/python/csds_client.py");
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(python_bin()?)
            .arg(&script)
            .arg(format!("127.0.0.1:{}", cp.xds_port))
            .arg(prefix)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("csds_client.py did not finish in 30 s")??;
    ensure!(
        out.status.success(),
        "csds_client.py failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn resource<'a>(client: &'a Value, type_url: &str, name: &str) -> Result<&'a Value> {
    client["resources"]
        .as_array()
        .and_then(|rs| {
            rs.iter()
                .find(|r| r["type_url"] == type_url && r["name"] == name)
        })
        .ok_or_else(|| anyhow!("no {type_url} {name} in {client}"))
}

#[tokio::test]
async fn envoys_status_over_csds_with_a_rejected_route() {
    let ctx = TestCtx::new("csds").unwrap_or_else(|e| panic!("{e:#}"));
    let r = scenario(&ctx).await;
    ctx.finish(r);
}

async fn scenario(ctx: &TestCtx) -> Result<()> {
    let b = Backends::start(ctx, &[("web-1", Kind::Http)]).await?;
    let cp = ControlPlane::start(ctx, &registry(&b, false)?).await?;
    let sotw = Envoy::start(ctx, &cp, Variant::Sotw, "csds-sotw").await?;
    let delta = Envoy::start(ctx, &cp, Variant::Delta, "csds-delta").await?;
    for envoy in [&sotw, &delta] {
        envoy.wait_routes("web", None).await?;
    }
    let all = eventually(
        "both Envoys ACKed everything",
        Duration::from_secs(10),
        async || {
            let doc = csds(&cp, "csds-").await?;
            let clients = doc["clients"].as_array().cloned().unwrap_or_default();
            ensure!(clients.len() == 2, "{doc}");
            for c in &clients {
                for r in c["resources"].as_array().into_iter().flatten() {
                    ensure!(
                        r["config_status"] == "SYNCED" && r["client_status"] == "ACKED",
                        "{}: {r}",
                        c["node_id"]
                    );
                }
            }
            Ok(clients)
        },
    )
    .await?;
    for c in &all {
        // The cluster arrived as a real envoy.config.cluster.v3.Cluster.
        let web = resource(c, TYPE_CLUSTER, "web")?;
        ensure!(web["config"]["name"] == "web", "unpacked cluster: {web}");
        ensure!(
            web["config"]["@type"] == TYPE_CLUSTER,
            "the Any's type: {web}"
        );
        resource(c, TYPE_ROUTE, "weft_http")?;
    }
    // The matcher narrows to one node.
    let one = csds(&cp, "csds-delta").await?;
    ensure!(
        one["clients"].as_array().map(Vec::len) == Some(1)
            && one["clients"][0]["node_id"] == "csds-delta",
        "prefix csds-delta: {one}"
    );

    cp.write_registry(&registry(&b, true)?)?;
    eventually(
        "both Envoys' rejections reported",
        Duration::from_secs(15),
        async || {
            let doc = csds(&cp, "csds-").await?;
            let clients = doc["clients"].as_array().cloned().unwrap_or_default();
            ensure!(clients.len() == 2, "{doc}");
            for c in &clients {
                let rds = resource(c, TYPE_ROUTE, "weft_http")?;
                ensure!(
                    rds["config_status"] == "ERROR" && rds["client_status"] == "NACKED",
                    "{}: {rds}",
                    c["node_id"]
                );
                let err = rds["error"].as_str().unwrap_or_default();
                ensure!(err.contains("RE2 program size"), "error_state: {rds}");
                let web = resource(c, TYPE_CLUSTER, "web")?;
                ensure!(web["config_status"] == "SYNCED", "cluster: {web}");
            }
            Ok(())
        },
    )
    .await?;

    cp.write_registry(&registry(&b, false)?)?;
    eventually(
        "the fixed route is ACKed",
        Duration::from_secs(15),
        async || {
            let doc = csds(&cp, "csds-").await?;
            for c in doc["clients"].as_array().into_iter().flatten() {
                let rds = resource(c, TYPE_ROUTE, "weft_http")?;
                ensure!(
                    rds["client_status"] == "ACKED" && rds.get("error").is_none(),
                    "{rds}"
                );
            }
            Ok(())
        },
    )
    .await?;
    Ok(())
}
