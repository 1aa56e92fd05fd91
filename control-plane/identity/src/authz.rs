//! Which node ids and registered services an identity may use.
//!
//! The rule: the service part of a node id is the text before its first `~` (the whole id when
//! there is none; the sidecar's node id is `<service>~<instance-id>`). It must be
//! `<service>.<namespace>` of the identity, or just `<service>` when the namespace is
//! `default`. A registration's `service` field follows the same rule. So
//! `spiffe://td/ns/default/svc/web` may use node ids `web`, `web~1` and `web.default~1`, and
//! register `web`; `spiffe://td/ns/shop/svc/cart` may use `cart.shop~1` and register
//! `cart.shop`, but not `cart`.

use crate::spiffe::Identity;

/// A request refused because the identity does not own what it names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "identity {identity} may not use {what} `{subject}`: it owns service {} only",
    allowed.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(" or ")
)]
pub struct Denied {
    pub identity: String,
    /// `node id` or `service`.
    pub what: &'static str,
    pub subject: String,
    /// The service names the identity may use.
    pub allowed: Vec<String>,
}

/// The service names `identity` owns, most specific first.
pub fn owned_services(identity: &Identity) -> Vec<String> {
    let mut names = vec![format!("{}.{}", identity.service, identity.namespace)];
    if identity.namespace == "default" {
        names.push(identity.service.clone());
    }
    names
}

/// The service part of a node id: before the first `~`, or all of it.
pub fn node_service(node_id: &str) -> &str {
    node_id.split_once('~').map_or(node_id, |(s, _)| s)
}

/// May `identity` receive config as node `node_id`? See the module docs for the rule.
pub fn authorize_node(identity: &Identity, node_id: &str) -> Result<(), Denied> {
    check(identity, "node id", node_id, node_service(node_id))
}

/// May `identity` register, heartbeat or deregister instances of `service`?
pub fn authorize_service(identity: &Identity, service: &str) -> Result<(), Denied> {
    check(identity, "service", service, service)
}

fn check(identity: &Identity, what: &'static str, subject: &str, name: &str) -> Result<(), Denied> {
    let allowed = owned_services(identity);
    if allowed.iter().any(|a| a == name) {
        Ok(())
    } else {
        Err(Denied {
            identity: identity.to_string(),
            what,
            subject: subject.to_string(),
            allowed,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn id(s: &str) -> Identity {
        Identity::parse(s).unwrap()
    }

    #[test]
    fn default_namespace_may_omit_the_namespace() {
        let web = id("spiffe://weft.test/ns/default/svc/web");
        for ok in [
            "web",
            "web~1",
            "web~a~b",
            "web.default",
            "web.default~pod-1",
        ] {
            assert!(authorize_node(&web, ok).is_ok(), "{ok}");
        }
        for bad in ["api~1", "webx~1", "web.prod~1", "", "~web", "we~b"] {
            assert!(authorize_node(&web, bad).is_err(), "{bad}");
        }
        assert!(authorize_service(&web, "web").is_ok());
        assert!(authorize_service(&web, "web.default").is_ok());
        assert!(authorize_service(&web, "api").is_err());
    }

    #[test]
    fn other_namespaces_must_be_named() {
        let cart = id("spiffe://weft.test/ns/shop/sa/cart");
        assert!(authorize_node(&cart, "cart.shop~1").is_ok());
        assert!(authorize_node(&cart, "cart~1").is_err());
        assert!(authorize_service(&cart, "cart.shop").is_ok());
        assert!(authorize_service(&cart, "cart").is_err());
    }

    #[test]
    fn denial_names_identity_subject_and_what_is_allowed() {
        let web = id("spiffe://weft.test/ns/default/svc/web");
        let msg = authorize_node(&web, "api~1").unwrap_err().to_string();
        assert_eq!(
            msg,
            "identity spiffe://weft.test/ns/default/svc/web may not use node id `api~1`: it owns \
             service `web.default` or `web` only"
        );
    }
}
