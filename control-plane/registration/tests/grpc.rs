//! The registration API end to end: a real tonic server on 127.0.0.1:0, a real client, the hub.

// Test helpers outside `#[test]` fns panic on setup failure on purpose: that is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::Code;
use tonic::transport::Channel;
use weft_proto::registry::v1::registration_client::RegistrationClient;
use weft_proto::registry::v1::{DeregisterRequest, Endpoint, HeartbeatRequest, RegisterRequest};
use weft_registration::{EmbeddedRegistry, RegistrationOptions};
use weft_registry::Hub;

struct Harness {
    hub: Arc<Hub>,
    registry: EmbeddedRegistry,
    client: RegistrationClient<Channel>,
    // Dropping these stops the server and the reaper.
    _stop_server: oneshot::Sender<()>,
    _stop_reaper: oneshot::Sender<()>,
}

async fn start() -> Harness {
    let hub = Hub::new();
    let registry = EmbeddedRegistry::new(
        hub.add_source("registration"),
        RegistrationOptions {
            reap_interval: Duration::from_millis(100),
            ..Default::default()
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    let svc = registry.service();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = server_stopped.await;
            })
            .await
            .unwrap();
    });
    let (stop_reaper, reaper_stopped) = oneshot::channel::<()>();
    tokio::spawn(registry.clone().run_reaper(async {
        let _ = reaper_stopped.await;
    }));
    let client = RegistrationClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Harness {
        hub,
        registry,
        client,
        _stop_server: stop_server,
        _stop_reaper: stop_reaper,
    }
}

fn register_req(service: &str, port: u32, ttl_seconds: u32) -> RegisterRequest {
    RegisterRequest {
        service: service.into(),
        instance_id: String::new(),
        endpoint: Some(Endpoint {
            address: "127.0.0.1".into(),
            port,
            weight: 0,
            zone: "z1".into(),
            health: 0,
            metadata: [("version".to_string(), "v1".to_string())].into(),
        }),
        ttl_seconds,
        protocol: String::new(),
    }
}

/// Ids of the instances of `service` the hub currently has, with their source.
fn hub_instances(hub: &Hub, service: &str) -> Vec<(String, String)> {
    hub.current()
        .registry
        .services
        .get(service)
        .map(|s| {
            s.instances
                .iter()
                .map(|i| (i.id.clone(), i.source.clone()))
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn register_shows_up_in_the_hub_with_its_source() {
    let mut h = start().await;
    let resp = h
        .client
        .register(RegisterRequest {
            protocol: "grpc".into(),
            ..register_req("echo", 50051, 0)
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!resp.instance_id.is_empty());
    assert_eq!(resp.ttl_seconds, 30);

    let reg = h.hub.current().registry;
    let svc = &reg.services["echo"];
    assert_eq!(svc.protocol, weft_registry::Protocol::Grpc);
    assert_eq!(svc.instances.len(), 1);
    let inst = &svc.instances[0];
    assert_eq!(inst.id, resp.instance_id);
    assert_eq!(inst.source, "registration");
    assert_eq!(inst.endpoint.port, 50051);
    assert_eq!(inst.endpoint.weight, 1);
    assert_eq!(inst.endpoint.zone.as_deref(), Some("z1"));
    assert_eq!(inst.endpoint.metadata["version"], "v1");

    // Re-registering the same id replaces the instance instead of adding one.
    let again = h
        .client
        .register(RegisterRequest {
            instance_id: resp.instance_id.clone(),
            ttl_seconds: 5,
            ..register_req("echo", 50051, 0)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.instance_id, resp.instance_id);
    assert_eq!(again.ttl_seconds, 5);
    assert_eq!(h.registry.instances().len(), 1);
    assert_eq!(hub_instances(&h.hub, "echo").len(), 1);
}

#[tokio::test]
async fn heartbeats_keep_an_instance_beyond_its_ttl_and_silence_expires_it() {
    let mut h = start().await;
    let id = h
        .client
        .register(register_req("echo", 8080, 1))
        .await
        .unwrap()
        .into_inner()
        .instance_id;
    let registered_at = Instant::now();

    // Heartbeat for 2.5 TTLs; the instance must be there after every one.
    while registered_at.elapsed() < Duration::from_millis(2500) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let hb = h
            .client
            .heartbeat(HeartbeatRequest {
                service: "echo".into(),
                instance_id: id.clone(),
                health: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(hb.ttl_seconds, 1);
        assert_eq!(hub_instances(&h.hub, "echo").len(), 1);
    }

    // Then stop: gone within the TTL plus reaper period (with slack for a slow machine).
    let silent_since = Instant::now();
    wait_until("instance to expire", Duration::from_secs(5), || {
        hub_instances(&h.hub, "echo").is_empty()
    })
    .await;
    assert!(
        silent_since.elapsed() >= Duration::from_millis(700),
        "expired too early: {:?}",
        silent_since.elapsed()
    );
    assert!(h.registry.instances().is_empty());

    // And a late heartbeat is told to register again.
    let err = h
        .client
        .heartbeat(HeartbeatRequest {
            service: "echo".into(),
            instance_id: id,
            health: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn deregister_removes_at_once_and_is_idempotent() {
    let mut h = start().await;
    let id = h
        .client
        .register(register_req("echo", 8080, 0))
        .await
        .unwrap()
        .into_inner()
        .instance_id;
    assert_eq!(hub_instances(&h.hub, "echo").len(), 1);
    for _ in 0..2 {
        h.client
            .deregister(DeregisterRequest {
                service: "echo".into(),
                instance_id: id.clone(),
            })
            .await
            .unwrap();
        assert!(hub_instances(&h.hub, "echo").is_empty());
    }
}

#[tokio::test]
async fn invalid_registrations_name_the_field() {
    let mut h = start().await;
    let mut bad_address = register_req("echo", 8080, 0);
    if let Some(ep) = bad_address.endpoint.as_mut() {
        ep.address = "not-an-ip.example".into();
    }
    let cases = [
        (register_req("echo", 0, 0), "endpoint.port", "0"),
        (register_req("echo", 70000, 0), "endpoint.port", "70000"),
        (bad_address, "endpoint.address", "not-an-ip.example"),
        (register_req("-echo", 8080, 0), "service", "-echo"),
        (
            RegisterRequest {
                protocol: "thrift".into(),
                ..register_req("echo", 8080, 0)
            },
            "protocol",
            "thrift",
        ),
    ];
    for (req, field, value) in cases {
        let err = h.client.register(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().starts_with(&format!("{field}: ")),
            "message should name {field}: {}",
            err.message()
        );
        assert!(
            err.message().contains(value),
            "message should name {value}: {}",
            err.message()
        );
    }
    assert!(h.hub.current().registry.services.is_empty());
}

#[tokio::test]
async fn heartbeat_on_unknown_instance_is_not_found() {
    let mut h = start().await;
    let err = h
        .client
        .heartbeat(HeartbeatRequest {
            service: "echo".into(),
            instance_id: "nope".into(),
            health: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("register it again"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("nope"), "{}", err.message());
}

#[tokio::test]
async fn metrics_count_registrations_and_removals() {
    let mut h = start().await;
    let mut metrics = prometheus_client::registry::Registry::default();
    h.registry.register_metrics(&mut metrics);
    let id = h
        .client
        .register(register_req("echo", 8080, 0))
        .await
        .unwrap()
        .into_inner()
        .instance_id;
    h.client
        .register(register_req("echo", 8081, 0))
        .await
        .unwrap();
    h.client
        .deregister(DeregisterRequest {
            service: "echo".into(),
            instance_id: id,
        })
        .await
        .unwrap();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &metrics).unwrap();
    for want in [
        "weft_registration_registered_instances 1",
        "weft_registration_registrations_total 2",
        "weft_registration_deregistrations_total 1",
        "weft_registration_expirations_total 0",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
}
