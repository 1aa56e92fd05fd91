//! Starting the binary: a malformed registry file is a usage error (exit 64) that names the
//! file and the field; no registry file at all runs on the embedded registry.

use std::time::Duration;

use anyhow::{Result, ensure};
use weft_tests::*;

#[tokio::test]
async fn malformed_registry_file_exits_64_naming_file_and_field() {
    let ctx = TestCtx::new("startup_malformed").unwrap_or_else(|e| panic!("{e:#}"));
    let r: Result<()> = async {
        let path = ctx.path("bad-registry.yaml");
        std::fs::write(
            &path,
            "services:\n  - name: web\n    endpoints:\n      - {address: 127.0.0.1, port: 70000}\n",
        )?;
        let args = ControlPlane::args(free_port()?, free_port()?, free_port()?, Some(&path));
        let (status, stdout, stderr) =
            run_control_plane_to_exit(&args, Duration::from_secs(30)).await?;
        std::fs::write(ctx.path("control-plane.stderr"), &stderr)?;
        ensure!(
            status.code() == Some(64),
            "expected exit status 64, got {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
        ensure!(
            stderr.contains(&path.display().to_string()),
            "stderr does not name the file {}:\n{stderr}",
            path.display()
        );
        ensure!(
            stderr.contains("services[0].endpoints[0].port"),
            "stderr does not name the field services[0].endpoints[0].port:\n{stderr}"
        );
        Ok(())
    }
    .await;
    ctx.finish(r);
}

#[tokio::test]
async fn without_registry_file_it_runs_on_the_embedded_registry() {
    let ctx = TestCtx::new("startup_embedded_only").unwrap_or_else(|e| panic!("{e:#}"));
    let r: Result<()> = async {
        // start_with waits for /readyz 200.
        let cp = ControlPlane::start_with(&ctx, None).await?;
        let health = cp.admin_get("/healthz").await?;
        ensure!(health.trim() == "ok", "/healthz said {health:?}");
        let clients = cp.clients_json().await?;
        ensure!(
            clients.get("clients").is_some_and(|c| c.is_array()),
            "{clients}"
        );
        let dump = cp.config_dump().await?;
        ensure!(
            dump.get("flavors").is_some(),
            "config_dump has no flavors: {dump}"
        );
        let metrics = cp.metrics().await?;
        ensure!(
            metrics.contains("weft_xds"),
            "/metrics has no weft_xds metrics:\n{metrics}"
        );
        Ok(())
    }
    .await;
    ctx.finish(r);
}
