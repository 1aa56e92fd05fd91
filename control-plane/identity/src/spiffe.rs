//! SPIFFE IDs (`spiffe://<trust-domain>/<path>`) and the workload identity Weft reads from them.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID accepted, as the SPIFFE spec recommends (URIs in certificates are bounded
/// in practice and this keeps log lines and error messages bounded too).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Longest trust domain name (a DNS name's limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a SPIFFE ID Weft can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("`{0}` is not a SPIFFE ID: it must start with `spiffe://`")]
    Scheme(String),
    #[error("SPIFFE ID is {0} bytes long, over the {MAX_SPIFFE_ID_LEN}-byte limit")]
    TooLong(usize),
    #[error("`{0}` has an empty trust domain")]
    EmptyTrustDomain(String),
    #[error(
        "trust domain `{0}` is invalid: use lowercase letters, digits, `.`, `-` and `_` only \
         (no port, user info or upper case), at most {MAX_TRUST_DOMAIN_LEN} characters"
    )]
    InvalidTrustDomain(String),
    #[error("`{0}` has a query or fragment, which SPIFFE IDs must not carry")]
    QueryOrFragment(String),
    #[error(
        "`{id}`: path segment `{segment}` is invalid: segments are non-empty, not `.` or `..`, \
         and use letters, digits, `.`, `-` and `_` only"
    )]
    InvalidSegment { id: String, segment: String },
    #[error("`{0}` ends with `/`")]
    TrailingSlash(String),
    #[error(
        "`{0}` names no workload: expected a path of key/value pairs with `ns/<namespace>` and \
         `svc/<service>` (or Istio's `sa/<service-account>`), e.g. \
         spiffe://example.org/ns/default/svc/web"
    )]
    NoWorkload(String),
    #[error("`{id}`: the path has an odd number of segments; it must be key/value pairs")]
    OddPath { id: String },
    #[error("`{id}`: key `{key}` appears more than once in the path")]
    DuplicateKey { id: String, key: String },
}

/// A trust domain, e.g. `weft.test` (lowercase, validated).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn new(name: &str) -> Result<Self, SpiffeError> {
        // Accept `spiffe://td` too: it is how trust domains are often written in configs.
        let name = name.strip_prefix("spiffe://").unwrap_or(name);
        if name.is_empty() {
            return Err(SpiffeError::EmptyTrustDomain(name.to_string()));
        }
        let valid = name.len() <= MAX_TRUST_DOMAIN_LEN
            && name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if !valid {
            return Err(SpiffeError::InvalidTrustDomain(name.to_string()));
        }
        Ok(Self(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A syntactically valid SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// The path without its leading `/`, split on `/` (empty for `spiffe://td`).
    segments: Vec<String>,
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<Self, SpiffeError> {
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeError::TooLong(s.len()));
        }
        // The scheme is case-insensitive in URIs, but SPIFFE requires lowercase; refusing an
        // upper-case one keeps one spelling per identity.
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeError::Scheme(s.to_string()))?;
        if rest.contains(['?', '#']) {
            return Err(SpiffeError::QueryOrFragment(s.to_string()));
        }
        let (td, path) = match rest.split_once('/') {
            Some((td, path)) => (td, Some(path)),
            None => (rest, None),
        };
        if td.is_empty() {
            return Err(SpiffeError::EmptyTrustDomain(s.to_string()));
        }
        let trust_domain = TrustDomain::new(td)?;
        let mut segments = Vec::new();
        if let Some(path) = path {
            if path.is_empty() || path.ends_with('/') {
                return Err(SpiffeError::TrailingSlash(s.to_string()));
            }
            for seg in path.split('/') {
                let ok = !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
                if !ok {
                    return Err(SpiffeError::InvalidSegment {
                        id: s.to_string(),
                        segment: seg.to_string(),
                    });
                }
                segments.push(seg.to_string());
            }
        }
        Ok(Self {
            trust_domain,
            segments,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path with its leading `/` (empty for a trust domain's own ID).
    pub fn path(&self) -> String {
        self.segments.iter().map(|s| format!("/{s}")).collect()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path())
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A workload's identity: the service `service` in namespace `namespace` of `trust_domain`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub spiffe_id: SpiffeId,
    pub namespace: String,
    pub service: String,
}

impl Identity {
    /// Reads the workload from the path's key/value pairs: `ns/<namespace>` and `svc/<service>`
    /// (Consul: `/ns/default/dc/dc1/svc/web`), or Istio's `sa/<service-account>` standing for
    /// the service when there is no `svc`. Other pairs (`dc`, `ap`, ...) are allowed and ignored.
    pub fn from_spiffe_id(id: SpiffeId) -> Result<Self, SpiffeError> {
        let text = id.to_string();
        if !id.segments.len().is_multiple_of(2) {
            return Err(SpiffeError::OddPath { id: text });
        }
        let (mut ns, mut svc, mut sa) = (None, None, None);
        for pair in id.segments.chunks_exact(2) {
            let slot = match pair[0].as_str() {
                "ns" => &mut ns,
                "svc" => &mut svc,
                "sa" => &mut sa,
                _ => continue,
            };
            if slot.replace(pair[1].clone()).is_some() {
                return Err(SpiffeError::DuplicateKey {
                    id: text,
                    key: pair[0].clone(),
                });
            }
        }
        match (ns, svc.or(sa)) {
            (Some(namespace), Some(service)) => Ok(Self {
                spiffe_id: id,
                namespace,
                service,
            }),
            _ => Err(SpiffeError::NoWorkload(text)),
        }
    }

    pub fn parse(s: &str) -> Result<Self, SpiffeError> {
        Self::from_spiffe_id(SpiffeId::parse(s)?)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        self.spiffe_id.trust_domain()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.spiffe_id.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_consul_istio_and_weft_forms() {
        let w = Identity::parse("spiffe://weft.test/ns/default/svc/web").unwrap();
        assert_eq!(
            (
                w.trust_domain().as_str(),
                w.namespace.as_str(),
                w.service.as_str()
            ),
            ("weft.test", "default", "web")
        );
        let c = Identity::parse("spiffe://1234.consul/ns/default/dc/dc1/svc/api").unwrap();
        assert_eq!(
            (c.namespace.as_str(), c.service.as_str()),
            ("default", "api")
        );
        let i = Identity::parse("spiffe://cluster.local/ns/shop/sa/cart").unwrap();
        assert_eq!((i.namespace.as_str(), i.service.as_str()), ("shop", "cart"));
        assert_eq!(i.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
    }

    #[test]
    fn refuses_malformed_ids_naming_the_problem() {
        let err = |s: &str| SpiffeId::parse(s).unwrap_err();
        assert!(matches!(
            err("https://td/ns/a/svc/b"),
            SpiffeError::Scheme(_)
        ));
        assert!(matches!(err("SPIFFE://td/x"), SpiffeError::Scheme(_)));
        assert!(matches!(
            err("spiffe:///ns/a"),
            SpiffeError::EmptyTrustDomain(_)
        ));
        assert!(matches!(
            err("spiffe://Weft.Test/x"),
            SpiffeError::InvalidTrustDomain(_)
        ));
        assert!(matches!(
            err("spiffe://td:8080/x"),
            SpiffeError::InvalidTrustDomain(_)
        ));
        assert!(matches!(
            err("spiffe://u@td/x"),
            SpiffeError::InvalidTrustDomain(_)
        ));
        assert!(matches!(
            err("spiffe://td/x?y=1"),
            SpiffeError::QueryOrFragment(_)
        ));
        assert!(matches!(
            err("spiffe://td/a//b"),
            SpiffeError::InvalidSegment { .. }
        ));
        assert!(matches!(
            err("spiffe://td/a/../b"),
            SpiffeError::InvalidSegment { .. }
        ));
        assert!(matches!(
            err("spiffe://td/a/b%20c"),
            SpiffeError::InvalidSegment { .. }
        ));
        assert!(matches!(
            err("spiffe://td/a/"),
            SpiffeError::TrailingSlash(_)
        ));
        let long = format!("spiffe://td/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        assert!(matches!(err(&long), SpiffeError::TooLong(_)));
        // The message names the offending part.
        let msg = err("spiffe://td/a/b c").to_string();
        assert!(msg.contains("`b c`"), "{msg}");
    }

    #[test]
    fn workload_needs_namespace_and_service_pairs() {
        let err = |s: &str| Identity::parse(s).unwrap_err();
        assert!(matches!(err("spiffe://td"), SpiffeError::NoWorkload(_)));
        assert!(matches!(
            err("spiffe://td/svc/web"),
            SpiffeError::NoWorkload(_)
        ));
        assert!(matches!(
            err("spiffe://td/ns/default"),
            SpiffeError::NoWorkload(_)
        ));
        assert!(matches!(
            err("spiffe://td/ns/default/svc"),
            SpiffeError::OddPath { .. }
        ));
        assert!(matches!(
            err("spiffe://td/ns/a/ns/b/svc/web"),
            SpiffeError::DuplicateKey { .. }
        ));
        // `svc` wins over `sa` when both are present.
        let both = Identity::parse("spiffe://td/ns/a/sa/runner/svc/web").unwrap();
        assert_eq!(both.service, "web");
    }

    #[test]
    fn trust_domain_accepts_the_spiffe_prefix() {
        assert_eq!(
            TrustDomain::new("spiffe://weft.test").unwrap().as_str(),
            "weft.test"
        );
        assert!(TrustDomain::new("").is_err());
    }
}
