//! Real Envoy (SotW and Delta ADS) fetching its config over mTLS: its bootstrap's xds_cluster
//! presents a client certificate with a SPIFFE ID, the control plane requires it, and traffic
//! flows through Envoy to the demo backends. An Envoy whose node id its identity does not own
//! gets nothing.

use std::time::Duration;

use anyhow::{Result, ensure};
use weft_tests::*;

const CONVERGE: Duration = Duration::from_secs(15);

/// The example bootstrap with an UpstreamTlsContext on the xds_cluster.
fn bootstrap(
    variant: Variant,
    node_id: &str,
    admin_port: u16,
    cp: &ControlPlane,
    pki: &Mtls,
    (cert, key): (&std::path::Path, &std::path::Path),
) -> Result<String> {
    let yaml = render_bootstrap(variant, node_id, admin_port, cp.xds_port)?;
    let anchor = "      connect_timeout: 1s\n";
    ensure!(
        yaml.matches(anchor).count() == 1,
        "bootstrap lacks `{anchor}`"
    );
    let tls = format!(
        r#"{anchor}      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: localhost
          common_tls_context:
            alpn_protocols: [h2]
            tls_certificates:
              - certificate_chain: {{filename: "{cert}"}}
                private_key: {{filename: "{key}"}}
            validation_context:
              trusted_ca: {{filename: "{ca}"}}
              match_typed_subject_alt_names:
                - san_type: DNS
                  matcher: {{exact: localhost}}
"#,
        cert = cert.display(),
        key = key.display(),
        ca = pki.ca_path.display(),
    );
    Ok(yaml.replace(anchor, &tls))
}

async fn scenario(ctx: &TestCtx, variant: Variant) -> Result<()> {
    let pki = Mtls::new(ctx)?;
    let b = Backends::start(ctx, &[("web-1", Kind::Http), ("web-2", Kind::Http)]).await?;
    let registry = format!(
        "services:\n{}",
        b.service_yaml("web", "http", &["web-1", "web-2"])?
    );
    let cp = ControlPlane::start_with_args(ctx, Some(&registry), &pki.control_plane_args()).await?;
    let (cert, key) = pki.client("envoy-web", "spiffe://weft.test/ns/default/svc/web")?;

    // Owned node id: config arrives over mTLS and traffic flows.
    let node = format!("web~envoy-{}", variant.name());
    let admin = free_port()?;
    let yaml = bootstrap(variant, &node, admin, &cp, &pki, (&cert, &key))?;
    let envoy = Envoy::start_with_bootstrap(
        ctx,
        &format!("envoy-{}", variant.name()),
        &yaml,
        admin,
        cp.envoy_http_port,
    )
    .await?;
    eventually(
        "Envoy routes Host: web over mTLS-fetched config",
        CONVERGE,
        async || {
            let r = envoy.http_get("web", "/").await?;
            ensure!(r.status == 200, "status {}: {}", r.status, r.body);
            Ok(())
        },
    )
    .await?;
    let t = envoy.spray("web", "/", 20).await?;
    ensure!(t.errors == 0, "requests failed: {t}");
    ensure!(
        t.get("web-1") > 0 && t.get("web-2") > 0,
        "not balanced: {t}"
    );
    let clients = cp.clients_of(&node).await?;
    ensure!(!clients.is_empty(), "{node} not in /debug/clients");
    ensure!(
        envoy
            .stat("cluster.xds_cluster.ssl.handshake")
            .await?
            .unwrap_or(0)
            >= 1,
        "Envoy made no TLS handshake to the control plane"
    );

    // Same certificate, a node id of another service: refused, never gets config.
    let rogue = format!("api~envoy-{}", variant.name());
    let admin2 = free_port()?;
    let yaml = bootstrap(variant, &rogue, admin2, &cp, &pki, (&cert, &key))?;
    let listener2 = free_port()?;
    let rogue_name = format!("envoy-rogue-{}", variant.name());
    let res = Envoy::start_with_bootstrap(ctx, &rogue_name, &yaml, admin2, listener2);
    // Envoy never becomes LIVE without CDS/LDS; give it a few seconds rather than 30.
    let outcome = tokio::time::timeout(Duration::from_secs(5), res).await;
    ensure!(
        !matches!(outcome, Ok(Ok(_))),
        "an Envoy claiming node {rogue} with the web identity got its config"
    );
    eventually("the refusal is counted", CONVERGE, async || {
        let denied = cp
            .metric_value("weft_xds_streams_denied_total", &[])
            .await?
            .unwrap_or(0.0);
        ensure!(denied >= 1.0, "weft_xds_streams_denied_total = {denied}");
        Ok(())
    })
    .await?;
    ensure!(
        cp.clients_of(&rogue).await?.is_empty(),
        "{rogue} listed as a connected client"
    );
    Ok(())
}

#[tokio::test]
async fn envoy_sotw_over_mtls() {
    let ctx = TestCtx::new("envoy_mtls_sotw").unwrap_or_else(|e| panic!("{e:#}"));
    let r = scenario(&ctx, Variant::Sotw).await;
    ctx.finish(r);
}

#[tokio::test]
async fn envoy_delta_over_mtls() {
    let ctx = TestCtx::new("envoy_mtls_delta").unwrap_or_else(|e| panic!("{e:#}"));
    let r = scenario(&ctx, Variant::Delta).await;
    ctx.finish(r);
}
