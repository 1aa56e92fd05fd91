//! A stateful stand-in for the parts of Consul's HTTP API that Weft uses. Tests only: no real
//! Consul can be installed on our CI machines, so the Consul source and the sidecar's Consul
//! registration are tested against this, written to follow Consul's documented semantics.
//!
//! ## Interface contract (shared by the Consul source tests and the sidecar registration tests)
//!
//! What it does: one agent on one node (`weft-standin`, address 127.0.0.1, datacenter `dc1`
//! unless [`StandInOptions`] says otherwise) with
//! - agent endpoints: `PUT /v1/agent/service/register` (ID, Name, Tags, Address, Port, Meta,
//!   Weights, Check/Checks with TTL, HTTP, GRPC, TCP or Args, Interval, Timeout,
//!   DeregisterCriticalServiceAfter, Status), `PUT /v1/agent/service/deregister/<id>`,
//!   `PUT /v1/agent/check/{pass,warn,fail}/<id>?note=`, `PUT /v1/agent/check/update/<id>`,
//!   `GET /v1/agent/services`, `GET /v1/agent/service/<id>`, `GET /v1/agent/checks`,
//!   `PUT /v1/agent/service/maintenance/<id>?enable=&reason=`, `PUT /v1/agent/maintenance`;
//! - `GET /v1/catalog/services` (with Consul's own `consul` service, as real catalogs have),
//!   `GET /v1/health/service/<name>` (`?passing`, `?tag`), `GET|PUT|DELETE /v1/kv/<key>`
//!   (`?recurse`, `?raw`, `?keys`, `?cas`, `?flags`), `/v1/status/leader`, `/v1/agent/self`;
//! - blocking queries (`index`, `wait`, default 5 min, max 10 min) on catalog, health and KV
//!   answering with `X-Consul-Index`; the index moves only on real changes (a TTL pass that
//!   changes neither status nor output does not move it, as an agent only syncs changes);
//! - TTL checks expire to critical; checks start `critical` unless `Status` is given; services
//!   whose check stays critical longer than `DeregisterCriticalServiceAfter` are reaped
//!   (checked every 100 ms, with no 1-minute minimum, so tests can be quick);
//! - optional ACL token (`X-Consul-Token`, `Authorization: Bearer` or `?token=`): 403 otherwise.
//!
//! What it does NOT do: run HTTP/gRPC/TCP/script checks (their status comes from the
//! registration's `Status` or [`ConsulStandIn::set_check_status`]), several nodes, sessions and
//! locks, `?filter=` expressions, ACL policies (one token allows everything), `wait` jitter,
//! TLS, prepared queries, Connect, namespaces and partitions.

mod server;
mod state;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::server::Shared;
use crate::state::State;

/// How the stand-in is started (all optional).
#[derive(Debug, Clone)]
pub struct StandInOptions {
    /// When set, every request must carry this ACL token.
    pub token: Option<String>,
    /// The agent's datacenter (`?dc=` naming another one is answered with 500, as Consul does
    /// when it has no path there).
    pub datacenter: String,
    /// The node's meta (`Node.Meta` in health answers), e.g. a `zone`.
    pub node_meta: BTreeMap<String, String>,
}

impl Default for StandInOptions {
    fn default() -> Self {
        StandInOptions {
            token: None,
            datacenter: "dc1".to_string(),
            node_meta: BTreeMap::new(),
        }
    }
}

/// A running stand-in. Dropping it stops the server (state is lost, as a Consul agent restart
/// with no data dir would lose it).
#[derive(Debug)]
pub struct ConsulStandIn {
    shared: Arc<Shared>,
    addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ConsulStandIn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Binds with SO_REUSEADDR and retries for a while: right after a previous stand-in on the same
/// port is dropped its listener may not be closed yet (its task is cancelled asynchronously).
async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        let res = socket.bind(addr).and_then(|()| socket.listen(1024));
        match res {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

impl ConsulStandIn {
    /// Starts on 127.0.0.1 and a free port.
    pub async fn start() -> std::io::Result<ConsulStandIn> {
        Self::start_with(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            StandInOptions::default(),
        )
        .await
    }

    /// Starts on a given address (to restart "the same Consul" on its old port).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<ConsulStandIn> {
        Self::start_with(addr, StandInOptions::default()).await
    }

    /// Starts on `addr` (port 0 for a free one) with options.
    pub async fn start_with(
        addr: SocketAddr,
        options: StandInOptions,
    ) -> std::io::Result<ConsulStandIn> {
        let listener = bind(addr).await?;
        let addr = listener.local_addr()?;
        let (changes, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            state: std::sync::Mutex::new(State::new(&options.datacenter, options.node_meta)),
            changes,
            token: options.token,
        });

        let accept_shared = shared.clone();
        let accept = tokio::spawn(async move {
            // Connections live in this set so that aborting the accept task closes them all, as
            // a dying agent would.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let shared = accept_shared.clone();
                        conns.spawn(async move {
                            let svc = service_fn(move |req| {
                                let shared = shared.clone();
                                async move {
                                    Ok::<_, std::convert::Infallible>(server::handle(shared, req).await)
                                }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });

        let tick_shared = shared.clone();
        let ticker = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(100));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let changed = tick_shared.lock().tick(Instant::now());
                if changed {
                    tick_shared.notify();
                }
            }
        });

        Ok(ConsulStandIn {
            shared,
            addr,
            tasks: vec![accept, ticker],
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets a check's status (`passing`, `warning`, `critical`) as Consul's own check runner
    /// would, bumping the index. Unknown checks and statuses are ignored (and reported on
    /// stderr, so a test typo is visible).
    pub fn set_check_status(&self, check_id: &str, status: &str) {
        let res = self
            .shared
            .mutate(|st| st.set_status(check_id, status, None, Instant::now()));
        if let Err(e) = res {
            eprintln!(
                "consul stand-in: set_check_status({check_id}, {status}): {}",
                e.message
            );
        }
    }

    /// Makes the raft index go backwards (as after a snapshot restore), to test index resets.
    /// Blocked queries return at once with the lower index, as Consul's do on a restore.
    pub fn reset_index(&self, to: u64) {
        self.shared.mutate(|st| st.reset_index(to));
    }

    /// The agent's registered services as JSON (`/v1/agent/services` shape), for assertions.
    pub fn agent_services(&self) -> serde_json::Value {
        self.shared.lock().agent_services()
    }

    /// The agent's checks as JSON (`/v1/agent/checks` shape), for assertions.
    pub fn agent_checks(&self) -> serde_json::Value {
        self.shared.lock().agent_checks()
    }

    /// Number of HTTP requests served per path (to check that clients do not spin).
    pub fn requests(&self, path: &str) -> u64 {
        self.shared.lock().requests.get(path).copied().unwrap_or(0)
    }

    /// All per-path request counters.
    pub fn all_requests(&self) -> BTreeMap<String, u64> {
        self.shared
            .lock()
            .requests
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// The current raft index.
    pub fn index(&self) -> u64 {
        self.shared.lock().index()
    }

    /// Registers a service as `PUT /v1/agent/service/register` would (same JSON body).
    pub fn register_service(&self, body: &serde_json::Value) -> Result<(), String> {
        self.shared
            .mutate(|st| st.register(body, Instant::now()))
            .map_err(|e| e.message)
    }

    /// Deregisters a service as `PUT /v1/agent/service/deregister/<id>` would.
    pub fn deregister_service(&self, id: &str) -> Result<(), String> {
        self.shared
            .mutate(|st| st.deregister(id))
            .map_err(|e| e.message)
    }

    /// Puts maintenance mode on or off for one service (the `_service_maintenance:<id>` check).
    pub fn set_service_maintenance(&self, id: &str, enable: bool) -> Result<(), String> {
        self.shared
            .mutate(|st| st.service_maintenance(id, enable, "test"))
            .map_err(|e| e.message)
    }

    /// Puts the node in or out of maintenance (the `_node_maintenance` check).
    pub fn set_node_maintenance(&self, enable: bool) {
        self.shared.mutate(|st| st.node_maintenance(enable, "test"));
    }

    /// Writes a KV value as `PUT /v1/kv/<key>` would.
    pub fn kv_put(&self, key: &str, value: impl Into<Vec<u8>>) {
        let value = value.into();
        self.shared.mutate(|st| st.kv_put(key, value, 0, None));
    }

    /// Deletes a KV key (or a whole prefix with `recurse`).
    pub fn kv_delete(&self, key: &str, recurse: bool) {
        self.shared.mutate(|st| st.kv_delete(key, recurse, None));
    }
}
