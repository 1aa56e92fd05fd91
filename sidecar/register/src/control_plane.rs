//! The control plane's Registration API: register, heartbeat every TTL/3 with the current
//! health, register again on NOT_FOUND, deregister on request.

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use weft_proto::registry::v1 as pb;
use weft_proto::registry::v1::registration_client::RegistrationClient;

use crate::{Ctx, Health, RegisterError, Reply, backoff};

struct State {
    endpoint: String,
    service: String,
    client: RegistrationClient<Channel>,
    /// The id the server knows us by (ours, or the one it generated when ours was empty).
    instance_id: String,
    /// The lease the server granted; it may clamp what we asked for.
    ttl: Duration,
    /// A Register call was sent, so the server may hold an entry to remove on deregistration.
    maybe_registered: bool,
    registered: bool,
    last_ok: Instant,
}

pub(crate) async fn run(
    endpoint: String,
    tls: Option<weft_identity::ClientTlsFiles>,
    mut ctx: Ctx,
    stop: oneshot::Receiver<Reply>,
) {
    let ttl = ctx.instance.ttl.max(Duration::from_secs(1));
    let rpc_timeout = (ttl / 3).clamp(Duration::from_secs(1), Duration::from_secs(10));
    let endpoint_with_tls = Endpoint::from_shared(endpoint.clone())
        .map_err(|e| e.to_string())
        .and_then(|ep| match &tls {
            // Read once: the channel reconnects by itself with this config, so a renewed
            // client certificate is used after the sidecar restarts.
            Some(files) => weft_identity::tls::tonic_client_tls(files)
                .map_err(|e| e.to_string())
                .and_then(|cfg| ep.tls_config(cfg).map_err(|e| e.to_string())),
            None => Ok(ep),
        });
    let channel = match endpoint_with_tls {
        Ok(ep) => ep
            .connect_timeout(rpc_timeout)
            .timeout(rpc_timeout)
            .tcp_nodelay(true)
            .connect_lazy(),
        Err(e) => {
            // A malformed endpoint will not heal by retrying; say so and wait to be stopped.
            let e = RegisterError::Connect {
                endpoint: endpoint.clone(),
                message: e,
            };
            tracing::error!(error = %e, "cannot register");
            ctx.record_error(&e);
            if let Ok(reply) = stop.await {
                let _ = reply.send(Ok(()));
            }
            return;
        }
    };
    let mut st = State {
        endpoint,
        service: ctx.instance.service.clone(),
        client: RegistrationClient::new(channel),
        instance_id: ctx.instance.instance_id.clone(),
        ttl,
        maybe_registered: false,
        registered: false,
        last_ok: Instant::now(),
    };
    let reply = {
        let keep = st.keep(&mut ctx);
        tokio::pin!(keep);
        tokio::select! {
            () = &mut keep => None,
            r = stop => r.ok(),
        }
    };
    if let Some(reply) = reply {
        let result = st.deregister().await;
        if result.is_ok() {
            ctx.update(|s| s.registered = false);
        }
        let _ = reply.send(result);
    }
}

impl State {
    fn err(&self, source: tonic::Status) -> RegisterError {
        RegisterError::ControlPlane {
            endpoint: self.endpoint.clone(),
            source,
        }
    }

    /// Keeps the instance registered and current; returns only if the [`crate::Registration`]
    /// handle is gone.
    async fn keep(&mut self, ctx: &mut Ctx) {
        let mut failures = 0u32;
        let mut next_heartbeat = Instant::now();
        loop {
            if !self.registered {
                match self.register(ctx).await {
                    Ok(()) => {
                        failures = 0;
                        next_heartbeat = Instant::now() + ctx.period(self.ttl);
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(error = %e, attempt = failures, "registration failed; retrying");
                        ctx.record_error(&e);
                        tokio::time::sleep(backoff(failures, ctx.period(self.ttl))).await;
                        continue;
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep_until(next_heartbeat) => {}
                r = ctx.health.changed() => {
                    if r.is_err() {
                        return;
                    }
                }
            }
            match self.heartbeat(ctx).await {
                Ok(()) => {
                    failures = 0;
                    next_heartbeat = Instant::now() + ctx.period(self.ttl);
                }
                Err(status) if status.code() == Code::NotFound => {
                    // The control plane restarted or reaped us: register again at once.
                    tracing::info!(
                        instance_id = %self.instance_id,
                        reason = status.message(),
                        "control plane forgot this instance; registering again"
                    );
                    self.registered = false;
                    ctx.update(|s| s.registered = false);
                }
                Err(status) => {
                    failures += 1;
                    let e = self.err(status);
                    tracing::warn!(error = %e, attempt = failures, "heartbeat failed; retrying");
                    ctx.record_error(&e);
                    // Once a whole TTL has passed without a heartbeat the entry is gone.
                    let alive = self.last_ok.elapsed() < self.ttl;
                    ctx.update(|s| s.registered = alive);
                    // Capped at TTL/3 so that a short outage does not cost the lease.
                    next_heartbeat = Instant::now() + backoff(failures, ctx.period(self.ttl));
                }
            }
        }
    }

    async fn register(&mut self, ctx: &mut Ctx) -> Result<(), RegisterError> {
        let health = ctx.take_health();
        let inst = &ctx.instance;
        let req = pb::RegisterRequest {
            service: inst.service.clone(),
            instance_id: self.instance_id.clone(),
            endpoint: Some(pb::Endpoint {
                address: inst.address.to_string(),
                port: u32::from(inst.port),
                weight: inst.weight,
                zone: inst.zone.clone().unwrap_or_default(),
                health: pb_health(health) as i32,
                metadata: inst
                    .metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            }),
            // 0 would ask for the server's default; round up so we never ask for less than given.
            ttl_seconds: ttl_secs(inst.ttl),
            protocol: inst.protocol.clone(),
        };
        self.maybe_registered = true;
        let resp = self
            .client
            .register(req)
            .await
            .map_err(|s| self.err(s))?
            .into_inner();
        if !resp.instance_id.is_empty() {
            self.instance_id = resp.instance_id;
        }
        if resp.ttl_seconds > 0 {
            self.ttl = Duration::from_secs(u64::from(resp.ttl_seconds));
        }
        self.registered = true;
        self.last_ok = Instant::now();
        tracing::info!(
            service = %ctx.instance.service,
            instance_id = %self.instance_id,
            ttl_seconds = self.ttl.as_secs(),
            ?health,
            "registered with the control plane"
        );
        ctx.update(|s| {
            s.registered = true;
            s.health = Some(health);
            s.registrations += 1;
            s.last_error = None;
        });
        Ok(())
    }

    async fn heartbeat(&mut self, ctx: &mut Ctx) -> Result<(), tonic::Status> {
        let health = ctx.take_health();
        let resp = self
            .client
            .heartbeat(pb::HeartbeatRequest {
                service: ctx.instance.service.clone(),
                instance_id: self.instance_id.clone(),
                health: pb_health(health) as i32,
            })
            .await?
            .into_inner();
        if resp.ttl_seconds > 0 {
            self.ttl = Duration::from_secs(u64::from(resp.ttl_seconds));
        }
        self.last_ok = Instant::now();
        ctx.update(|s| {
            s.registered = true;
            s.health = Some(health);
            s.last_error = None;
        });
        Ok(())
    }

    async fn deregister(&mut self) -> Result<(), RegisterError> {
        if !self.maybe_registered {
            return Ok(());
        }
        self.client
            .deregister(pb::DeregisterRequest {
                service: self.service.clone(),
                instance_id: self.instance_id.clone(),
            })
            .await
            .map_err(|s| self.err(s))?;
        Ok(())
    }
}

fn pb_health(h: Health) -> pb::Health {
    match h {
        Health::Healthy => pb::Health::Healthy,
        Health::Unhealthy => pb::Health::Unhealthy,
        Health::Draining => pb::Health::Draining,
    }
}

/// Whole seconds, rounded up and at least 1: 0 would ask the server for its default.
pub(crate) fn ttl_secs(ttl: Duration) -> u32 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    u32::try_from(secs).unwrap_or(u32::MAX).max(1)
}
