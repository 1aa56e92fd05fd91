//! Leader election on a `coordination.k8s.io/v1` Lease, so one replica at a time writes status.
//!
//! The rules are client-go's (`leaderelection`): a lease held by someone else is taken over
//! only after its record (seen through its `resourceVersion`) has not changed for a whole lease
//! duration *as measured by our own clock*, so clock skew between replicas does not matter;
//! every write is a replace carrying the `resourceVersion` read, so two candidates racing for
//! an expired lease cannot both win (the loser gets 409 Conflict). A leader that fails to
//! renew within the renew deadline stops acting as leader before its lease can expire
//! elsewhere (renew deadline < lease duration).

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;
use tokio::time::Instant;

/// Where the lease lives and how it is timed.
#[derive(Debug, Clone)]
pub struct LeaseOptions {
    pub namespace: String,
    /// Default `weft-control-plane`.
    pub name: String,
    /// This replica's name in the lease (`holderIdentity`); must differ between replicas.
    pub identity: String,
    /// How long a lease is honoured without renewal (default 15s).
    pub duration: Duration,
    /// A leader that has not renewed for this long steps down (default 10s).
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew (default 2s).
    pub retry_period: Duration,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        LeaseOptions {
            namespace: default_namespace(),
            name: "weft-control-plane".to_string(),
            identity: default_identity(),
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// `POD_NAMESPACE` (set from the downward API), else `weft-system`.
pub fn default_namespace() -> String {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "weft-system".to_string())
}

/// `POD_NAME`, else the host name (a pod's host name is its name too).
pub fn default_identity() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| format!("weft-control-plane-{}", std::process::id()))
}

/// Runs the election; publishes `true` on `leader` while this replica holds the lease.
#[derive(Debug)]
pub struct LeaderElector {
    api: Api<Lease>,
    opts: LeaseOptions,
    leader: watch::Sender<bool>,
    gauge: Gauge,
    /// The other holder's record as last seen (its resourceVersion) and when it was first seen.
    observed: Option<(String, Instant)>,
}

/// The outcome of one attempt.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    Leading,
    Following,
}

impl LeaderElector {
    pub fn new(
        client: kube::Client,
        opts: LeaseOptions,
        leader: watch::Sender<bool>,
        gauge: Gauge,
    ) -> Self {
        LeaderElector {
            api: Api::namespaced(client, &opts.namespace),
            opts,
            leader,
            gauge,
            observed: None,
        }
    }

    /// Runs until shutdown; on shutdown a leader releases the lease so another replica takes
    /// over at once rather than after the lease duration.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut last_renew: Option<Instant> = None;
        loop {
            // Bounded, so a hung request cannot keep a stale leader acting past its deadline.
            let attempt =
                tokio::time::timeout(self.opts.renew_deadline, self.try_acquire_or_renew()).await;
            let now = Instant::now();
            match attempt {
                Ok(Ok(Attempt::Leading)) => {
                    last_renew = Some(now);
                    self.set_leader(true);
                }
                Ok(Ok(Attempt::Following)) => {
                    last_renew = None;
                    self.set_leader(false);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, lease = %self.opts.name, "lease request failed");
                    self.step_down_if_stale(&mut last_renew, now);
                }
                Err(_) => {
                    tracing::warn!(lease = %self.opts.name, "lease request timed out");
                    self.step_down_if_stale(&mut last_renew, now);
                }
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(self.opts.retry_period) => {}
            }
        }
        if *self.leader.borrow() {
            self.set_leader(false);
            if let Err(e) = self.release().await {
                tracing::warn!(error = %e, "could not release the lease");
            }
        }
    }

    fn step_down_if_stale(&self, last_renew: &mut Option<Instant>, now: Instant) {
        if last_renew.is_some_and(|t| now.duration_since(t) >= self.opts.renew_deadline) {
            tracing::warn!("could not renew the lease within the renew deadline; stepping down");
            *last_renew = None;
            self.set_leader(false);
        }
    }

    fn set_leader(&self, leading: bool) {
        let was = self.leader.send_replace(leading);
        self.gauge.set(i64::from(leading));
        if was != leading {
            tracing::info!(
                identity = %self.opts.identity,
                lease = %self.opts.name,
                leading,
                "leadership changed"
            );
        }
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.opts.identity.clone()),
            lease_duration_seconds: Some(secs(self.opts.duration)),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    async fn try_acquire_or_renew(&mut self) -> Result<Attempt, kube::Error> {
        let pp = PostParams::default();
        let Some(mut lease) = self.api.get_opt(&self.opts.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.opts.name.clone()),
                    namespace: Some(self.opts.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(0, None)),
            };
            return match self.api.create(&pp, &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Following),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let transitions = spec.lease_transitions.unwrap_or(0);
        let new_spec = if holder == self.opts.identity {
            self.observed = None;
            self.spec(transitions, spec.acquire_time.clone())
        } else {
            let rv = lease.metadata.resource_version.clone().unwrap_or_default();
            let now = Instant::now();
            let seen_at = match &self.observed {
                Some((seen_rv, at)) if *seen_rv == rv => *at,
                _ => {
                    self.observed = Some((rv, now));
                    now
                }
            };
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(self.opts.duration);
            let expired = holder.is_empty() || now.duration_since(seen_at) >= duration;
            if !expired {
                return Ok(Attempt::Following);
            }
            tracing::info!(previous = %holder, "lease expired or released; taking it over");
            self.spec(transitions.saturating_add(1), None)
        };
        lease.spec = Some(new_spec);
        // The resourceVersion read travels with the replace: a concurrent writer makes it 409.
        match self.api.replace(&self.opts.name, &pp, &lease).await {
            Ok(_) => Ok(Attempt::Leading),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Following),
            Err(e) => Err(e),
        }
    }

    async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.opts.name).await? else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.opts.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease.spec = Some(spec);
        self.api
            .replace(&self.opts.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}
