//! Which registry objects a resource is built from: the way back from "a proxy rejected
//! RouteConfiguration `weft_http`" to "these TrafficRoutes are not live", for status feedback.
//!
//! It mirrors what each translator function reads (their docs), so it changes with them.

use weft_registry::{ObjectKey, Registry};

use crate::{CLUSTER_TYPE, ENDPOINT_TYPE, Flavor, HTTP_LISTENER_NAME, LISTENER_TYPE, ROUTE_TYPE};

/// The services, routes and policies whose content resource `name` of `type_url` carries for
/// `flavor`, sorted. Unknown types or names carry nothing.
pub fn origins(reg: &Registry, flavor: Flavor, type_url: &str, name: &str) -> Vec<ObjectKey> {
    let service = |s: &str| {
        reg.services
            .contains_key(s)
            .then(|| ObjectKey::Service(s.into()))
    };
    let policy = |s: &str| reg.policy_for(s).map(|p| ObjectKey::Policy(p.name.clone()));
    let mut out: Vec<ObjectKey> = match (type_url, flavor) {
        // A cluster: its service and the policy that applies to it.
        (CLUSTER_TYPE, _) => service(name).into_iter().chain(policy(name)).collect(),
        (ENDPOINT_TYPE, _) => service(name).into_iter().collect(),
        // Envoy's one listener and route configuration carry every service; the routes also
        // every route and the policies' rate limits.
        (LISTENER_TYPE, Flavor::Envoy) if name == HTTP_LISTENER_NAME => reg
            .services
            .keys()
            .map(|s| ObjectKey::Service(s.clone()))
            .collect(),
        (ROUTE_TYPE, Flavor::Envoy) if name == HTTP_LISTENER_NAME => reg
            .services
            .keys()
            .map(|s| ObjectKey::Service(s.clone()))
            .chain(reg.routes.keys().map(|r| ObjectKey::Route(r.clone())))
            .chain(
                reg.policies
                    .values()
                    .filter(|p| p.rate_limit.is_some())
                    .map(|p| ObjectKey::Policy(p.name.clone())),
            )
            .collect(),
        // gRPC: one listener and one route configuration per service.
        (LISTENER_TYPE, Flavor::Grpc) => service(name).into_iter().collect(),
        (ROUTE_TYPE, Flavor::Grpc) => service(name)
            .into_iter()
            .chain(
                reg.routes_for(name)
                    .map(|r| ObjectKey::Route(r.name.clone())),
            )
            .collect(),
        _ => Vec::new(),
    };
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> Registry {
        let doc = weft_registry::parse_document(
            "test",
            r#"
services:
  - {name: web, protocol: http, endpoints: [{address: 10.0.0.1, port: 80}]}
  - {name: api, protocol: http}
routes:
  - {name: web-split, service: web, rules: [{match: {path_prefix: /}}]}
policies:
  - {name: web-lb, service: web, lb: round_robin}
  - {name: api-rl, service: api, rate_limit: {requests: 5, per: 1s}}
"#,
        )
        .expect("valid");
        let mut r = Registry::default();
        for s in doc.services {
            r.services.insert(
                s.name.clone(),
                weft_registry::Service {
                    name: s.name.clone(),
                    protocol: s.protocol,
                    instances: Vec::new(),
                },
            );
        }
        r.routes = doc
            .routes
            .into_iter()
            .map(|x| (x.name.clone(), x))
            .collect();
        r.policies = doc
            .policies
            .into_iter()
            .map(|x| (x.name.clone(), x))
            .collect();
        r
    }

    #[test]
    fn resources_lead_back_to_what_they_were_built_from() {
        let r = reg();
        let svc = |s: &str| ObjectKey::Service(s.into());
        assert_eq!(
            origins(&r, Flavor::Envoy, CLUSTER_TYPE, "web"),
            [svc("web"), ObjectKey::Policy("web-lb".into())]
        );
        assert_eq!(
            origins(&r, Flavor::Grpc, ENDPOINT_TYPE, "web"),
            [svc("web")]
        );
        assert_eq!(
            origins(&r, Flavor::Envoy, ROUTE_TYPE, HTTP_LISTENER_NAME),
            [
                svc("api"),
                svc("web"),
                ObjectKey::Route("web-split".into()),
                ObjectKey::Policy("api-rl".into())
            ]
        );
        assert_eq!(
            origins(&r, Flavor::Grpc, ROUTE_TYPE, "web"),
            [svc("web"), ObjectKey::Route("web-split".into())]
        );
        assert!(origins(&r, Flavor::Envoy, CLUSTER_TYPE, "gone").is_empty());
        assert!(origins(&r, Flavor::Grpc, "type.googleapis.com/other", "web").is_empty());
    }
}
