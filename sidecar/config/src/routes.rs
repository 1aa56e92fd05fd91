//! RouteConfiguration -> compiled route table, and request matching.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
use envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
use envoy_types::pb::envoy::config::route::v3::route::Action;
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
use envoy_types::pb::envoy::config::route::v3::route_action::hash_policy::PolicySpecifier;
use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, Route, RouteConfiguration, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher};
use envoy_types::pb::google::protobuf::Any;
use regex::Regex;

use crate::util::{duration, err, unpack};
use crate::{
    ConfigError, HashOn, HashPolicy, LOCAL_RATE_LIMIT_FILTER, NoRoute, RequestInfo, RetryConfig,
    RetryOn, RouteDecision, TokenBucketConfig,
};

/// Envoy's `num_retries` when a retry policy leaves it unset.
const DEFAULT_NUM_RETRIES: u32 = 1;
/// Envoy's `tokens_per_fill` when unset.
const DEFAULT_TOKENS_PER_FILL: u32 = 1;
const GRPC_RETRY_ON: &[&str] = &[
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

#[derive(Debug, Clone, Default)]
pub(crate) struct Table {
    vhosts: Vec<VHost>,
    /// Lower-cased domain -> virtual host index.
    exact: HashMap<String, usize>,
    /// `*.example.com` stored as `.example.com`, longest first.
    suffixes: Vec<(String, usize)>,
    /// `svc:*` stored as `svc:`, longest first.
    prefixes: Vec<(String, usize)>,
    /// The `*` virtual host.
    any: Option<usize>,
}

#[derive(Debug, Clone)]
struct VHost {
    name: String,
    routes: Vec<CompiledRoute>,
    rate_limit: Option<TokenBucketConfig>,
}

#[derive(Debug, Clone)]
struct CompiledRoute {
    index: usize,
    path: PathMatch,
    case_sensitive: bool,
    grpc_only: bool,
    headers: Vec<HeaderCond>,
    target: Target,
    timeout: Option<Duration>,
    retry: Option<RetryConfig>,
    hash_policies: Vec<HashPolicy>,
    rate_limit: Option<TokenBucketConfig>,
}

#[derive(Debug, Clone)]
enum PathMatch {
    Prefix(String),
    Exact(String),
    /// `path_separated_prefix`: the prefix itself or the prefix followed by `/`.
    Segments(String),
    Regex(Regex),
}

#[derive(Debug, Clone)]
enum Target {
    Cluster(String),
    Weighted {
        clusters: Vec<(String, u64)>,
        total: u64,
    },
}

#[derive(Debug, Clone)]
enum HeaderSource {
    Method,
    Authority,
    Path,
    Named(http::HeaderName),
}

#[derive(Debug, Clone)]
struct HeaderCond {
    source: HeaderSource,
    test: ValueTest,
    invert: bool,
    missing_as_empty: bool,
}

#[derive(Debug, Clone)]
enum ValueTest {
    Present(bool),
    Range {
        start: i64,
        end: i64,
    },
    Str {
        pattern: StrPattern,
        ignore_case: bool,
    },
}

#[derive(Debug, Clone)]
enum StrPattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(Regex),
}

impl Table {
    pub(crate) fn build(rc: &RouteConfiguration) -> Result<Table, ConfigError> {
        let mut t = Table::default();
        let mut names = BTreeSet::new();
        let mut suffixes = HashMap::new();
        let mut prefixes = HashMap::new();
        for vh in &rc.virtual_hosts {
            let res = format!("route_config {} virtual_host {}", rc.name, vh.name);
            if vh.name.is_empty() {
                return Err(err(
                    &format!("route_config {}", rc.name),
                    "a virtual host has no name",
                ));
            }
            // Rate-limit keys and `/debug/config` identify virtual hosts by name.
            if !names.insert(vh.name.clone()) {
                return Err(err(&res, "virtual host name is used twice"));
            }
            if vh.domains.is_empty() {
                return Err(err(&res, "has no domains"));
            }
            let idx = t.vhosts.len();
            for d in &vh.domains {
                let domain = d.to_ascii_lowercase();
                let dup = if domain.is_empty() {
                    return Err(err(&res, "has an empty domain"));
                } else if domain == "*" {
                    t.any.replace(idx).is_some()
                } else if let Some(s) = domain.strip_prefix('*') {
                    suffixes.insert(s.to_string(), idx).is_some()
                } else if let Some(p) = domain.strip_suffix('*') {
                    prefixes.insert(p.to_string(), idx).is_some()
                } else {
                    t.exact.insert(domain, idx).is_some()
                };
                if dup {
                    return Err(err(
                        &res,
                        format!("domain {d:?} is also claimed by another virtual host"),
                    ));
                }
            }
            t.vhosts.push(compile_vhost(rc, vh, &res)?);
        }
        t.suffixes = longest_first(suffixes);
        t.prefixes = longest_first(prefixes);
        Ok(t)
    }

    pub(crate) fn virtual_hosts(&self) -> Vec<String> {
        self.vhosts.iter().map(|v| v.name.clone()).collect()
    }

    fn find_vhost(&self, authority: &str) -> Option<&VHost> {
        let host = authority.to_ascii_lowercase();
        if let Some(&i) = self.exact.get(&host) {
            return self.vhosts.get(i);
        }
        // `svc:*` before any other wildcard, so a service's own name beats a catch-all host
        // pattern another route claimed.
        if let Some((name, port)) = host.rsplit_once(':')
            && !name.is_empty()
            && !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
        {
            let key = format!("{name}:");
            if let Some((_, i)) = self.prefixes.iter().find(|(p, _)| *p == key) {
                return self.vhosts.get(*i);
            }
        }
        // As Envoy: the wildcard must stand for at least one character.
        let found = self
            .suffixes
            .iter()
            .find(|(s, _)| host.len() > s.len() && host.ends_with(s.as_str()))
            .or_else(|| {
                self.prefixes
                    .iter()
                    .find(|(p, _)| host.len() > p.len() && host.starts_with(p.as_str()))
            })
            .map(|(_, i)| *i)
            .or(self.any)?;
        self.vhosts.get(found)
    }

    pub(crate) fn route(
        &self,
        req: &RequestInfo<'_>,
        weighted_pick: u64,
    ) -> Result<RouteDecision, NoRoute> {
        let vh = self
            .find_vhost(req.authority)
            .ok_or_else(|| NoRoute::UnknownAuthority(req.authority.to_string()))?;
        let r = vh
            .routes
            .iter()
            .find(|r| r.matches(req))
            .ok_or_else(|| NoRoute::NoMatch(vh.name.clone()))?;
        let cluster = match &r.target {
            Target::Cluster(c) => c.clone(),
            Target::Weighted { clusters, total } => pick_weighted(clusters, *total, weighted_pick),
        };
        let (rate_limit, rate_limit_key) = match (&r.rate_limit, &vh.rate_limit) {
            (Some(rl), _) => (
                Some(rl.clone()),
                Some(format!("route/{}/{}", vh.name, r.index)),
            ),
            (None, Some(rl)) => (Some(rl.clone()), Some(format!("vh/{}", vh.name))),
            (None, None) => (None, None),
        };
        Ok(RouteDecision {
            virtual_host: vh.name.clone(),
            cluster,
            timeout: r.timeout,
            retry: r.retry.clone(),
            hash_policies: r.hash_policies.clone(),
            rate_limit,
            rate_limit_key,
        })
    }
}

fn longest_first(m: HashMap<String, usize>) -> Vec<(String, usize)> {
    let mut v: Vec<_> = m.into_iter().collect();
    // Ties cannot share a string, so the order is total and deterministic.
    v.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
    v
}

fn pick_weighted(clusters: &[(String, u64)], total: u64, pick: u64) -> String {
    let mut x = pick % total.max(1);
    for (name, w) in clusters {
        if x < *w {
            return name.clone();
        }
        x -= w;
    }
    // Unreachable while weights sum to `total`; the last cluster is the safe answer.
    clusters.last().map(|(n, _)| n.clone()).unwrap_or_default()
}

impl CompiledRoute {
    fn matches(&self, req: &RequestInfo<'_>) -> bool {
        let path_ok = match &self.path {
            PathMatch::Regex(re) => re.is_match(req.path),
            _ if self.case_sensitive => self.path_matches(req.path),
            _ => self.path_matches(&req.path.to_ascii_lowercase()),
        };
        if !path_ok {
            return false;
        }
        if self.grpc_only && !is_grpc(req.headers) {
            return false;
        }
        self.headers.iter().all(|h| h.matches(req))
    }

    fn path_matches(&self, path: &str) -> bool {
        match &self.path {
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Exact(p) => path == p,
            PathMatch::Segments(p) => path
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
            PathMatch::Regex(re) => re.is_match(path),
        }
    }
}

fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

impl HeaderCond {
    /// Envoy's semantics: multiple values are joined with `,`; a missing header matches only
    /// `present_match` tests (with inversion applying to them), never an inverted value test.
    fn matches(&self, req: &RequestInfo<'_>) -> bool {
        let value: Option<String> = match &self.source {
            HeaderSource::Method => Some(req.method.as_str().to_string()),
            HeaderSource::Authority => Some(req.authority.to_string()),
            HeaderSource::Path => Some(req.path.to_string()),
            HeaderSource::Named(name) => {
                let vals: Vec<String> = req
                    .headers
                    .get_all(name)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect();
                (!vals.is_empty()).then(|| vals.join(","))
            }
        };
        let value = match (value, self.missing_as_empty) {
            (Some(v), _) => v,
            (None, true) => String::new(),
            (None, false) => {
                return match self.test {
                    ValueTest::Present(present) => present == self.invert,
                    _ => false,
                };
            }
        };
        let hit = match &self.test {
            ValueTest::Present(present) => *present,
            ValueTest::Range { start, end } => {
                value.parse::<i64>().is_ok_and(|v| *start <= v && v < *end)
            }
            ValueTest::Str {
                pattern,
                ignore_case,
            } => {
                let v = if *ignore_case && !matches!(pattern, StrPattern::Regex(_)) {
                    value.to_lowercase()
                } else {
                    value
                };
                match pattern {
                    StrPattern::Exact(s) => v == *s,
                    StrPattern::Prefix(s) => v.starts_with(s.as_str()),
                    StrPattern::Suffix(s) => v.ends_with(s.as_str()),
                    StrPattern::Contains(s) => v.contains(s.as_str()),
                    StrPattern::Regex(re) => re.is_match(&v),
                }
            }
        };
        hit != self.invert
    }
}

fn compile_vhost(
    rc: &RouteConfiguration,
    vh: &VirtualHost,
    res: &str,
) -> Result<VHost, ConfigError> {
    let rate_limit = rate_limit(&vh.typed_per_filter_config, res)?;
    let mut routes = Vec::with_capacity(vh.routes.len());
    for (i, r) in vh.routes.iter().enumerate() {
        let rres = format!(
            "route_config {} virtual_host {} route {i}",
            rc.name, vh.name
        );
        routes.push(compile_route(vh, r, i, &rres)?);
    }
    Ok(VHost {
        name: vh.name.clone(),
        routes,
        rate_limit,
    })
}

fn compile_route(
    vh: &VirtualHost,
    r: &Route,
    index: usize,
    res: &str,
) -> Result<CompiledRoute, ConfigError> {
    let m = r.r#match.as_ref().ok_or_else(|| err(res, "has no match"))?;
    // Conditions the sidecar cannot evaluate would otherwise silently widen the match.
    let unsupported = [
        ("query_parameters", !m.query_parameters.is_empty()),
        ("cookies", !m.cookies.is_empty()),
        ("runtime_fraction", m.runtime_fraction.is_some()),
        ("tls_context", m.tls_context.is_some()),
        ("dynamic_metadata", !m.dynamic_metadata.is_empty()),
        ("filter_state", !m.filter_state.is_empty()),
    ];
    if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
        return Err(err(res, format!("match.{field} is not supported")));
    }
    let case_sensitive = m.case_sensitive.is_none_or(|b| b.value);
    let fold = |s: &str| {
        if case_sensitive {
            s.to_string()
        } else {
            s.to_ascii_lowercase()
        }
    };
    let path = match &m.path_specifier {
        Some(PathSpecifier::Prefix(p)) => PathMatch::Prefix(fold(p)),
        Some(PathSpecifier::Path(p)) => PathMatch::Exact(fold(p)),
        Some(PathSpecifier::PathSeparatedPrefix(p)) => PathMatch::Segments(fold(p)),
        Some(PathSpecifier::SafeRegex(re)) => PathMatch::Regex(regex(re, res, "match.safe_regex")?),
        Some(_) => return Err(err(res, "match path specifier is not supported")),
        None => return Err(err(res, "match has no path specifier")),
    };
    let headers = m
        .headers
        .iter()
        .enumerate()
        .map(|(i, h)| header_cond(h, res, &format!("match.headers[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;

    let action = match &r.action {
        Some(Action::Route(a)) => a,
        Some(_) => {
            return Err(err(
                res,
                "action is not a route to a cluster (redirects, direct responses and filter actions are not supported)",
            ));
        }
        None => return Err(err(res, "has no action")),
    };
    let target = match &action.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) if !c.is_empty() => Target::Cluster(c.clone()),
        Some(ClusterSpecifier::Cluster(_)) => return Err(err(res, "cluster name is empty")),
        Some(ClusterSpecifier::WeightedClusters(wc)) => {
            let mut clusters = Vec::with_capacity(wc.clusters.len());
            for cw in &wc.clusters {
                if cw.name.is_empty() {
                    return Err(err(
                        res,
                        "weighted_clusters entry has no cluster name (cluster_header is not supported)",
                    ));
                }
                clusters.push((cw.name.clone(), u64::from(cw.weight.map_or(0, |w| w.value))));
            }
            let total: u64 = clusters.iter().map(|(_, w)| *w).sum();
            if total == 0 {
                return Err(err(res, "weighted_clusters weights sum to 0"));
            }
            Target::Weighted { clusters, total }
        }
        Some(_) => {
            return Err(err(
                res,
                "cluster specifier is not cluster or weighted_clusters",
            ));
        }
        None => return Err(err(res, "route action names no cluster")),
    };
    let timeout = match &action.timeout {
        Some(d) => Some(duration(d, res, "timeout")?).filter(|d| !d.is_zero()),
        // Unlike Envoy's 15s default, no deadline (as Linkerd): a default deadline would cut
        // every long-lived gRPC stream through the sidecar. Routes that want one say so.
        None => None,
    };
    // As Envoy: a route's retry policy replaces its virtual host's, it is not merged.
    let retry = match action.retry_policy.as_ref().or(vh.retry_policy.as_ref()) {
        Some(rp) => Some(retry(rp, res)?),
        None => None,
    };
    let mut hash_policies = Vec::with_capacity(action.hash_policy.len());
    for (i, hp) in action.hash_policy.iter().enumerate() {
        let on = match &hp.policy_specifier {
            Some(PolicySpecifier::Header(h)) => {
                let name =
                    http::HeaderName::from_bytes(h.header_name.as_bytes()).map_err(|_| {
                        err(
                            res,
                            format!(
                                "hash_policy[{i}] header {:?} is not a header name",
                                h.header_name
                            ),
                        )
                    })?;
                HashOn::Header {
                    name: name.as_str().to_string(),
                }
            }
            Some(PolicySpecifier::Cookie(c)) => HashOn::Cookie {
                name: c.name.clone(),
            },
            Some(PolicySpecifier::ConnectionProperties(cp)) if cp.source_ip => HashOn::SourceIp,
            // Hashes nothing in Envoy either.
            Some(PolicySpecifier::ConnectionProperties(_)) => continue,
            _ => {
                return Err(err(
                    res,
                    format!("hash_policy[{i}] is not a header, cookie or source_ip policy"),
                ));
            }
        };
        hash_policies.push(HashPolicy {
            on,
            terminal: hp.terminal,
        });
    }
    Ok(CompiledRoute {
        index,
        path,
        case_sensitive,
        grpc_only: m.grpc.is_some(),
        headers,
        target,
        timeout,
        retry,
        hash_policies,
        rate_limit: rate_limit(&r.typed_per_filter_config, res)?,
    })
}

/// Envoy's `safe_regex` matches the whole value, as RE2's FullMatch.
fn regex(re: &RegexMatcher, res: &str, field: &str) -> Result<Regex, ConfigError> {
    Regex::new(&format!("^(?:{})$", re.regex))
        .map_err(|e| err(res, format!("{field} {:?} does not compile: {e}", re.regex)))
}

#[allow(deprecated)] // the legacy matcher fields are still valid xDS and read as such
fn header_cond(h: &HeaderMatcher, res: &str, field: &str) -> Result<HeaderCond, ConfigError> {
    let source = match h.name.as_str() {
        ":method" => HeaderSource::Method,
        ":authority" | "host" => HeaderSource::Authority,
        ":path" => HeaderSource::Path,
        n if n.starts_with(':') => {
            return Err(err(
                res,
                format!("{field} pseudo-header {n} is not supported"),
            ));
        }
        n => HeaderSource::Named(
            http::HeaderName::from_bytes(n.as_bytes())
                .map_err(|_| err(res, format!("{field} name {n:?} is not a header name")))?,
        ),
    };
    let str_test = |pattern: StrPattern| ValueTest::Str {
        pattern,
        ignore_case: false,
    };
    let test = match &h.header_match_specifier {
        Some(HeaderMatchSpecifier::StringMatch(sm)) => string_matcher(sm, res, field)?,
        Some(HeaderMatchSpecifier::PresentMatch(p)) => ValueTest::Present(*p),
        Some(HeaderMatchSpecifier::RangeMatch(r)) => ValueTest::Range {
            start: r.start,
            end: r.end,
        },
        Some(HeaderMatchSpecifier::ExactMatch(s)) => str_test(StrPattern::Exact(s.clone())),
        Some(HeaderMatchSpecifier::PrefixMatch(s)) => str_test(StrPattern::Prefix(s.clone())),
        Some(HeaderMatchSpecifier::SuffixMatch(s)) => str_test(StrPattern::Suffix(s.clone())),
        Some(HeaderMatchSpecifier::ContainsMatch(s)) => str_test(StrPattern::Contains(s.clone())),
        Some(HeaderMatchSpecifier::SafeRegexMatch(re)) => {
            str_test(StrPattern::Regex(regex(re, res, field)?))
        }
        // Envoy: a matcher with no specifier only asks for the header to be present.
        None => ValueTest::Present(true),
    };
    Ok(HeaderCond {
        source,
        test,
        invert: h.invert_match,
        missing_as_empty: h.treat_missing_header_as_empty,
    })
}

fn string_matcher(sm: &StringMatcher, res: &str, field: &str) -> Result<ValueTest, ConfigError> {
    let ic = sm.ignore_case;
    let fold = |s: &str| if ic { s.to_lowercase() } else { s.to_string() };
    let pattern = match &sm.match_pattern {
        Some(MatchPattern::Exact(s)) => StrPattern::Exact(fold(s)),
        Some(MatchPattern::Prefix(s)) => StrPattern::Prefix(fold(s)),
        Some(MatchPattern::Suffix(s)) => StrPattern::Suffix(fold(s)),
        Some(MatchPattern::Contains(s)) => StrPattern::Contains(fold(s)),
        Some(MatchPattern::SafeRegex(re)) => StrPattern::Regex(regex(re, res, field)?),
        Some(_) => return Err(err(res, format!("{field} string matcher is not supported"))),
        None => return Err(err(res, format!("{field} string matcher has no pattern"))),
    };
    Ok(ValueTest::Str {
        pattern,
        ignore_case: ic,
    })
}

fn retry(
    rp: &envoy_types::pb::envoy::config::route::v3::RetryPolicy,
    res: &str,
) -> Result<RetryConfig, ConfigError> {
    let mut on = RetryOn::default();
    for cond in rp
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        match cond {
            "5xx" => on.server_error_5xx = true,
            "gateway-error" => on.gateway_error = true,
            "reset" => on.reset = true,
            "connect-failure" => on.connect_failure = true,
            "retriable-4xx" => on.retriable_4xx = true,
            "refused-stream" => on.refused_stream = true,
            g if GRPC_RETRY_ON.contains(&g) => {
                if !on.grpc_statuses.iter().any(|s| s == g) {
                    on.grpc_statuses.push(g.to_string());
                }
            }
            other => {
                return Err(err(
                    res,
                    format!("retry_policy.retry_on condition {other:?} is not supported"),
                ));
            }
        }
    }
    let per_try_timeout = match &rp.per_try_timeout {
        Some(d) => Some(duration(d, res, "retry_policy.per_try_timeout")?).filter(|d| !d.is_zero()),
        None => None,
    };
    Ok(RetryConfig {
        num_retries: rp.num_retries.map_or(DEFAULT_NUM_RETRIES, |n| n.value),
        per_try_timeout,
        retry_on: on,
    })
}

fn rate_limit(
    per_filter: &HashMap<String, Any>,
    res: &str,
) -> Result<Option<TokenBucketConfig>, ConfigError> {
    let Some(any) = per_filter.get(LOCAL_RATE_LIMIT_FILTER) else {
        return Ok(None);
    };
    let field = format!("typed_per_filter_config[{LOCAL_RATE_LIMIT_FILTER}]");
    let lrl: LocalRateLimit = unpack(any, res, &field)?;
    // Descriptor-based limits need the rate-limit actions the sidecar does not evaluate.
    if !lrl.descriptors.is_empty() {
        return Err(err(res, format!("{field}: descriptors are not supported")));
    }
    // Envoy defaults both fractions to 0% (never limit); the translation's contract is that
    // the token bucket alone turns the limit on, so only an explicit 0% turns it off here.
    let off = |f: &Option<RuntimeFractionalPercent>| {
        f.as_ref()
            .is_some_and(|f| f.default_value.is_none_or(|v| v.numerator == 0))
    };
    if off(&lrl.filter_enabled) || off(&lrl.filter_enforced) {
        return Ok(None);
    }
    let Some(tb) = lrl.token_bucket else {
        return Ok(None);
    };
    if tb.max_tokens == 0 {
        return Err(err(res, format!("{field}: token_bucket.max_tokens is 0")));
    }
    let tokens_per_fill = tb
        .tokens_per_fill
        .map_or(DEFAULT_TOKENS_PER_FILL, |v| v.value);
    if tokens_per_fill == 0 {
        return Err(err(
            res,
            format!("{field}: token_bucket.tokens_per_fill is 0"),
        ));
    }
    let fill_interval = match &tb.fill_interval {
        Some(d) => duration(d, res, &format!("{field}: token_bucket.fill_interval"))?,
        None => Duration::ZERO,
    };
    if fill_interval.is_zero() {
        return Err(err(
            res,
            format!("{field}: token_bucket.fill_interval must be greater than zero"),
        ));
    }
    Ok(Some(TokenBucketConfig {
        max_tokens: tb.max_tokens,
        tokens_per_fill,
        fill_interval,
    }))
}
