//! `weft-sidecar` client-side balancing end to end: registry-file policies decide how a client
//! sidecar spreads requests over server sidecars (round robin, weighted round robin, random,
//! ring hash, Maglev, peak-EWMA), eject failing endpoints and keep traffic in the local zone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, ensure};
use weft_tests::*;

const CONVERGE: Duration = Duration::from_secs(20);

/// A control plane, one demo backend per name, a server sidecar in front of each (service
/// `web`, instance id = backend name) and a client sidecar.
struct Mesh {
    b: Backends,
    cp: ControlPlane,
    servers: Vec<Sidecar>,
    client: Sidecar,
}

impl Mesh {
    async fn start(
        ctx: &TestCtx,
        names: &[&str],
        registry: &str,
        server: impl Fn(&str, SidecarArgs) -> SidecarArgs,
        client: impl Fn(SidecarArgs) -> SidecarArgs,
    ) -> Result<Self> {
        let specs: Vec<_> = names.iter().map(|n| (*n, Kind::Http)).collect();
        let b = Backends::start(ctx, &specs).await?;
        let cp = ControlPlane::start(ctx, registry).await?;
        let mut servers = Vec::new();
        for name in names {
            let args = SidecarArgs::server(&cp, name, "web", b.port(name)?).health("http:/healthz");
            servers.push(Sidecar::start(ctx, server(name, args)).await?);
        }
        let client = Sidecar::start(ctx, client(SidecarArgs::client(&cp, "client")?)).await?;
        let m = Self {
            b,
            cp,
            servers,
            client,
        };
        m.wait_endpoints(names.len()).await?;
        Ok(m)
    }

    fn server(&self, name: &str) -> Result<&Sidecar> {
        self.servers
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| anyhow!("no server {name}"))
    }

    /// Waits until the client sidecar lists exactly `n` endpoints for `web`.
    async fn wait_endpoints(&self, n: usize) -> Result<()> {
        eventually(
            &format!("the client sidecar has {n} endpoints for web"),
            CONVERGE,
            async || {
                let eps = self.client.endpoints("web").await?;
                ensure!(eps.len() == n, "{} endpoints: {eps:?}", eps.len());
                Ok(())
            },
        )
        .await
    }

    /// Waits until the client sidecar balances `web` with `algorithm` (snake_case name).
    async fn wait_algorithm(&self, algorithm: &str) -> Result<()> {
        eventually(
            &format!("the client sidecar balances web with {algorithm}"),
            CONVERGE,
            async || {
                let a = self.client.algorithm("web").await?;
                ensure!(
                    a.as_deref().is_some_and(|a| a.contains(algorithm)),
                    "algorithm is {a:?}"
                );
                Ok(())
            },
        )
        .await
    }

    /// The client sidecar's `/debug/endpoints` entry for `server`'s inbound port.
    async fn endpoint_of(&self, server: &str) -> Result<serde_json::Value> {
        let port = self.server(server)?.inbound_port();
        let eps = self.client.endpoints("web").await?;
        eps.into_iter()
            .find(|e| {
                e.get("addr")
                    .and_then(|a| a.as_str())
                    .is_some_and(|a| a.ends_with(&format!(":{port}")))
            })
            .ok_or_else(|| anyhow!("the client has no endpoint for {server} (port {port})"))
    }
}

fn policy(lb: &str, extra: &str) -> String {
    format!("policies:\n  - name: web-lb\n    service: web\n    lb: {lb}\n{extra}")
}

fn within(t: &Tally, name: &str, lo: u64, hi: u64) -> Result<()> {
    let n = t.get(name);
    ensure!(
        (lo..=hi).contains(&n),
        "{name} got {n}, expected {lo}..={hi}: {t}"
    );
    Ok(())
}

/// `n` GETs with `Host: web` through the client's outbound port, `concurrency` at a time;
/// the tally and each request's latency.
async fn timed(client: &Sidecar, n: usize, concurrency: usize) -> Result<(Tally, Vec<Duration>)> {
    let port = client.outbound_port();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let next = Arc::clone(&next);
        tasks.push(tokio::spawn(async move {
            let mut t = Tally::default();
            let mut lat = Vec::new();
            while next.fetch_add(1, Ordering::SeqCst) < n {
                let start = Instant::now();
                t.add(http_request(port, "GET", Some("web"), "/", &[]).await);
                lat.push(start.elapsed());
            }
            (t, lat)
        }));
    }
    let mut total = Tally::default();
    let mut lats = Vec::new();
    for task in tasks {
        let (t, l) = task.await?;
        total.merge(&t);
        lats.extend(l);
    }
    Ok((total, lats))
}

// ---------------------------------------------------------------------------------------------

async fn round_robin_and_random(ctx: &TestCtx) -> Result<()> {
    let names = ["web-1", "web-2", "web-3"];
    let m = Mesh::start(ctx, &names, &policy("round_robin", ""), |_, a| a, |a| a).await?;
    m.wait_algorithm("round_robin").await?;

    // Round robin: an even split, give or take the turn the sequence starts on.
    let t = m.client.spray("web", "/", 90).await?;
    ensure!(t.errors == 0, "round robin: requests failed: {t}");
    for n in names {
        within(&t, n, 27, 33)?;
    }

    // The policy changes to random in the file: the client follows, and the split stays
    // within ~5 standard deviations of even (sd = 8.2 for 300 draws of 1/3).
    m.cp.write_registry(&policy("random", ""))?;
    m.wait_algorithm("random").await?;
    let t = m.client.spray("web", "/", 300).await?;
    ensure!(t.errors == 0, "random: requests failed: {t}");
    for n in names {
        within(&t, n, 60, 140)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_round_robin_and_random_spread_evenly() {
    let ctx = TestCtx::new("sidecar_lb_rr_random").unwrap();
    let r = round_robin_and_random(&ctx).await;
    ctx.finish(r);
}

// ---------------------------------------------------------------------------------------------

async fn weighted_round_robin(ctx: &TestCtx) -> Result<()> {
    let names = ["web-1", "web-2", "web-3"];
    let weight = |name: &str| match name {
        "web-1" => 1,
        "web-2" => 2,
        _ => 3,
    };
    let m = Mesh::start(
        ctx,
        &names,
        &policy("weighted_round_robin", ""),
        |name, a| a.weight(weight(name)),
        |a| a,
    )
    .await?;
    m.wait_algorithm("weighted_round_robin").await?;
    eventually("the client knows the weights", CONVERGE, async || {
        for n in names {
            let e = m.endpoint_of(n).await?;
            ensure!(
                e.get("weight").and_then(|w| w.as_u64()) == Some(u64::from(weight(n))),
                "{n}: {e}"
            );
        }
        Ok(())
    })
    .await?;

    // 120 requests at weights 1:2:3 -> 20/40/60; smooth WRR is deterministic, so +-20%.
    let t = m.client.spray("web", "/", 120).await?;
    ensure!(t.errors == 0, "requests failed: {t}");
    within(&t, "web-1", 16, 24)?;
    within(&t, "web-2", 32, 48)?;
    within(&t, "web-3", 48, 72)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_weighted_round_robin_follows_weights() {
    let ctx = TestCtx::new("sidecar_lb_wrr").unwrap();
    let r = weighted_round_robin(&ctx).await;
    ctx.finish(r);
}

// ---------------------------------------------------------------------------------------------

const KEYS: usize = 100;

/// Which backend answers each of `KEYS` users (header `x-user`).
async fn key_map(client: &Sidecar) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for i in 0..KEYS {
        let user = format!("user-{i}");
        let r = client.request("web", "/", &[("x-user", &user)]).await?;
        ensure!(r.status == 200, "{user}: {} {}", r.status, r.body.trim());
        let b = r.backend().ok_or_else(|| anyhow!("{user}: no x-backend"))?;
        out.insert(user, b.to_string());
    }
    Ok(out)
}

async fn consistent_hash(ctx: &TestCtx, lb: &str) -> Result<()> {
    let names = ["web-1", "web-2", "web-3", "web-4"];
    let registry = format!(
        "routes:\n  - name: web-sticky\n    service: web\n    rules:\n      - hash_policy: [{{header: x-user}}]\n{}",
        policy(lb, "")
    );
    let mut m = Mesh::start(ctx, &names, &registry, |_, a| a, |a| a).await?;
    m.wait_algorithm(lb).await?;

    let before = key_map(&m.client).await?;
    let again = key_map(&m.client).await?;
    let unstable: Vec<_> = before
        .iter()
        .filter(|(k, v)| again.get(*k) != Some(v))
        .collect();
    ensure!(
        unstable.is_empty(),
        "{lb}: the same key went to different backends: {unstable:?}"
    );
    let mut per_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for v in before.values() {
        *per_backend.entry(v.as_str()).or_default() += 1;
    }
    for n in names {
        let c = per_backend.get(n).copied().unwrap_or(0);
        ensure!(
            c >= 5,
            "{lb}: {n} owns only {c} of {KEYS} keys: {per_backend:?}"
        );
    }

    // web-1's sidecar stops: its keys move, every other key stays where it was.
    let idx = m
        .servers
        .iter()
        .position(|s| s.name == "web-1")
        .ok_or_else(|| anyhow!("no web-1"))?;
    m.servers[idx].sigterm()?;
    let st = m.servers[idx].wait(Duration::from_secs(15)).await?;
    ensure!(st.success(), "web-1's sidecar exited with {st}");
    m.wait_endpoints(3).await?;
    let after = key_map(&m.client).await?;
    let mut moved_elsewhere = Vec::new();
    for (k, was) in &before {
        let now = after.get(k).map(String::as_str).unwrap_or("?");
        ensure!(
            now != "web-1",
            "{lb}: {k} still reaches web-1 after it left"
        );
        if was != "web-1" && was != now {
            moved_elsewhere.push(format!("{k}: {was} -> {now}"));
        }
    }
    // Ring hash moves none of them; Maglev may move a few (its table is only nearly minimal).
    let slack = KEYS / 20;
    ensure!(
        moved_elsewhere.len() <= slack,
        "{lb}: {} keys not on web-1 moved (allowed {slack}): {moved_elsewhere:?}",
        moved_elsewhere.len()
    );
    eprintln!(
        "{lb}: keys per backend before {per_backend:?}; {} keys not on web-1 moved",
        moved_elsewhere.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_ring_hash_is_sticky_and_minimally_disruptive() {
    let ctx = TestCtx::new("sidecar_lb_ring_hash").unwrap();
    let r = consistent_hash(&ctx, "ring_hash").await;
    ctx.finish(r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_maglev_is_sticky_and_minimally_disruptive() {
    let ctx = TestCtx::new("sidecar_lb_maglev").unwrap();
    let r = consistent_hash(&ctx, "maglev").await;
    ctx.finish(r);
}

// ---------------------------------------------------------------------------------------------

async fn peak_ewma_avoids_slow(ctx: &TestCtx) -> Result<()> {
    let names = ["web-1", "web-2", "web-3", "web-4", "web-5"];
    // No policy: the sidecar's default, peak-EWMA.
    let m = Mesh::start(ctx, &names, "", |_, a| a, |a| a).await?;
    m.wait_algorithm("peak_ewma").await?;
    m.b.control("web-5", "delay?ms=2000").await?;
    let slow = |lats: &[Duration]| lats.iter().filter(|l| **l > Duration::from_secs(1)).count();

    // Warm-up: long enough for web-5's first 2 s answer to come back and be measured.
    let warm_start = Instant::now();
    let mut warm = Tally::default();
    while warm_start.elapsed() < Duration::from_millis(3000) {
        let (t, _) = timed(&m.client, 20, 4).await?;
        warm.merge(&t);
    }
    ensure!(warm.errors == 0, "warm-up requests failed: {warm}");

    let (t, lats) = timed(&m.client, 200, 4).await?;
    ensure!(t.errors == 0, "peak_ewma: requests failed: {t}");
    let ewma_slow = slow(&lats);
    eprintln!("peak_ewma: {ewma_slow}/200 requests slower than 1 s: {t} (warm-up: {warm})");
    ensure!(
        ewma_slow <= 4,
        "peak_ewma sent {ewma_slow} of 200 requests (> 2%) to the slow backend: {t}"
    );

    // Side by side: round robin keeps sending web-5 its fifth.
    m.cp.write_registry(&policy("round_robin", ""))?;
    m.wait_algorithm("round_robin").await?;
    let (t, lats) = timed(&m.client, 50, 10).await?;
    ensure!(t.errors == 0, "round_robin: requests failed: {t}");
    let rr_slow = slow(&lats);
    eprintln!("round_robin: {rr_slow}/50 requests slower than 1 s: {t}");
    ensure!(
        (5..=15).contains(&rr_slow),
        "round robin should send ~20% (10 of 50) to the slow backend, sent {rr_slow}: {t}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_peak_ewma_avoids_a_slow_backend() {
    let ctx = TestCtx::new("sidecar_lb_peak_ewma").unwrap();
    let r = peak_ewma_avoids_slow(&ctx).await;
    ctx.finish(r);
}

// ---------------------------------------------------------------------------------------------

async fn outlier_detection(ctx: &TestCtx) -> Result<()> {
    let names = ["web-1", "web-2", "web-3"];
    let m = Mesh::start(
        ctx,
        &names,
        &policy(
            "round_robin",
            "    outlier_detection: {consecutive_5xx: 3, base_ejection_time: 2s}\n",
        ),
        |_, a| a,
        |a| a,
    )
    .await?;
    m.wait_algorithm("round_robin").await?;
    let t = m.client.spray("web", "/", 30).await?;
    ensure!(t.errors == 0 && t.get("web-1") > 0, "before: {t}");

    // web-1 answers 500 to everything: after 3 in a row it is ejected.
    m.b.control("web-1", "fail?status=500").await?;
    let mut failures = 0;
    let deadline = Instant::now() + CONVERGE;
    let ejected_for = loop {
        let r = m.client.request("web", "/", &[]).await?;
        if r.status != 200 {
            failures += 1;
        }
        let e = m.endpoint_of("web-1").await?;
        if e.get("ejected").and_then(|x| x.as_bool()) == Some(true) {
            break e
                .get("ejected_for_ms")
                .and_then(|x| x.as_u64())
                .unwrap_or(0);
        }
        ensure!(
            Instant::now() < deadline,
            "web-1 never ejected after {failures} failures: {e}"
        );
    };
    let ejected_at = Instant::now();
    ensure!(
        failures >= 3,
        "web-1 was ejected after only {failures} failed requests"
    );
    ensure!(
        (500..=2000).contains(&ejected_for),
        "ejected_for_ms {ejected_for} does not fit base_ejection_time 2s"
    );

    // Heal it at once; while the ejection lasts, it still gets nothing.
    m.b.control("web-1", "fail?status=0").await?;
    let t = m.client.spray("web", "/", 10).await?;
    let during = ejected_at.elapsed();
    ensure!(
        t.errors == 0 && t.get("web-1") == 0,
        "during the ejection ({during:?} in): {t}"
    );

    // After the ejection time it comes back.
    let back_after = eventually("web-1 gets traffic again", CONVERGE, async || {
        let t = m.client.spray("web", "/", 6).await?;
        ensure!(t.errors == 0, "requests failed: {t}");
        ensure!(t.get("web-1") > 0, "{t}");
        Ok(ejected_at.elapsed())
    })
    .await?;
    ensure!(
        back_after + Duration::from_millis(300) >= Duration::from_millis(ejected_for),
        "web-1 came back after {back_after:?}, before its ejection ({ejected_for} ms) ended"
    );
    let e = m.endpoint_of("web-1").await?;
    ensure!(
        e.get("ejected").and_then(|x| x.as_bool()) == Some(false),
        "web-1 still shown ejected: {e}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_outlier_detection_ejects_and_restores() {
    let ctx = TestCtx::new("sidecar_lb_outlier").unwrap();
    let r = outlier_detection(&ctx).await;
    ctx.finish(r);
}

// ---------------------------------------------------------------------------------------------

async fn zones(ctx: &TestCtx) -> Result<()> {
    let names = ["web-a1", "web-a2", "web-b1", "web-b2"];
    let m = Mesh::start(
        ctx,
        &names,
        &policy("round_robin", "    zone_aware: {enabled: true}\n"),
        |name, a| a.zone(if name.starts_with("web-a") { "a" } else { "b" }),
        |a| a.zone("a"),
    )
    .await?;
    m.wait_algorithm("round_robin").await?;
    eventually(
        "the client knows every endpoint's zone",
        CONVERGE,
        async || {
            for n in names {
                let e = m.endpoint_of(n).await?;
                let want = if n.starts_with("web-a") { "a" } else { "b" };
                ensure!(
                    e.get("zone").and_then(|z| z.as_str()) == Some(want),
                    "{n}: {e}"
                );
            }
            Ok(())
        },
    )
    .await?;

    let only = |allowed: &'static [&'static str]| {
        move |t: &Tally| {
            t.errors == 0
                && allowed.iter().all(|a| t.get(a) > 0)
                && t.counts.keys().all(|k| allowed.contains(&k.as_str()))
        }
    };
    let spray = async || m.client.spray("web", "/", 20).await;
    converge(
        "all traffic stays in zone a",
        CONVERGE,
        spray,
        only(&["web-a1", "web-a2"]),
    )
    .await?;
    let t = m.client.spray("web", "/", 40).await?;
    ensure!(
        t.errors == 0 && t.get("web-a1") + t.get("web-a2") == 40,
        "zone a healthy: {t}"
    );

    // Both zone-a apps fail their health checks: traffic spills over to zone b.
    m.b.control("web-a1", "health?status=fail").await?;
    m.b.control("web-a2", "health?status=fail").await?;
    converge(
        "traffic spills over to zone b",
        CONVERGE,
        spray,
        only(&["web-b1", "web-b2"]),
    )
    .await?;

    // Healthy again: back home.
    m.b.control("web-a1", "health?status=pass").await?;
    m.b.control("web-a2", "health?status=pass").await?;
    converge(
        "traffic returns to zone a",
        CONVERGE,
        spray,
        only(&["web-a1", "web-a2"]),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_zone_aware_stays_local_and_spills_over() {
    let ctx = TestCtx::new("sidecar_lb_zones").unwrap();
    let r = zones(&ctx).await;
    ctx.finish(r);
}

// ---------------------------------------------------------------------------------------------

async fn peak_ewma_tries_every_endpoint(ctx: &TestCtx) -> Result<()> {
    let names = ["web-1", "web-2", "web-3"];
    // No policy: the default, peak-EWMA. Three equally fast backends, one request at a time.
    // Every one must be tried. (Not an even share: on a loaded machine one slow first answer
    // rightly keeps an endpoint's peak estimate high for a while.)
    let m = Mesh::start(ctx, &names, "", |_, a| a, |a| a).await?;
    m.wait_algorithm("peak_ewma").await?;
    let t = m.client.spray("web", "/", 90).await?;
    ensure!(t.errors == 0, "requests failed: {t}");
    for n in names {
        ensure!(
            t.get(n) >= 1,
            "peak_ewma starves {n}: it got {} of 90 sequential requests although all three \
             backends are equally fast: {t}",
            t.get(n)
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_peak_ewma_tries_every_endpoint() {
    let ctx = TestCtx::new("sidecar_lb_peak_ewma_starvation").unwrap();
    let r = peak_ewma_tries_every_endpoint(&ctx).await;
    ctx.finish(r);
}
