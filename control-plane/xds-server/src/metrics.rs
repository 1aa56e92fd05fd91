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
            "weft_xds_convergence_seconds",
            "Time from a registry change to the client's ACK of the response carrying it",
            self.convergence.clone(),
        );
    }
}
