//! Test support for code that talks to etcd: a real etcd process, a TCP proxy to put between
//! a client and it, and throwaway TLS certificates. Shared by the etcd source's, the sidecar
//! registration's, the control plane binary's and the end-to-end (`weft-tests`) tests.
//!
//! - [`Etcd`]: one single-member etcd (`/usr/bin/etcd`, else `etcd` on `PATH`; Debian's
//!   `etcd-server`) on free 127.0.0.1 ports, its data dir and log in a fresh temp dir. It can
//!   be killed (SIGKILL), restarted on the same ports and data, or wiped; mutual TLS with
//!   [`Certs`]; [`Etcd::client`] gives a connected `etcd_client::Client`. Dropping it kills the
//!   process by PID and removes the temp dir, also when the test panics.
//! - [`Proxy`]: a TCP proxy to a local port that a test can [cut](Proxy::cut) (connections
//!   closed) or [freeze](Proxy::freeze) (connections open, nothing forwarded) on cue.
//! - [`Certs`]: a CA, a server certificate for 127.0.0.1/localhost and a client certificate,
//!   made with the `openssl` command line.
//!
//! ```no_run
//! # async fn demo() {
//! use weft_etcd_support::{Etcd, Proxy};
//! let mut etcd = Etcd::start().await;
//! let proxy = Proxy::start(etcd.client_port()).await;
//! etcd.client().await.put("k", "v", None).await.unwrap();
//! proxy.cut(); // clients going through `proxy.endpoint()` lose their connections
//! etcd.kill();
//! etcd.restart().await; // same ports, same data
//! proxy.open();
//! # }
//! ```

// Test support, used only from tests: a failure to set up (no etcd, no openssl, a port that
// cannot be bound) panics with a clear message, like a failed assertion. [`EtcdBuilder::start`]
// and [`Etcd::try_client`] return errors instead, for harnesses that report with `Result`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod certs;
mod etcd;
mod proxy;

use std::time::{Duration, Instant};

pub use certs::Certs;
pub use etcd::{Etcd, EtcdBuilder};
pub use proxy::Proxy;

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

/// A fresh, empty directory under the system temp dir, unique within this machine's running
/// processes: `<prefix>-<pid>-<n>`.
fn fresh_temp_dir(prefix: &str) -> std::io::Result<std::path::PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
