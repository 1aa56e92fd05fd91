//! Prometheus metrics of the xDS server (names follow Prometheus conventions).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub variant: &'static str,
    pub service: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    pub variant: &'static str,
    pub type_url: String,
}

/// Why a stream was refused, or ended by a limit (see [`crate::XdsLimits`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub reason: &'static str,
}

/// One sync state of one type (`weft_xds_sync_state_streams`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    pub type_url: String,
    pub state: &'static str,
}

/// One resource of one type.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub type_url: String,
    pub resource: String,
}

#[derive(Clone, Debug)]
pub struct XdsMetrics {
    pub streams: Family<StreamLabels, Gauge>,
    pub streams_total: Family<StreamLabels, Counter>,
    /// Streams currently subscribed to each type (for ADS, one stream counts once per type).
    pub subscribed: Family<TypeLabels, Gauge>,
    pub pushes: Family<TypeLabels, Counter>,
    pub acks: Family<TypeLabels, Counter>,
    pub nacks: Family<TypeLabels, Counter>,
    pub stream_errors: Family<StreamLabels, Counter>,
    pub convergence: Histogram,
    /// Streams refused by the authorizer (mTLS identity does not own the node id).
    pub streams_denied: Counter,
    pub streams_refused: Family<RefusedLabels, Counter>,
    pub requests_throttled: Counter,
    /// Responses made and not yet taken by their streams' HTTP/2 writers: up to 8 in a
    /// stream's queue and the one its task waits to put in.
    pub queued_responses: Gauge,
    /// Connected streams rejecting each resource; a series exists only while one does.
    pub rejected_resources: Family<ResourceLabels, Gauge>,
    /// Resources rejected, by variant and type (a NACK blamed on three resources counts 3).
    pub resource_rejections: Family<TypeLabels, Counter>,
}

impl Default for XdsMetrics {
    fn default() -> Self {
        Self {
            streams: Family::default(),
            streams_total: Family::default(),
            subscribed: Family::default(),
            pushes: Family::default(),
            acks: Family::default(),
            nacks: Family::default(),
            stream_errors: Family::default(),
            // 1 ms .. ~16 s.
            convergence: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            streams_denied: Counter::default(),
            streams_refused: Family::default(),
            requests_throttled: Counter::default(),
            queued_responses: Gauge::default(),
            rejected_resources: Family::default(),
            resource_rejections: Family::default(),
        }
    }
}

impl XdsMetrics {
    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "weft_xds_streams",
            "Connected xDS streams by variant (sotw, delta) and service (ads, cds, eds, lds, rds)",
            self.streams.clone(),
        );
        reg.register(
            "weft_xds_streams_opened",
            "xDS streams opened since start",
            self.streams_total.clone(),
        );
        reg.register(
            "weft_xds_subscribed_streams",
            "Connected streams subscribed to each type URL, by variant",
            self.subscribed.clone(),
        );
        reg.register(
            "weft_xds_pushes",
            "xDS responses sent, by variant and type URL",
            self.pushes.clone(),
        );
        reg.register(
            "weft_xds_acks",
            "xDS responses ACKed by clients",
            self.acks.clone(),
        );
        reg.register(
            "weft_xds_nacks",
            "xDS responses rejected (NACKed) by clients",
            self.nacks.clone(),
        );
        reg.register(
            "weft_xds_stream_errors",
            "xDS streams ended by a protocol error (garbage, unknown type URL)",
            self.stream_errors.clone(),
        );
        reg.register(
            "weft_xds_streams_denied",
            "xDS streams refused because the client's identity does not own the node id",
            self.streams_denied.clone(),
        );
        reg.register(
            "weft_xds_convergence_seconds",
            "Time from a registry change to the client's ACK of the response carrying it",
            self.convergence.clone(),
        );
        reg.register(
            "weft_xds_streams_refused",
            "xDS streams refused or ended by a limit, by reason (max_streams, node_too_large, \
             request_too_large, too_many_subscriptions)",
            self.streams_refused.clone(),
        );
        reg.register(
            "weft_xds_requests_throttled",
            "xDS requests read late because their stream was over its request rate",
            self.requests_throttled.clone(),
        );
        reg.register(
            "weft_xds_queued_responses",
            "xDS responses waiting in streams' send queues, with the one a blocked stream holds (at most 9 per stream)",
            self.queued_responses.clone(),
        );
        reg.register(
            "weft_xds_rejected_resources",
            "Connected xDS clients currently rejecting each resource, by type URL and resource \
             name (a series exists only while some client rejects the resource)",
            self.rejected_resources.clone(),
        );
        reg.register(
            "weft_xds_resource_rejections",
            "Resources rejected by xDS clients, by variant and type URL (one NACK blamed on \
             three resources counts three)",
            self.resource_rejections.clone(),
        );
    }
}
