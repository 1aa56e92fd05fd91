//! `weft-sidecar` over mTLS: it presents its certificate to the control plane, registers its
//! app through the registration API and receives config; traffic through a client sidecar
//! (its own identity) reaches the app. A sidecar whose certificate names another service can
//! neither register nor get config.

use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use weft_tests::*;

const CONVERGE: Duration = Duration::from_secs(20);

fn tls_args(
    mut a: SidecarArgs,
    cp: &ControlPlane,
    pki: &Mtls,
    name: &str,
    id: &str,
) -> Result<SidecarArgs> {
    let (cert, key) = pki.client(name, id)?;
    a.control_plane = format!("https://localhost:{}", cp.xds_port);
    for (flag, v) in [
        ("--tls-ca", pki.ca_path.display().to_string()),
        ("--tls-cert", cert.display().to_string()),
        ("--tls-key", key.display().to_string()),
    ] {
        a = a.arg(flag).arg(&v);
    }
    Ok(a)
}

async fn scenario(ctx: &TestCtx, variant: Variant) -> Result<()> {
    let pki = Mtls::new(ctx)?;
    let b = Backends::start(ctx, &[("web-1", Kind::Http)]).await?;
    let cp = ControlPlane::start_with_args(
        ctx,
        Some("policies:\n  - {name: web-lb, service: web, lb: round_robin}\n"),
        &pki.control_plane_args(),
    )
    .await?;
    let server = tls_args(
        SidecarArgs::server(&cp, "web-1", "web", b.port("web-1")?)
            .health("http:/healthz")
            .variant(variant),
        &cp,
        &pki,
        "sc-web",
        "spiffe://weft.test/ns/default/svc/web",
    )?;
    let _web = Sidecar::start(ctx, server).await?;
    let client = tls_args(
        SidecarArgs::client(&cp, "client")?.variant(variant),
        &cp,
        &pki,
        "sc-client",
        "spiffe://weft.test/ns/default/svc/client",
    )?;
    let client = Sidecar::start(ctx, client).await?;

    eventually("web-1 registered over mTLS", CONVERGE, async || {
        registration_of(&cp, "web", "web-1")
            .await?
            .ok_or_else(|| anyhow!("web-1 not registered yet"))?;
        Ok(())
    })
    .await?;
    converge(
        "traffic reaches web-1 through both sidecars",
        CONVERGE,
        async || client.spray("web", "/", 10).await,
        |t| t.errors == 0 && t.get("web-1") == 10,
    )
    .await?;
    for node in ["web~web-1", "client~client"] {
        ensure!(
            !cp.clients_of(node).await?.is_empty(),
            "{node} not connected over xDS"
        );
    }

    // A sidecar for `api` holding web's certificate: refused on both APIs.
    let rogue = tls_args(
        SidecarArgs::server(&cp, "api-1", "api", b.port("web-1")?)
            .variant(variant)
            .wait(SidecarWait::Live),
        &cp,
        &pki,
        "sc-rogue",
        "spiffe://weft.test/ns/default/svc/web",
    )?;
    let rogue = Sidecar::start(ctx, rogue).await?;
    eventually("the rogue sidecar is refused", CONVERGE, async || {
        let denied = cp
            .metric_value("weft_registration_denied_total", &[])
            .await?
            .unwrap_or(0.0);
        let xds_denied = cp
            .metric_value("weft_xds_streams_denied_total", &[])
            .await?
            .unwrap_or(0.0);
        ensure!(
            denied >= 1.0 && xds_denied >= 1.0,
            "denied: registration {denied}, xds {xds_denied}"
        );
        Ok(())
    })
    .await?;
    ensure!(
        registration_of(&cp, "api", "api-1").await?.is_none(),
        "api-1 registered"
    );
    let ready = rogue.admin_get("/readyz").await?;
    ensure!(
        ready.status != 200,
        "the rogue sidecar is ready: {}",
        ready.body
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_delta_over_mtls() {
    let ctx = TestCtx::new("sidecar_mtls_delta").unwrap_or_else(|e| panic!("{e:#}"));
    let r = scenario(&ctx, Variant::Delta).await;
    ctx.finish(r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_sotw_over_mtls() {
    let ctx = TestCtx::new("sidecar_mtls_sotw").unwrap_or_else(|e| panic!("{e:#}"));
    let r = scenario(&ctx, Variant::Sotw).await;
    ctx.finish(r);
}
