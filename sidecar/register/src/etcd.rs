//! etcd: a lease kept alive every TTL/3, the instance key written under it in a fenced
//! transaction, re-put on health changes and lease loss, removed (only if still ours) on
//! deregistration.
//!
//! Fencing: the key is written only if it does not exist or is held by our own lease. A key held
//! by another lease belongs to another sidecar with the same instance id (typically our
//! replacement after we lost our lease); we stop writing and only check now and then whether it
//! became free.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn,
    TxnOp, TxnOpResponse,
};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::{Ctx, Health, RegisterError, Reply, backoff, control_plane::ttl_secs};

/// TLS files from the backend; all `None` means plaintext.
pub(crate) struct TlsFiles {
    pub(crate) ca: Option<PathBuf>,
    pub(crate) cert: Option<PathBuf>,
    pub(crate) key: Option<PathBuf>,
}

/// What a fenced put found.
enum PutOutcome {
    Written,
    /// The key is held by this lease (0: a key without a lease, written by hand).
    HeldBy(i64),
}

struct State {
    endpoints: Vec<String>,
    key: String,
    tls: TlsFiles,
    ttl: Duration,
    rpc_timeout: Duration,
    client: Option<Client>,
    lease: Option<i64>,
    /// Leases we gave up on that may still exist (e.g. presumed lost during a partition). A key
    /// held by one of them is ours: we revoke it instead of fencing ourselves out.
    old_leases: Vec<i64>,
    keepalive: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    /// When etcd last confirmed our lease alive.
    confirmed: Instant,
    next_keepalive: Instant,
    /// The value in etcd is not (known to be) the current one.
    dirty: bool,
    fenced: bool,
    next_fence_check: Instant,
    registered: bool,
    /// `<prefix>/service-config/<service>` for a gRPC app: the service's protocol is not an
    /// instance property in the registry, and without it clients would speak HTTP/1.1 to it.
    service_config: Option<String>,
}

enum Event {
    KeepaliveDue,
    KeepaliveAnswer(Result<Option<i64>, etcd_client::Error>),
    HealthChanged,
    HandleGone,
    FenceCheck,
}

pub(crate) async fn run(
    endpoints: Vec<String>,
    prefix: String,
    tls: TlsFiles,
    mut ctx: Ctx,
    stop: oneshot::Receiver<Reply>,
) {
    let ttl = Duration::from_secs(u64::from(ttl_secs(ctx.instance.ttl)));
    let key = format!(
        "{prefix}/services/{}/{}",
        ctx.instance.service, ctx.instance.instance_id
    );
    let service_config = (ctx.instance.protocol == "grpc")
        .then(|| format!("{prefix}/service-config/{}", ctx.instance.service));
    let now = Instant::now();
    let mut st = State {
        endpoints,
        key,
        tls,
        ttl,
        rpc_timeout: (ttl / 3).clamp(Duration::from_secs(1), Duration::from_secs(5)),
        client: None,
        lease: None,
        old_leases: Vec::new(),
        keepalive: None,
        confirmed: now,
        next_keepalive: now,
        dirty: true,
        fenced: false,
        next_fence_check: now,
        registered: false,
        service_config,
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
            ctx.update(|s| {
                s.registered = false;
                s.lease = None;
            });
        }
        let _ = reply.send(result);
    }
}

fn etcd_err(source: etcd_client::Error) -> RegisterError {
    RegisterError::Etcd { source }
}

impl State {
    fn timeout_err(&self, what: &str) -> RegisterError {
        RegisterError::Connect {
            endpoint: self.endpoints.join(","),
            message: format!("{what} timed out after {:?}", self.rpc_timeout),
        }
    }

    /// Runs one etcd call bounded by the request timeout.
    async fn call<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, RegisterError> {
        match tokio::time::timeout(self.rpc_timeout, f).await {
            Ok(r) => r.map_err(etcd_err),
            Err(_) => Err(self.timeout_err(what)),
        }
    }

    /// Keeps the key written and the lease alive; returns only if the handle is gone.
    async fn keep(&mut self, ctx: &mut Ctx) {
        let mut failures = 0u32;
        loop {
            match self.converge(ctx).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(key = %self.key, error = %e, attempt = failures, "etcd registration failed; retrying");
                    ctx.record_error(&e);
                    self.check_lease_age(ctx);
                    tokio::time::sleep(backoff(failures, ctx.period(self.ttl))).await;
                    continue;
                }
            }
            let event = self.next_event(ctx).await;
            match event {
                Event::HandleGone => return,
                Event::KeepaliveDue => {
                    self.next_keepalive = Instant::now() + ctx.period(self.ttl);
                    let sent = match self.keepalive.as_mut() {
                        Some((keeper, _)) => keeper.keep_alive().await,
                        None => Ok(()),
                    };
                    if let Err(e) = sent {
                        tracing::debug!(error = %e, "lease keepalive stream broke");
                        self.keepalive = None;
                    }
                    self.check_lease_age(ctx);
                }
                Event::KeepaliveAnswer(Ok(Some(ttl))) if ttl > 0 => {
                    self.confirmed = Instant::now();
                }
                Event::KeepaliveAnswer(Ok(Some(_))) => {
                    // etcd answers TTL 0 for a lease it no longer has: expired or revoked.
                    tracing::warn!(lease = ?self.lease, key = %self.key, "etcd lease lost; registering under a new one");
                    self.lose_lease(ctx);
                }
                Event::KeepaliveAnswer(Ok(None) | Err(_)) => {
                    self.keepalive = None;
                }
                Event::HealthChanged => self.dirty = true,
                Event::FenceCheck => {
                    self.dirty = true;
                }
            }
        }
    }

    async fn next_event(&mut self, ctx: &mut Ctx) -> Event {
        let fenced = self.fenced;
        let fence_check = self.next_fence_check;
        let next_keepalive = self.next_keepalive;
        let answer = async {
            match self.keepalive.as_mut() {
                Some((_, stream)) => stream.message().await.map(|m| m.map(|r| r.ttl())),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = tokio::time::sleep_until(next_keepalive) => Event::KeepaliveDue,
            r = answer => Event::KeepaliveAnswer(r),
            r = ctx.health.changed() => match r {
                Ok(()) => Event::HealthChanged,
                Err(_) => Event::HandleGone,
            },
            () = tokio::time::sleep_until(fence_check), if fenced => Event::FenceCheck,
        }
    }

    /// Treats the lease as gone once etcd has not confirmed it for a whole TTL: by then etcd has
    /// expired it, and waiting for the connection to say so only prolongs the gap.
    fn check_lease_age(&mut self, ctx: &Ctx) {
        if self.lease.is_some() && self.confirmed.elapsed() >= self.ttl {
            tracing::warn!(lease = ?self.lease, key = %self.key, "etcd lease not renewed within its TTL; registering under a new one");
            self.lose_lease(ctx);
        }
    }

    fn lose_lease(&mut self, ctx: &Ctx) {
        if let Some(old) = self.lease.take() {
            self.old_leases.push(old);
        }
        self.keepalive = None;
        self.dirty = true;
        self.registered = false;
        ctx.update(|s| {
            s.registered = false;
            s.lease = None;
        });
    }

    async fn connect(&self) -> Result<Client, RegisterError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(self.rpc_timeout)
            // HTTP/2 pings find a silently dead connection before the lease runs out.
            .with_keep_alive(self.ttl / 3, self.rpc_timeout);
        if let Some(tls) = self.load_tls()? {
            opts = opts.with_tls(tls);
        }
        self.call("connecting", Client::connect(&self.endpoints, Some(opts)))
            .await
    }

    fn load_tls(&self) -> Result<Option<etcd_client::TlsOptions>, RegisterError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| RegisterError::Connect {
                endpoint: self.endpoints.join(","),
                message: format!("reading TLS file {}: {e}", path.display()),
            })
        };
        let t = &self.tls;
        if t.ca.is_none() && t.cert.is_none() && t.key.is_none() {
            return Ok(None);
        }
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = &t.ca {
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
        }
        match (&t.cert, &t.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            (None, None) => {}
            _ => {
                return Err(RegisterError::Connect {
                    endpoint: self.endpoints.join(","),
                    message: "a client certificate needs both a cert and a key file".into(),
                });
            }
        }
        Ok(Some(tls))
    }

    /// Brings etcd to the wanted state: connected, a live lease with a keepalive stream, and the
    /// current value written under it (unless fenced).
    async fn converge(&mut self, ctx: &mut Ctx) -> Result<(), RegisterError> {
        if self.client.is_none() {
            self.client = Some(self.connect().await?);
        }
        let Some(mut client) = self.client.clone() else {
            return Ok(());
        };
        let lease = match self.lease {
            Some(l) => l,
            None => {
                let resp = self
                    .call(
                        "granting a lease",
                        client.lease_grant(ttl_i64(self.ttl), None),
                    )
                    .await?;
                let id = resp.id();
                if resp.ttl() > 0 {
                    // etcd may raise a TTL below its minimum.
                    self.ttl = Duration::from_secs(resp.ttl().unsigned_abs());
                }
                tracing::info!(lease = id, ttl_seconds = resp.ttl(), "etcd lease granted");
                self.lease = Some(id);
                self.confirmed = Instant::now();
                self.keepalive = None;
                self.dirty = true;
                ctx.update(|s| s.lease = Some(id));
                id
            }
        };
        if self.keepalive.is_none() {
            let (mut keeper, stream) = self
                .call(
                    "opening the lease keepalive",
                    client.lease_keep_alive(lease),
                )
                .await?;
            // Renew at once: the stream may be replacing one that broke a while ago.
            self.call("renewing the lease", keeper.keep_alive()).await?;
            self.keepalive = Some((keeper, stream));
            self.next_keepalive = Instant::now() + ctx.period(self.ttl);
        }
        if self.dirty {
            self.dirty = false;
            let health = ctx.take_health();
            let value = encode(ctx, health)?;
            let put = match self.put_fenced(&mut client, lease, &value).await {
                Ok(p) => p,
                Err(e) => {
                    self.dirty = true;
                    if is_not_found(&e) {
                        // Revoked or expired between two keepalives: no need to wait for the
                        // keepalive stream to say so.
                        tracing::warn!(lease, key = %self.key, "etcd lease lost; registering under a new one");
                        self.lose_lease(ctx);
                    }
                    return Err(e);
                }
            };
            match put {
                PutOutcome::Written => {
                    let first = !self.registered;
                    self.registered = true;
                    if first {
                        self.declare_protocol(&mut client).await;
                    }
                    if self.fenced {
                        tracing::info!(key = %self.key, "etcd key is free again; registered");
                    } else if first {
                        tracing::info!(key = %self.key, lease, ?health, "registered in etcd");
                    }
                    self.fenced = false;
                    ctx.update(|s| {
                        s.registered = true;
                        s.health = Some(health);
                        s.fenced = false;
                        s.last_error = None;
                        s.lease = Some(lease);
                        if first {
                            s.registrations += 1;
                        }
                    });
                }
                PutOutcome::HeldBy(holder) => {
                    let e = RegisterError::Fenced {
                        key: self.key.clone(),
                        holder,
                    };
                    if !self.fenced {
                        tracing::error!(error = %e, "fenced out of the instance key; not writing it");
                    }
                    self.fenced = true;
                    self.registered = false;
                    self.next_fence_check = Instant::now() + self.ttl.max(Duration::from_secs(1));
                    ctx.update(|s| {
                        s.registered = false;
                        s.fenced = true;
                        s.last_error = Some(e.to_string());
                    });
                }
            }
        }
        Ok(())
    }

    /// Declares the service's protocol (gRPC) unless some key already says what it is: an
    /// operator's explicit service-config wins, and nothing here ever overwrites it. Not under
    /// our lease, as it describes the service, not this instance. Failure is logged, not fatal:
    /// the instance is registered either way.
    async fn declare_protocol(&mut self, client: &mut Client) {
        let Some(key) = self.service_config.clone() else {
            return;
        };
        let txn = Txn::new()
            .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), r#"{"protocol":"grpc"}"#, None)]);
        match self
            .call("declaring the service's protocol", client.txn(txn))
            .await
        {
            Ok(r) if r.succeeded() => tracing::info!(%key, "declared the service as gRPC"),
            Ok(_) => {}
            Err(e) => tracing::warn!(%key, error = %e, "could not declare the service as gRPC"),
        }
    }

    /// Puts `value` under `lease` only if the key is absent or already ours, in one transaction.
    /// A key held by one of our own abandoned leases is freed (by revoking that lease) and
    /// tried again.
    async fn put_fenced(
        &mut self,
        client: &mut Client,
        lease: i64,
        value: &str,
    ) -> Result<PutOutcome, RegisterError> {
        loop {
            let key = self.key.as_str();
            let put = || TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)));
            let txn = Txn::new()
                .when([Compare::version(key, CompareOp::Equal, 0)])
                .and_then([put()])
                .or_else([TxnOp::txn(
                    Txn::new()
                        .when([Compare::lease(key, CompareOp::Equal, lease)])
                        .and_then([put()])
                        .or_else([TxnOp::get(key, None)]),
                )]);
            let resp = self
                .call("writing the instance key", client.txn(txn))
                .await?;
            if resp.succeeded() {
                return Ok(PutOutcome::Written);
            }
            let inner = resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Txn(t) => Some(t),
                _ => None,
            });
            let Some(inner) = inner else {
                return Err(etcd_err(etcd_client::Error::InvalidArgs(
                    "etcd transaction answered without the nested transaction's result".into(),
                )));
            };
            if inner.succeeded() {
                return Ok(PutOutcome::Written);
            }
            let holder = inner.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g.kvs().first().map(|kv| kv.lease())),
                _ => None,
            });
            match holder {
                // Deleted between the two comparisons' reads cannot happen in one txn; an empty
                // get means it vanished, so simply try again.
                Some(None) | None => continue,
                Some(Some(h)) if self.old_leases.contains(&h) => {
                    tracing::info!(lease = h, key = %self.key, "the key is held by an old lease of ours; revoking it");
                    self.call("revoking an old lease", client.lease_revoke(h))
                        .await
                        .map(drop)
                        .or_else(ignore_lease_not_found)?;
                    self.old_leases.retain(|l| *l != h);
                }
                Some(Some(h)) => return Ok(PutOutcome::HeldBy(h)),
            }
        }
    }

    async fn deregister(&mut self) -> Result<(), RegisterError> {
        let Some(mut client) = self.client.clone() else {
            return Ok(());
        };
        for old in std::mem::take(&mut self.old_leases) {
            // Best effort: an old lease either expired already or holds nothing we want.
            let _ = self
                .call("revoking an old lease", client.lease_revoke(old))
                .await;
        }
        let Some(lease) = self.lease.take() else {
            return Ok(());
        };
        self.keepalive = None;
        let key = self.key.as_str();
        let txn = Txn::new()
            .when([Compare::lease(key, CompareOp::Equal, lease)])
            .and_then([TxnOp::delete(key, None)]);
        let deleted = self
            .call("deleting the instance key", client.txn(txn))
            .await;
        // Revoking also deletes every key under the lease, so it is worth doing even if the
        // delete failed; report the first error.
        let revoked = self
            .call("revoking the lease", client.lease_revoke(lease))
            .await
            .map(drop)
            .or_else(ignore_lease_not_found);
        if let Ok(r) = &deleted {
            if r.succeeded() {
                tracing::info!(key = %self.key, "deregistered from etcd");
            } else {
                tracing::info!(key = %self.key, "instance key not ours at deregistration; left alone");
            }
        }
        deleted?;
        revoked
    }
}

/// A lease already gone is what revoking wanted.
fn ignore_lease_not_found(e: RegisterError) -> Result<(), RegisterError> {
    if is_not_found(&e) { Ok(()) } else { Err(e) }
}

/// etcd answers NOT_FOUND for requests naming a lease it does not have.
fn is_not_found(e: &RegisterError) -> bool {
    matches!(
        e,
        RegisterError::Etcd {
            source: etcd_client::Error::GRpcStatus(s),
        } if s.code() == tonic::Code::NotFound
    )
}

fn ttl_i64(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1)
}

/// The key's value: a `weft_registry::Endpoint` in JSON, exactly what the control plane's etcd
/// source decodes.
fn encode(ctx: &Ctx, health: Health) -> Result<String, RegisterError> {
    let inst = &ctx.instance;
    let ep = weft_registry::Endpoint {
        address: inst.address.to_string(),
        port: inst.port,
        // The schema rejects 0; the Registration API reads 0 as 1, so do the same here.
        weight: inst.weight.max(1),
        zone: inst.zone.clone(),
        health: match health {
            Health::Healthy => weft_registry::Health::Healthy,
            Health::Unhealthy => weft_registry::Health::Unhealthy,
            Health::Draining => weft_registry::Health::Draining,
        },
        metadata: inst.metadata.clone(),
    };
    serde_json::to_string(&ep).map_err(|e| {
        etcd_err(etcd_client::Error::InvalidArgs(format!(
            "encoding the endpoint: {e}"
        )))
    })
}
