//! Tests of the harness's own parts that need no control plane: the demo backend, the real
//! Envoy with a static bootstrap, the grpcio and grpc-js clients against a backend directly,
//! and the demo's example files.

use anyhow::{Context, Result, ensure};
use weft_tests::*;

#[tokio::test]
async fn demo_backend_serves_http1_and_h2c() {
    let ctx = TestCtx::new("harness_demo_backend_http").unwrap_or_else(|e| panic!("{e:#}"));
    let r = async {
        let b = Backends::start(&ctx, &[("web-1", Kind::Http), ("web-2", Kind::Http)]).await?;
        let r = http_get(b.port("web-1")?, Some("web"), "/anything").await?;
        ensure!(r.status == 200, "status {}", r.status);
        ensure!(r.body == "web-1\n", "body {:?}", r.body);
        ensure!(r.backend() == Some("web-1"), "headers {:?}", r.headers);
        let r = http_get(b.port("web-2")?, None, "/healthz").await?;
        ensure!(
            r.status == 200 && r.body == "ok",
            "healthz: {} {:?}",
            r.status,
            r.body
        );

        // h2c with prior knowledge on the same port.
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", b.port("web-2")?)).await?;
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await?;
        let driver = tokio::spawn(conn);
        let req = http::Request::get(format!("http://127.0.0.1:{}/x", b.port("web-2")?))
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        let resp = send.send_request(req).await?;
        ensure!(
            resp.version() == http::Version::HTTP_2,
            "not h2: {:?}",
            resp.version()
        );
        ensure!(resp.status() == 200);
        ensure!(resp.headers().get("x-backend").map(|v| v.as_bytes()) == Some(b"web-2".as_slice()));
        driver.abort();
        Ok(())
    }
    .await;
    ctx.finish(r);
}

#[tokio::test]
async fn demo_backend_serves_echo_and_health() {
    let ctx = TestCtx::new("harness_demo_backend_grpc").unwrap_or_else(|e| panic!("{e:#}"));
    let r = async {
        let b = Backends::start(&ctx, &[("echo-1", Kind::Grpc)]).await?;
        let url = format!("http://127.0.0.1:{}", b.port("echo-1")?);
        let mut echo = weft_proto::demo::v1::echo_client::EchoClient::connect(url.clone()).await?;
        let reply = echo
            .echo(weft_proto::demo::v1::EchoRequest {
                message: "hi".into(),
            })
            .await?
            .into_inner();
        ensure!(
            reply.backend == "echo-1" && reply.message == "hi",
            "{reply:?}"
        );
        let channel = tonic::transport::Channel::from_shared(url)?
            .connect()
            .await?;
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        for service in ["", "weft.demo.v1.Echo"] {
            let st = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await?
                .into_inner();
            ensure!(
                st.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
                "health of {service:?}: {st:?}"
            );
        }
        Ok(())
    }
    .await;
    ctx.finish(r);
}

async fn client_direct(lang: Lang) -> Result<()> {
    let ctx = TestCtx::new(&format!("harness_client_direct_{}", lang.name()))?;
    let r = async {
        let b = Backends::start(&ctx, &[("echo-1", Kind::Grpc)]).await?;
        let mut c = GrpcClient::start_direct(
            &ctx,
            lang,
            &format!("127.0.0.1:{}", b.port("echo-1")?),
            "direct",
        )
        .await?;
        c.ping().await?;
        let t = c.call(20).await?;
        ensure!(t.get("echo-1") == 20 && t.errors == 0, "{t}");
        Ok(())
    }
    .await;
    ctx.finish(r);
    Ok(())
}

#[tokio::test]
async fn python_client_calls_a_backend_directly() {
    client_direct(Lang::Python)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test]
async fn node_client_calls_a_backend_directly() {
    client_direct(Lang::Node)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test]
async fn envoy_with_a_static_bootstrap_proxies_to_a_backend() {
    let ctx = TestCtx::new("harness_envoy_static").unwrap_or_else(|e| panic!("{e:#}"));
    let r = async {
        let b = Backends::start(&ctx, &[("web-1", Kind::Http)]).await?;
        let (admin, listener) = (free_port()?, free_port()?);
        let yaml = format!(
            r#"
node: {{id: static, cluster: tests}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
    - name: http
      address: {{socket_address: {{address: 127.0.0.1, port_value: {listener}}}}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: static_http
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
                route_config:
                  virtual_hosts:
                    - name: web
                      domains: ["web", "web:*"]
                      routes: [{{match: {{prefix: /}}, route: {{cluster: web}}}}]
  clusters:
    - name: web
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: web
        endpoints:
          - lb_endpoints:
              - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}
"#,
            port = b.port("web-1")?
        );
        let envoy = Envoy::start_with_bootstrap(&ctx, "envoy-static", &yaml, admin, listener).await?;
        let t = envoy.spray("web", "/", 10).await?;
        ensure!(t.get("web-1") == 10 && t.errors == 0, "{t}");
        let r = envoy.http_get("unknown-host", "/").await?;
        ensure!(r.status == 404, "unknown host got {}", r.status);
        let stats = envoy.stats().await?;
        let rq = stats.get("http.static_http.downstream_rq_2xx").copied().unwrap_or(0);
        ensure!(rq >= 10, "downstream_rq_2xx = {rq}");
        Ok(())
    }
    .await;
    ctx.finish(r);
}

#[tokio::test]
async fn example_envoy_bootstraps_validate() {
    let r: Result<()> = async {
        let envoy = envoy_bin()?;
        for v in [Variant::Sotw, Variant::Delta] {
            let path = v.example_bootstrap();
            let out = tokio::process::Command::new(&envoy)
                .args(["--mode", "validate", "-c"])
                .arg(&path)
                .output()
                .await
                .context("running envoy --mode validate")?;
            ensure!(
                out.status.success(),
                "{} does not validate:\n{}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
    .await;
    r.unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn demo_registry_is_valid() {
    let path = repo_root().join("examples/demo/registry.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc = weft_registry::parse_document(&path.display().to_string(), &text)
        .unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = doc.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["web", "web-canary", "echo"]);
    assert_eq!(doc.services[0].endpoints.len(), 3);
    assert_eq!(doc.services[2].protocol, weft_registry::Protocol::Grpc);
    // Every backend a route names is a service of the demo.
    for r in &doc.routes {
        for rule in &r.rules {
            for b in &rule.backends {
                assert!(
                    names.contains(&b.service.as_str()),
                    "unknown backend {}",
                    b.service
                );
            }
        }
    }
}
