//! The admin status page (`GET /`) in headless Chromium against a real control plane and a real
//! Envoy: it shows the registry's services and endpoints and the proxy SYNCED, then follows a
//! registry edit and a NACK by itself, without a reload. Screenshot:
//! `tests/artifacts/status_page/status_page.png`.

use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use serde_json::Value;
use weft_tests::browser::{self, Browser};
use weft_tests::*;

const NODE: &str = "envoy-status";

/// Over Envoy's RE2 program-size limit (see nack.rs), with markup in it: the NACK message quotes
/// the regex, so the page must show `<b>` as text.
const BAD_REGEX: &str = "/nack-<b>[a-z]{300}";

fn registry(b: &Backends, web: &[&str], bad_route: bool) -> Result<String> {
    let mut y = String::from("services:\n");
    y.push_str(&b.service_yaml("web", "http", web)?);
    y.push_str(&b.service_yaml("api", "http", &["api-1"])?);
    if bad_route {
        y.push_str(&format!(
            "routes:\n  - name: bad-regex\n    service: web\n    rules:\n      - match: {{path_regex: \"{BAD_REGEX}\"}}\n"
        ));
    }
    Ok(y)
}

/// What the page shows, read from its DOM through the ids and data attributes it sets.
const PAGE_STATE: &str = r##"
const q = (root, s) => [...root.querySelectorAll(s)];
const banner = document.getElementById("error");
return {
  no_reload: window.__weftNoReload === true,
  refreshes: Number(document.getElementById("updated").dataset.refreshes),
  error: banner.hidden ? null : banner.textContent,
  ready: document.getElementById("ready").dataset.status || null,
  services: Object.fromEntries(q(document, "#services [data-service]").map(s =>
    [s.dataset.service, q(s, "[data-endpoint]").map(e => e.dataset.endpoint)])),
  nodes: q(document, "#clients tr[data-node]").map(r => ({
    node: r.dataset.node, state: r.dataset.state,
    types: Object.fromEntries(q(r, "td[data-type]").map(t => [t.dataset.type, t.dataset.state || null])),
  })),
  nacks: q(document, "#nacks tr[data-node]").map(r => ({
    node: r.dataset.node, type: r.dataset.type, message: r.lastElementChild.textContent,
  })),
  markup_in_data: document.querySelector("main b, main script, main img") !== null,
};
"##;

async fn page_state(b: &Browser) -> Result<Value> {
    b.execute(PAGE_STATE, vec![]).await
}

fn node<'a>(st: &'a Value, id: &str) -> Option<&'a Value> {
    st["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["node"].as_str() == Some(id))
}

/// `service`'s endpoints on the page, sorted (the page keeps the registry's order).
fn endpoints(st: &Value, service: &str) -> Vec<String> {
    let mut v: Vec<String> = st["services"][service]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

async fn scenario(ctx: &TestCtx) -> Result<()> {
    // Before anything starts, so a machine without Chromium fails at once, saying what to install.
    browser::chromedriver_bin()?;
    browser::chromium_bin()?;

    let b = Backends::start(
        ctx,
        &[
            ("web-1", Kind::Http),
            ("web-2", Kind::Http),
            ("api-1", Kind::Http),
        ],
    )
    .await?;
    let ep = |name: &str| -> Result<String> { Ok(format!("127.0.0.1:{}", b.port(name)?)) };
    let cp = ControlPlane::start(ctx, &registry(&b, &["web-1"], false)?).await?;
    let envoy = Envoy::start(ctx, &cp, Variant::Sotw, NODE).await?;
    envoy.wait_routes("web", None).await?;

    let root = http_get(cp.admin_port, None, "/").await?;
    let html = root
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    ensure!(
        root.status == 200 && html,
        "the control plane's / is not the status page (weft_admin::Admin::status_page() not \
         called in control-plane/app/src/main.rs?): {} {:?}",
        root.status,
        root.headers.get(http::header::CONTENT_TYPE)
    );

    let browser = Browser::start(ctx).await?;
    browser
        .goto(&format!("http://127.0.0.1:{}/", cp.admin_port))
        .await?;
    // Lost if the page reloads: the later checks prove it updated itself in place.
    browser
        .execute("window.__weftNoReload = true;", vec![])
        .await?;

    let first = eventually(
        "the page shows both services, their endpoints and the Envoy SYNCED",
        Duration::from_secs(15),
        async || {
            let st = page_state(&browser).await?;
            ensure!(st["error"].is_null(), "error banner: {}", st["error"]);
            ensure!(st["ready"] == "200", "readiness: {}", st["ready"]);
            ensure!(endpoints(&st, "web") == [ep("web-1")?], "web: {st}");
            ensure!(endpoints(&st, "api") == [ep("api-1")?], "api: {st}");
            let n = node(&st, NODE).ok_or_else(|| anyhow!("no row for {NODE}: {st}"))?;
            ensure!(n["state"] == "SYNCED", "{NODE}: {n}");
            for t in ["CDS", "EDS", "LDS", "RDS"] {
                ensure!(n["types"][t] == "SYNCED", "{NODE} {t}: {n}");
            }
            Ok(st)
        },
    )
    .await?;
    // The same, as a user sees it (rendered text, not just attributes).
    let clients = browser.text("#clients").await?.unwrap_or_default();
    ensure!(
        clients.contains(NODE) && clients.contains("SYNCED") && clients.contains("SotW"),
        "the proxies table reads: {clients}"
    );
    let web = browser
        .text("[data-service=\"web\"]")
        .await?
        .unwrap_or_default();
    ensure!(
        web.contains(&ep("web-1")?) && web.contains("healthy"),
        "web reads: {web}"
    );

    // (i) A registry edit reaches the open page.
    cp.write_registry(&registry(&b, &["web-1", "web-2"], false)?)?;
    eventually(
        "the page shows web's new endpoint",
        Duration::from_secs(15),
        async || {
            let st = page_state(&browser).await?;
            let mut want = vec![ep("web-1")?, ep("web-2")?];
            want.sort();
            ensure!(endpoints(&st, "web") == want, "web: {st}");
            Ok(())
        },
    )
    .await?;

    // (ii) So does a NACK.
    cp.write_registry(&registry(&b, &["web-1", "web-2"], true)?)?;
    let st = eventually(
        "the page shows the Envoy NACKED and its NACK",
        Duration::from_secs(20),
        async || {
            let st = page_state(&browser).await?;
            let n = node(&st, NODE).ok_or_else(|| anyhow!("no row for {NODE}: {st}"))?;
            ensure!(
                n["state"] == "NACKED" && n["types"]["RDS"] == "NACKED",
                "{n}"
            );
            let has_nack = st["nacks"].as_array().is_some_and(|a| {
                a.iter().any(|r| {
                    r["node"] == NODE
                        && r["type"] == "RDS"
                        && r["message"].as_str().is_some_and(|m| !m.is_empty())
                })
            });
            ensure!(has_nack, "no RDS NACK of {NODE} listed: {}", st["nacks"]);
            Ok(st)
        },
    )
    .await?;

    // The message shown is the client's, verbatim, and its markup stayed text.
    let doc: Value = serde_json::from_str(&cp.admin_get("/debug/nacks").await?)?;
    let message = doc["nacks"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node_id"] == NODE))
        .and_then(|n| n["message"].as_str())
        .ok_or_else(|| anyhow!("no NACK of {NODE} in /debug/nacks: {doc}"))?;
    let shown: Vec<&str> = st["nacks"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|r| r["node"] == NODE)
                .filter_map(|r| r["message"].as_str())
                .collect()
        })
        .unwrap_or_default();
    ensure!(
        shown.contains(&message),
        "page NACK messages {shown:?}, /debug/nacks says {message:?}"
    );
    ensure!(
        message.contains("<b>"),
        "Envoy's message no longer quotes the regex, so escaping goes unchecked: {message}"
    );
    ensure!(
        st["markup_in_data"] == false,
        "an element was parsed out of server data"
    );
    let nacks_text = browser.text("#nacks").await?.unwrap_or_default();
    ensure!(
        nacks_text.contains(BAD_REGEX),
        "the NACK section reads: {nacks_text}"
    );

    ensure!(st["no_reload"] == true, "the page was reloaded");
    ensure!(
        st["refreshes"].as_u64() > first["refreshes"].as_u64(),
        "refresh count did not grow: {} then {}",
        first["refreshes"],
        st["refreshes"]
    );
    ensure!(st["error"].is_null(), "error banner: {}", st["error"]);

    // The whole page in one picture: the window's height is the viewport's plus the frame's.
    let height = browser
        .execute(
            "return document.documentElement.scrollHeight + window.outerHeight - window.innerHeight;",
            vec![],
        )
        .await?
        .as_u64()
        .unwrap_or(1000);
    let height = u32::try_from(height.clamp(600, 4000)).unwrap_or(1000);
    browser.set_window_size(1280, height).await?;
    let png = browser.screenshot_png().await?;
    let shot = ctx.path("status_page.png");
    std::fs::write(&shot, png)?;
    eprintln!("screenshot: {}", shot.display());

    match browser.browser_log().await? {
        Some(log) => {
            eprintln!("browser log: {} entries", log.len());
            for e in &log {
                eprintln!("browser {} {}: {}", e.level, e.source, e.message);
            }
            let severe: Vec<_> = log.iter().filter(|e| e.level == "SEVERE").collect();
            ensure!(severe.is_empty(), "browser errors: {severe:?}");
        }
        None => eprintln!("chromedriver serves no browser log; console not checked"),
    }
    Ok(())
}

#[tokio::test]
async fn status_page_follows_registry_edits_and_nacks_without_reload() {
    let ctx = TestCtx::new("status_page").unwrap_or_else(|e| panic!("{e:#}"));
    let r = scenario(&ctx).await;
    ctx.finish(r);
}
