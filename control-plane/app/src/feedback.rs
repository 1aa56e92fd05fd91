//! Feedback from the proxies to where their config came from: which registry objects the
//! resources that connected proxies reject were built from, for the `Programmed` condition of
//! Weft's custom resources.
//!
//! This is the one place that joins the xDS server's view (rejected resources by name) with
//! the translator's (what a resource is built from), so neither the server nor the Kubernetes
//! source learns about the other.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use weft_registry::{Registry, RegistrySnapshot};
use weft_source_kubernetes::ProxyRejections;
use weft_translate::Flavor;
use weft_xds_server::{RejectedResource, XdsServer};

/// How long rejections settle before they are looked at: a bad change makes every proxy NACK
/// within a few milliseconds of each other, and one status write should report them all.
const SETTLE: Duration = Duration::from_millis(200);

/// How many proxies a message names before it only counts them.
const NAMED_NODES: usize = 5;

/// The registry objects behind every rejected resource, each with what is rejected, by whom
/// and why.
pub fn proxy_rejections(registry: &Registry, rejected: &[RejectedResource]) -> ProxyRejections {
    let mut by: BTreeMap<weft_registry::ObjectKey, Vec<String>> = BTreeMap::new();
    for r in rejected {
        let Some(flavor) = Flavor::ALL.into_iter().find(|f| f.as_str() == r.flavor) else {
            continue;
        };
        let kind = r.type_url.rsplit('.').next().unwrap_or(&r.type_url);
        let mut nodes = r
            .nodes
            .iter()
            .take(NAMED_NODES)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if r.nodes.len() > NAMED_NODES {
            nodes.push_str(&format!(", and {} more", r.nodes.len() - NAMED_NODES));
        }
        let proxies = if r.nodes.len() == 1 {
            "proxy"
        } else {
            "proxies"
        };
        let msg = format!(
            "{kind} {} is rejected by {} {proxies} ({nodes}): {}",
            r.name,
            r.nodes.len(),
            r.reason
        );
        for o in weft_translate::origins(registry, flavor, &r.type_url, &r.name) {
            by.entry(o).or_default().push(msg.clone());
        }
    }
    by.into_iter().map(|(k, v)| (k, v.join("\n"))).collect()
}

/// Keeps `tx` equal to [`proxy_rejections`] of the current registry and rejections, until
/// `shutdown`.
pub async fn run(
    xds: XdsServer,
    mut registry: watch::Receiver<RegistrySnapshot>,
    tx: watch::Sender<Arc<ProxyRejections>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut changed = xds.rejections_changed();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            r = changed.changed() => if r.is_err() { return },
            r = registry.changed() => if r.is_err() { return },
        }
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(SETTLE) => {}
        }
        changed.borrow_and_update();
        let reg = Arc::clone(&registry.borrow_and_update().registry);
        let now = proxy_rejections(&reg, &xds.rejected_resources());
        tx.send_if_modified(|cur| {
            if **cur == now {
                false
            } else {
                *cur = Arc::new(now);
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_registry::ObjectKey;

    #[test]
    fn a_rejected_route_configuration_points_at_its_routes() {
        let doc = weft_registry::parse_document(
            "t",
            "services:\n  - {name: web, protocol: http}\nroutes:\n  - {name: shop.r, service: web, rules: [{match: {path_prefix: /}}]}\n",
        )
        .expect("valid");
        let mut reg = Registry::default();
        reg.services.insert(
            "web".into(),
            weft_registry::Service {
                name: "web".into(),
                protocol: doc.services[0].protocol,
                instances: Vec::new(),
            },
        );
        reg.routes = doc
            .routes
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        let nodes: Vec<String> = (1..=7).map(|i| format!("envoy-{i}")).collect();
        let rejected = [RejectedResource {
            flavor: "envoy".into(),
            type_url: weft_translate::ROUTE_TYPE.into(),
            name: "weft_http".into(),
            nodes,
            reason: "bad regex".into(),
        }];
        let got = proxy_rejections(&reg, &rejected);
        let msg = &got[&ObjectKey::Route("shop.r".into())];
        assert_eq!(
            msg,
            "RouteConfiguration weft_http is rejected by 7 proxies (envoy-1, envoy-2, envoy-3, \
             envoy-4, envoy-5, and 2 more): bad regex"
        );
        assert!(got.contains_key(&ObjectKey::Service("web".into())));
        assert!(proxy_rejections(&reg, &[]).is_empty());
    }
}
