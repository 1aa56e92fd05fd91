//! Which kind of xDS client is asking, decided from its Node.

use std::fmt;

use envoy_types::pb::envoy::config::core::v3::Node;

/// The feature set a client accepts. Resources are built per flavour because the two NACK
/// different things: Envoy rejects `api_listener` listeners over LDS, gRPC rejects MAGLEV,
/// LEAST_REQUEST and listeners without an `api_listener`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Flavor {
    /// An Envoy proxy (the sidecar or an edge proxy).
    Envoy,
    /// A proxyless gRPC client (`xds:///` targets): grpc C-core and its wrappers, grpc-js,
    /// grpc-go, grpc-java.
    Grpc,
}

/// The client feature every gRPC xDS client sets and Envoy never does.
const GRPC_ONLY_FEATURE: &str = "envoy.lb.does_not_support_overprovisioning";

impl Flavor {
    pub const ALL: [Flavor; 2] = [Flavor::Envoy, Flavor::Grpc];

    pub fn as_str(self) -> &'static str {
        match self {
            Flavor::Envoy => "envoy",
            Flavor::Grpc => "grpc",
        }
    }

    /// Decides from the xDS Node which resources a client can accept.
    ///
    /// Real gRPC clients name themselves `gRPC C-core linux Python`, `gRPC Node Pure JS`,
    /// `gRPC Go`, `gRPC Java`, so the match is case-insensitive. A client that says nothing is
    /// taken for Envoy: sending Envoy resources to an unknown gRPC client fails loudly (NACK),
    /// while sending api_listeners to an Envoy would leave it without a listener.
    pub fn classify(node: Option<&Node>) -> Flavor {
        let Some(node) = node else {
            return Flavor::Envoy;
        };
        let agent = node.user_agent_name.to_ascii_lowercase();
        if agent == "envoy" {
            return Flavor::Envoy;
        }
        if agent.contains("grpc") {
            return Flavor::Grpc;
        }
        if node.client_features.iter().any(|f| f == GRPC_ONLY_FEATURE) {
            return Flavor::Grpc;
        }
        Flavor::Envoy
    }
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
