//! The in-tree xDS load client behind `weft-bench-xds`: M simulated Envoys on ADS.
//!
//! What it does: each client has its own HTTP/2 connection (from its own 127.x.y.z source
//! address, so 10,000 clients plus reconnects never run out of ephemeral ports), says it is
//! Envoy (`user_agent_name: envoy`, which makes the control plane serve it the `envoy`
//! flavour), subscribes to every Cluster (wildcard CDS) and to the ClusterLoadAssignment of
//! every cluster it got, and ACKs each response the way Envoy does: SotW with the response's
//! `version_info` and nonce (EDS ACKs carrying the full name list), Delta with the nonce and
//! subscribe/unsubscribe increments. Per response it records when it arrived, when the ACK
//! went out, its protobuf-encoded size and whether it carried the name the driver watches.
//!
//! What it does not do: decode or validate the resources beyond their names (Envoy would; the
//! control plane's cost does not depend on it), follow LDS/RDS, or reconnect. Responses are
//! read into [`LightSotw`] / [`LightDelta`], which keep each resource as undecoded bytes: the
//! load client shares the machine with the control plane, and decoding every resource of
//! every response for 1,000 clients would measure the client, not the control plane.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use hyper_util::rt::TokioIo;
use prost::Message;
use serde::Serialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// The xDS protocol variant a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    Sotw,
    Delta,
}

impl Variant {
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Sotw => "sotw",
            Variant::Delta => "delta",
        }
    }
}

/// The resource type of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kind {
    Cds,
    Eds,
}

/// One response as a client saw it.
#[derive(Debug, Clone, Copy)]
pub struct Record {
    pub kind: Kind,
    pub arrived: Instant,
    /// When the ACK (or NACK) was queued on the stream.
    pub acked: Instant,
    /// Protobuf-encoded size of the response message (gRPC and HTTP/2 framing excluded).
    pub bytes: u32,
    pub resources: u32,
    pub removed: u32,
    /// Carried the resource the driver was watching when it arrived.
    pub watched: bool,
}

/// What the driver is waiting for: the first response of `kind` carrying `name`.
#[derive(Debug, Clone)]
struct Watch {
    epoch: u64,
    kind: Kind,
    name: String,
}

/// State shared by every client of a fleet.
#[derive(Debug, Default)]
pub struct Shared {
    watch: RwLock<Option<Watch>>,
    /// Clients that ACKed a response carrying the current watch.
    watched_acks: AtomicU64,
    /// Responses and their bytes, over all clients (for pushes per second).
    pub responses: AtomicU64,
    pub bytes: AtomicU64,
    /// Streams that failed before syncing and were opened again (see [`Fleet::start`]).
    pub retries: AtomicU64,
    /// Keep per-response records (off during churn, where only the counters matter).
    pub record: AtomicBool,
    /// Cluster-name sets, shared between clients holding the same set: 10,000 clients each
    /// with its own copy of 1,000 names would make the bench, not the control plane, the
    /// memory hog.
    sets: Mutex<HashMap<u64, Arc<BTreeSet<String>>>>,
}

impl Shared {
    fn intern(&self, set: BTreeSet<String>) -> Arc<BTreeSet<String>> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        set.hash(&mut h);
        let key = h.finish();
        let mut sets = lock(&self.sets);
        match sets.get(&key) {
            Some(s) if **s == set => Arc::clone(s),
            _ => {
                let s = Arc::new(set);
                sets.insert(key, Arc::clone(&s));
                s
            }
        }
    }

    fn watching(&self, kind: Kind) -> Option<Watch> {
        self.watch
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|w| w.kind == kind)
            .cloned()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One simulated client, as the driver sees it.
#[derive(Debug, Default)]
pub struct Client {
    pub records: Mutex<Vec<Record>>,
    /// Has ACKed its clusters and the endpoints of every one of them.
    pub synced: AtomicBool,
    /// The last watch epoch this client counted in `watched_acks`.
    counted_epoch: AtomicU64,
    pub error: Mutex<Option<String>>,
}

impl Client {
    fn note(&self, shared: &Shared, r: Record, watch: Option<&Watch>) {
        shared.responses.fetch_add(1, Ordering::Relaxed);
        shared
            .bytes
            .fetch_add(u64::from(r.bytes), Ordering::Relaxed);
        if let Some(w) = watch.filter(|_| r.watched)
            && self.counted_epoch.swap(w.epoch, Ordering::Relaxed) != w.epoch
        {
            shared.watched_acks.fetch_add(1, Ordering::Relaxed);
        }
        if shared.record.load(Ordering::Relaxed) {
            lock(&self.records).push(r);
        }
    }
}

/// M clients against one control plane.
#[derive(Debug)]
pub struct Fleet {
    pub variant: Variant,
    pub shared: Arc<Shared>,
    pub clients: Vec<Arc<Client>>,
    tasks: JoinSet<()>,
    next_epoch: u64,
}

/// Each new connection gets the next source address in 127.1.0.1 .. 127.254.249.250.
static NEXT_SOURCE: AtomicU32 = AtomicU32::new(0);

fn next_source() -> Ipv4Addr {
    let n = NEXT_SOURCE.fetch_add(1, Ordering::Relaxed);
    let a = 1 + (n / 62_500) % 254;
    let b = (n / 250) % 250;
    let c = 1 + n % 250;
    Ipv4Addr::new(127, a as u8, b as u8, c as u8)
}

impl Fleet {
    /// Connects `m` clients to the xDS server at `target` (at most 256 connecting at once) and
    /// starts their streams. Returns once every stream is open; see [`Fleet::wait_synced`].
    pub async fn start(target: SocketAddr, variant: Variant, m: usize) -> Result<Fleet> {
        let shared = Arc::new(Shared {
            record: AtomicBool::new(true),
            ..Default::default()
        });
        let clients: Vec<Arc<Client>> = (0..m).map(|_| Arc::new(Client::default())).collect();
        let mut tasks = JoinSet::new();
        let gate = Arc::new(Semaphore::new(256));
        let (opened_tx, mut opened_rx) = mpsc::channel::<Result<()>>(m.max(1));
        for (i, c) in clients.iter().enumerate() {
            let (c, shared, gate, opened) = (
                Arc::clone(c),
                Arc::clone(&shared),
                Arc::clone(&gate),
                opened_tx.clone(),
            );
            tasks.spawn(async move {
                let node = envoy_node(&format!("bench-{i}"));
                let channel = {
                    let _permit = gate.acquire().await;
                    connect(target).await
                };
                let channel = match channel {
                    Ok(ch) => {
                        let _ = opened.send(Ok(())).await;
                        ch
                    }
                    Err(e) => {
                        let _ = opened.send(Err(e)).await;
                        return;
                    }
                };
                drop(opened);
                let mut channel = channel;
                let mut tries = 1;
                loop {
                    let r = match variant {
                        Variant::Sotw => run_sotw(channel, node.clone(), &shared, &c).await,
                        Variant::Delta => run_delta(channel, node.clone(), &shared, &c).await,
                    };
                    let Err(e) = r else { break };
                    // A connection reset while thousands connect at once (the accept queue
                    // overflowed) is the kernel's, not the protocol's: open the stream again,
                    // as Envoy would, but only before it synced, so a measured change is never
                    // masked by a reconnect.
                    if c.synced.load(Ordering::Relaxed) || tries >= 3 {
                        *lock(&c.error) = Some(format!("{e:#}"));
                        break;
                    }
                    tries += 1;
                    shared.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100 * tries)).await;
                    let reconnected = {
                        let _permit = gate.acquire().await;
                        connect(target).await
                    };
                    match reconnected {
                        Ok(ch) => channel = ch,
                        Err(e) => {
                            *lock(&c.error) = Some(format!("{e:#}"));
                            break;
                        }
                    }
                }
            });
        }
        drop(opened_tx);
        for _ in 0..m {
            match opened_rx.recv().await {
                Some(Ok(())) => {}
                Some(Err(e)) => return Err(e.context("connecting an xDS client")),
                None => bail!("a client task ended before connecting"),
            }
        }
        Ok(Fleet {
            variant,
            shared,
            clients,
            tasks,
            next_epoch: 0,
        })
    }

    /// Waits until every client has its clusters and their endpoints ACKed.
    pub async fn wait_synced(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_errors()?;
            let synced = self
                .clients
                .iter()
                .filter(|c| c.synced.load(Ordering::Relaxed))
                .count();
            if synced == self.clients.len() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{synced} of {} {} clients synced after {timeout:?}",
                    self.clients.len(),
                    self.variant.as_str()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn check_errors(&self) -> Result<()> {
        let failed: Vec<String> = self
            .clients
            .iter()
            .filter_map(|c| lock(&c.error).clone())
            .collect();
        match failed.first() {
            None => Ok(()),
            Some(e) => Err(anyhow!(
                "{} client stream(s) failed, first: {e}",
                failed.len()
            )),
        }
    }

    /// From now on, the first response of `kind` carrying `name` counts for each client.
    pub fn watch(&mut self, kind: Kind, name: &str) {
        self.next_epoch += 1;
        self.shared.watched_acks.store(0, Ordering::Relaxed);
        *self.shared.watch.write().unwrap_or_else(|p| p.into_inner()) = Some(Watch {
            epoch: self.next_epoch,
            kind,
            name: name.to_string(),
        });
    }

    /// Waits until every client has ACKed a response carrying the watched resource.
    pub async fn wait_watched(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let m = self.clients.len() as u64;
        loop {
            let n = self.shared.watched_acks.load(Ordering::Relaxed);
            if n >= m {
                return Ok(());
            }
            self.check_errors()?;
            if Instant::now() >= deadline {
                bail!("only {n} of {m} clients got the change within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Every client's records so far, emptied.
    pub fn take_records(&self) -> Vec<Vec<Record>> {
        self.clients
            .iter()
            .map(|c| std::mem::take(&mut *lock(&c.records)))
            .collect()
    }

    /// Ends every stream and connection.
    pub async fn stop(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// The node an Envoy sends: `user_agent_name: envoy` and none of the gRPC-only client
/// features, so the control plane classifies it as the `envoy` flavour.
fn envoy_node(id: &str) -> Node {
    Node {
        id: id.to_string(),
        cluster: "bench".to_string(),
        user_agent_name: "envoy".to_string(),
        client_features: vec!["envoy.lrs.supports_send_all_clusters".to_string()],
        ..Default::default()
    }
}

/// One HTTP/2 connection to `target` from the next unused 127.x source address.
pub async fn connect(target: SocketAddr) -> Result<Channel> {
    let source = next_source();
    Endpoint::from_shared(format!("http://{target}"))?
        .connect_with_connector(BindConnector { source, target })
        .await
        .with_context(|| format!("connecting {source} -> {target}"))
}

/// Connects from a chosen loopback source address (port chosen by the kernel).
#[derive(Debug, Clone, Copy)]
struct BindConnector {
    source: Ipv4Addr,
    target: SocketAddr,
}

impl tonic::codegen::Service<Uri> for BindConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<TcpStream>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let Self { source, target } = *self;
        Box::pin(async move {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(source.into(), 0))?;
            let stream = socket.connect(target).await?;
            stream.set_nodelay(true)?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// `envoy.service.discovery.v3.DiscoveryResponse`, resources left encoded (`Any`s).
#[derive(Clone, PartialEq, prost::Message)]
pub struct LightSotw {
    #[prost(string, tag = "1")]
    pub version_info: String,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    pub resources: Vec<Bytes>,
    #[prost(string, tag = "4")]
    pub type_url: String,
    #[prost(string, tag = "5")]
    pub nonce: String,
}

/// `envoy.service.discovery.v3.DeltaDiscoveryResponse`, resources left encoded (`Resource`s).
#[derive(Clone, PartialEq, prost::Message)]
pub struct LightDelta {
    #[prost(string, tag = "1")]
    pub system_version_info: String,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    pub resources: Vec<Bytes>,
    #[prost(string, tag = "4")]
    pub type_url: String,
    #[prost(string, tag = "5")]
    pub nonce: String,
    #[prost(string, repeated, tag = "6")]
    pub removed_resources: Vec<String>,
}

/// The bytes of length-delimited field `tag` of an encoded message, found without decoding it.
fn field(mut buf: &[u8], tag: u64) -> Option<&[u8]> {
    while !buf.is_empty() {
        let key = prost::encoding::decode_varint(&mut buf).ok()?;
        match key & 7 {
            0 => {
                prost::encoding::decode_varint(&mut buf).ok()?;
            }
            1 => buf = buf.get(8..)?,
            5 => buf = buf.get(4..)?,
            2 => {
                let len = usize::try_from(prost::encoding::decode_varint(&mut buf).ok()?).ok()?;
                let value = buf.get(..len)?;
                if key >> 3 == tag {
                    return Some(value);
                }
                buf = buf.get(len..)?;
            }
            _ => return None,
        }
    }
    None
}

/// The name of the resource inside an encoded `google.protobuf.Any` (its `value` is field 2).
fn any_name(any: &[u8]) -> Option<&str> {
    resource_name(field(any, 2)?)
}

/// The name of an encoded Delta `Resource` (field 3).
fn delta_name(resource: &[u8]) -> Option<&str> {
    std::str::from_utf8(field(resource, 3)?).ok()
}

const ADS: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/";

/// Opens an ADS stream (`method` is `StreamAggregatedResources` or
/// `DeltaAggregatedResources`) whose responses decode as `Resp`.
pub async fn ads_stream<Req, Resp>(
    ch: Channel,
    method: &'static str,
    rx: mpsc::Receiver<Req>,
) -> Result<tonic::Streaming<Resp>>
where
    Req: Message + Send + Sync + 'static,
    Resp: Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(ch).max_decoding_message_size(MAX_MESSAGE);
    grpc.ready().await.context("ADS channel not ready")?;
    let path = http::uri::PathAndQuery::try_from(format!("{ADS}{method}"))?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    Ok(grpc
        .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, codec)
        .await?
        .into_inner())
}

/// The name of a Cluster or ClusterLoadAssignment from its encoding, without decoding the
/// rest: both have the name as field 1, which prost writes first.
fn resource_name(bytes: &[u8]) -> Option<&str> {
    let mut buf = bytes;
    let key = prost::encoding::decode_varint(&mut buf).ok()?;
    if key != (1 << 3) | 2 {
        return None;
    }
    let len = usize::try_from(prost::encoding::decode_varint(&mut buf).ok()?).ok()?;
    std::str::from_utf8(buf.get(..len)?).ok()
}

fn kind_of(type_url: &str) -> Result<Kind> {
    match type_url {
        CLUSTER_TYPE => Ok(Kind::Cds),
        ENDPOINT_TYPE => Ok(Kind::Eds),
        other => bail!("unexpected type URL {other}"),
    }
}

const MAX_MESSAGE: usize = 256 * 1024 * 1024;

async fn run_sotw(ch: Channel, node: Node, shared: &Shared, me: &Client) -> Result<()> {
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(16);
    tx.send(DiscoveryRequest {
        node: Some(node),
        type_url: CLUSTER_TYPE.to_string(),
        ..Default::default()
    })
    .await?;
    let mut inbound = ads_stream::<_, LightSotw>(ch, "StreamAggregatedResources", rx).await?;
    let mut clusters = Arc::new(BTreeSet::new());
    let (mut eds_version, mut eds_nonce) = (String::new(), String::new());
    while let Some(resp) = inbound.message().await? {
        let arrived = Instant::now();
        let kind = kind_of(&resp.type_url)?;
        let watch = shared.watching(kind);
        let names: Option<Vec<&str>> = resp.resources.iter().map(|a| any_name(a)).collect();
        let watched = match (&watch, &names) {
            (Some(w), Some(n)) => n.iter().any(|x| *x == w.name),
            _ => false,
        };
        let mut ack = DiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        };
        match (&names, kind) {
            (None, _) => {
                // What Envoy does with a resource it cannot read: reject the response.
                ack.error_detail = Some(RpcStatus {
                    code: 3,
                    message: "a resource has no name".to_string(),
                    details: Vec::new(),
                });
            }
            (Some(n), Kind::Cds) => {
                ack.version_info = resp.version_info.clone();
                let set: BTreeSet<String> = n.iter().map(|s| s.to_string()).collect();
                if set != *clusters {
                    clusters = shared.intern(set);
                    // As Envoy: ask for the new clusters' endpoints before ACKing the clusters.
                    tx.send(DiscoveryRequest {
                        type_url: ENDPOINT_TYPE.to_string(),
                        version_info: eds_version.clone(),
                        response_nonce: eds_nonce.clone(),
                        resource_names: clusters.iter().cloned().collect(),
                        ..Default::default()
                    })
                    .await?;
                }
            }
            (Some(n), Kind::Eds) => {
                ack.version_info = resp.version_info.clone();
                ack.resource_names = clusters.iter().cloned().collect();
                eds_version = resp.version_info.clone();
                eds_nonce = resp.nonce.clone();
                if n.len() >= clusters.len() && !clusters.is_empty() {
                    me.synced.store(true, Ordering::Relaxed);
                }
            }
        }
        let bytes = resp.encoded_len() as u32;
        let resources = resp.resources.len() as u32;
        drop(names);
        drop(resp);
        tx.send(ack).await?;
        let r = Record {
            kind,
            arrived,
            acked: Instant::now(),
            bytes,
            resources,
            removed: 0,
            watched,
        };
        me.note(shared, r, watch.as_ref());
    }
    Ok(())
}

async fn run_delta(ch: Channel, node: Node, shared: &Shared, me: &Client) -> Result<()> {
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
    tx.send(DeltaDiscoveryRequest {
        node: Some(node),
        type_url: CLUSTER_TYPE.to_string(),
        ..Default::default()
    })
    .await?;
    let mut inbound = ads_stream::<_, LightDelta>(ch, "DeltaAggregatedResources", rx).await?;
    let mut clusters = Arc::new(BTreeSet::new());
    let mut endpoints_received = 0usize;
    while let Some(resp) = inbound.message().await? {
        let arrived = Instant::now();
        let kind = kind_of(&resp.type_url)?;
        let watch = shared.watching(kind);
        let names: Vec<&str> = resp
            .resources
            .iter()
            .map(|r| delta_name(r).context("a Delta resource without a name"))
            .collect::<Result<_>>()?;
        let watched = watch
            .as_ref()
            .is_some_and(|w| names.iter().any(|n| *n == w.name));
        match kind {
            Kind::Cds => {
                let subscribe: Vec<String> = names
                    .iter()
                    .filter(|n| !clusters.contains(**n))
                    .map(|n| n.to_string())
                    .collect();
                let unsubscribe: Vec<String> = resp
                    .removed_resources
                    .iter()
                    .filter(|n| clusters.contains(*n))
                    .cloned()
                    .collect();
                if !subscribe.is_empty() || !unsubscribe.is_empty() {
                    let mut set = (*clusters).clone();
                    set.extend(subscribe.iter().cloned());
                    for n in &unsubscribe {
                        set.remove(n);
                    }
                    clusters = shared.intern(set);
                    tx.send(DeltaDiscoveryRequest {
                        type_url: ENDPOINT_TYPE.to_string(),
                        resource_names_subscribe: subscribe,
                        resource_names_unsubscribe: unsubscribe,
                        ..Default::default()
                    })
                    .await?;
                }
            }
            Kind::Eds => {
                endpoints_received += resp.resources.len();
                if endpoints_received >= clusters.len() && !clusters.is_empty() {
                    me.synced.store(true, Ordering::Relaxed);
                }
            }
        }
        let r = Record {
            kind,
            arrived,
            acked: arrived,
            bytes: resp.encoded_len() as u32,
            resources: resp.resources.len() as u32,
            removed: resp.removed_resources.len() as u32,
            watched,
        };
        drop(names);
        let ack = ack_delta(resp);
        tx.send(ack).await?;
        me.note(
            shared,
            Record {
                acked: Instant::now(),
                ..r
            },
            watch.as_ref(),
        );
    }
    Ok(())
}

fn ack_delta(resp: LightDelta) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: resp.type_url,
        response_nonce: resp.nonce,
        ..Default::default()
    }
}

/// Fails unless this process may open `needed` files: each client is one socket here and one
/// in the control plane (which inherits this limit).
pub fn check_nofile(needed: u64) -> Result<()> {
    let limits =
        std::fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits")?;
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .with_context(|| format!("no `Max open files` in /proc/self/limits:\n{limits}"))?;
    if soft == "unlimited" {
        return Ok(());
    }
    let soft: u64 = soft.parse().with_context(|| format!("parsing {soft:?}"))?;
    if soft < needed {
        bail!(
            "the open-files limit is {soft}, but this run needs about {needed} (one socket per \
             client here and in the control plane): raise it with `ulimit -n 65536` and run \
             again (`make bench` does this)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;

    #[test]
    fn names_are_read_from_field_one() {
        let c = Cluster {
            name: "svc-7".into(),
            alt_stat_name: "x".into(),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(resource_name(&c), Some("svc-7"));
        let e = ClusterLoadAssignment {
            cluster_name: "svc-8".into(),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(resource_name(&e), Some("svc-8"));
        assert_eq!(resource_name(&[]), None);
    }

    #[test]
    fn light_responses_read_names_like_the_generated_types() {
        use envoy_types::pb::envoy::service::discovery::v3::{
            DeltaDiscoveryResponse, DiscoveryResponse, Resource,
        };
        use envoy_types::pb::google::protobuf::Any;
        let c = Cluster {
            name: "svc-1".into(),
            ..Default::default()
        };
        let any = Any {
            type_url: CLUSTER_TYPE.into(),
            value: c.encode_to_vec(),
        };
        let sotw = DiscoveryResponse {
            version_info: "v".into(),
            resources: vec![any.clone()],
            type_url: CLUSTER_TYPE.into(),
            nonce: "1".into(),
            ..Default::default()
        };
        let light = LightSotw::decode(sotw.encode_to_vec().as_slice()).unwrap();
        assert_eq!(light.encoded_len(), sotw.encoded_len());
        assert_eq!(any_name(&light.resources[0]), Some("svc-1"));
        let delta = DeltaDiscoveryResponse {
            resources: vec![Resource {
                name: "svc-1".into(),
                version: "x".into(),
                resource: Some(any),
                ..Default::default()
            }],
            removed_resources: vec!["gone".into()],
            nonce: "2".into(),
            ..Default::default()
        };
        let light = LightDelta::decode(delta.encode_to_vec().as_slice()).unwrap();
        assert_eq!(delta_name(&light.resources[0]), Some("svc-1"));
        assert_eq!(light.removed_resources, ["gone"]);
    }

    #[test]
    fn sources_are_distinct_loopback_addresses() {
        let a = next_source();
        let b = next_source();
        assert_ne!(a, b);
        assert!(a.is_loopback() && b.is_loopback());
        assert_ne!(a, Ipv4Addr::LOCALHOST);
    }

    #[test]
    fn nofile_check_passes_for_tiny_needs() {
        check_nofile(1).unwrap();
        assert!(
            check_nofile(u64::MAX - 1)
                .unwrap_err()
                .to_string()
                .contains("ulimit -n 65536")
                || std::fs::read_to_string("/proc/self/limits")
                    .unwrap()
                    .contains("unlimited")
        );
    }
}
