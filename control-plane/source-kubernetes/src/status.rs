//! Writes `status` (observedGeneration, `Accepted`, `ResolvedRefs`, `Programmed`) of Weft's
//! custom resources, and only while this replica leads.
//!
//! `Programmed` is feedback from the proxies: the binary hands in which registry objects the
//! resources that connected proxies reject were built from ([`ProxyRejections`]); this crate
//! never sees xDS.
//!
//! It compares what the status should be with what the object (as last watched) says, so a
//! restart, a new leader or an echo of its own patch writes nothing when nothing changed, and
//! `lastTransitionTime` only moves when a condition's status flips.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use tokio::sync::watch;
use weft_crds::{ExternalService, ObjectStatus, TrafficPolicy, TrafficRoute};
use weft_registry::{ObjectKey, Registry, RegistrySnapshot};

/// Registry objects that connected proxies reject a resource built from, each with a message
/// saying which resource, which proxies and why. Empty: nothing is rejected.
pub type ProxyRejections = BTreeMap<ObjectKey, String>;

/// Which custom resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CrdKind {
    TrafficRoute,
    TrafficPolicy,
    ExternalService,
}

impl CrdKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CrdKind::TrafficRoute => "TrafficRoute",
            CrdKind::TrafficPolicy => "TrafficPolicy",
            CrdKind::ExternalService => "ExternalService",
        }
    }

    pub fn api_resource(self) -> ApiResource {
        match self {
            CrdKind::TrafficRoute => ApiResource::erase::<TrafficRoute>(&()),
            CrdKind::TrafficPolicy => ApiResource::erase::<TrafficPolicy>(&()),
            CrdKind::ExternalService => ApiResource::erase::<ExternalService>(&()),
        }
    }
}

/// What validation said of one object.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Valid and applied; these registry services must exist for `ResolvedRefs=True`, and
    /// these are the registry objects it became (for `Programmed`).
    Accepted {
        refs: Vec<String>,
        objects: Vec<ObjectKey>,
    },
    /// Rejected; the message names the field(s).
    Invalid(String),
}

/// One custom resource whose status is maintained.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusTarget {
    pub kind: CrdKind,
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    /// The object's resourceVersion when this target was computed.
    pub resource_version: String,
    /// The status the object carries now.
    pub current: Option<ObjectStatus>,
    pub verdict: Verdict,
}

type Key = (CrdKind, String, String);

/// The status `t` should have, given the merged registry and what proxies reject.
pub fn desired_status(
    t: &StatusTarget,
    registry: &Registry,
    rejections: &ProxyRejections,
) -> ObjectStatus {
    let g = t.generation;
    let programmed = match &t.verdict {
        Verdict::Accepted { objects, .. } => {
            let why: Vec<&str> = objects
                .iter()
                .filter_map(|o| rejections.get(o))
                .map(String::as_str)
                .collect();
            if why.is_empty() {
                weft_crds::programmed(
                    g,
                    true,
                    weft_crds::REASON_PROGRAMMED,
                    "no connected proxy rejects the configuration built from it",
                )
            } else {
                let mut why = why;
                why.dedup();
                weft_crds::programmed(
                    g,
                    false,
                    weft_crds::REASON_REJECTED_BY_PROXIES,
                    why.join("\n"),
                )
            }
        }
        Verdict::Invalid(_) => {
            let mut c = weft_crds::programmed(
                g,
                false,
                weft_crds::REASON_INVALID,
                "not programmed: the object is invalid",
            );
            c.status = "Unknown".to_string();
            c
        }
    };
    let (accepted, resolved) = match &t.verdict {
        Verdict::Accepted { refs, .. } => {
            let mut missing: Vec<&str> = refs
                .iter()
                .filter(|r| !registry.services.contains_key(*r))
                .map(String::as_str)
                .collect();
            missing.sort_unstable();
            missing.dedup();
            let resolved = if missing.is_empty() {
                weft_crds::resolved_refs(
                    g,
                    true,
                    weft_crds::REASON_RESOLVED_REFS,
                    "every referenced service exists",
                )
            } else {
                weft_crds::resolved_refs(
                    g,
                    false,
                    weft_crds::REASON_BACKEND_NOT_FOUND,
                    format!("service not found in the registry: {}", missing.join(", ")),
                )
            };
            (
                weft_crds::accepted(
                    g,
                    true,
                    weft_crds::REASON_ACCEPTED,
                    "applied to the registry",
                ),
                resolved,
            )
        }
        Verdict::Invalid(msg) => {
            let mut resolved = weft_crds::resolved_refs(
                g,
                false,
                weft_crds::REASON_INVALID,
                "not checked: the object is invalid",
            );
            resolved.status = "Unknown".to_string();
            (
                weft_crds::accepted(g, false, weft_crds::REASON_INVALID, msg.clone()),
                resolved,
            )
        }
    };
    let mut conditions = t
        .current
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    weft_crds::set_condition(&mut conditions, accepted);
    weft_crds::set_condition(&mut conditions, resolved);
    weft_crds::set_condition(&mut conditions, programmed);
    ObjectStatus::new(g, conditions)
}

/// See the module documentation.
pub struct StatusWriter {
    pub client: kube::Client,
    pub targets: watch::Receiver<Arc<Vec<StatusTarget>>>,
    pub registry: watch::Receiver<RegistrySnapshot>,
    pub leader: watch::Receiver<bool>,
    /// What proxies reject (see [`ProxyRejections`]); a closed channel means nothing is.
    pub rejections: watch::Receiver<Arc<ProxyRejections>>,
    pub retry: Duration,
    pub writes: prometheus_client::metrics::counter::Counter,
}

impl StatusWriter {
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        // What was patched, per object, at which resourceVersion: until the watch shows a newer
        // version the same patch is not sent again.
        let mut written: HashMap<Key, (String, ObjectStatus)> = HashMap::new();
        let mut retry_due = false;
        // The binary may give no rejection feed (a closed channel): then only wait on the rest.
        let mut rejections_open = true;
        loop {
            let retry_sleep = async {
                if retry_due {
                    tokio::time::sleep(self.retry).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                () = &mut shutdown => return,
                r = self.targets.changed() => if r.is_err() { return },
                r = self.registry.changed() => if r.is_err() { return },
                r = self.leader.changed() => if r.is_err() { return },
                r = self.rejections.changed(), if rejections_open => if r.is_err() {
                    rejections_open = false;
                },
                () = retry_sleep => {}
            }
            retry_due = false;
            if !*self.leader.borrow_and_update() {
                written.clear();
                continue;
            }
            let targets = Arc::clone(&self.targets.borrow_and_update());
            let registry = Arc::clone(&self.registry.borrow_and_update().registry);
            let rejections = Arc::clone(&self.rejections.borrow_and_update());
            written.retain(|k, _| {
                targets
                    .iter()
                    .any(|t| (t.kind, &t.namespace, &t.name) == (k.0, &k.1, &k.2))
            });
            for t in targets.iter() {
                let want = desired_status(t, &registry, &rejections);
                if t.current.as_ref() == Some(&want) {
                    continue;
                }
                let key = (t.kind, t.namespace.clone(), t.name.clone());
                if written
                    .get(&key)
                    .is_some_and(|(rv, s)| *rv == t.resource_version && *s == want)
                {
                    continue;
                }
                // Leadership may have been lost while patching the previous object.
                if !*self.leader.borrow() {
                    break;
                }
                match self.patch(t, &want).await {
                    Ok(()) => {
                        self.writes.inc();
                        written.insert(key, (t.resource_version.clone(), want));
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 => {
                        // Deleted meanwhile: the watch will drop it.
                    }
                    Err(e) => {
                        tracing::warn!(
                            kind = t.kind.as_str(),
                            namespace = %t.namespace,
                            name = %t.name,
                            error = %e,
                            "status write failed; will retry"
                        );
                        retry_due = true;
                    }
                }
            }
        }
    }

    async fn patch(&self, t: &StatusTarget, status: &ObjectStatus) -> Result<(), kube::Error> {
        let ar = t.kind.api_resource();
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &t.namespace, &ar);
        // A merge patch replaces the conditions list whole, which is what we computed.
        let body = serde_json::json!({ "status": status });
        api.patch_status(&t.name, &PatchParams::default(), &Patch::Merge(&body))
            .await
            .map(|_| ())
    }
}
