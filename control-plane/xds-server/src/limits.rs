//! Limits that keep one client (buggy, hostile or just large) from taking the control plane's
//! memory or CPU from the others. Defaults are what operators of Istio and Envoy expect; each
//! field says why.

use std::time::{Duration, Instant};

/// Every limit of the xDS server. Stream-level limits are enforced by the server
/// ([`crate::XdsServer::with_limits`]); connection-level ones by the gRPC transport, through
/// [`XdsLimits::configure`].
#[derive(Debug, Clone, PartialEq)]
pub struct XdsLimits {
    /// Largest request message. 4 MiB is gRPC's default everywhere (and tonic's); an xDS
    /// request is a few hundred bytes, or a few hundred KiB for an Envoy that lists every
    /// endpoint name it wants.
    pub max_request_bytes: usize,
    /// HTTP/2 concurrent streams per connection. 100 is the HTTP/2 spec's recommended minimum
    /// and what Go's and nginx's servers advertise; an Envoy opens one ADS stream per
    /// connection, so only a client multiplexing many identities on one connection hits it.
    pub max_streams_per_connection: u32,
    /// Open xDS streams in total. At about 20 KiB per idle stream (BENCHMARKS.md), 100,000 is
    /// ~2 GiB: above it a replica is better refusing (clients retry another replica) than
    /// being OOM-killed and dropping every stream at once.
    pub max_streams: usize,
    /// Requests a stream may send per second once its burst is spent; 0 is no limit. An Envoy
    /// in steady state sends one request per response (the ACK), a few per second at most.
    pub requests_per_second: u32,
    /// Requests a stream may send at once. Envoy sends a burst at startup (one request per
    /// type, then one EDS/RDS subscription change per cluster/listener it learns), so it is
    /// generous: only a client looping on requests runs out.
    pub request_burst: u32,
    /// Largest encoded `Node` in a stream's first request. Envoy's node with Istio-style
    /// metadata is a few KiB; 64 KiB leaves room and still bounds what `/debug/clients` and
    /// the classifier see.
    pub max_node_bytes: usize,
    /// Resource names a stream may be subscribed to, across all types (wildcard counts as
    /// none). 10,000 covers an Envoy asking for every cluster of a large mesh by name.
    pub max_subscriptions: usize,
    /// HTTP/2 keepalive ping interval; `None` disables. Detects dead peers on idle streams:
    /// proxies and NATs otherwise hold half-open streams forever.
    pub keepalive_interval: Option<Duration>,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// After this, a connection is sent GOAWAY so its client reconnects, possibly to another
    /// replica: without it, streams stay on the replicas that were up first forever (a new
    /// replica gets no clients). `None` disables. 30 minutes, as istiod's
    /// `--keepaliveMaxServerConnectionAge`.
    pub max_connection_age: Option<Duration>,
    /// How long streams get to finish after the GOAWAY before the connection is closed.
    /// xDS streams never finish on their own, so this is when the client must reconnect.
    /// 10 s, as gRPC-Go's and istiod's default grace.
    pub max_connection_age_grace: Duration,
}

impl Default for XdsLimits {
    fn default() -> Self {
        Self {
            max_request_bytes: 4 * 1024 * 1024,
            max_streams_per_connection: 100,
            max_streams: 100_000,
            requests_per_second: 100,
            request_burst: 1_000,
            max_node_bytes: 64 * 1024,
            max_subscriptions: 10_000,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_timeout: Duration::from_secs(10),
            max_connection_age: Some(Duration::from_secs(30 * 60)),
            max_connection_age_grace: Duration::from_secs(10),
        }
    }
}

impl XdsLimits {
    /// Applies the connection-level limits to the gRPC server that serves xDS, so that the
    /// binary and the tests configure the transport the same way.
    ///
    /// tonic applies one fixed age to every connection: there is no per-connection jitter, so
    /// clients that connected together (after a restart) reconnect together, once per age.
    pub fn configure<L>(&self, server: tonic::transport::Server<L>) -> tonic::transport::Server<L> {
        let server = server
            .max_concurrent_streams(self.max_streams_per_connection)
            .http2_keepalive_interval(self.keepalive_interval)
            .http2_keepalive_timeout(Some(self.keepalive_timeout));
        match self.max_connection_age {
            Some(age) => server
                .max_connection_age(age)
                .max_connection_age_grace(self.max_connection_age_grace),
            None => server,
        }
    }
}

/// A per-stream token bucket on requests.
///
/// When it is empty the stream stops reading requests instead of ending: the unread requests
/// stay in HTTP/2 flow control (bounded by the stream window), which pushes back on the
/// client, and a client that is merely bursty (an Envoy learning a large mesh) keeps its
/// stream and converges a little later. Ending the stream would make it reconnect and send
/// the same burst again.
#[derive(Debug)]
pub(crate) struct RequestBucket {
    /// Tokens per second; `None` is no limit.
    rate: Option<f64>,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RequestBucket {
    pub(crate) fn new(limits: &XdsLimits, now: Instant) -> Self {
        let burst = f64::from(limits.request_burst.max(1));
        Self {
            rate: (limits.requests_per_second > 0).then(|| f64::from(limits.requests_per_second)),
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(rate) = self.rate {
            let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * rate).min(self.burst);
        }
        self.last = now;
    }

    /// How long until a request may be read; `None` if one may be read now.
    pub(crate) fn wait(&mut self, now: Instant) -> Option<Duration> {
        let rate = self.rate?;
        self.refill(now);
        (self.tokens < 1.0).then(|| Duration::from_secs_f64((1.0 - self.tokens) / rate))
    }

    /// Spends a token for a request just read.
    pub(crate) fn take(&mut self, now: Instant) {
        if self.rate.is_some() {
            self.refill(now);
            self.tokens = (self.tokens - 1.0).max(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let limits = XdsLimits {
            requests_per_second: 10,
            request_burst: 3,
            ..XdsLimits::default()
        };
        let t0 = Instant::now();
        let mut b = RequestBucket::new(&limits, t0);
        for _ in 0..3 {
            assert_eq!(b.wait(t0), None);
            b.take(t0);
        }
        let w = b.wait(t0).map(|d| d.as_millis());
        assert_eq!(w, Some(100));
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.wait(t1), None);
        b.take(t1);
        assert!(b.wait(t1).is_some());
        // Idle time refills up to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(b.wait(t2), None);
            b.take(t2);
        }
        assert!(b.wait(t2).is_some());
    }

    #[test]
    fn zero_rate_is_no_limit() {
        let limits = XdsLimits {
            requests_per_second: 0,
            ..XdsLimits::default()
        };
        let t0 = Instant::now();
        let mut b = RequestBucket::new(&limits, t0);
        for _ in 0..10_000 {
            b.take(t0);
        }
        assert_eq!(b.wait(t0), None);
    }
}
