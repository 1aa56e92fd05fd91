//! Registry -> translator -> cache, debounced.
//!
//! Bursts of registry changes are coalesced: config is built once the registry has been quiet
//! for `debounce`, or at the latest `debounce_max` after the burst's first change. Convergence
//! is measured from that first change.
//!
//! Only what a change touches is rebuilt: an endpoint change re-translates the endpoints of the
//! services whose instances changed and nothing else, so clusters, listeners and routes keep
//! their versions and no client is sent them again.
//!
//! Each rebuild is one `config.change` span (exported with `--otlp-endpoint`), whose context
//! goes with the snapshots it publishes, so that every push of the change is its child.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use weft_registry::{Protocol, Registry, RegistrySnapshot};
use weft_translate::{self as translate, Flavor};
use weft_xds_cache::{ApplyStats, Cache, TypeUpdate};
use weft_xds_server::TRACE_TARGET;

/// What a registry change requires rebuilding.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub clusters: bool,
    pub listeners: bool,
    pub routes: bool,
    /// Services whose endpoints must be re-translated.
    pub endpoints: Vec<String>,
    /// Services that disappeared: their endpoints are removed.
    pub endpoints_removed: Vec<String>,
}

fn shapes(reg: &Registry) -> BTreeMap<&str, Protocol> {
    reg.services
        .iter()
        .map(|(n, s)| (n.as_str(), s.protocol))
        .collect()
}

/// Compares two registries and says what to rebuild. `None`: everything.
pub fn plan(prev: Option<&Registry>, next: &Registry) -> Plan {
    let Some(prev) = prev else {
        return Plan {
            clusters: true,
            listeners: true,
            routes: true,
            endpoints: next.services.keys().cloned().collect(),
            endpoints_removed: Vec::new(),
        };
    };
    // Each flag mirrors what the translator function reads (see their docs in
    // weft-translate): clusters read service names, protocols and policies; routes read
    // service names, protocols (default retry conditions) and routes; listeners read names.
    let shapes_changed = shapes(prev) != shapes(next);
    let names_changed = !prev.services.keys().eq(next.services.keys());
    Plan {
        clusters: shapes_changed || prev.policies != next.policies,
        listeners: names_changed,
        routes: shapes_changed || prev.routes != next.routes,
        endpoints: next
            .services
            .iter()
            .filter(|(n, s)| {
                prev.services
                    .get(*n)
                    .is_none_or(|p| p.instances != s.instances)
            })
            .map(|(n, _)| n.clone())
            .collect(),
        endpoints_removed: prev
            .services
            .keys()
            .filter(|n| !next.services.contains_key(*n))
            .cloned()
            .collect(),
    }
}

fn named<M>(items: Vec<M>, name: impl Fn(&M) -> String) -> Vec<(String, M)> {
    items.into_iter().map(|m| (name(&m), m)).collect()
}

/// OpenTelemetry integers are i64, and tracing-opentelemetry records a `u64` field as text.
fn int<T: TryInto<i64>>(n: T) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// Translates what `plan` says for every flavour and applies it to the cache.
pub fn apply(
    cache: &Cache,
    opts: &translate::Options,
    prev: Option<&Registry>,
    next: &Registry,
    changed_at: Instant,
) -> ApplyStats {
    change(cache, opts, prev, next, changed_at, None)
}

/// [`apply`] as the `config.change` span of registry `generation`.
fn change(
    cache: &Cache,
    opts: &translate::Options,
    prev: Option<&Registry>,
    next: &Registry,
    changed_at: Instant,
    generation: Option<u64>,
) -> ApplyStats {
    let started = Instant::now();
    let span = tracing::info_span!(
        target: TRACE_TARGET,
        parent: None,
        "config.change",
        weft.registry.generation = tracing::field::Empty,
        weft.change.initial = prev.is_none(),
        // From the burst's first change to the start of the rebuild: the debounce.
        weft.change.waited_ms = int(started.saturating_duration_since(changed_at).as_millis()),
        weft.rebuilt.clusters = tracing::field::Empty,
        weft.rebuilt.listeners = tracing::field::Empty,
        weft.rebuilt.routes = tracing::field::Empty,
        weft.rebuilt.endpoint_services = tracing::field::Empty,
        weft.removed.endpoint_services = tracing::field::Empty,
        weft.resources.encoded = tracing::field::Empty,
        weft.resources.removed = tracing::field::Empty,
        weft.resources.unchanged = tracing::field::Empty,
        weft.duration_us = tracing::field::Empty,
    );
    let _entered = span.enter();
    let trace = crate::telemetry::trace_parent(&span);
    let plan = plan(prev, next);
    if let Some(g) = generation {
        span.record("weft.registry.generation", int(g));
    }
    span.record("weft.rebuilt.clusters", plan.clusters);
    span.record("weft.rebuilt.listeners", plan.listeners);
    span.record("weft.rebuilt.routes", plan.routes);
    span.record("weft.rebuilt.endpoint_services", int(plan.endpoints.len()));
    span.record(
        "weft.removed.endpoint_services",
        int(plan.endpoints_removed.len()),
    );
    let mut total = ApplyStats::default();
    for flavor in Flavor::ALL {
        let mut updates = Vec::new();
        if plan.clusters {
            let c = translate::clusters(next, flavor);
            updates.push(TypeUpdate::replace(
                translate::CLUSTER_TYPE,
                named(c, |c| c.name.clone()),
            ));
        }
        if !plan.endpoints.is_empty() {
            let e: Vec<_> = plan
                .endpoints
                .iter()
                .filter_map(|n| next.services.get(n))
                .map(|s| translate::endpoint_assignment(s, flavor))
                .collect();
            updates.push(TypeUpdate::upsert(
                translate::ENDPOINT_TYPE,
                named(e, |e| e.cluster_name.clone()),
            ));
        }
        if !plan.endpoints_removed.is_empty() {
            updates.push(TypeUpdate::Remove {
                type_url: translate::ENDPOINT_TYPE.to_string(),
                names: plan.endpoints_removed.clone(),
            });
        }
        if plan.listeners {
            let l = translate::listeners(next, opts, flavor);
            updates.push(TypeUpdate::replace(
                translate::LISTENER_TYPE,
                named(l, |l| l.name.clone()),
            ));
        }
        if plan.routes {
            let r = translate::routes(next, opts, flavor);
            updates.push(TypeUpdate::replace(
                translate::ROUTE_TYPE,
                named(r, |r| r.name.clone()),
            ));
        }
        let s = cache.apply_traced(flavor.as_str(), updates, changed_at, trace);
        total.changed += s.changed;
        total.removed += s.removed;
        total.unchanged += s.unchanged;
    }
    span.record("weft.resources.encoded", int(total.changed));
    span.record("weft.resources.removed", int(total.removed));
    span.record("weft.resources.unchanged", int(total.unchanged));
    span.record("weft.duration_us", int(started.elapsed().as_micros()));
    total
}

/// Follows the hub until `shutdown` resolves. `prev` is the registry already in the cache.
pub async fn run(
    mut rx: watch::Receiver<RegistrySnapshot>,
    cache: Arc<Cache>,
    opts: translate::Options,
    mut prev: Arc<Registry>,
    debounce: Duration,
    debounce_max: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
        // The first change of the burst: convergence is measured from here.
        let first_change = rx.borrow().changed_at;
        let hard_deadline = tokio::time::Instant::now() + debounce_max;
        loop {
            let quiet_until = (tokio::time::Instant::now() + debounce).min(hard_deadline);
            tokio::select! {
                () = tokio::time::sleep_until(quiet_until) => break,
                r = rx.changed() => if r.is_err() { return },
            }
            if tokio::time::Instant::now() >= hard_deadline {
                break;
            }
        }
        let snap = rx.borrow_and_update().clone();
        let started = Instant::now();
        let stats = change(
            &cache,
            &opts,
            Some(&prev),
            &snap.registry,
            first_change,
            Some(snap.generation),
        );
        tracing::info!(
            generation = snap.generation,
            changed = stats.changed,
            removed = stats.removed,
            unchanged = stats.unchanged,
            took_ms = started.elapsed().as_millis() as u64,
            "configuration updated"
        );
        prev = snap.registry;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_registry::{Hub, SourceEvent, parse_document};

    fn registry(yaml: &str) -> Arc<Registry> {
        let hub = Hub::new();
        let src = hub.add_source("file");
        let doc = parse_document("t", yaml).unwrap();
        let mut ev = vec![SourceEvent::Init];
        ev.extend(doc.into_objects().into_iter().map(SourceEvent::InitApply));
        ev.push(SourceEvent::InitDone);
        src.apply(ev);
        hub.current().registry
    }

    const BASE: &str = "services:
  - {name: a, endpoints: [{address: 127.0.0.1, port: 1}]}
  - {name: b, protocol: grpc, endpoints: [{address: 127.0.0.1, port: 2}]}
";

    #[test]
    fn endpoint_change_rebuilds_only_that_services_endpoints() {
        let a = registry(BASE);
        let b = registry(&BASE.replace("port: 1}", "port: 3}"));
        let p = plan(Some(&a), &b);
        assert_eq!(
            p,
            Plan {
                endpoints: vec!["a".into()],
                ..Default::default()
            }
        );
        let cache = Cache::new(&["envoy", "grpc"], &translate_types());
        let opts = translate::Options::default();
        apply(&cache, &opts, None, &a, Instant::now());
        let before = cache.encodes_total();
        let stats = apply(&cache, &opts, Some(&a), &b, Instant::now());
        // One changed assignment per flavour, nothing else encoded.
        assert_eq!(stats.changed, 2);
        assert_eq!(cache.encodes_total() - before, 2);
    }

    #[test]
    fn policy_and_route_changes_touch_their_types() {
        let a = registry(BASE);
        let b = registry(&format!(
            "{BASE}policies: [{{name: p, service: a, lb: random}}]\n"
        ));
        let p = plan(Some(&a), &b);
        assert!(p.clusters && !p.listeners && !p.routes && p.endpoints.is_empty());
        let c = registry(&format!(
            "{BASE}routes: [{{name: r, service: a, rules: [{{backends: [{{service: b}}]}}]}}]\n"
        ));
        let p = plan(Some(&a), &c);
        assert!(!p.clusters && !p.listeners && p.routes);
    }

    #[test]
    fn protocol_change_rebuilds_clusters_and_routes() {
        // A retry rule without `on` takes its default conditions from the protocol.
        let with_retry = format!(
            "{BASE}routes: [{{name: r, service: a, rules: [{{retries: {{attempts: 2}}}}]}}]\n"
        );
        let a = registry(&with_retry);
        let b = registry(&with_retry.replace("name: a,", "name: a, protocol: grpc,"));
        let p = plan(Some(&a), &b);
        assert!(p.clusters && p.routes && !p.listeners, "{p:?}");
        // And the routes really differ: HTTP services retry on 5xx by default, gRPC ones not.
        let opts = translate::Options::default();
        assert_ne!(
            translate::routes(&a, &opts, Flavor::Envoy),
            translate::routes(&b, &opts, Flavor::Envoy)
        );
    }

    #[test]
    fn removed_service_removes_everything_of_it() {
        let a = registry(BASE);
        let b = registry("services: [{name: a, endpoints: [{address: 127.0.0.1, port: 1}]}]");
        let p = plan(Some(&a), &b);
        assert!(p.clusters && p.listeners && p.routes);
        assert_eq!(p.endpoints_removed, vec!["b".to_string()]);
    }

    pub(super) fn translate_types() -> [&'static str; 4] {
        [
            translate::CLUSTER_TYPE,
            translate::ENDPOINT_TYPE,
            translate::LISTENER_TYPE,
            translate::ROUTE_TYPE,
        ]
    }
}
