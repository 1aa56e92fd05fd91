//! Proxyless gRPC clients (grpcio and @grpc/grpc-js-xds) against the control plane:
//! `xds:///echo` round-robins over the registry's endpoints, follows endpoint removal and
//! re-addition without failed calls, and honours weighted route splits.

use std::time::Duration;

use anyhow::{Result, ensure};
use weft_tests::*;

const CONVERGE: Duration = Duration::from_secs(10);

fn registry(b: &Backends, echo: &[&str], split: Option<(u32, u32)>) -> Result<String> {
    let mut y = String::from("services:\n");
    y.push_str(&b.service_yaml("echo", "grpc", echo)?);
    y.push_str(&b.service_yaml("echo-a", "grpc", &["echo-a-1"])?);
    y.push_str(&b.service_yaml("echo-b", "grpc", &["echo-b-1"])?);
    y.push_str("policies:\n  - {name: echo-lb, service: echo, lb: round_robin}\n");
    if let Some((a, bw)) = split {
        y.push_str(&format!(
            "routes:\n  - name: echo-split\n    service: echo\n    rules:\n      - match: {{path_prefix: /}}\n        backends: [{{service: echo-a, weight: {a}}}, {{service: echo-b, weight: {bw}}}]\n"
        ));
    }
    Ok(y)
}

/// Makes batches of `batch` calls until `pred` holds (see [`weft_tests::converge`]: any
/// failed call in any batch fails the test).
async fn converge(
    client: &mut GrpcClient,
    what: &str,
    batch: u32,
    timeout: Duration,
    pred: impl Fn(&Tally) -> bool,
) -> Result<()> {
    weft_tests::converge(what, timeout, async || client.call(batch).await, pred).await
}

async fn scenario(ctx: &TestCtx, lang: Lang) -> Result<()> {
    let b = Backends::start(
        ctx,
        &[
            ("echo-1", Kind::Grpc),
            ("echo-2", Kind::Grpc),
            ("echo-3", Kind::Grpc),
            ("echo-a-1", Kind::Grpc),
            ("echo-b-1", Kind::Grpc),
        ],
    )
    .await?;
    let all = ["echo-1", "echo-2", "echo-3"];
    let cp = ControlPlane::start(ctx, &registry(&b, &all, None)?).await?;
    let node = format!("grpc-e2e-{}", lang.name());
    let mut c = GrpcClient::start_xds(ctx, lang, cp.xds_port, "echo", &node, "z1").await?;

    // First calls wait for the xDS resolution (wait_for_ready), so they get a long deadline.
    let t = c.call_with_deadline(5, 20.0).await?;
    ensure!(
        t.errors == 0 && t.ok() == 5,
        "first calls through xds:///echo: {t}"
    );
    converge(&mut c, "all three endpoints answer", 30, CONVERGE, |t| {
        all.iter().all(|n| t.get(n) > 0)
    })
    .await?;

    // 1. Round robin: each ~100 of 300.
    let t = c.call(300).await?;
    ensure!(t.errors == 0, "round robin: {t}");
    for n in all {
        ensure!((70..=130).contains(&t.get(n)), "round robin is uneven: {t}");
    }

    // 2. Remove echo-3 from the registry file.
    cp.write_registry(&registry(&b, &["echo-1", "echo-2"], None)?)?;
    converge(&mut c, "echo-3 gets no calls", 30, CONVERGE, |t| {
        t.get("echo-3") == 0
    })
    .await?;
    let t = c.call(100).await?;
    ensure!(
        t.errors == 0 && t.get("echo-3") == 0,
        "after removing echo-3: {t}"
    );
    ensure!(
        t.get("echo-1") >= 30 && t.get("echo-2") >= 30,
        "after removing echo-3: {t}"
    );

    // 3. Add it back.
    cp.write_registry(&registry(&b, &all, None)?)?;
    converge(&mut c, "echo-3 gets calls again", 30, CONVERGE, |t| {
        t.get("echo-3") > 0
    })
    .await?;

    // 4. Weighted split echo-a 75 / echo-b 25.
    cp.write_registry(&registry(&b, &all, Some((75, 25)))?)?;
    converge(&mut c, "the split route is in force", 40, CONVERGE, |t| {
        t.get("echo-a-1") + t.get("echo-b-1") == t.ok() && t.get("echo-a-1") > 0
    })
    .await?;
    let t = c.call(400).await?;
    ensure!(t.errors == 0, "split: {t}");
    let (a, bb) = (t.get("echo-a-1"), t.get("echo-b-1"));
    ensure!(
        a + bb == 400,
        "split: calls went outside echo-a/echo-b: {t}"
    );
    // Binomial(400, 0.75): sd ~8.7, so 260..=340 is more than 4.5 sd either side.
    ensure!((260..=340).contains(&a), "split 75/25 is off: {t}");
    Ok(())
}

#[tokio::test]
async fn grpcio_follows_the_registry() {
    let ctx = TestCtx::new("grpc_python").unwrap_or_else(|e| panic!("{e:#}"));
    let r = scenario(&ctx, Lang::Python).await;
    ctx.finish(r);
}

#[tokio::test]
async fn grpc_js_xds_follows_the_registry() {
    let ctx = TestCtx::new("grpc_node").unwrap_or_else(|e| panic!("{e:#}"));
    let r = scenario(&ctx, Lang::Node).await;
    ctx.finish(r);
}
