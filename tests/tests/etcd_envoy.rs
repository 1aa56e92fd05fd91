//! etcd as the registry, real Envoy (SotW and Delta) as the client: instances written to etcd
//! decide where real HTTP traffic goes, including a lease running out and a delete.

use std::time::Duration;

use anyhow::{Result, ensure};
use etcd_client::PutOptions;
use weft_tests::*;

async fn scenario(ctx: &TestCtx, variant: Variant) -> Result<()> {
    let b = Backends::start(ctx, &[("web-1", Kind::Http), ("web-2", Kind::Http)]).await?;
    let etcd = Etcd::start(ctx).await?;
    let mut kv = etcd.client().await?;
    let ep = |name: &str| -> Result<String> {
        Ok(format!(
            r#"{{"address":"127.0.0.1","port":{}}}"#,
            b.port(name)?
        ))
    };
    kv.put("/weft/services/web/w1", ep("web-1")?, None).await?;
    let cp = ControlPlane::start_with_args(
        ctx,
        None,
        &["--etcd-endpoints".to_string(), etcd.url.clone()],
    )
    .await?;
    let envoy = Envoy::start(ctx, &cp, variant, &format!("envoy-etcd-{}", variant.name())).await?;
    let only = |name: &'static str| move |t: &Tally| t.errors == 0 && t.get(name) == 20;
    let spray_until = async |what: &str, pred: &dyn Fn(&Tally) -> bool| -> Result<()> {
        converge(
            what,
            Duration::from_secs(15),
            async || envoy.spray("web", "/", 20).await,
            pred,
        )
        .await
    };
    spray_until("traffic reaches web-1 from etcd", &only("web-1")).await?;

    // web-2 on a 2 s lease nobody keeps alive: it gets traffic, then none once it expires.
    let lease = kv.lease_grant(2, None).await?.id();
    kv.put(
        "/weft/services/web/w2",
        ep("web-2")?,
        Some(PutOptions::new().with_lease(lease)),
    )
    .await?;
    spray_until("web-2 joins", &|t: &Tally| {
        t.errors == 0 && t.get("web-1") > 0 && t.get("web-2") > 0
    })
    .await?;
    spray_until("web-2 leaves when its lease expires", &only("web-1")).await?;

    // Swap by put + delete.
    kv.put("/weft/services/web/w2", ep("web-2")?, None).await?;
    kv.delete("/weft/services/web/w1", None).await?;
    spray_until("only web-2 after the delete", &only("web-2")).await?;

    let rejected: u64 = envoy
        .stats()
        .await?
        .iter()
        .filter(|(k, _)| k.ends_with(".update_rejected"))
        .map(|(_, v)| *v)
        .sum();
    ensure!(rejected == 0, "Envoy rejected {rejected} updates");
    Ok(())
}

#[tokio::test]
async fn etcd_drives_envoy_sotw() {
    let ctx = TestCtx::new("etcd_envoy_sotw").unwrap();
    let r = scenario(&ctx, Variant::Sotw).await;
    ctx.finish(r);
}

#[tokio::test]
async fn etcd_drives_envoy_delta() {
    let ctx = TestCtx::new("etcd_envoy_delta").unwrap();
    let r = scenario(&ctx, Variant::Delta).await;
    ctx.finish(r);
}
