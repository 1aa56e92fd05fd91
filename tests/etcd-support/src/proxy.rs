//! A TCP proxy that a test can cut or freeze to make a client lose (or silently stall) its
//! connection on cue.

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Open,
    /// Every connection is closed and new ones are closed at once.
    Cut,
    /// Connections stay open but nothing is forwarded: a silently dead path.
    Frozen,
}

/// A TCP proxy from a free 127.0.0.1 port to `127.0.0.1:upstream`. It forwards until
/// [`cut`](Proxy::cut) or [`freeze`](Proxy::freeze), and again after [`open`](Proxy::open).
/// Its accept task ends with the test's tokio runtime.
pub struct Proxy {
    port: u16,
    mode: watch::Sender<Mode>,
}

impl Proxy {
    /// Listens on a free port and forwards every connection to `127.0.0.1:upstream`.
    pub async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy's port");
        let port = listener
            .local_addr()
            .expect("the proxy's local address")
            .port();
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

    /// The port the proxy listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`, for plain-HTTP etcd clients.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Closes every connection, and new ones at once, until [`open`](Proxy::open).
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Keeps connections open but forwards nothing (new ones too) until
    /// [`open`](Proxy::open); frozen connections are then closed.
    pub fn freeze(&self) {
        self.mode.send_replace(Mode::Frozen);
    }

    /// Restores forwarding for new connections.
    pub fn open(&self) {
        self.mode.send_replace(Mode::Open);
    }
}
