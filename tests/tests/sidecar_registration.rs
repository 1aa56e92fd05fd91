//! `weft-sidecar` registration end to end: a sidecar registers its app with the control plane
//! (or etcd), the control plane serves it over xDS to a client sidecar, and traffic through the
//! client sidecar follows the app's health, a graceful drain (SIGTERM) and a crash (SIGKILL).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, ensure};
use weft_proto::demo::v1::EchoRequest;
use weft_proto::demo::v1::echo_client::EchoClient;
use weft_tests::*;

const CONVERGE: Duration = Duration::from_secs(20);

/// The registry file: no services (the sidecars register them), round robin for both, so these
/// tests' traffic assertions do not depend on the default peak-EWMA's latency judgement.
const REGISTRY: &str = "policies:
  - {name: web-lb, service: web, lb: round_robin}
  - {name: echo-lb, service: echo, lb: round_robin}
";

/// Starts one server sidecar per backend (service `service`, instance id = backend name,
/// health `http:/healthz`), one after the other.
async fn servers(
    ctx: &TestCtx,
    cp: &ControlPlane,
    b: &Backends,
    service: &str,
    names: &[&str],
    tune: impl Fn(SidecarArgs) -> SidecarArgs,
) -> Result<Vec<Sidecar>> {
    let mut futs = Vec::new();
    for name in names {
        let args =
            tune(SidecarArgs::server(cp, name, service, b.port(name)?).health("http:/healthz"));
        futs.push(Sidecar::start(ctx, args));
    }
    let mut out = Vec::new();
    for f in futs {
        out.push(f.await?);
    }
    Ok(out)
}

/// Waits until every batch of 20 through `client` reaches each of `expected` (and nothing else),
/// without a single failure along the way.
async fn converge_to(client: &Sidecar, what: &str, expected: &[&str]) -> Result<()> {
    let expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    converge(
        what,
        CONVERGE,
        async || client.spray("web", "/", 20).await,
        |t| {
            t.errors == 0
                && expected.iter().all(|e| t.get(e) > 0)
                && t.counts.keys().all(|k| expected.contains(k))
        },
    )
    .await
}

fn str_field<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(|x| x.as_str())
}

// ---------------------------------------------------------------------------------------------

async fn registers_and_serves(ctx: &TestCtx, variant: Variant) -> Result<()> {
    let b = Backends::start(ctx, &[("web-1", Kind::Http), ("web-2", Kind::Http)]).await?;
    let cp = ControlPlane::start(ctx, REGISTRY).await?;
    let s = servers(ctx, &cp, &b, "web", &["web-1", "web-2"], |a| {
        a.variant(variant)
    })
    .await?;
    let client = Sidecar::start(ctx, SidecarArgs::client(&cp, "client")?.variant(variant)).await?;

    // The control plane's embedded registry holds both, on their sidecars' inbound ports.
    eventually("both instances are registered", CONVERGE, async || {
        for sc in &s {
            let r = registration_of(&cp, "web", &sc.instance_id)
                .await?
                .ok_or_else(|| anyhow!("{} not registered yet", sc.instance_id))?;
            ensure!(
                r.get("port").and_then(|p| p.as_u64()) == Some(u64::from(sc.inbound_port())),
                "{} registered with the wrong port (want inbound {}): {r}",
                sc.instance_id,
                sc.inbound_port()
            );
            ensure!(
                str_field(&r, "address") == Some("127.0.0.1"),
                "address: {r}"
            );
            ensure!(str_field(&r, "health") == Some("healthy"), "health: {r}");
        }
        Ok(())
    })
    .await?;

    // ... and serves them over xDS: the `web` ClusterLoadAssignment names both inbound ports.
    let dump = cp.config_dump().await?;
    let flavors = dump
        .get("flavors")
        .and_then(|f| f.as_object())
        .ok_or_else(|| anyhow!("config_dump has no flavors"))?;
    let mut found = false;
    for snap in flavors.values() {
        let Some(res) = snap
            .pointer(&format!(
                "/types/{}/resources",
                TYPE_ENDPOINT.replace('/', "~1")
            ))
            .and_then(|r| r.as_array())
        else {
            continue;
        };
        for r in res {
            if str_field(r, "name") == Some("web") {
                let text = r.get("resource").map(|x| x.to_string()).unwrap_or_default();
                for sc in &s {
                    ensure!(
                        text.contains(&format!("PortValue({})", sc.inbound_port())),
                        "EDS for web lacks {}'s inbound port {}: {text}",
                        sc.name,
                        sc.inbound_port()
                    );
                }
                found = true;
            }
        }
    }
    ensure!(
        found,
        "no `web` ClusterLoadAssignment in config_dump: {dump}"
    );

    // Traffic through the client sidecar reaches both apps, through their sidecars.
    converge_to(
        &client,
        "traffic reaches web-1 and web-2",
        &["web-1", "web-2"],
    )
    .await?;
    let t = client.spray("web", "/", 40).await?;
    ensure!(t.errors == 0, "requests failed: {t}");
    ensure!(
        t.get("web-1") >= 8 && t.get("web-2") >= 8,
        "traffic is not spread over both instances: {t}"
    );

    // The client sidecar's view matches.
    let eps = client.endpoints("web").await?;
    ensure!(
        eps.len() == 2,
        "client sidecar /debug/endpoints for web: {eps:?}"
    );
    let xds = client.admin_json("/debug/config").await?;
    ensure!(
        xds.to_string().contains("web"),
        "client /debug/config does not mention web: {xds}"
    );
    let reg = s[0].admin_json("/debug/registration").await?;
    ensure!(
        reg.to_string().contains(&s[0].inbound_port().to_string()),
        "server /debug/registration does not show its inbound port: {reg}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_registers_and_serves_delta() {
    let ctx = TestCtx::new("sidecar_registers_delta").unwrap();
    let r = registers_and_serves(&ctx, Variant::Delta).await;
    ctx.finish(r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_registers_and_serves_sotw() {
    let ctx = TestCtx::new("sidecar_registers_sotw").unwrap();
    let r = registers_and_serves(&ctx, Variant::Sotw).await;
    ctx.finish(r);
}

// ---------------------------------------------------------------------------------------------

async fn health_follows_app(ctx: &TestCtx) -> Result<()> {
    let names = ["web-1", "web-2", "web-3"];
    let specs: Vec<_> = names.iter().map(|n| (*n, Kind::Http)).collect();
    let b = Backends::start(ctx, &specs).await?;
    let cp = ControlPlane::start(ctx, REGISTRY).await?;
    let s = servers(ctx, &cp, &b, "web", &names, |a| a).await?;
    let client = Sidecar::start(ctx, SidecarArgs::client(&cp, "client")?).await?;
    converge_to(&client, "traffic reaches all three", &names).await?;

    // web-1's /healthz fails: its sidecar marks it unhealthy and it gets no more traffic. The
    // app itself still answers requests, so nothing may fail meanwhile.
    b.control("web-1", "health?status=fail").await?;
    eventually("web-1 is unhealthy in the registry", CONVERGE, async || {
        let r = registration_of(&cp, "web", &s[0].instance_id).await?;
        let health = r.as_ref().and_then(|r| str_field(r, "health"));
        // Deregistering is also a way to take it out of rotation.
        ensure!(
            health == Some("unhealthy") || r.is_none(),
            "web-1 registration: {r:?}"
        );
        Ok(())
    })
    .await?;
    converge_to(&client, "web-1 gets no traffic", &["web-2", "web-3"]).await?;
    let t = client.spray("web", "/", 30).await?;
    ensure!(
        t.errors == 0 && t.get("web-1") == 0,
        "web-1 still gets traffic while unhealthy: {t}"
    );
    let ready = s[0].admin_get("/readyz").await?;
    ensure!(
        ready.status != 200,
        "web-1's sidecar says ready while its app fails: {}",
        ready.status
    );

    // Healthy again: back in rotation.
    b.control("web-1", "health?status=pass").await?;
    eventually(
        "web-1 is healthy again in the registry",
        CONVERGE,
        async || {
            let r = registration_of(&cp, "web", &s[0].instance_id).await?;
            ensure!(
                r.as_ref().and_then(|r| str_field(r, "health")) == Some("healthy"),
                "web-1 registration: {r:?}"
            );
            Ok(())
        },
    )
    .await?;
    converge_to(&client, "web-1 gets traffic again", &names).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_health_check_takes_app_out_and_back() {
    let ctx = TestCtx::new("sidecar_health").unwrap();
    let r = health_follows_app(&ctx).await;
    ctx.finish(r);
}

// ---------------------------------------------------------------------------------------------

/// Request loops through `client` until `stop`, `workers` at a time; returns their tally.
fn spray_in_background(
    client: &Sidecar,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Tally>> {
    let port = client.outbound_port();
    (0..workers)
        .map(|_| {
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut t = Tally::default();
                while !stop.load(Ordering::SeqCst) {
                    t.add(http_request(port, "GET", Some("web"), "/", &[]).await);
                }
                t
            })
        })
        .collect()
}

async fn sigterm_drains(ctx: &TestCtx) -> Result<()> {
    let names = ["web-1", "web-2", "web-3"];
    let specs: Vec<_> = names.iter().map(|n| (*n, Kind::Http)).collect();
    let b = Backends::start(ctx, &specs).await?;
    let cp = ControlPlane::start(ctx, REGISTRY).await?;
    let mut s = servers(ctx, &cp, &b, "web", &names, |a| a.variant(Variant::Sotw)).await?;
    let client = Sidecar::start(
        ctx,
        SidecarArgs::client(&cp, "client")?.variant(Variant::Sotw),
    )
    .await?;
    converge_to(&client, "traffic reaches all three", &names).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let workers = spray_in_background(&client, 3, Arc::clone(&stop));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = Instant::now();
    s[0].sigterm()?;
    let status = s[0].wait(Duration::from_secs(15)).await?;
    let drained_in = started.elapsed();
    ensure!(status.success(), "web-1's sidecar exited with {status}");
    // Gone from the registry: it deregistered on the way out.
    eventually(
        "web-1 is deregistered",
        Duration::from_secs(5),
        async || {
            let r = registration_of(&cp, "web", &s[0].instance_id).await?;
            ensure!(r.is_none(), "still registered: {r:?}");
            Ok(())
        },
    )
    .await?;
    // Keep spraying a moment after the exit too.
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::SeqCst);
    let mut total = Tally::default();
    for w in workers {
        total.merge(&w.await?);
    }
    eprintln!("during the drain ({drained_in:?}): {total}");
    ensure!(
        total.errors == 0,
        "requests failed while web-1's sidecar drained (in {drained_in:?}): {total}"
    );
    ensure!(
        total.ok() >= 30,
        "too few requests went through during the drain to prove anything: {total}"
    );
    ensure!(
        total.get("web-2") > 0 && total.get("web-3") > 0,
        "the other instances did not take the traffic: {total}"
    );
    let t = client.spray("web", "/", 30).await?;
    ensure!(t.errors == 0 && t.get("web-1") == 0, "after the drain: {t}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_sigterm_drains_without_failed_requests() {
    let ctx = TestCtx::new("sidecar_sigterm").unwrap();
    let r = sigterm_drains(&ctx).await;
    ctx.finish(r);
}

// ---------------------------------------------------------------------------------------------

async fn sigkill_expires(ctx: &TestCtx) -> Result<()> {
    let names = ["web-1", "web-2"];
    let specs: Vec<_> = names.iter().map(|n| (*n, Kind::Http)).collect();
    let b = Backends::start(ctx, &specs).await?;
    let cp = ControlPlane::start(ctx, REGISTRY).await?;
    let mut s = servers(ctx, &cp, &b, "web", &names, |a| a.ttl("2s")).await?;
    let client = Sidecar::start(ctx, SidecarArgs::client(&cp, "client")?).await?;
    converge_to(&client, "traffic reaches both", &names).await?;
    let r = registration_of(&cp, "web", &s[0].instance_id).await?;
    ensure!(
        r.as_ref()
            .and_then(|r| r.get("ttl_seconds"))
            .and_then(|t| t.as_u64())
            == Some(2),
        "registration does not carry the 2 s TTL: {r:?}"
    );

    let killed = Instant::now();
    s[0].kill().await?;
    // Right after the kill it is still registered: nobody told the control plane.
    ensure!(
        registration_of(&cp, "web", &s[0].instance_id)
            .await?
            .is_some(),
        "web-1 vanished at once; a SIGKILLed sidecar cannot deregister"
    );
    let gone_after = eventually(
        "web-1's lease expires",
        Duration::from_secs(10),
        async || {
            let r = registration_of(&cp, "web", &s[0].instance_id).await?;
            ensure!(r.is_none(), "still registered: {r:?}");
            Ok(killed.elapsed())
        },
    )
    .await?;
    ensure!(
        gone_after <= Duration::from_secs(6),
        "web-1 took {gone_after:?} to expire with a 2 s TTL"
    );
    // Requests to the dead instance may fail until the client learns it is gone; after that,
    // none may.
    eventually(
        "the client sends only to web-2, without failures",
        CONVERGE,
        async || {
            let t = client.spray("web", "/", 20).await?;
            ensure!(t.errors == 0 && t.get("web-2") == 20, "{t}");
            Ok(())
        },
    )
    .await?;
    ensure!(
        client.endpoints("web").await?.len() == 1,
        "client still lists the dead endpoint: {:?}",
        client.endpoints("web").await?
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_sigkill_instance_expires_after_ttl() {
    let ctx = TestCtx::new("sidecar_sigkill").unwrap();
    let r = sigkill_expires(&ctx).await;
    ctx.finish(r);
}

// ---------------------------------------------------------------------------------------------

async fn etcd_registration(ctx: &TestCtx) -> Result<()> {
    let b = Backends::start(ctx, &[("web-1", Kind::Http)]).await?;
    let etcd = Etcd::start(ctx).await?;
    let cp = ControlPlane::start_with_args(
        ctx,
        Some(REGISTRY),
        &["--etcd-endpoints".to_string(), etcd.url.clone()],
    )
    .await?;
    let etcd_addr = etcd.url.trim_start_matches("http://").to_string();
    let mut s = servers(ctx, &cp, &b, "web", &["web-1"], |a| {
        a.register(&format!("etcd://{etcd_addr}")).ttl("3s")
    })
    .await?;
    let client = Sidecar::start(ctx, SidecarArgs::client(&cp, "client")?).await?;

    let mut kv = etcd.client().await?;
    let inbound = s[0].inbound_port();
    eventually("the instance is in etcd", CONVERGE, async || {
        let resp = kv
            .get(
                "/weft/services/web/",
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await?;
        let values: Vec<String> = resp
            .kvs()
            .iter()
            .map(|k| String::from_utf8_lossy(k.value()).into_owned())
            .collect();
        ensure!(
            values.iter().any(|v| v.contains(&inbound.to_string())),
            "no key under /weft/services/web/ names inbound port {inbound}: {values:?}"
        );
        Ok(())
    })
    .await?;
    ensure!(
        registration_of(&cp, "web", &s[0].instance_id)
            .await?
            .is_none(),
        "an etcd-registered instance must not also be in the embedded registry"
    );
    converge_to(&client, "traffic reaches web-1 through etcd", &["web-1"]).await?;

    // A graceful stop removes the key.
    s[0].sigterm()?;
    let st = s[0].wait(Duration::from_secs(15)).await?;
    ensure!(st.success(), "web-1's sidecar exited with {st}");
    let resp = kv
        .get(
            "/weft/services/web/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await?;
    ensure!(
        resp.kvs().is_empty(),
        "the key outlived the sidecar's clean exit: {:?}",
        resp.kvs()
            .iter()
            .map(|k| String::from_utf8_lossy(k.key()).into_owned())
            .collect::<Vec<_>>()
    );
    eventually("the client has no endpoint left", CONVERGE, async || {
        let eps = client.endpoints("web").await?;
        ensure!(eps.is_empty(), "{eps:?}");
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_registers_in_etcd() {
    let ctx = TestCtx::new("sidecar_etcd").unwrap();
    let r = etcd_registration(&ctx).await;
    ctx.finish(r);
}

// ---------------------------------------------------------------------------------------------

async fn grpc_app(ctx: &TestCtx) -> Result<()> {
    let b = Backends::start(ctx, &[("echo-1", Kind::Grpc), ("echo-2", Kind::Grpc)]).await?;
    let cp = ControlPlane::start(ctx, REGISTRY).await?;
    let mut servers = Vec::new();
    for name in ["echo-1", "echo-2"] {
        let args = SidecarArgs::server(&cp, name, "echo", b.port(name)?)
            .protocol("grpc")
            .health("grpc");
        servers.push(Sidecar::start(ctx, args).await?);
    }
    let client = Sidecar::start(ctx, SidecarArgs::client(&cp, "client")?).await?;

    eventually("echo is registered as grpc", CONVERGE, async || {
        let regs = registrations(&cp).await?;
        ensure!(regs.len() == 2, "{regs:?}");
        Ok(())
    })
    .await?;

    // h2c to the client sidecar's outbound port, `:authority: echo`.
    let channel = tonic::transport::Endpoint::from_shared(format!(
        "http://127.0.0.1:{}",
        client.outbound_port()
    ))?
    .origin("http://echo".parse()?)
    .timeout(Duration::from_secs(5))
    .connect_lazy();
    let mut echo = EchoClient::new(channel);
    let calls = async |echo: &mut EchoClient<tonic::transport::Channel>, n: usize| -> Tally {
        let mut t = Tally::default();
        for i in 0..n {
            match echo
                .echo(EchoRequest {
                    message: format!("hello {i}"),
                })
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    if r.message == format!("hello {i}") {
                        *t.counts.entry(r.backend).or_default() += 1;
                    } else {
                        t.errors += 1;
                        t.last_error = Some(format!("wrong echo: {r:?}"));
                    }
                }
                Err(e) => {
                    t.errors += 1;
                    t.last_error = Some(format!("{e}"));
                }
            }
        }
        t
    };
    // The first calls may come before the client has the endpoints; then none may fail.
    eventually("Echo calls reach both backends", CONVERGE, async || {
        let t = calls(&mut echo, 20).await;
        ensure!(
            t.errors == 0 && t.get("echo-1") > 0 && t.get("echo-2") > 0,
            "{t}"
        );
        Ok(())
    })
    .await?;
    let t = calls(&mut echo, 40).await;
    ensure!(t.errors == 0, "Echo calls failed: {t}");
    ensure!(
        t.get("echo-1") >= 8 && t.get("echo-2") >= 8,
        "Echo calls not spread: {t}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_grpc_app() {
    let ctx = TestCtx::new("sidecar_grpc").unwrap();
    let r = grpc_app(&ctx).await;
    ctx.finish(r);
}

// ---------------------------------------------------------------------------------------------

/// Consul end to end: the sidecar registers its app through the (stand-in) agent API with a TTL
/// check it keeps current; the control plane's Consul source sees it by blocking queries; a
/// client sidecar gets traffic to it. The app failing its health check turns the Consul check
/// critical and takes it out of rotation; SIGTERM deregisters it.
async fn consul_registration(ctx: &TestCtx) -> Result<()> {
    let consul = weft_consul_standin::ConsulStandIn::start().await?;
    let names = ["web-1", "web-2"];
    let b = Backends::start(ctx, &[("web-1", Kind::Http), ("web-2", Kind::Http)]).await?;
    let cp = ControlPlane::start_with_args(
        ctx,
        Some(REGISTRY),
        &[
            "--consul-addr".to_string(),
            consul.url(),
            "--consul-wait".to_string(),
            "2s".to_string(),
        ],
    )
    .await?;
    let addr = consul.addr();
    let mut s = servers(ctx, &cp, &b, "web", &names, |a| {
        a.register(&format!("consul://{addr}")).ttl("2s")
    })
    .await?;
    let client = Sidecar::start(ctx, SidecarArgs::client(&cp, "client")?).await?;
    converge_to(&client, "traffic reaches both through Consul", &names).await?;
    let services = consul.agent_services();
    ensure!(
        services.get(s[0].instance_id.as_str()).is_some(),
        "web-1 is not an agent service: {services}"
    );
    ensure!(
        registration_of(&cp, "web", &s[0].instance_id)
            .await?
            .is_none(),
        "a Consul-registered instance must not also be in the embedded registry"
    );

    b.control("web-1", "health?status=fail").await?;
    eventually("web-1's Consul check is critical", CONVERGE, async || {
        let checks = consul.agent_checks();
        let id = format!("service:{}", s[0].instance_id);
        let status = checks
            .get(&id)
            .and_then(|c| c.get("Status"))
            .and_then(|v| v.as_str())
            .map(str::to_string);
        ensure!(status.as_deref() == Some("critical"), "{id}: {status:?}");
        Ok(())
    })
    .await?;
    converge_to(&client, "web-1 out of rotation", &["web-2"]).await?;
    b.control("web-1", "health?status=pass").await?;
    converge_to(&client, "web-1 back", &names).await?;

    s[1].sigterm()?;
    let st = s[1].wait(Duration::from_secs(15)).await?;
    ensure!(st.success(), "web-2's sidecar exited with {st}");
    ensure!(
        consul
            .agent_services()
            .get(s[1].instance_id.as_str())
            .is_none(),
        "web-2 still registered with the agent after a clean exit"
    );
    converge_to(&client, "only web-1 left", &["web-1"]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_registers_in_consul() {
    let ctx = TestCtx::new("sidecar_consul").unwrap();
    let r = consul_registration(&ctx).await;
    ctx.finish(r);
}
