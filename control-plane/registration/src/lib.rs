//! The embedded registry: the `weft.registry.v1.Registration` gRPC API, with TTL leases.
//!
//! What it does:
//! - Serves `Register`, `Heartbeat` and `Deregister` ([`EmbeddedRegistry::service`]). A workload
//!   registers an instance with a TTL; the instance stays while heartbeats arrive within the TTL,
//!   and [`EmbeddedRegistry::run_reaper`] removes it once the TTL passes without one.
//! - Validates every request and answers `INVALID_ARGUMENT` with a message naming the field and
//!   the value, so a misconfigured workload learns what to fix.
//! - Feeds the hub through its [`SourceHandle`] only: `Apply(Instance)` (and `Apply(Service)`
//!   when a protocol is given) on registration, `Delete` on deregistration or expiry.
//! - Exposes Prometheus metrics ([`EmbeddedRegistry::register_metrics`]).
//! - With [`RegistrationOptions::require_identity`] (mTLS on the gRPC port), refuses with
//!   `PERMISSION_DENIED` any call for a service the caller's SPIFFE identity does not own
//!   ([`weft_identity::authorize_service`]: `<service>.<namespace>`, or `<service>` in the
//!   `default` namespace).
//!
//! What it does not do: persist anything. Leases live in memory, so after a control-plane
//! restart the registry starts empty (and is synced at once); workloads find out on their next
//! heartbeat (`NOT_FOUND`) and register again. It does not bind a port either: the binary mounts
//! [`EmbeddedRegistry::service`] on its xDS gRPC server.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as MetricsRegistry;
use serde::Serialize;
use tokio::time::{Instant, MissedTickBehavior};
use tonic::{Request, Response, Status};
use weft_proto::registry::v1 as pb;
use weft_proto::registry::v1::registration_server::{Registration, RegistrationServer};
use weft_registry::schema::is_valid_name;
use weft_registry::{
    Endpoint, Health, MAX_WEIGHT, Object, ObjectKey, Protocol, SourceEvent, SourceHandle,
};

/// Longest instance id or zone accepted. Both end up in Envoy resources and `/debug` output;
/// the bound keeps one misbehaving client from storing arbitrarily large strings.
const MAX_LABEL_LEN: usize = 253;

/// Bounds on metadata, for the same reason as [`MAX_LABEL_LEN`].
const MAX_METADATA_ENTRIES: usize = 64;
const MAX_METADATA_BYTES: usize = 4096;

/// Lease settings of the embedded registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationOptions {
    /// TTL given to registrations that ask for 0.
    pub default_ttl: Duration,
    /// Requested TTLs are clamped to `[min_ttl, max_ttl]`.
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    /// How often the reaper looks for expired leases. An instance is removed at most this long
    /// after its lease ends.
    pub reap_interval: Duration,
    /// Every call must come over a connection whose client certificate carries a verified
    /// SPIFFE identity ([`weft_identity::PeerInfo`] in the request extensions) owning the
    /// request's `service`.
    pub require_identity: bool,
}

impl Default for RegistrationOptions {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(30),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(3600),
            reap_interval: Duration::from_millis(500),
            require_identity: false,
        }
    }
}

/// Why a request was refused. Converted to a gRPC status whose message is this error's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistrationError {
    #[error(
        "service: invalid name `{0}`: use 1-253 letters, digits, `-`, `.` or `_`, starting and \
         ending with a letter or digit"
    )]
    InvalidService(String),
    #[error(
        "instance_id: invalid id `{0}`: use at most 253 printable characters without whitespace"
    )]
    InvalidInstanceId(String),
    #[error("endpoint: required")]
    MissingEndpoint,
    #[error(
        "endpoint.address: `{0}` is not an IP address (host names are not accepted: register the \
         address the instance listens on)"
    )]
    InvalidAddress(String),
    #[error("endpoint.port: {0} is out of range 1..=65535")]
    InvalidPort(u32),
    #[error("endpoint.weight: {0} is out of range 1..={MAX_WEIGHT} (0 means the default, 1)")]
    InvalidWeight(u32),
    #[error(
        "endpoint.zone: invalid zone `{0}`: use at most 253 printable characters without \
         whitespace"
    )]
    InvalidZone(String),
    #[error("{field}: unknown health value {value} (expected 0-3)")]
    InvalidHealth { field: &'static str, value: i32 },
    #[error(
        "endpoint.metadata: {0} (at most {MAX_METADATA_ENTRIES} entries, {MAX_METADATA_BYTES} \
         bytes in total, keys non-empty)"
    )]
    InvalidMetadata(String),
    #[error("protocol: unknown protocol `{0}` (expected `grpc`, `http` or empty)")]
    InvalidProtocol(String),
    #[error(
        "instance `{instance_id}` of service `{service}` is not registered: its lease expired or \
         the control plane restarted; register it again"
    )]
    NotRegistered {
        service: String,
        instance_id: String,
    },
}

impl From<RegistrationError> for Status {
    fn from(e: RegistrationError) -> Status {
        match e {
            RegistrationError::NotRegistered { .. } => Status::not_found(e.to_string()),
            _ => Status::invalid_argument(e.to_string()),
        }
    }
}

/// One registered instance, as [`EmbeddedRegistry::instances`] shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceSummary {
    pub service: String,
    pub instance_id: String,
    #[serde(flatten)]
    pub endpoint: Endpoint,
    pub ttl_seconds: u64,
    /// Time left on the lease; 0 when it has run out and awaits the reaper.
    pub expires_in_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct LeaseKey {
    service: String,
    id: String,
}

#[derive(Debug, Clone)]
struct Lease {
    endpoint: Endpoint,
    ttl: Duration,
    expires: Instant,
}

#[derive(Default)]
struct State {
    leases: HashMap<LeaseKey, Lease>,
    /// Protocols declared by registrations, per service. Kept so the `Service` object can be
    /// deleted with the service's last lease instead of lingering as an empty service.
    protocols: HashMap<String, Protocol>,
}

#[derive(Clone, Default)]
struct Metrics {
    registered: Gauge,
    registrations: Counter,
    expirations: Counter,
    deregistrations: Counter,
    denied: Counter,
}

struct Inner {
    source: SourceHandle,
    opts: RegistrationOptions,
    state: Mutex<State>,
    metrics: Metrics,
}

/// See the crate documentation. Cheap to clone: every clone shares one lease table.
#[derive(Clone)]
pub struct EmbeddedRegistry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedRegistry")
            .field("source", &self.inner.source.name())
            .field("opts", &self.inner.opts)
            .finish_non_exhaustive()
    }
}

/// The gRPC service; mount it with `tonic::transport::Server::add_service`.
#[derive(Debug, Clone)]
pub struct RegistrationService {
    registry: EmbeddedRegistry,
}

impl EmbeddedRegistry {
    /// Emits Init+InitDone on `source` immediately: the embedded registry starts empty and is
    /// synced at once.
    pub fn new(source: SourceHandle, opts: RegistrationOptions) -> Self {
        source.apply([SourceEvent::Init, SourceEvent::InitDone]);
        Self {
            inner: Arc::new(Inner {
                source,
                opts,
                state: Mutex::new(State::default()),
                metrics: Metrics::default(),
            }),
        }
    }

    /// Registers `weft_registration_registered_instances`, `weft_registration_registrations_total`,
    /// `weft_registration_expirations_total` and `weft_registration_deregistrations_total`.
    pub fn register_metrics(&self, reg: &mut MetricsRegistry) {
        let m = &self.inner.metrics;
        reg.register(
            "weft_registration_registered_instances",
            "Instances currently holding a lease in the embedded registry",
            m.registered.clone(),
        );
        // prometheus-client appends `_total` to counter names.
        reg.register(
            "weft_registration_registrations",
            "Accepted Register calls (new instances and re-registrations)",
            m.registrations.clone(),
        );
        reg.register(
            "weft_registration_expirations",
            "Instances removed because their lease ran out without a heartbeat",
            m.expirations.clone(),
        );
        reg.register(
            "weft_registration_deregistrations",
            "Instances removed by a Deregister call",
            m.deregistrations.clone(),
        );
        reg.register(
            "weft_registration_denied",
            "Calls refused because the caller's identity does not own the service",
            m.denied.clone(),
        );
    }

    /// The gRPC service to mount on the xDS server.
    pub fn service(&self) -> RegistrationServer<RegistrationService> {
        RegistrationServer::new(RegistrationService {
            registry: self.clone(),
        })
    }

    /// Removes expired instances every `reap_interval` until `shutdown` resolves.
    pub async fn run_reaper(self, shutdown: impl Future<Output = ()>) {
        // A zero period would make `interval` panic; a millisecond is already far finer than any
        // TTL (at least a second) needs.
        let period = self.inner.opts.reap_interval.max(Duration::from_millis(1));
        let mut tick = tokio::time::interval(period);
        // After a stall, one sweep catches up on everything; a burst of sweeps would add nothing.
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => self.reap(Instant::now()),
            }
        }
    }

    /// Every lease currently held, sorted by service and id.
    pub fn instances(&self) -> Vec<InstanceSummary> {
        let now = Instant::now();
        let st = self.lock();
        let mut out: Vec<InstanceSummary> = st
            .leases
            .iter()
            .map(|(k, l)| InstanceSummary {
                service: k.service.clone(),
                instance_id: k.id.clone(),
                endpoint: l.endpoint.clone(),
                ttl_seconds: l.ttl.as_secs(),
                expires_in_ms: millis(l.expires.saturating_duration_since(now)),
            })
            .collect();
        out.sort_by(|a, b| (&a.service, &a.instance_id).cmp(&(&b.service, &b.instance_id)));
        out
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation below leaves the table consistent between statements that could panic,
        // so a poisoned lock still holds usable state.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Clamps a requested TTL; 0 asks for the default.
    fn effective_ttl(&self, requested_secs: u32) -> Duration {
        let o = &self.inner.opts;
        let ttl = if requested_secs == 0 {
            o.default_ttl
        } else {
            Duration::from_secs(u64::from(requested_secs))
        };
        // `clamp` panics when min > max; a misconfigured max must not take the API down.
        ttl.max(o.min_ttl).min(o.max_ttl.max(o.min_ttl))
    }

    fn register(
        &self,
        req: pb::RegisterRequest,
    ) -> Result<pb::RegisterResponse, RegistrationError> {
        let valid = validate_register(req)?;
        let ttl = self.effective_ttl(valid.ttl_seconds);
        let id = valid
            .instance_id
            .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
        let key = LeaseKey {
            service: valid.service,
            id,
        };
        let now = Instant::now();

        let mut events = Vec::new();
        // Events are applied while the table is locked, so the hub sees changes in the same order
        // as the table; the hub never calls back into this crate, so this cannot deadlock.
        let mut st = self.lock();
        // One address:port is one endpoint to every client. A workload that restarts with a new
        // id at the same address replaces its old lease rather than leaving a stale twin behind
        // until the old TTL runs out.
        let stale: Vec<LeaseKey> = st
            .leases
            .iter()
            .filter(|(k, l)| {
                k.service == key.service
                    && k.id != key.id
                    && l.endpoint.address == valid.endpoint.address
                    && l.endpoint.port == valid.endpoint.port
            })
            .map(|(k, _)| k.clone())
            .collect();
        for old in stale {
            st.leases.remove(&old);
            tracing::info!(
                service = %old.service,
                instance_id = %old.id,
                replaced_by = %key.id,
                "registration replaced by a new instance at the same address"
            );
            events.push(SourceEvent::Delete(ObjectKey::Instance {
                service: old.service,
                id: old.id,
            }));
        }
        if let Some(protocol) = valid.protocol {
            st.protocols.insert(key.service.clone(), protocol);
            events.push(SourceEvent::Apply(Object::Service {
                name: key.service.clone(),
                protocol,
            }));
        }
        events.push(SourceEvent::Apply(Object::Instance {
            service: key.service.clone(),
            id: key.id.clone(),
            endpoint: valid.endpoint.clone(),
        }));
        let replaced = st
            .leases
            .insert(
                key.clone(),
                Lease {
                    endpoint: valid.endpoint.clone(),
                    ttl,
                    expires: now + ttl,
                },
            )
            .is_some();
        self.inner.source.apply(events);
        self.inner
            .metrics
            .registered
            .set(gauge_value(st.leases.len()));
        drop(st);

        self.inner.metrics.registrations.inc();
        tracing::info!(
            service = %key.service,
            instance_id = %key.id,
            address = %valid.endpoint.address,
            port = valid.endpoint.port,
            ttl_seconds = ttl.as_secs(),
            reregistered = replaced,
            "instance registered"
        );
        Ok(pb::RegisterResponse {
            instance_id: key.id,
            ttl_seconds: secs_u32(ttl),
        })
    }

    fn heartbeat(
        &self,
        req: pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, RegistrationError> {
        let health = match pb::Health::try_from(req.health) {
            Ok(pb::Health::Unspecified) => None,
            Ok(h) => Some(health_from_pb(h)),
            Err(_) => {
                return Err(RegistrationError::InvalidHealth {
                    field: "health",
                    value: req.health,
                });
            }
        };
        let key = LeaseKey {
            service: req.service,
            id: req.instance_id,
        };
        let now = Instant::now();
        let mut st = self.lock();
        let Some(lease) = st.leases.get_mut(&key) else {
            return Err(not_registered(key));
        };
        if lease.expires <= now {
            // The lease ran out and only the reaper's period kept it in the table. Reviving it
            // would make expiry depend on reaper timing; treat it as gone, as documented.
            drop(st);
            self.reap(now);
            return Err(not_registered(key));
        }
        lease.expires = now + lease.ttl;
        let ttl = lease.ttl;
        let mut changed = None;
        if let Some(h) = health
            && lease.endpoint.health != h
        {
            lease.endpoint.health = h;
            changed = Some(lease.endpoint.clone());
        }
        if let Some(endpoint) = changed {
            self.inner
                .source
                .apply([SourceEvent::Apply(Object::Instance {
                    service: key.service.clone(),
                    id: key.id.clone(),
                    endpoint,
                })]);
            drop(st);
            tracing::info!(
                service = %key.service,
                instance_id = %key.id,
                health = ?health,
                "instance health changed"
            );
        }
        Ok(pb::HeartbeatResponse {
            ttl_seconds: secs_u32(ttl),
        })
    }

    fn deregister(&self, req: pb::DeregisterRequest) {
        let key = LeaseKey {
            service: req.service,
            id: req.instance_id,
        };
        let mut st = self.lock();
        if st.leases.remove(&key).is_none() {
            // Idempotent: a retried Deregister, or one after expiry, has nothing left to do.
            return;
        }
        let mut events = vec![SourceEvent::Delete(ObjectKey::Instance {
            service: key.service.clone(),
            id: key.id.clone(),
        })];
        forget_service_if_empty(&mut st, &key.service, &mut events);
        self.inner.source.apply(events);
        self.inner
            .metrics
            .registered
            .set(gauge_value(st.leases.len()));
        drop(st);
        self.inner.metrics.deregistrations.inc();
        tracing::info!(service = %key.service, instance_id = %key.id, "instance deregistered");
    }

    /// Removes every lease that ended at or before `now`.
    fn reap(&self, now: Instant) {
        let mut st = self.lock();
        let mut expired: Vec<LeaseKey> = st
            .leases
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(k, _)| k.clone())
            .collect();
        if expired.is_empty() {
            return;
        }
        expired.sort();
        let mut events = Vec::new();
        for key in &expired {
            if let Some(lease) = st.leases.remove(key) {
                tracing::info!(
                    service = %key.service,
                    instance_id = %key.id,
                    address = %lease.endpoint.address,
                    port = lease.endpoint.port,
                    ttl_seconds = lease.ttl.as_secs(),
                    "instance lease expired without a heartbeat; removed"
                );
            }
            events.push(SourceEvent::Delete(ObjectKey::Instance {
                service: key.service.clone(),
                id: key.id.clone(),
            }));
        }
        for key in &expired {
            forget_service_if_empty(&mut st, &key.service, &mut events);
        }
        self.inner.source.apply(events);
        self.inner
            .metrics
            .registered
            .set(gauge_value(st.leases.len()));
        drop(st);
        self.inner.metrics.expirations.inc_by(expired.len() as u64);
    }
}

impl RegistrationService {
    /// With [`RegistrationOptions::require_identity`], the caller's verified identity must own
    /// `service`; the refusal names both.
    fn authorize<T>(&self, request: &Request<T>, service: &str) -> Result<(), Status> {
        if !self.registry.inner.opts.require_identity {
            return Ok(());
        }
        let peer = request
            .extensions()
            .get::<weft_identity::PeerInfo>()
            .map_or(weft_identity::PeerIdentity::Plain, |p| p.identity.clone());
        let checked = peer.verified().and_then(|identity| {
            weft_identity::authorize_service(identity, service).map_err(|e| e.to_string())
        });
        checked.map_err(|reason| {
            self.registry.inner.metrics.denied.inc();
            tracing::warn!(service = %service, %reason, "registration API call refused");
            Status::permission_denied(reason)
        })
    }
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        self.authorize(&request, &request.get_ref().service)?;
        let req = request.into_inner();
        let service = req.service.clone();
        match self.registry.register(req) {
            Ok(resp) => Ok(Response::new(resp)),
            Err(e) => {
                tracing::warn!(service = %service, error = %e, "registration rejected");
                Err(e.into())
            }
        }
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.authorize(&request, &request.get_ref().service)?;
        let req = request.into_inner();
        match self.registry.heartbeat(req) {
            Ok(resp) => Ok(Response::new(resp)),
            Err(e) => {
                tracing::debug!(error = %e, "heartbeat refused");
                Err(e.into())
            }
        }
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        self.authorize(&request, &request.get_ref().service)?;
        self.registry.deregister(request.into_inner());
        Ok(Response::new(pb::DeregisterResponse {}))
    }
}

/// A register request that passed validation.
struct ValidRegister {
    service: String,
    instance_id: Option<String>,
    endpoint: Endpoint,
    ttl_seconds: u32,
    protocol: Option<Protocol>,
}

fn validate_register(req: pb::RegisterRequest) -> Result<ValidRegister, RegistrationError> {
    if !is_valid_name(&req.service) {
        return Err(RegistrationError::InvalidService(req.service));
    }
    let instance_id = if req.instance_id.is_empty() {
        None
    } else if is_valid_label(&req.instance_id) {
        Some(req.instance_id)
    } else {
        return Err(RegistrationError::InvalidInstanceId(req.instance_id));
    };
    let ep = req.endpoint.ok_or(RegistrationError::MissingEndpoint)?;
    let address: IpAddr = ep
        .address
        .parse()
        .map_err(|_| RegistrationError::InvalidAddress(ep.address.clone()))?;
    let port = u16::try_from(ep.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(RegistrationError::InvalidPort(ep.port))?;
    let weight = match ep.weight {
        0 => 1,
        w if w <= MAX_WEIGHT => w,
        w => return Err(RegistrationError::InvalidWeight(w)),
    };
    let zone = if ep.zone.is_empty() {
        None
    } else if is_valid_label(&ep.zone) {
        Some(ep.zone)
    } else {
        return Err(RegistrationError::InvalidZone(ep.zone));
    };
    let health = match pb::Health::try_from(ep.health) {
        Ok(pb::Health::Unspecified) => Health::Healthy,
        Ok(h) => health_from_pb(h),
        Err(_) => {
            return Err(RegistrationError::InvalidHealth {
                field: "endpoint.health",
                value: ep.health,
            });
        }
    };
    let metadata: BTreeMap<String, String> = ep.metadata.into_iter().collect();
    let bytes: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(RegistrationError::InvalidMetadata(format!(
            "{} entries",
            metadata.len()
        )));
    }
    if bytes > MAX_METADATA_BYTES {
        return Err(RegistrationError::InvalidMetadata(format!("{bytes} bytes")));
    }
    if metadata.contains_key("") {
        return Err(RegistrationError::InvalidMetadata("empty key".into()));
    }
    let protocol = match req.protocol.to_ascii_lowercase().as_str() {
        "" => None,
        "grpc" => Some(Protocol::Grpc),
        "http" => Some(Protocol::Http),
        _ => return Err(RegistrationError::InvalidProtocol(req.protocol)),
    };
    Ok(ValidRegister {
        service: req.service,
        instance_id,
        endpoint: Endpoint {
            // The canonical form, so `::0001` and `::1` are one endpoint everywhere.
            address: address.to_string(),
            port,
            weight,
            zone,
            health,
            metadata,
        },
        ttl_seconds: req.ttl_seconds,
        protocol,
    })
}

/// Instance ids and zones: printable, no whitespace, bounded.
fn is_valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_LABEL_LEN
        && s.chars().all(|c| !c.is_whitespace() && !c.is_control())
}

fn health_from_pb(h: pb::Health) -> Health {
    match h {
        pb::Health::Unspecified | pb::Health::Healthy => Health::Healthy,
        pb::Health::Unhealthy => Health::Unhealthy,
        pb::Health::Draining => Health::Draining,
    }
}

fn not_registered(key: LeaseKey) -> RegistrationError {
    RegistrationError::NotRegistered {
        service: key.service,
        instance_id: key.id,
    }
}

/// Deletes the `Service` object this source declared once no lease of that service is left,
/// so a service whose workloads are all gone does not linger in the registry.
fn forget_service_if_empty(st: &mut State, service: &str, events: &mut Vec<SourceEvent>) {
    if !st.protocols.contains_key(service) || st.leases.keys().any(|k| k.service == service) {
        return;
    }
    st.protocols.remove(service);
    events.push(SourceEvent::Delete(ObjectKey::Service(service.to_string())));
}

fn secs_u32(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use weft_registry::Hub;

    fn req(service: &str, address: &str, port: u32) -> pb::RegisterRequest {
        pb::RegisterRequest {
            service: service.into(),
            instance_id: String::new(),
            endpoint: Some(pb::Endpoint {
                address: address.into(),
                port,
                ..Default::default()
            }),
            ttl_seconds: 0,
            protocol: String::new(),
        }
    }

    fn registry(opts: RegistrationOptions) -> (Arc<Hub>, EmbeddedRegistry) {
        let hub = Hub::new();
        let reg = EmbeddedRegistry::new(hub.add_source("registration"), opts);
        (hub, reg)
    }

    #[test]
    fn new_registry_is_synced_and_empty() {
        let (hub, _reg) = registry(RegistrationOptions::default());
        assert!(hub.is_ready());
        assert!(hub.current().registry.services.is_empty());
    }

    #[test]
    fn ttl_defaults_and_clamps() {
        let (_hub, reg) = registry(RegistrationOptions::default());
        assert_eq!(reg.effective_ttl(0), Duration::from_secs(30));
        assert_eq!(reg.effective_ttl(5), Duration::from_secs(5));
        assert_eq!(reg.effective_ttl(u32::MAX), Duration::from_secs(3600));
        let (_hub, reg) = registry(RegistrationOptions {
            min_ttl: Duration::from_secs(10),
            ..Default::default()
        });
        assert_eq!(reg.effective_ttl(1), Duration::from_secs(10));
    }

    #[test]
    fn validation_names_field_and_value() {
        let cases = [
            (
                req("bad name", "10.0.0.1", 80),
                "service: invalid name `bad name`",
            ),
            (
                req("a", "example.com", 80),
                "endpoint.address: `example.com`",
            ),
            (req("a", "10.0.0.1", 0), "endpoint.port: 0"),
            (req("a", "10.0.0.1", 65536), "endpoint.port: 65536"),
            (
                pb::RegisterRequest {
                    protocol: "tcp".into(),
                    ..req("a", "10.0.0.1", 80)
                },
                "protocol: unknown protocol `tcp`",
            ),
            (
                pb::RegisterRequest {
                    endpoint: None,
                    ..req("a", "10.0.0.1", 80)
                },
                "endpoint: required",
            ),
        ];
        for (r, want) in cases {
            let e = validate_register(r).err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.starts_with(want)),
                "want {want:?}, got {e:?}"
            );
        }
        let mut r = req("a", "10.0.0.1", 80);
        if let Some(ep) = r.endpoint.as_mut() {
            ep.weight = MAX_WEIGHT + 1;
            ep.zone = "z 1".into();
        }
        let e = validate_register(r).err().map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|e| e.starts_with("endpoint.weight: 100001")),
            "{e:?}"
        );
    }

    #[test]
    fn weight_zero_means_one_and_address_is_canonical() {
        let v = validate_register(req("a", "::0001", 80)).unwrap();
        assert_eq!(v.endpoint.weight, 1);
        assert_eq!(v.endpoint.address, "::1");
        assert_eq!(v.endpoint.health, Health::Healthy);
    }

    #[test]
    fn protocol_is_applied_and_forgotten_with_the_last_instance() {
        let (hub, reg) = registry(RegistrationOptions::default());
        let resp = reg
            .register(pb::RegisterRequest {
                protocol: "grpc".into(),
                ..req("echo", "10.0.0.1", 80)
            })
            .unwrap();
        assert_eq!(resp.instance_id.len(), 16);
        assert_eq!(
            hub.current().registry.services["echo"].protocol,
            Protocol::Grpc
        );
        reg.deregister(pb::DeregisterRequest {
            service: "echo".into(),
            instance_id: resp.instance_id,
        });
        assert!(hub.current().registry.services.is_empty());
    }

    #[test]
    fn new_id_at_same_address_replaces_the_old_lease() {
        let (hub, reg) = registry(RegistrationOptions::default());
        for id in ["old", "new"] {
            reg.register(pb::RegisterRequest {
                instance_id: id.into(),
                ..req("echo", "10.0.0.1", 80)
            })
            .unwrap();
        }
        let ids: Vec<_> = reg.instances().into_iter().map(|i| i.instance_id).collect();
        assert_eq!(ids, vec!["new".to_string()]);
        assert_eq!(
            hub.current().registry.services["echo"].instances[0].id,
            "new"
        );
    }

    #[test]
    fn heartbeat_health_update_reemits_the_instance() {
        let (hub, reg) = registry(RegistrationOptions::default());
        let id = reg
            .register(req("echo", "10.0.0.1", 80))
            .unwrap()
            .instance_id;
        reg.heartbeat(pb::HeartbeatRequest {
            service: "echo".into(),
            instance_id: id.clone(),
            health: pb::Health::Draining as i32,
        })
        .unwrap();
        let inst = &hub.current().registry.services["echo"].instances[0];
        assert_eq!(inst.endpoint.health, Health::Draining);
        // Unspecified leaves it alone.
        reg.heartbeat(pb::HeartbeatRequest {
            service: "echo".into(),
            instance_id: id,
            health: 0,
        })
        .unwrap();
        let inst = &hub.current().registry.services["echo"].instances[0];
        assert_eq!(inst.endpoint.health, Health::Draining);
    }

    #[test]
    fn expired_lease_refuses_heartbeat_even_before_the_reaper_runs() {
        let (hub, reg) = registry(RegistrationOptions {
            min_ttl: Duration::ZERO,
            default_ttl: Duration::ZERO,
            ..Default::default()
        });
        let id = reg
            .register(req("echo", "10.0.0.1", 80))
            .unwrap()
            .instance_id;
        let e = reg
            .heartbeat(pb::HeartbeatRequest {
                service: "echo".into(),
                instance_id: id,
                health: 0,
            })
            .unwrap_err();
        assert!(matches!(e, RegistrationError::NotRegistered { .. }), "{e}");
        assert!(hub.current().registry.services.is_empty());
        assert!(reg.instances().is_empty());
    }

    #[tokio::test]
    async fn require_identity_lets_an_identity_use_only_its_own_service() {
        use weft_identity::{Identity, PeerIdentity, PeerInfo};
        let (_hub, reg) = registry(RegistrationOptions {
            require_identity: true,
            ..Default::default()
        });
        let svc = RegistrationService {
            registry: reg.clone(),
        };
        let web = Identity::parse("spiffe://weft.test/ns/default/svc/web").unwrap();
        let as_peer = |identity: PeerIdentity, service: &str| {
            let mut r = Request::new(req(service, "10.0.0.1", 80));
            r.extensions_mut().insert(PeerInfo {
                remote_addr: None,
                identity,
            });
            r
        };
        let denied = svc
            .register(as_peer(PeerIdentity::Verified(web.clone()), "api"))
            .await
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(
            denied
                .message()
                .contains("spiffe://weft.test/ns/default/svc/web")
                && denied.message().contains("`api`"),
            "{}",
            denied.message()
        );
        // No certificate at all (plain connection, or no PeerInfo) is refused too.
        let plain = svc.register(Request::new(req("web", "10.0.0.1", 80))).await;
        assert_eq!(plain.unwrap_err().code(), tonic::Code::PermissionDenied);
        assert!(reg.instances().is_empty());

        let ok = svc
            .register(as_peer(PeerIdentity::Verified(web.clone()), "web"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reg.instances().len(), 1);
        // Heartbeat and deregister of another service's instance are refused as well.
        let mut hb = Request::new(pb::HeartbeatRequest {
            service: "api".into(),
            instance_id: ok.instance_id.clone(),
            health: 0,
        });
        hb.extensions_mut().insert(PeerInfo {
            remote_addr: None,
            identity: PeerIdentity::Verified(web.clone()),
        });
        assert_eq!(
            svc.heartbeat(hb).await.unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        let mut dereg = Request::new(pb::DeregisterRequest {
            service: "api".into(),
            instance_id: ok.instance_id,
        });
        dereg.extensions_mut().insert(PeerInfo {
            remote_addr: None,
            identity: PeerIdentity::Verified(web),
        });
        assert_eq!(
            svc.deregister(dereg).await.unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(reg.instances().len(), 1);
    }
}
