//! The control-plane backend against the real registration server (weft-registration) served
//! in-process on 127.0.0.1, read back through its hub.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::TcpListenerStream;
use weft_registration::{EmbeddedRegistry, InstanceSummary, RegistrationOptions};
use weft_registry::Hub;
use weft_sidecar_register::{Backend, Health, Instance, Registration, Status};

/// One control plane's registration API. Stopped (gracefully) on drop, also on panic.
struct ControlPlane {
    addr: SocketAddr,
    hub: Arc<Hub>,
    registry: EmbeddedRegistry,
    stop_server: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    _stop_reaper: oneshot::Sender<()>,
}

impl ControlPlane {
    /// Serves on `addr` (port 0 for a free one).
    async fn start(addr: SocketAddr) -> ControlPlane {
        let hub = Hub::new();
        let registry = EmbeddedRegistry::new(
            hub.add_source("registration"),
            RegistrationOptions {
                reap_interval: Duration::from_millis(100),
                ..Default::default()
            },
        );
        // The old server's port may take a moment to be free again.
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot bind {addr}: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let addr = listener.local_addr().unwrap();
        let (stop_server, stopped) = oneshot::channel::<()>();
        let svc = registry.service();
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        let (stop_reaper, reaper_stopped) = oneshot::channel::<()>();
        tokio::spawn(registry.clone().run_reaper(async {
            let _ = reaper_stopped.await;
        }));
        ControlPlane {
            addr,
            hub,
            registry,
            stop_server: Some(stop_server),
            server: Some(server),
            _stop_reaper: stop_reaper,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving and waits until the port is released.
    async fn stop(mut self) {
        drop(self.stop_server.take());
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .expect("server did not stop")
                .unwrap();
        }
    }

    fn instances(&self) -> Vec<InstanceSummary> {
        self.registry.instances()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
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
        protocol: "grpc".into(),
        metadata: BTreeMap::from([("version".to_string(), "v1".to_string())]),
        ttl,
    }
}

async fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn status(r: &Registration) -> Status {
    r.status().borrow().clone()
}

#[tokio::test]
async fn registers_after_healthy_and_pushes_health_changes_at_once() {
    let cp = ControlPlane::start("127.0.0.1:0".parse().unwrap()).await;
    // A long TTL: heartbeats come every 10 s, so anything sooner is the health change itself.
    let reg = Registration::spawn(
        Backend::ControlPlane {
            endpoint: cp.endpoint(),
            tls: None,
        },
        instance(Duration::from_secs(30)),
    );

    reg.set_health(Health::Unhealthy);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(cp.instances().is_empty(), "registered before healthy");
    assert!(!status(&reg).registered);

    reg.set_health(Health::Healthy);
    eventually(Duration::from_secs(5), "registration", || {
        !cp.instances().is_empty()
    })
    .await;
    let insts = cp.instances();
    assert_eq!(insts.len(), 1);
    let i = &insts[0];
    assert_eq!(i.service, "echo");
    assert_eq!(i.instance_id, "host-1-8080");
    assert_eq!(i.ttl_seconds, 30);
    assert_eq!(i.endpoint.address, "127.0.0.1");
    assert_eq!(i.endpoint.port, 8080);
    assert_eq!(i.endpoint.weight, 3);
    assert_eq!(i.endpoint.zone.as_deref(), Some("z1"));
    assert_eq!(i.endpoint.health, weft_registry::Health::Healthy);
    assert_eq!(i.endpoint.metadata["version"], "v1");
    assert_eq!(
        cp.hub.current().registry.services["echo"].protocol,
        weft_registry::Protocol::Grpc
    );
    eventually(Duration::from_secs(2), "status registered", || {
        status(&reg).registered
    })
    .await;
    let st = status(&reg);
    assert_eq!(st.registrations, 1);
    assert_eq!(st.health, Some(Health::Healthy));
    assert_eq!(st.last_error, None);

    for (h, want) in [
        (Health::Unhealthy, weft_registry::Health::Unhealthy),
        (Health::Draining, weft_registry::Health::Draining),
        (Health::Healthy, weft_registry::Health::Healthy),
    ] {
        reg.set_health(h);
        eventually(Duration::from_secs(2), &format!("health {h:?}"), || {
            cp.instances()
                .first()
                .is_some_and(|i| i.endpoint.health == want)
        })
        .await;
        eventually(Duration::from_secs(2), "status health", || {
            status(&reg).health == Some(h)
        })
        .await;
    }

    reg.deregister(Duration::from_secs(5)).await.unwrap();
    assert!(
        cp.instances().is_empty(),
        "still registered after deregister"
    );
    assert!(cp.hub.current().registry.services.is_empty());
}

#[tokio::test]
async fn heartbeats_keep_it_and_a_restarted_control_plane_gets_it_back() {
    let cp = ControlPlane::start("127.0.0.1:0".parse().unwrap()).await;
    let addr = cp.addr;
    let reg = Registration::spawn(
        Backend::ControlPlane {
            endpoint: cp.endpoint(),
            tls: None,
        },
        instance(Duration::from_secs(1)),
    );
    reg.set_health(Health::Healthy);
    eventually(Duration::from_secs(5), "registration", || {
        !cp.instances().is_empty()
    })
    .await;

    // Three TTLs: only heartbeats keep it.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(cp.instances().len(), 1, "lost the lease while heartbeating");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status(&reg).registrations, 1);

    // A new control plane on the same port knows nothing; the next heartbeat gets NOT_FOUND.
    cp.stop().await;
    let cp = ControlPlane::start(addr).await;
    eventually(Duration::from_secs(8), "re-registration", || {
        !cp.instances().is_empty()
    })
    .await;
    assert_eq!(cp.instances()[0].instance_id, "host-1-8080");
    eventually(Duration::from_secs(2), "status counts it", || {
        let st = status(&reg);
        st.registered && st.registrations >= 2
    })
    .await;

    reg.deregister(Duration::from_secs(5)).await.unwrap();
    assert!(cp.instances().is_empty());
}

#[tokio::test]
async fn a_control_plane_that_comes_up_late_still_gets_the_registration() {
    // Reserve a port, then leave it closed.
    let addr = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let reg = Registration::spawn(
        Backend::ControlPlane {
            endpoint: format!("http://{addr}"),
            tls: None,
        },
        instance(Duration::from_secs(3)),
    );
    reg.set_health(Health::Healthy);
    eventually(Duration::from_secs(5), "an error in the status", || {
        status(&reg).last_error.is_some()
    })
    .await;
    let st = status(&reg);
    assert!(!st.registered);
    assert!(
        st.last_error
            .as_deref()
            .unwrap()
            .contains(&addr.to_string()),
        "{st:?}"
    );

    let cp = ControlPlane::start(addr).await;
    // Retries are capped at TTL/3 = 1 s.
    eventually(Duration::from_secs(5), "registration", || {
        !cp.instances().is_empty()
    })
    .await;
    eventually(Duration::from_secs(2), "error cleared", || {
        let st = status(&reg);
        st.registered && st.last_error.is_none()
    })
    .await;
}

#[tokio::test]
async fn a_killed_sidecar_expires_after_its_ttl() {
    let cp = ControlPlane::start("127.0.0.1:0".parse().unwrap()).await;
    let reg = Registration::spawn(
        Backend::ControlPlane {
            endpoint: cp.endpoint(),
            tls: None,
        },
        instance(Duration::from_secs(1)),
    );
    reg.set_health(Health::Healthy);
    eventually(Duration::from_secs(5), "registration", || {
        !cp.instances().is_empty()
    })
    .await;

    // Dropping without deregistering is what SIGKILL leaves behind.
    drop(reg);
    let dropped = Instant::now();
    eventually(Duration::from_secs(5), "expiry", || {
        cp.instances().is_empty()
    })
    .await;
    // It must have gone by expiry, not by a deregistration.
    assert!(
        dropped.elapsed() >= Duration::from_millis(300),
        "gone after {:?}: was it deregistered?",
        dropped.elapsed()
    );
}

#[tokio::test]
async fn deregister_before_registration_is_a_no_op() {
    let cp = ControlPlane::start("127.0.0.1:0".parse().unwrap()).await;
    let reg = Registration::spawn(
        Backend::ControlPlane {
            endpoint: cp.endpoint(),
            tls: None,
        },
        instance(Duration::from_secs(5)),
    );
    reg.set_health(Health::Unhealthy);
    reg.deregister(Duration::from_secs(2)).await.unwrap();
    assert!(cp.instances().is_empty());
}
