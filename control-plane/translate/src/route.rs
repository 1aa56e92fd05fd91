//! Routes become RDS RouteConfigurations: virtual hosts per service, one Envoy route per rule.

use std::collections::BTreeSet;

use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
    WeightedCluster,
    header_matcher::HeaderMatchSpecifier,
    retry_policy::RetryBackOff,
    route::Action,
    route_action,
    route_action::ClusterSpecifier,
    route_action::hash_policy::{self, PolicySpecifier},
    route_match::PathSpecifier,
    weighted_cluster::ClusterWeight,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatcher, StringMatcher, string_matcher::MatchPattern,
};
use weft_registry::{Backend, Protocol, Registry, Service};

use crate::rate_limit::per_filter_config;
use crate::util::{duration, millis, u32v};
use crate::{Flavor, HTTP_LISTENER_NAME, Options};

/// Retry conditions a gRPC client understands (gRPC status codes); it ignores the rest.
const GRPC_RETRY_ON: &[&str] = &[
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];
const DEFAULT_RETRY_ON: &[&str] = &["connect-failure", "refused-stream", "unavailable"];
/// gRPC's own defaults (A44), spelled out because an explicit back-off must carry a base.
const GRPC_RETRY_BASE_MS: u64 = 25;
const GRPC_RETRY_MAX_MS: u64 = 250;
/// Every gRPC call is a POST, so a method matcher can only be "always" or "never" for gRPC.
const GRPC_METHOD: &str = "POST";

/// Envoy: one RouteConfiguration, [`HTTP_LISTENER_NAME`], with a virtual host per service.
/// gRPC: one RouteConfiguration per service, named after it, with a single virtual host.
/// Reads services (names, protocols) and routes, never instances.
pub fn routes(reg: &Registry, _opts: &Options, flavor: Flavor) -> Vec<RouteConfiguration> {
    match flavor {
        Flavor::Envoy => vec![RouteConfiguration {
            name: HTTP_LISTENER_NAME.to_string(),
            virtual_hosts: envoy_virtual_hosts(reg),
            ..Default::default()
        }],
        Flavor::Grpc => reg
            .services
            .values()
            .map(|svc| RouteConfiguration {
                name: svc.name.clone(),
                virtual_hosts: vec![VirtualHost {
                    name: svc.name.clone(),
                    domains: own_domains(&svc.name).to_vec(),
                    routes: service_routes(reg, svc, Flavor::Grpc),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    }
}

/// The names a service answers to: `svc` and `svc:<any port>`.
fn own_domains(service: &str) -> [String; 2] {
    [service.to_string(), format!("{service}:*")]
}

/// Envoy NACKs the whole RouteConfiguration when two virtual hosts share a domain (compared
/// case-insensitively), so each domain goes to one virtual host only: services' own names
/// first, then routes' extra `hosts` in (service, route) name order; later duplicates are
/// dropped. A virtual host left without any domain is omitted (Envoy requires at least one).
fn envoy_virtual_hosts(reg: &Registry) -> Vec<VirtualHost> {
    let mut taken = BTreeSet::new();
    let mut claim = |domain: &str, into: &mut Vec<String>| {
        if taken.insert(domain.to_ascii_lowercase()) {
            into.push(domain.to_string());
        }
    };
    let mut domains: Vec<Vec<String>> = Vec::with_capacity(reg.services.len());
    for name in reg.services.keys() {
        let mut own = Vec::new();
        for d in own_domains(name) {
            claim(&d, &mut own);
        }
        domains.push(own);
    }
    for (name, doms) in reg.services.keys().zip(domains.iter_mut()) {
        for route in reg.routes_for(name) {
            for host in &route.hosts {
                claim(host, doms);
            }
        }
    }
    reg.services
        .values()
        .zip(domains)
        .filter(|(_, doms)| !doms.is_empty())
        .map(|(svc, domains)| VirtualHost {
            name: svc.name.clone(),
            domains,
            routes: service_routes(reg, svc, Flavor::Envoy),
            typed_per_filter_config: reg
                .policy_for(&svc.name)
                .and_then(|p| p.rate_limit.as_ref())
                .map(per_filter_config)
                .unwrap_or_default(),
            ..Default::default()
        })
        .collect()
}

/// Every rule of every route of `svc` in (route name, rule) order, then a catch-all to the
/// service itself so traffic matching no rule still reaches it.
fn service_routes(reg: &Registry, svc: &Service, flavor: Flavor) -> Vec<Route> {
    let mut out = Vec::new();
    for route in reg.routes_for(&svc.name) {
        for (i, rule) in route.rules.iter().enumerate() {
            let Some(m) = route_match(&rule.matches, flavor) else {
                continue;
            };
            // A rule's own limit replaces the service's for the requests it matches (Envoy
            // uses the most specific per-filter config). gRPC clients get none: they reject
            // per-filter config for filters they lack.
            let typed_per_filter_config = match (flavor, &rule.rate_limit) {
                (Flavor::Envoy, Some(rl)) => per_filter_config(rl),
                _ => Default::default(),
            };
            out.push(Route {
                name: format!("{}/{i}", route.name),
                r#match: Some(m),
                action: Some(Action::Route(route_action(svc, rule, flavor))),
                typed_per_filter_config,
                ..Default::default()
            });
        }
    }
    out.push(Route {
        name: "default".to_string(),
        r#match: Some(RouteMatch {
            path_specifier: Some(PathSpecifier::Prefix("/".to_string())),
            ..Default::default()
        }),
        action: Some(Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::Cluster(svc.name.clone())),
            ..Default::default()
        })),
        ..Default::default()
    });
    out
}

/// `None` when the rule can never match a request from this client (a non-POST method for
/// gRPC), so it is left out rather than sent as dead configuration.
fn route_match(m: &weft_registry::RouteMatch, flavor: Flavor) -> Option<RouteMatch> {
    let path = if let Some(p) = &m.path_prefix {
        PathSpecifier::Prefix(p.clone())
    } else if let Some(p) = &m.path_exact {
        PathSpecifier::Path(p.clone())
    } else if let Some(re) = &m.path_regex {
        PathSpecifier::SafeRegex(regex(re))
    } else {
        PathSpecifier::Prefix("/".to_string())
    };
    let mut headers: Vec<HeaderMatcher> = m.headers.iter().map(header_matcher).collect();
    if let Some(method) = &m.method {
        match flavor {
            Flavor::Envoy => headers.push(HeaderMatcher {
                name: ":method".to_string(),
                header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(string_match(
                    MatchPattern::Exact(method.clone()),
                ))),
                ..Default::default()
            }),
            // gRPC implementations disagree on whether `:method` is visible to matchers.
            Flavor::Grpc if method == GRPC_METHOD => {}
            Flavor::Grpc => return None,
        }
    }
    Some(RouteMatch {
        path_specifier: Some(path),
        headers,
        ..Default::default()
    })
}

fn header_matcher(h: &weft_registry::HeaderMatch) -> HeaderMatcher {
    let spec = if let Some(v) = &h.exact {
        Some(HeaderMatchSpecifier::StringMatch(string_match(
            MatchPattern::Exact(v.clone()),
        )))
    } else if let Some(v) = &h.prefix {
        Some(HeaderMatchSpecifier::StringMatch(string_match(
            MatchPattern::Prefix(v.clone()),
        )))
    } else if let Some(v) = &h.regex {
        Some(HeaderMatchSpecifier::StringMatch(string_match(
            MatchPattern::SafeRegex(regex(v)),
        )))
    } else {
        // Validation guarantees exactly one field; `present` is the remaining one.
        h.present.map(HeaderMatchSpecifier::PresentMatch)
    };
    HeaderMatcher {
        name: h.name.clone(),
        invert_match: h.invert,
        header_match_specifier: spec,
        ..Default::default()
    }
}

fn string_match(pattern: MatchPattern) -> StringMatcher {
    StringMatcher {
        ignore_case: false,
        match_pattern: Some(pattern),
    }
}

/// No engine set: both Envoy and gRPC default to RE2, and naming `google_re2` explicitly is
/// deprecated in Envoy.
fn regex(re: &str) -> RegexMatcher {
    RegexMatcher {
        regex: re.to_string(),
        engine_type: None,
    }
}

fn route_action(svc: &Service, rule: &weft_registry::RouteRule, flavor: Flavor) -> RouteAction {
    let mut action = RouteAction {
        cluster_specifier: Some(cluster_specifier(&svc.name, &rule.backends)),
        retry_policy: rule
            .retries
            .as_ref()
            .and_then(|rt| retry_policy(rt, svc.protocol, flavor)),
        hash_policy: rule
            .hash_policy
            .iter()
            .filter_map(|h| hash_policy(h, flavor))
            .collect(),
        ..Default::default()
    };
    if let Some(t) = rule.timeout {
        match flavor {
            Flavor::Envoy => action.timeout = Some(duration(t)),
            // gRPC ignores `timeout`; it applies max_stream_duration as the call deadline.
            Flavor::Grpc => {
                action.max_stream_duration = Some(route_action::MaxStreamDuration {
                    max_stream_duration: Some(duration(t)),
                    ..Default::default()
                })
            }
        }
    }
    action
}

/// Backends naming the same service twice are merged (weights summed), so no client sees a
/// duplicate weighted cluster. No backends: the route's own service.
fn cluster_specifier(service: &str, backends: &[Backend]) -> ClusterSpecifier {
    let mut merged: Vec<(String, u32)> = Vec::new();
    for b in backends {
        match merged.iter_mut().find(|(name, _)| *name == b.service) {
            Some((_, w)) => *w = w.saturating_add(b.weight),
            None => merged.push((b.service.clone(), b.weight)),
        }
    }
    match merged.as_slice() {
        [] => ClusterSpecifier::Cluster(service.to_string()),
        [(only, _)] => ClusterSpecifier::Cluster(only.clone()),
        _ => ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: merged
                .into_iter()
                .map(|(name, weight)| ClusterWeight {
                    name,
                    weight: Some(u32v(weight)),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
    }
}

fn retry_policy(
    rt: &weft_registry::RetryPolicy,
    protocol: Protocol,
    flavor: Flavor,
) -> Option<envoy_types::pb::envoy::config::route::v3::RetryPolicy> {
    let mut on: Vec<&str> = if rt.on.is_empty() {
        let mut d = DEFAULT_RETRY_ON.to_vec();
        if protocol == Protocol::Http {
            d.push("5xx");
        }
        d
    } else {
        rt.on.iter().map(String::as_str).collect()
    };
    let mut seen = BTreeSet::new();
    on.retain(|c| seen.insert(*c));
    match flavor {
        Flavor::Envoy => Some(envoy_types::pb::envoy::config::route::v3::RetryPolicy {
            retry_on: on.join(","),
            num_retries: Some(u32v(rt.attempts)),
            per_try_timeout: rt.per_try_timeout.map(duration),
            ..Default::default()
        }),
        Flavor::Grpc => {
            on.retain(|c| GRPC_RETRY_ON.contains(c));
            if on.is_empty() {
                // Nothing gRPC could retry on: a policy would only be noise.
                return None;
            }
            // gRPC NACKs num_retries 0, ignores per_try_timeout, and requires a base interval
            // whenever retry_back_off is present.
            Some(envoy_types::pb::envoy::config::route::v3::RetryPolicy {
                retry_on: on.join(","),
                num_retries: Some(u32v(rt.attempts.max(1))),
                retry_back_off: Some(RetryBackOff {
                    base_interval: Some(millis(GRPC_RETRY_BASE_MS)),
                    max_interval: Some(millis(GRPC_RETRY_MAX_MS)),
                }),
                ..Default::default()
            })
        }
    }
}

/// gRPC hashes only on headers (and its own channel id); cookie and source-IP policies are
/// dropped for it rather than sent to be ignored.
fn hash_policy(h: &weft_registry::HashPolicy, flavor: Flavor) -> Option<route_action::HashPolicy> {
    let spec = if let Some(name) = &h.header {
        PolicySpecifier::Header(hash_policy::Header {
            header_name: name.clone(),
            regex_rewrite: None,
        })
    } else if flavor == Flavor::Grpc {
        return None;
    } else if let Some(c) = &h.cookie {
        PolicySpecifier::Cookie(hash_policy::Cookie {
            name: c.name.clone(),
            ttl: c.ttl.map(duration),
            ..Default::default()
        })
    } else if h.source_ip == Some(true) {
        PolicySpecifier::ConnectionProperties(hash_policy::ConnectionProperties { source_ip: true })
    } else {
        return None;
    };
    Some(route_action::HashPolicy {
        terminal: h.terminal,
        policy_specifier: Some(spec),
    })
}
