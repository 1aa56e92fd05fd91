//! Decoding and validation of the shared schema.
//!
//! Every error names where the bad value came from (`origin`: a file path, an etcd key, a CRD),
//! the field path inside it (`services[0].endpoints[1].port`) and the reason, so an operator can
//! fix it without guessing. Decoding is YAML, of which JSON is a subset, so every source can
//! accept either.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use serde::de::DeserializeOwned;

use crate::model::*;

/// Envoy's default `base_ejection_time`, against which a `max_ejection_time` is checked.
const DEFAULT_BASE_EJECTION_TIME: std::time::Duration = std::time::Duration::from_secs(30);

/// One problem in one value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {path}: {reason}")]
pub struct SchemaError {
    /// Where the value came from: a file path, an etcd key, a Kubernetes object.
    pub origin: String,
    /// Field path inside the value, `.` for the whole value.
    pub path: String,
    pub reason: String,
}

/// Every problem found in one value; never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SchemaErrors(pub Vec<SchemaError>);

impl fmt::Display for SchemaErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Largest value a source may hand us; larger ones are refused before parsing so one bad key
/// cannot make us allocate without bound.
pub const MAX_VALUE_BYTES: usize = 1 << 20;

/// Decodes a registry document (a file's content) and validates it.
pub fn parse_document(origin: &str, text: &str) -> Result<RegistryDoc, SchemaErrors> {
    if text.trim().is_empty() {
        return Ok(RegistryDoc::default());
    }
    let doc: RegistryDoc = decode(origin, text)?;
    let errs = validate_document(origin, &doc);
    if errs.is_empty() {
        Ok(doc)
    } else {
        Err(SchemaErrors(errs))
    }
}

/// Decodes any schema value (an endpoint, a route, a policy) from YAML or JSON, naming the path
/// of the first field that does not fit. Does not run semantic validation.
pub fn decode<T: DeserializeOwned>(origin: &str, text: &str) -> Result<T, SchemaErrors> {
    if text.len() > MAX_VALUE_BYTES {
        return Err(one(
            origin,
            ".",
            format!(
                "value is {} bytes, more than the limit of {MAX_VALUE_BYTES}",
                text.len()
            ),
        ));
    }
    let de = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path.is_empty() {
            ".".to_string()
        } else {
            path
        };
        let msg = e.into_inner().to_string();
        // serde_yaml_ng prefixes some messages with the path (or, for unknown fields, the
        // parent's path); say the path once.
        let msg = match msg.split_once(": ") {
            Some((prefix, rest)) if !prefix.is_empty() && path.starts_with(prefix) => {
                rest.to_string()
            }
            _ => msg,
        };
        one(origin, &path, msg)
    })
}

/// Decodes and validates a single endpoint value (as etcd or the registration API carry them).
pub fn parse_endpoint(origin: &str, text: &str) -> Result<Endpoint, SchemaErrors> {
    let ep: Endpoint = decode(origin, text)?;
    let mut v = Validator::new(origin);
    v.endpoint("", &ep);
    v.finish(ep)
}

/// Decodes and validates a single route value.
pub fn parse_route(origin: &str, text: &str) -> Result<Route, SchemaErrors> {
    let r: Route = decode(origin, text)?;
    let mut v = Validator::new(origin);
    v.route("", &r);
    v.finish(r)
}

/// Decodes and validates a single policy value.
pub fn parse_policy(origin: &str, text: &str) -> Result<Policy, SchemaErrors> {
    let p: Policy = decode(origin, text)?;
    let mut v = Validator::new(origin);
    v.policy("", &p);
    v.finish(p)
}

/// Semantic checks serde cannot express. Returns every problem, not just the first.
pub fn validate_document(origin: &str, doc: &RegistryDoc) -> Vec<SchemaError> {
    let mut v = Validator::new(origin);
    let mut names = BTreeSet::new();
    for (i, s) in doc.services.iter().enumerate() {
        let p = format!("services[{i}]");
        v.name(&format!("{p}.name"), &s.name);
        if !names.insert(s.name.as_str()) {
            v.err(
                &format!("{p}.name"),
                format!("duplicate service `{}`", s.name),
            );
        }
        let mut seen = BTreeSet::new();
        for (j, ep) in s.endpoints.iter().enumerate() {
            let ep_path = format!("{p}.endpoints[{j}]");
            v.endpoint(&ep_path, ep);
            if !seen.insert((ep.address.as_str(), ep.port)) {
                v.err(
                    &ep_path,
                    format!(
                        "duplicate endpoint {}:{} in service `{}`",
                        ep.address, ep.port, s.name
                    ),
                );
            }
        }
    }
    let mut route_names = BTreeSet::new();
    for (i, r) in doc.routes.iter().enumerate() {
        let p = format!("routes[{i}]");
        v.route(&p, r);
        if !route_names.insert(r.name.as_str()) {
            v.err(
                &format!("{p}.name"),
                format!("duplicate route `{}`", r.name),
            );
        }
    }
    let mut policy_names = BTreeSet::new();
    let mut targets = BTreeSet::new();
    for (i, pol) in doc.policies.iter().enumerate() {
        let p = format!("policies[{i}]");
        v.policy(&p, pol);
        if !policy_names.insert(pol.name.as_str()) {
            v.err(
                &format!("{p}.name"),
                format!("duplicate policy `{}`", pol.name),
            );
        }
        if !targets.insert(pol.service.as_str()) {
            v.err(
                &format!("{p}.service"),
                format!(
                    "service `{}` already has a policy in this document",
                    pol.service
                ),
            );
        }
    }
    v.errors
}

fn one(origin: &str, path: &str, reason: String) -> SchemaErrors {
    SchemaErrors(vec![SchemaError {
        origin: origin.to_string(),
        path: path.to_string(),
        reason,
    }])
}

/// Joins a parent path and a field name; a single value's fields have no parent.
fn join(parent: &str, field: &str) -> String {
    if parent.is_empty() {
        field.to_string()
    } else {
        format!("{parent}.{field}")
    }
}

struct Validator<'a> {
    origin: &'a str,
    errors: Vec<SchemaError>,
}

impl<'a> Validator<'a> {
    fn new(origin: &'a str) -> Self {
        Self {
            origin,
            errors: Vec::new(),
        }
    }

    fn finish<T>(self, value: T) -> Result<T, SchemaErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(SchemaErrors(self.errors))
        }
    }

    fn err(&mut self, path: &str, reason: String) {
        let path = if path.is_empty() { "." } else { path };
        self.errors.push(SchemaError {
            origin: self.origin.to_string(),
            path: path.to_string(),
            reason,
        });
    }

    /// Service, route and policy names become Envoy resource names and Host values, so they keep
    /// to characters that are safe in both.
    fn name(&mut self, path: &str, name: &str) {
        if !is_valid_name(name) {
            self.err(
                path,
                format!(
                    "invalid name `{name}`: use 1-253 letters, digits, `-`, `.` or `_`, \
                     starting and ending with a letter or digit"
                ),
            );
        }
    }

    fn weight(&mut self, path: &str, w: u32) {
        if w == 0 || w > MAX_WEIGHT {
            self.err(path, format!("weight {w} is out of range 1..={MAX_WEIGHT}"));
        }
    }

    fn endpoint(&mut self, p: &str, ep: &Endpoint) {
        if ep.address.parse::<IpAddr>().is_err() {
            self.err(
                &join(p, "address"),
                format!("`{}` is not an IP address", ep.address),
            );
        }
        if ep.port == 0 {
            self.err(
                &join(p, "port"),
                "port 0 is not a valid port (use 1-65535)".into(),
            );
        }
        self.weight(&join(p, "weight"), ep.weight);
        if ep.zone.as_deref() == Some("") {
            self.err(&join(p, "zone"), "zone is empty; omit it instead".into());
        }
    }

    fn route(&mut self, p: &str, r: &Route) {
        self.name(&join(p, "name"), &r.name);
        self.name(&join(p, "service"), &r.service);
        for (i, h) in r.hosts.iter().enumerate() {
            if h.is_empty() || h.contains(char::is_whitespace) {
                self.err(
                    &join(p, &format!("hosts[{i}]")),
                    format!("invalid host `{h}`"),
                );
            }
        }
        if r.rules.is_empty() {
            self.err(&join(p, "rules"), "a route needs at least one rule".into());
        }
        for (i, rule) in r.rules.iter().enumerate() {
            let rp = join(p, &format!("rules[{i}]"));
            self.rule(&rp, rule);
        }
    }

    fn rule(&mut self, rp: &str, rule: &RouteRule) {
        let m = &rule.matches;
        let mp = join(rp, "match");
        let paths = [&m.path_prefix, &m.path_exact, &m.path_regex]
            .iter()
            .filter(|x| x.is_some())
            .count();
        if paths > 1 {
            self.err(
                &mp,
                "set at most one of path_prefix, path_exact, path_regex".into(),
            );
        }
        for (field, val) in [
            ("path_prefix", &m.path_prefix),
            ("path_exact", &m.path_exact),
        ] {
            if let Some(v) = val
                && !v.starts_with('/')
            {
                self.err(&join(&mp, field), format!("`{v}` must start with `/`"));
            }
        }
        if let Some(re) = &m.path_regex {
            self.regex(&join(&mp, "path_regex"), re);
        }
        if let Some(method) = &m.method
            && (method.is_empty() || !method.chars().all(|c| c.is_ascii_uppercase()))
        {
            self.err(
                &join(&mp, "method"),
                format!("`{method}` is not an HTTP method (upper case, e.g. GET)"),
            );
        }
        for (i, h) in m.headers.iter().enumerate() {
            let hp = join(&mp, &format!("headers[{i}]"));
            if h.name.is_empty() || h.name.chars().any(|c| c.is_ascii_uppercase()) {
                self.err(
                    &join(&hp, "name"),
                    format!("header name `{}` must be non-empty lower case", h.name),
                );
            }
            if let Some(re) = &h.regex {
                self.regex(&join(&hp, "regex"), re);
            }
            let set = [
                h.exact.is_some(),
                h.prefix.is_some(),
                h.regex.is_some(),
                h.present.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if set != 1 {
                self.err(
                    &hp,
                    "set exactly one of exact, prefix, regex, present".into(),
                );
            }
        }
        for (i, b) in rule.backends.iter().enumerate() {
            let bp = join(rp, &format!("backends[{i}]"));
            self.name(&join(&bp, "service"), &b.service);
            self.weight(&join(&bp, "weight"), b.weight);
        }
        if rule.timeout.is_some_and(|t| t.is_zero()) {
            self.err(
                &join(rp, "timeout"),
                "timeout must be greater than 0".into(),
            );
        }
        if let Some(rt) = &rule.retries {
            let p = join(rp, "retries");
            if !(1..=10).contains(&rt.attempts) {
                self.err(
                    &join(&p, "attempts"),
                    format!("attempts {} is out of range 1..=10", rt.attempts),
                );
            }
            if rt.per_try_timeout.is_some_and(|t| t.is_zero()) {
                self.err(
                    &join(&p, "per_try_timeout"),
                    "must be greater than 0".into(),
                );
            }
            for (i, on) in rt.on.iter().enumerate() {
                if !RETRY_ON.contains(&on.as_str()) {
                    self.err(
                        &join(&p, &format!("on[{i}]")),
                        format!("unknown retry condition `{on}`, expected one of {RETRY_ON:?}"),
                    );
                }
            }
        }
        if let Some(rl) = &rule.rate_limit {
            self.rate_limit(&join(rp, "rate_limit"), rl);
        }
        for (i, h) in rule.hash_policy.iter().enumerate() {
            let hp = join(rp, &format!("hash_policy[{i}]"));
            let set = [
                h.header.is_some(),
                h.cookie.is_some(),
                h.source_ip == Some(true),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if set != 1 {
                self.err(
                    &hp,
                    "set exactly one of header, cookie, source_ip: true".into(),
                );
            }
            if h.header.as_deref() == Some("") {
                self.err(&join(&hp, "header"), "header name is empty".into());
            }
            if h.cookie.as_ref().is_some_and(|c| c.name.is_empty()) {
                self.err(&join(&hp, "cookie.name"), "cookie name is empty".into());
            }
        }
    }

    /// Clients compile regexes with RE2. Checking the syntax here (Rust's `regex` accepts
    /// RE2's syntax: no backreferences or lookaround) catches typos before they reach a client:
    /// Envoy would reject the whole route configuration, holding back every other route's
    /// changes until this one is fixed. Limits only the client knows (Envoy's RE2 program
    /// size) can still be rejected there; see docs/xds.md on NACKs.
    fn regex(&mut self, path: &str, re: &str) {
        if re.is_empty() {
            self.err(path, "regex is empty".into());
        } else if let Err(e) = regex::Regex::new(re) {
            let first = e.to_string();
            let reason = first.lines().last().unwrap_or("invalid").trim().to_string();
            self.err(path, format!("invalid regex `{re}`: {reason}"));
        }
    }

    fn percent(&mut self, path: &str, v: u32) {
        if v > 100 {
            self.err(path, format!("{v} is out of range 0..=100"));
        }
    }

    fn rate_limit(&mut self, p: &str, rl: &RateLimit) {
        if rl.requests == 0 {
            self.err(&join(p, "requests"), "must be at least 1".into());
        }
        if rl.per < MIN_RATE_LIMIT_PER {
            self.err(
                &join(p, "per"),
                format!(
                    "{} is less than the minimum of {}ms (Envoy rejects a shorter fill interval)",
                    humantime_serde::re::humantime::format_duration(rl.per),
                    MIN_RATE_LIMIT_PER.as_millis()
                ),
            );
        }
        if let Some(burst) = rl.burst
            && burst < rl.requests
        {
            self.err(
                &join(p, "burst"),
                format!(
                    "burst {burst} is less than requests {}: the bucket could never hold a whole refill",
                    rl.requests
                ),
            );
        }
    }

    fn policy(&mut self, p: &str, pol: &Policy) {
        self.name(&join(p, "name"), &pol.name);
        self.name(&join(p, "service"), &pol.service);
        if pol.connect_timeout.is_some_and(|t| t.is_zero()) {
            self.err(&join(p, "connect_timeout"), "must be greater than 0".into());
        }
        if let Some(od) = &pol.outlier_detection {
            let op = join(p, "outlier_detection");
            if od.max_ejection_percent.is_some_and(|m| m > 100) {
                self.err(
                    &join(&op, "max_ejection_percent"),
                    "must be between 0 and 100".into(),
                );
            }
            if od.interval.is_some_and(|t| t.is_zero()) {
                self.err(&join(&op, "interval"), "must be greater than 0".into());
            }
            if od.base_ejection_time.is_some_and(|t| t.is_zero()) {
                self.err(
                    &join(&op, "base_ejection_time"),
                    "must be greater than 0".into(),
                );
            }
            if let Some(max) = od.max_ejection_time {
                // Envoy rejects a cluster whose base ejection time exceeds the maximum.
                let base = od.base_ejection_time.unwrap_or(DEFAULT_BASE_EJECTION_TIME);
                if max.is_zero() {
                    self.err(
                        &join(&op, "max_ejection_time"),
                        "must be greater than 0".into(),
                    );
                } else if max < base {
                    self.err(
                        &join(&op, "max_ejection_time"),
                        format!(
                            "{} is less than base_ejection_time ({})",
                            humantime_serde::re::humantime::format_duration(max),
                            humantime_serde::re::humantime::format_duration(base)
                        ),
                    );
                }
            }
        }
        if let Some(cb) = &pol.circuit_breakers
            && let Some(rb) = &cb.retry_budget
        {
            self.percent(
                &join(p, "circuit_breakers.retry_budget.percent"),
                rb.percent,
            );
        }
        if let Some(za) = &pol.zone_aware {
            self.percent(
                &join(p, "zone_aware.min_healthy_percent"),
                za.min_healthy_percent,
            );
        }
        if let Some(pt) = pol.panic_threshold {
            self.percent(&join(p, "panic_threshold"), pt);
        }
        if let Some(rl) = &pol.rate_limit {
            self.rate_limit(&join(p, "rate_limit"), rl);
        }
        if let Some(hc) = &pol.health_check {
            let hp = join(p, "health_check");
            if let Some(path) = &hc.path
                && !path.starts_with('/')
            {
                self.err(&join(&hp, "path"), format!("`{path}` must start with `/`"));
            }
            for (f, v) in [
                ("unhealthy_threshold", hc.unhealthy_threshold),
                ("healthy_threshold", hc.healthy_threshold),
            ] {
                if v == Some(0) {
                    self.err(&join(&hp, f), "must be at least 1".into());
                }
            }
            for (f, v) in [("interval", hc.interval), ("timeout", hc.timeout)] {
                if v.is_some_and(|t| t.is_zero()) {
                    self.err(&join(&hp, f), "must be greater than 0".into());
                }
            }
        }
    }
}

/// Service, route and policy names: 1-253 of `[A-Za-z0-9._-]`, alphanumeric at both ends.
pub fn is_valid_name(name: &str) -> bool {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
    !name.is_empty()
        && name.len() <= 253
        && name.chars().all(ok_char)
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errs(text: &str) -> String {
        match parse_document("f.yaml", text) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn valid_document_parses() {
        let doc = parse_document(
            "f.yaml",
            r#"
services:
  - name: echo
    protocol: grpc
    endpoints:
      - {address: 127.0.0.1, port: 50051, weight: 2, zone: z1, health: draining}
      - {address: "::1", port: 50052}
routes:
  - name: echo-split
    service: echo
    rules:
      - match: {path_prefix: /api, headers: [{name: x-canary, exact: "1"}]}
        backends: [{service: echo, weight: 90}, {service: echo-v2, weight: 10}]
        timeout: 2s
        retries: {attempts: 3, per_try_timeout: 500ms, on: [5xx, connect-failure]}
        hash_policy: [{header: x-user}]
policies:
  - {name: echo-lb, service: echo, lb: ring_hash, connect_timeout: 1s}
"#,
        )
        .unwrap();
        assert_eq!(doc.services[0].protocol, Protocol::Grpc);
        assert_eq!(doc.services[0].endpoints[0].weight, 2);
        assert_eq!(doc.services[0].endpoints[0].health, Health::Draining);
        assert_eq!(doc.services[0].endpoints[1].weight, 1);
        assert_eq!(
            doc.routes[0].rules[0].timeout,
            Some(std::time::Duration::from_secs(2))
        );
        assert_eq!(doc.policies[0].lb, Some(LbAlgorithm::RingHash));
    }

    #[test]
    fn empty_file_is_an_empty_registry() {
        assert_eq!(parse_document("f", "  \n").unwrap(), RegistryDoc::default());
    }

    #[test]
    fn yaml_syntax_error_names_file_and_line() {
        let e = errs("services: [\n  - name: x\n");
        assert!(e.starts_with("f.yaml: "), "{e}");
        assert!(e.contains("line"), "{e}");
    }

    #[test]
    fn port_out_of_range_names_the_field() {
        let e = errs("services: [{name: a, endpoints: [{address: 127.0.0.1, port: 70000}]}]");
        assert!(e.contains("services[0].endpoints[0].port"), "{e}");
        assert!(e.contains("70000"), "{e}");
        assert_eq!(e.matches("services[0].endpoints[0].port").count(), 1, "{e}");
    }

    #[test]
    fn port_zero_is_rejected() {
        let e = errs("services: [{name: a, endpoints: [{address: 127.0.0.1, port: 0}]}]");
        assert!(e.contains("services[0].endpoints[0].port: port 0"), "{e}");
    }

    #[test]
    fn negative_and_huge_weights_are_rejected() {
        let e =
            errs("services: [{name: a, endpoints: [{address: 127.0.0.1, port: 1, weight: -1}]}]");
        assert!(e.contains("services[0].endpoints[0].weight"), "{e}");
        let e = errs(
            "services: [{name: a, endpoints: [{address: 127.0.0.1, port: 1, weight: 100001}]}]",
        );
        assert!(e.contains("weight 100001 is out of range"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_field() {
        let e = errs("services: [{name: a, endpoints: [{address: 127.0.0.1, port: eighty}]}]");
        assert!(e.contains("services[0].endpoints[0].port"), "{e}");
    }

    #[test]
    fn duplicate_endpoint_is_rejected() {
        let e = errs(
            "services: [{name: a, endpoints: [{address: 127.0.0.1, port: 1}, {address: 127.0.0.1, port: 1}]}]",
        );
        assert!(
            e.contains("services[0].endpoints[1]: duplicate endpoint 127.0.0.1:1"),
            "{e}"
        );
    }

    #[test]
    fn unknown_lb_algorithm_lists_the_known_ones() {
        let e = errs("policies: [{name: p, service: a, lb: fastest}]");
        assert!(e.contains("policies[0].lb"), "{e}");
        assert!(e.contains("unknown variant `fastest`"), "{e}");
        assert!(e.contains("round_robin"), "{e}");
    }

    #[test]
    fn unknown_field_is_rejected() {
        let e =
            errs("services: [{name: a, endpoints: [{address: 127.0.0.1, port: 1, wieght: 3}]}]");
        assert!(e.contains("services[0].endpoints[0]"), "{e}");
        assert!(e.contains("unknown field `wieght`"), "{e}");
        assert_eq!(e.matches("services[0]").count(), 1, "{e}");
    }

    #[test]
    fn host_names_are_not_addresses() {
        let e = errs("services: [{name: a, endpoints: [{address: example.com, port: 1}]}]");
        assert!(e.contains("`example.com` is not an IP address"), "{e}");
    }

    #[test]
    fn every_error_is_reported_not_just_the_first() {
        let e = parse_document(
            "f",
            "services: [{name: -bad, endpoints: [{address: x, port: 0}]}]",
        )
        .unwrap_err();
        assert_eq!(e.0.len(), 3, "{e}");
    }

    #[test]
    fn route_rules_are_checked() {
        let e = errs(
            "routes: [{name: r, service: a, rules: [{match: {path_prefix: api, path_exact: /x}, retries: {attempts: 0, on: [sometimes]}, hash_policy: [{}]}]}]",
        );
        for want in [
            "routes[0].rules[0].match: set at most one",
            "routes[0].rules[0].match.path_prefix: `api` must start with `/`",
            "routes[0].rules[0].retries.attempts",
            "routes[0].rules[0].retries.on[0]: unknown retry condition `sometimes`",
            "routes[0].rules[0].hash_policy[0]: set exactly one",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
    }

    #[test]
    fn regexes_are_checked() {
        let e = errs(
            "routes: [{name: r, service: a, rules: [{match: {path_regex: \"(\", headers: [{name: x, regex: \"a(?=b)\"}]}}]}]",
        );
        assert!(
            e.contains("routes[0].rules[0].match.path_regex: invalid regex `(`"),
            "{e}"
        );
        assert!(
            e.contains("routes[0].rules[0].match.headers[0].regex: invalid regex"),
            "{e}"
        );
        assert_eq!(
            errs(
                "routes: [{name: r, service: a, rules: [{match: {path_regex: \"/v[0-9]+/.*\"}}]}]"
            ),
            ""
        );
    }

    #[test]
    fn single_values_are_checked_with_their_origin() {
        let e = parse_endpoint("/weft/services/a/i1", r#"{"address":"10.0.0.1","port":0}"#)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "/weft/services/a/i1: port: port 0 is not a valid port (use 1-65535)"
        );
        let big = "x".repeat(MAX_VALUE_BYTES + 1);
        assert!(
            parse_endpoint("k", &big)
                .unwrap_err()
                .to_string()
                .contains("limit")
        );
    }

    #[test]
    fn sidecar_policies_parse_with_defaults() {
        let doc = parse_document(
            "f.yaml",
            r#"
routes:
  - name: r
    service: web
    rules:
      - match: {path_prefix: /api}
        rate_limit: {requests: 10, per: 500ms, burst: 20}
policies:
  - name: p
    service: web
    zone_aware: {}
    panic_threshold: 0
    rate_limit: {requests: 5}
    circuit_breakers: {retry_budget: {}}
    outlier_detection: {base_ejection_time: 10s, max_ejection_time: 1m}
"#,
        )
        .unwrap();
        let p = &doc.policies[0];
        assert_eq!(p.zone_aware, Some(ZoneAware::default()));
        let za = p.zone_aware.as_ref().unwrap();
        assert!(za.enabled);
        assert_eq!(za.min_healthy_percent, 70);
        assert_eq!(p.panic_threshold, Some(0));
        let rl = p.rate_limit.as_ref().unwrap();
        assert_eq!(rl.requests, 5);
        assert_eq!(rl.per, std::time::Duration::from_secs(1));
        assert_eq!(rl.max_tokens(), 5);
        let rb = p
            .circuit_breakers
            .as_ref()
            .unwrap()
            .retry_budget
            .as_ref()
            .unwrap();
        assert_eq!((rb.percent, rb.min_concurrency), (20, 3));
        assert_eq!(
            p.outlier_detection.as_ref().unwrap().max_ejection_time,
            Some(std::time::Duration::from_secs(60))
        );
        let rl = doc.routes[0].rules[0].rate_limit.as_ref().unwrap();
        assert_eq!(rl.per, std::time::Duration::from_millis(500));
        assert_eq!(rl.max_tokens(), 20);
    }

    #[test]
    fn sidecar_policies_are_checked() {
        let e = errs(
            r#"
routes:
  - name: r
    service: web
    rules: [{rate_limit: {requests: 0, per: 10ms}}]
policies:
  - name: p
    service: web
    zone_aware: {enabled: false, min_healthy_percent: 101}
    panic_threshold: 150
    rate_limit: {requests: 10, per: 49ms, burst: 9}
    circuit_breakers: {retry_budget: {percent: 200}}
    outlier_detection: {max_ejection_time: 10s}
"#,
        );
        for want in [
            "f.yaml: routes[0].rules[0].rate_limit.requests: must be at least 1",
            "f.yaml: routes[0].rules[0].rate_limit.per: 10ms is less than the minimum of 50ms",
            "f.yaml: policies[0].zone_aware.min_healthy_percent: 101 is out of range 0..=100",
            "f.yaml: policies[0].panic_threshold: 150 is out of range 0..=100",
            "f.yaml: policies[0].rate_limit.per: 49ms is less than the minimum",
            "f.yaml: policies[0].rate_limit.burst: burst 9 is less than requests 10",
            "f.yaml: policies[0].circuit_breakers.retry_budget.percent: 200 is out of range",
            "f.yaml: policies[0].outlier_detection.max_ejection_time: 10s is less than base_ejection_time (30s)",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
        assert_eq!(e.lines().count(), 8, "{e}");
    }

    #[test]
    fn sidecar_policies_reject_unknown_fields() {
        for (text, field) in [
            (
                "policies: [{name: p, service: a, zone_aware: {min_healthy: 5}}]",
                "min_healthy",
            ),
            (
                "policies: [{name: p, service: a, rate_limit: {requests: 1, burts: 2}}]",
                "burts",
            ),
            (
                "policies: [{name: p, service: a, circuit_breakers: {retry_budget: {pct: 1}}}]",
                "pct",
            ),
        ] {
            let e = errs(text);
            assert!(e.contains(&format!("unknown field `{field}`")), "{e}");
        }
        let e = errs("policies: [{name: p, service: a, rate_limit: {per: 1s}}]");
        assert!(e.contains("policies[0].rate_limit"), "{e}");
        assert!(e.contains("missing field `requests`"), "{e}");
    }

    #[test]
    fn lb_algorithm_names_are_the_schema_spelling() {
        for a in LbAlgorithm::ALL {
            let yaml = serde_yaml_ng::to_string(&a).unwrap();
            assert_eq!(yaml.trim(), a.as_str());
            let back: LbAlgorithm = decode("t", a.as_str()).unwrap();
            assert_eq!(back, a);
        }
    }

    #[test]
    fn names() {
        assert!(is_valid_name("echo"));
        assert!(is_valid_name("echo-v2.ns_1"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("-a"));
        assert!(!is_valid_name("a b"));
    }
}
