//! `weft-sidecar` against bad input on its traffic ports: garbage bytes, oversized headers,
//! unknown services and missing Host headers get a clear answer (or a closed connection), and
//! the sidecar keeps serving.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Result, ensure};
use weft_tests::*;

const CONVERGE: Duration = Duration::from_secs(20);
/// How long a server may take to answer or close after garbage.
const ANSWER: Duration = Duration::from_secs(5);

/// Garbage must get a 400 or a closed connection, never silence or a 2xx.
fn rejected(what: &str, r: &RawReply) -> Result<()> {
    match r.status() {
        Some(400) => Ok(()),
        Some(s) => {
            anyhow::bail!("{what}: answered {s}, expected 400 or a closed connection: {r:?}")
        }
        None => {
            ensure!(
                r.closed,
                "{what}: neither answered nor closed within {ANSWER:?}: {r:?}"
            );
            Ok(())
        }
    }
}

async fn bad_input(ctx: &TestCtx) -> Result<()> {
    let b = Backends::start(ctx, &[("web-1", Kind::Http)]).await?;
    let cp = ControlPlane::start(ctx, "").await?;
    let mut server = Sidecar::start(
        ctx,
        SidecarArgs::server(&cp, "web-1", "web", b.port("web-1")?).health("http:/healthz"),
    )
    .await?;
    let mut client = Sidecar::start(ctx, SidecarArgs::client(&cp, "client")?).await?;
    let works = async |client: &Sidecar| -> Result<()> {
        let r = client.request("web", "/", &[]).await?;
        ensure!(
            r.status == 200 && r.backend() == Some("web-1"),
            "{} {}",
            r.status,
            r.body.trim()
        );
        Ok(())
    };
    eventually("traffic reaches web-1", CONVERGE, async || {
        works(&client).await
    })
    .await?;

    let ports = [
        ("outbound", client.outbound_port()),
        ("inbound", server.inbound_port()),
    ];

    // 1. Garbage bytes.
    let mut tls_hello = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    tls_hello.extend((0..200u32).map(|i| (i * 37 % 251) as u8));
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        (
            "binary garbage then CRLFCRLF",
            b"\x00\x01\x02garbage\xff\xfe\r\n\r\n".to_vec(),
        ),
        ("a TLS ClientHello", tls_hello),
        (
            "a bad request line",
            b"GET\x7f/ HTTP/1.1\r\nHost: web\r\n\r\n".to_vec(),
        ),
        (
            "a header without a colon",
            b"GET / HTTP/1.1\r\nHost: web\r\nno colon here\r\n\r\n".to_vec(),
        ),
        (
            "an unknown HTTP version",
            b"GET / HTTP/9.9\r\nHost: web\r\n\r\n".to_vec(),
        ),
        (
            "an HTTP/2 preface and junk frames",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff".to_vec(),
        ),
        (
            "conflicting Content-Length headers",
            b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabc"
                .to_vec(),
        ),
    ];
    for (port_name, port) in ports {
        for (what, bytes) in &garbage {
            let r = raw_exchange(port, bytes, ANSWER).await?;
            rejected(&format!("{what} on {port_name}"), &r)?;
        }
    }

    // 2. A 100 KB header: 431 (or 400).
    let big = format!(
        "GET / HTTP/1.1\r\nHost: web\r\nx-big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    for (port_name, port) in ports {
        let r = raw_exchange(port, big.as_bytes(), ANSWER).await?;
        ensure!(
            matches!(r.status(), Some(431 | 400)),
            "a 100 KB header on {port_name}: expected 431 (or 400), got {:?}: {}",
            r.status(),
            r.error
                .clone()
                .unwrap_or_else(|| r.text.chars().take(300).collect())
        );
    }

    // 3. An unknown service: 404 naming it.
    let r = client.request("no-such-service", "/", &[]).await?;
    ensure!(
        r.status == 404,
        "unknown service: {} {}",
        r.status,
        r.body.trim()
    );
    ensure!(
        r.body.contains("no-such-service"),
        "the 404 body does not name the service: {:?}",
        r.body
    );
    ensure!(
        r.headers.contains_key("x-weft-error"),
        "the 404 has no x-weft-error header: {:?}",
        r.headers
    );

    // 4. No Host at all (HTTP/1.1 and HTTP/1.0), and an empty one: a clear 4xx.
    for (what, req) in [
        (
            "HTTP/1.1 without Host",
            "GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        ),
        (
            "HTTP/1.0 without Host",
            "GET / HTTP/1.0\r\nConnection: close\r\n\r\n",
        ),
        (
            "an empty Host",
            "GET / HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n",
        ),
    ] {
        let r = raw_exchange(client.outbound_port(), req.as_bytes(), ANSWER).await?;
        let status = r.status();
        ensure!(
            status.is_some_and(|s| (400..500).contains(&s)),
            "{what}: expected a 4xx, got {status:?}: {r:?}"
        );
        let body = r.text.split("\r\n\r\n").nth(1).unwrap_or("");
        ensure!(
            !body.trim().is_empty(),
            "{what}: the {status:?} has no body saying why: {r:?}"
        );
    }

    // Still alive and serving.
    for sc in [&mut client, &mut server] {
        sc.ensure_running()?;
        let h = sc.admin_get("/healthz").await?;
        ensure!(h.status == 200, "{} /healthz: {}", sc.name, h.status);
    }
    let t = client.spray("web", "/", 20).await?;
    ensure!(
        t.errors == 0 && t.get("web-1") == 20,
        "after the bad input: {t}"
    );
    let r = http_request(server.inbound_port(), "GET", Some("web"), "/", &[]).await?;
    ensure!(
        r.status == 200 && r.backend() == Some("web-1"),
        "the inbound port after the bad input: {} {}",
        r.status,
        r.body.trim()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_survives_bad_input() {
    let ctx = TestCtx::new("sidecar_bad_input").unwrap();
    let r = bad_input(&ctx).await;
    ctx.finish(r);
}
