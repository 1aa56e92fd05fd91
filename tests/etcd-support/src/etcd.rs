//! A real single-member etcd on free loopback ports.

use std::collections::HashSet;
use std::io::{self, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::Certs;

/// How long [`Etcd`] waits for a (re)started etcd to answer.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// One single-member etcd on free 127.0.0.1 ports (client and peer), with its data dir (and,
/// unless [`EtcdBuilder::log_file`] says otherwise, its log) in a fresh temp dir.
///
/// Dropping it kills the process (SIGKILL, by PID), reaps it and removes the temp dir, also
/// when the test panics.
pub struct Etcd {
    client_port: u16,
    peer_port: u16,
    /// Temp dir holding `data/` (and `etcd.log` by default); removed on drop.
    root: PathBuf,
    log: PathBuf,
    tls: Option<Tls>,
    child: Option<Child>,
}

/// The server side's files and the client identity the readiness probe and
/// [`Etcd::client`] connect with.
struct Tls {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    ca_pem: Vec<u8>,
    client_pem: Vec<u8>,
    client_key: Vec<u8>,
}

/// Options for an [`Etcd`]: [`Etcd::builder`], then [`start`](EtcdBuilder::start) or
/// [`build`](EtcdBuilder::build).
#[derive(Default)]
pub struct EtcdBuilder {
    certs: Option<CertPaths>,
    log: Option<PathBuf>,
}

/// [`Certs`]' file names, without owning (and so removing) the directory.
struct CertPaths {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
}

impl EtcdBuilder {
    /// Serve clients over TLS with `certs.server`, and require a client certificate signed by
    /// `certs.ca`. The client URL is then `https://`; [`Etcd::client`] uses `certs.client`.
    pub fn mtls(mut self, certs: &Certs) -> Self {
        self.certs = Some(CertPaths {
            ca: certs.ca.clone(),
            server: certs.server.clone(),
            client: certs.client.clone(),
        });
        self
    }

    /// Append etcd's stdout and stderr to `path` (kept after drop) instead of `etcd.log` in
    /// the temp dir.
    pub fn log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.log = Some(path.into());
        self
    }

    /// Chooses the ports and creates the temp dir; does not start etcd (see
    /// [`Etcd::restart`]).
    pub fn build(self) -> io::Result<Etcd> {
        let tls = match self.certs {
            None => None,
            Some(c) => Some(Tls {
                ca_pem: std::fs::read(&c.ca)?,
                client_pem: std::fs::read(&c.client.0)?,
                client_key: std::fs::read(&c.client.1)?,
                ca: c.ca,
                server_cert: c.server.0,
                server_key: c.server.1,
            }),
        };
        let root = crate::fresh_temp_dir("weft-etcd")?;
        Ok(Etcd {
            client_port: free_port()?,
            peer_port: free_port()?,
            log: self.log.unwrap_or_else(|| root.join("etcd.log")),
            root,
            tls,
            child: None,
        })
    }

    /// [`build`](Self::build)s and starts etcd, and waits (up to 30 s) until it answers.
    pub async fn start(self) -> io::Result<Etcd> {
        let mut etcd = self.build()?;
        etcd.try_restart().await?;
        Ok(etcd)
    }
}

impl Etcd {
    /// Options: mutual TLS, where the log goes.
    pub fn builder() -> EtcdBuilder {
        EtcdBuilder::default()
    }

    /// Starts a plain-HTTP etcd and waits until it answers; panics (with etcd's log) if it
    /// does not.
    pub async fn start() -> Etcd {
        Etcd::builder().start().await.expect("starting etcd")
    }

    /// Starts an etcd that serves clients over TLS and requires a client certificate signed
    /// by `certs.ca`; panics if it does not come up.
    pub async fn start_mtls(certs: &Certs) -> Etcd {
        Etcd::builder()
            .mtls(certs)
            .start()
            .await
            .expect("starting etcd with mutual TLS")
    }

    /// Ports and temp dir chosen, etcd not started yet: start it with [`Etcd::restart`].
    pub fn stopped() -> Etcd {
        Etcd::builder().build().expect("preparing etcd's temp dir")
    }

    /// The client URL: `http://127.0.0.1:<port>`, or `https://` with mutual TLS.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    pub fn peer_port(&self) -> u16 {
        self.peer_port
    }

    /// etcd's `--data-dir` (inside the temp dir).
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// Where etcd's stdout and stderr go (appended across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// etcd's log so far ("" if unreadable).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of etcd's log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The running process's PID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops etcd with SIGKILL (`kill -9`, no clean shutdown) and reaps it. Data and ports
    /// are kept for [`Etcd::restart`]. Does nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills etcd and deletes its data: the next [`Etcd::restart`] is a brand-new cluster.
    pub fn wipe(&mut self) {
        self.kill();
        match std::fs::remove_dir_all(self.data_dir()) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                panic!("wiping {}: {e}", self.data_dir().display())
            }
            _ => {}
        }
    }

    /// (Re)starts etcd on the same ports and data dir (killing it first if running) and waits
    /// until it serves; panics with etcd's log if it does not.
    pub async fn restart(&mut self) {
        self.try_restart().await.expect("restarting etcd");
    }

    /// [`Etcd::restart`], returning the failure instead of panicking.
    pub async fn try_restart(&mut self) -> io::Result<()> {
        self.kill();
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let client_url = self.endpoint();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(etcd_binary());
        cmd.args(["--name", "t", "--data-dir"])
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("t={peer_url}")])
            .args(["--quota-backend-bytes", "1073741824"])
            .args(["--max-request-bytes", "4194304"]);
        if let Some(tls) = &self.tls {
            cmd.arg("--trusted-ca-file").arg(&tls.ca);
            cmd.arg("--cert-file").arg(&tls.server_cert);
            cmd.arg("--key-file").arg(&tls.server_key);
            cmd.arg("--client-cert-auth");
        }
        writeln!(log, "$ {cmd:?}")?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot start {:?} (Debian package etcd-server; .ci/run installs it): {e}",
                        etcd_binary()
                    ),
                )
            })?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                self.child = None;
                return Err(io::Error::other(format!(
                    "etcd exited with {status}; log {} (last lines):\n{}",
                    self.log.display(),
                    self.log_tail(40)
                )));
            }
            let probe = tokio::time::timeout(Duration::from_secs(2), async {
                self.try_client().await?.get("/health-probe", None).await
            })
            .await;
            if matches!(probe, Ok(Ok(_))) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "etcd on :{} did not answer within {READY_WITHIN:?}; log {} (last lines):\n{}",
                    self.client_port,
                    self.log.display(),
                    self.log_tail(40)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A client connected to [`Etcd::endpoint`] (with the client certificate under mutual
    /// TLS); panics if it cannot connect.
    pub async fn client(&self) -> etcd_client::Client {
        self.try_client().await.expect("connecting to etcd")
    }

    /// [`Etcd::client`], returning the failure instead of panicking.
    pub async fn try_client(&self) -> Result<etcd_client::Client, etcd_client::Error> {
        let opts = self.tls.as_ref().map(|t| {
            let tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&t.ca_pem))
                .identity(etcd_client::Identity::from_pem(
                    &t.client_pem,
                    &t.client_key,
                ));
            etcd_client::ConnectOptions::new().with_tls(tls)
        });
        etcd_client::Client::connect([self.endpoint()], opts).await
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// `/usr/bin/etcd` if it exists, else `etcd` from `PATH`.
fn etcd_binary() -> PathBuf {
    let debian = Path::new("/usr/bin/etcd");
    if debian.exists() {
        debian.to_path_buf()
    } else {
        PathBuf::from("etcd")
    }
}

/// A free 127.0.0.1 port, never the same one twice in this process (so an etcd's client and
/// peer ports, and two etcds, cannot collide).
fn free_port() -> io::Result<u16> {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(|| Mutex::new(HashSet::new()));
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut given = given.lock().unwrap_or_else(|p| p.into_inner());
        if given.insert(port) {
            return Ok(port);
        }
    }
    Err(io::Error::other("no free port not handed out before"))
}
