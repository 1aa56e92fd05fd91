//! The etcd backend against a real etcd (`etcd` on PATH) on free loopback ports.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;
use weft_etcd_support::{Etcd, Proxy};
use weft_sidecar_register::{Backend, Health, Instance, Registration, Status};

const KEY: &str = "/weft/services/echo/host-1-8080";

fn backend(endpoint: String) -> Backend {
    Backend::Etcd {
        endpoints: vec![endpoint],
        prefix: "/weft".into(),
        ca: None,
        cert: None,
        key: None,
    }
}

fn instance(ttl: Duration) -> Instance {
    Instance {
        service: "echo".into(),
        instance_id: "host-1-8080".into(),
        address: "127.0.0.1".parse().unwrap(),
        port: 8080,
        weight: 3,
        zone: Some("z1".into()),
        protocol: "http".into(),
        metadata: BTreeMap::from([("version".to_string(), "v1".to_string())]),
        ttl,
    }
}

/// The key's decoded value and lease, if it exists.
async fn read(client: &mut etcd_client::Client) -> Option<(weft_registry::Endpoint, i64)> {
    let resp = client.get(KEY, None).await.unwrap();
    let kv = resp.kvs().first()?;
    let text = kv.value_str().unwrap();
    let ep = weft_registry::schema::parse_endpoint(KEY, text)
        .unwrap_or_else(|e| panic!("value {text:?} does not decode: {e}"));
    Some((ep, kv.lease()))
}

/// Polls the key until `f` accepts what it reads.
async fn wait_key(
    client: &mut etcd_client::Client,
    limit: Duration,
    what: &str,
    f: impl Fn(Option<&(weft_registry::Endpoint, i64)>) -> bool,
) -> Option<(weft_registry::Endpoint, i64)> {
    let deadline = Instant::now() + limit;
    loop {
        let got = read(client).await;
        if f(got.as_ref()) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}; key is {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_status(
    reg: &Registration,
    limit: Duration,
    what: &str,
    f: impl Fn(&Status) -> bool,
) -> Status {
    let mut rx = reg.status();
    match tokio::time::timeout(limit, async {
        rx.wait_for(|s| f(s)).await.map(|s| s.clone())
    })
    .await
    {
        Ok(s) => s.unwrap(),
        Err(_) => panic!(
            "timed out after {limit:?}: {what}; status {:?}",
            *reg.status().borrow()
        ),
    }
}

#[tokio::test]
async fn registers_under_its_lease_updates_health_and_deregisters() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let reg = Registration::spawn(backend(etcd.endpoint()), instance(Duration::from_secs(2)));

    reg.set_health(Health::Unhealthy);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(read(&mut c).await.is_none(), "registered before healthy");

    reg.set_health(Health::Healthy);
    let (ep, lease) = wait_key(&mut c, Duration::from_secs(5), "registration", |k| {
        k.is_some()
    })
    .await
    .unwrap();
    assert_eq!(
        ep,
        weft_registry::Endpoint {
            address: "127.0.0.1".into(),
            port: 8080,
            weight: 3,
            zone: Some("z1".into()),
            health: weft_registry::Health::Healthy,
            metadata: BTreeMap::from([("version".to_string(), "v1".to_string())]),
        }
    );
    assert_ne!(lease, 0, "key is not attached to a lease");
    let st = wait_status(&reg, Duration::from_secs(2), "registered", |s| s.registered).await;
    assert_eq!(st.lease, Some(lease));
    assert_eq!(st.registrations, 1);
    assert!(!st.fenced);

    reg.set_health(Health::Unhealthy);
    wait_key(&mut c, Duration::from_secs(2), "unhealthy", |k| {
        k.is_some_and(|(ep, l)| ep.health == weft_registry::Health::Unhealthy && *l == lease)
    })
    .await;
    reg.set_health(Health::Draining);
    wait_key(&mut c, Duration::from_secs(2), "draining", |k| {
        k.is_some_and(|(ep, _)| ep.health == weft_registry::Health::Draining)
    })
    .await;

    // Three TTLs later the keepalive has held the same lease.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (_, still) = read(&mut c).await.expect("key expired despite keepalive");
    assert_eq!(still, lease);

    reg.deregister(Duration::from_secs(5)).await.unwrap();
    assert!(read(&mut c).await.is_none(), "key left after deregister");
    let ttl = c.lease_time_to_live(lease, None).await.unwrap().ttl();
    assert_eq!(ttl, -1, "lease not revoked");
}

#[tokio::test]
async fn a_killed_sidecar_disappears_after_the_lease_ttl() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let reg = Registration::spawn(backend(etcd.endpoint()), instance(Duration::from_secs(2)));
    reg.set_health(Health::Healthy);
    wait_key(&mut c, Duration::from_secs(5), "registration", |k| {
        k.is_some()
    })
    .await;

    drop(reg);
    let dropped = Instant::now();
    wait_key(&mut c, Duration::from_secs(8), "expiry", |k| k.is_none()).await;
    assert!(
        dropped.elapsed() >= Duration::from_millis(500),
        "gone after {:?}: was it deleted rather than expired?",
        dropped.elapsed()
    );
}

#[tokio::test]
async fn a_lost_lease_is_replaced_and_the_key_written_again() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let reg = Registration::spawn(backend(etcd.endpoint()), instance(Duration::from_secs(3)));
    reg.set_health(Health::Healthy);
    let (_, first) = wait_key(&mut c, Duration::from_secs(5), "registration", |k| {
        k.is_some()
    })
    .await
    .unwrap();

    // Revoking deletes the key; the sidecar notices at its next keepalive (every 1 s).
    c.lease_revoke(first).await.unwrap();
    let (_, second) = wait_key(&mut c, Duration::from_secs(6), "re-registration", |k| {
        k.is_some_and(|(_, l)| *l != first)
    })
    .await
    .unwrap();
    let st = wait_status(&reg, Duration::from_secs(2), "new lease", |s| {
        s.registered && s.lease == Some(second)
    })
    .await;
    assert_eq!(st.registrations, 2);
    reg.deregister(Duration::from_secs(5)).await.unwrap();
    assert!(read(&mut c).await.is_none());
}

#[tokio::test]
async fn a_stale_sidecar_is_fenced_out_of_a_newer_ones_key() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    // A talks to etcd through a proxy, so the test can cut it off while its lease is lost and B
    // takes over; without that A could win the race to re-register.
    let proxy = Proxy::start(etcd.client_port()).await;
    let a = Registration::spawn(backend(proxy.endpoint()), instance(Duration::from_secs(2)));
    a.set_health(Health::Healthy);
    let (_, lease_a) = wait_key(&mut c, Duration::from_secs(5), "A registered", |k| {
        k.is_some()
    })
    .await
    .unwrap();

    proxy.cut();
    c.lease_revoke(lease_a).await.unwrap();
    assert!(read(&mut c).await.is_none());

    let b = Registration::spawn(backend(etcd.endpoint()), instance(Duration::from_secs(2)));
    b.set_health(Health::Healthy);
    let (_, lease_b) = wait_key(&mut c, Duration::from_secs(5), "B registered", |k| {
        k.is_some()
    })
    .await
    .unwrap();
    assert_ne!(lease_b, lease_a);

    proxy.open();
    let st = wait_status(&a, Duration::from_secs(10), "A fenced", |s| s.fenced).await;
    assert!(!st.registered, "{st:?}");
    let err = st.last_error.unwrap_or_default();
    assert!(
        err.contains(KEY) && err.contains(&lease_b.to_string()),
        "{err}"
    );

    // A keeps its hands off for several keepalive periods, even with a health change.
    a.set_health(Health::Unhealthy);
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let (ep, lease) = read(&mut c).await.expect("B's key vanished");
        assert_eq!(lease, lease_b, "A overwrote B's key");
        assert_eq!(ep.health, weft_registry::Health::Healthy);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(a.status().borrow().fenced);
    assert!(b.status().borrow().registered);

    // Once B leaves, A may take the key.
    b.deregister(Duration::from_secs(5)).await.unwrap();
    let (ep, lease) = wait_key(
        &mut c,
        Duration::from_secs(8),
        "A takes the free key",
        |k| k.is_some(),
    )
    .await
    .unwrap();
    assert_ne!(lease, lease_b);
    assert_eq!(ep.health, weft_registry::Health::Unhealthy);
    let st = wait_status(&a, Duration::from_secs(2), "A unfenced", |s| {
        !s.fenced && s.registered
    })
    .await;
    assert_eq!(st.lease, Some(lease));

    // Deregistering a fenced-then-free A removes only its own key.
    a.deregister(Duration::from_secs(5)).await.unwrap();
    assert!(read(&mut c).await.is_none());
}

#[tokio::test]
async fn a_fenced_sidecar_does_not_delete_the_other_key_on_deregister() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    // Someone else (another sidecar, by hand) holds the key under their own lease.
    let other = c.lease_grant(30, None).await.unwrap().id();
    c.put(
        KEY,
        r#"{"address":"10.0.0.9","port":80}"#,
        Some(etcd_client::PutOptions::new().with_lease(other)),
    )
    .await
    .unwrap();

    let reg = Registration::spawn(backend(etcd.endpoint()), instance(Duration::from_secs(2)));
    reg.set_health(Health::Healthy);
    wait_status(&reg, Duration::from_secs(5), "fenced", |s| s.fenced).await;
    reg.deregister(Duration::from_secs(5)).await.unwrap();
    let (ep, lease) = read(&mut c).await.expect("the other key was deleted");
    assert_eq!(lease, other);
    assert_eq!(ep.address, "10.0.0.9");
}

/// A gRPC app declares its service's protocol (clients need HTTP/2), but never over what an
/// operator already wrote.
#[tokio::test]
async fn grpc_instance_declares_the_service_protocol_without_overwriting() {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    let mut grpc = instance(Duration::from_secs(5));
    grpc.protocol = "grpc".into();

    let reg = Registration::spawn(backend(etcd.endpoint()), grpc.clone());
    reg.set_health(Health::Healthy);
    wait_status(&reg, Duration::from_secs(5), "registered", |s| s.registered).await;
    let cfg = "/weft/service-config/echo";
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = c.get(cfg, None).await.unwrap();
        if let Some(kv) = resp.kvs().first() {
            assert_eq!(kv.value_str().unwrap(), r#"{"protocol":"grpc"}"#);
            assert_eq!(
                kv.lease(),
                0,
                "the service's protocol must outlive one instance"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{cfg} never written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reg.deregister(Duration::from_secs(5)).await.unwrap();

    // An operator's explicit choice stays.
    c.put(cfg, r#"{"protocol":"http"}"#, None).await.unwrap();
    let reg = Registration::spawn(backend(etcd.endpoint()), grpc);
    reg.set_health(Health::Healthy);
    wait_status(&reg, Duration::from_secs(5), "registered", |s| s.registered).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resp = c.get(cfg, None).await.unwrap();
    assert_eq!(
        resp.kvs().first().unwrap().value_str().unwrap(),
        r#"{"protocol":"http"}"#
    );
    reg.deregister(Duration::from_secs(5)).await.unwrap();
}
