//! Test helpers: a real etcd process on free local ports, and a TCP proxy in front of it that a
//! test can cut or freeze to make a client lose (or silently stall) its connection on cue.
//! Copied from control-plane/source-etcd/tests/common (test crates cannot share modules).
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One single-member etcd. Killed (SIGKILL) and its directory removed on drop, also on panic.
pub struct Etcd {
    pub client_port: u16,
    pub peer_port: u16,
    /// Holds `data/` and `etcd.log`.
    pub root: PathBuf,
    child: Option<Child>,
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Etcd {
    /// Starts etcd on free ports with a fresh data dir and waits until it answers.
    pub async fn start() -> Etcd {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let root = std::env::temp_dir().join(format!(
            "weft-sidecar-register-etcd-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let client_port = free_port();
        let mut peer_port = free_port();
        while peer_port == client_port {
            peer_port = free_port();
        }
        let mut etcd = Etcd {
            client_port,
            peer_port,
            root,
            child: None,
        };
        etcd.restart().await;
        etcd
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills etcd and deletes its data: the next start is a brand-new cluster.
    pub fn wipe(&mut self) {
        self.kill();
        std::fs::remove_dir_all(self.data_dir()).unwrap();
    }

    /// (Re)starts etcd on the same ports and data dir, and waits until it serves.
    pub async fn restart(&mut self) {
        self.kill();
        let c = self.client_port;
        let p = self.peer_port;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("etcd.log"))
            .unwrap();
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(self.data_dir())
            .arg("--listen-client-urls")
            .arg(format!("http://127.0.0.1:{c}"))
            .arg("--advertise-client-urls")
            .arg(format!("http://127.0.0.1:{c}"))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{p}"))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{p}"))
            .arg("--initial-cluster")
            .arg(format!("t=http://127.0.0.1:{p}"))
            .args(["--quota-backend-bytes", "1073741824"])
            .args(["--max-request-bytes", "4194304"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start etcd (is etcd-server installed?)");
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "etcd exited with {status}; log: {}",
                    std::fs::read_to_string(self.root.join("etcd.log")).unwrap_or_default()
                );
            }
            let ok = tokio::time::timeout(Duration::from_secs(2), async {
                let mut c = etcd_client::Client::connect([self.endpoint()], None).await?;
                c.get("/health-probe", None).await
            })
            .await;
            if matches!(ok, Ok(Ok(_))) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become ready; log: {}",
                std::fs::read_to_string(self.root.join("etcd.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.endpoint()], None)
            .await
            .unwrap()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Open,
    /// Every connection is closed and new ones are closed at once.
    Cut,
    /// Connections stay open but nothing is forwarded: a silently dead path.
    Frozen,
}

/// A TCP proxy to `127.0.0.1:upstream`. Its task ends with the test's runtime.
pub struct Proxy {
    pub port: u16,
    mode: watch::Sender<Mode>,
}

impl Proxy {
    pub async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (mode, _) = watch::channel(Mode::Open);
        let tx = mode.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    return;
                };
                let mut rx = tx.subscribe();
                tokio::spawn(async move {
                    let at_start = *rx.borrow_and_update();
                    match at_start {
                        Mode::Cut => return,
                        Mode::Frozen => {
                            let _ = rx.wait_for(|m| *m != Mode::Frozen).await;
                            return;
                        }
                        Mode::Open => {}
                    }
                    let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    let mode = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => return,
                        m = rx.wait_for(|m| *m != Mode::Open) => m.map(|m| *m),
                    };
                    if let Ok(Mode::Frozen) = mode {
                        // Hold both sockets open without forwarding until the mode changes.
                        let _ = rx.wait_for(|m| *m != Mode::Frozen).await;
                    }
                });
            }
        });
        Proxy { port, mode }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    pub fn freeze(&self) {
        self.mode.send_replace(Mode::Frozen);
    }

    pub fn open(&self) {
        self.mode.send_replace(Mode::Open);
    }
}

/// Polls `f` every 50 ms until it is true; panics with `what` after `limit`.
pub async fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
