//! The gRPC port's connections: plain TCP, or TLS with the handshake done here, off the accept
//! loop, so that tonic only ever sees connections whose peer is verified.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::server::Connected;

use crate::peer::{PeerError, identity_from_chain};
use crate::spiffe::{Identity, TrustDomain};

/// Longest a client may take to complete its TLS handshake before the connection is dropped.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; further connections wait in the kernel's accept queue.
/// Bounds the memory and CPU that clients which open connections and never finish (or start)
/// a handshake can take.
pub const DEFAULT_MAX_HANDSHAKES: usize = 1024;

/// What a service learns about its peer. tonic puts it in every request's extensions
/// (`req.extensions().get::<PeerInfo>()`).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote_addr: Option<SocketAddr>,
    pub identity: PeerIdentity,
}

/// The peer's identity as the connection established it.
#[derive(Debug, Clone)]
pub enum PeerIdentity {
    /// A plain-text connection: TLS is off on this port.
    Plain,
    /// A client certificate chaining to the client CA, carrying a valid SPIFFE ID.
    Verified(Identity),
    /// A client certificate chaining to the client CA but without a usable SPIFFE ID. The
    /// connection is kept so that each request can be refused with this reason (a TLS alert
    /// could not say why).
    Refused(PeerError),
}

impl PeerIdentity {
    /// The verified identity, or why there is none.
    pub fn verified(&self) -> Result<&Identity, String> {
        match self {
            PeerIdentity::Verified(id) => Ok(id),
            PeerIdentity::Refused(e) => Err(format!("client certificate refused: {e}")),
            PeerIdentity::Plain => Err("no client certificate: the connection is not TLS".into()),
        }
    }
}

/// One accepted connection of the gRPC port.
#[derive(Debug)]
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>, PeerInfo),
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            Conn::Plain(s) => PeerInfo {
                remote_addr: s.peer_addr().ok(),
                identity: PeerIdentity::Plain,
            },
            Conn::Tls(_, info) => info.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// TLS on the gRPC port.
#[derive(Debug, Clone)]
pub struct TlsIncoming {
    pub config: Arc<ServerConfig>,
    pub trust_domain: TrustDomain,
    pub handshake_timeout: Duration,
    pub max_handshakes: usize,
}

/// The stream of connections tonic serves (`serve_with_incoming_shutdown`).
pub type Incoming = Pin<Box<dyn Stream<Item = io::Result<Conn>> + Send>>;

/// Connections of `listener`: plain when `tls` is `None`; else only those whose TLS handshake
/// (client certificate required by `tls.config`) completed within the timeout. Handshakes run
/// in their own tasks, so a client that stalls its handshake holds up no one else. The accept
/// loop ends when the stream is dropped.
pub fn incoming(listener: TcpListener, tls: Option<TlsIncoming>) -> Incoming {
    match tls {
        None => Box::pin(tokio_stream::StreamExt::map(
            TcpListenerStream::new(listener),
            |r| r.map(Conn::Plain),
        )),
        Some(tls) => {
            let (tx, rx) = mpsc::channel(64);
            tokio::spawn(accept_tls(listener, tls, tx));
            Box::pin(ReceiverStream::new(rx))
        }
    }
}

async fn accept_tls(listener: TcpListener, tls: TlsIncoming, tx: mpsc::Sender<io::Result<Conn>>) {
    let acceptor = TlsAcceptor::from(Arc::clone(&tls.config));
    let permits = Arc::new(Semaphore::new(tls.max_handshakes.max(1)));
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            () = tx.closed() => return,
        };
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors or a connection reset before accept: neither is
                    // a reason to stop serving. The pause keeps an EMFILE from spinning.
                    tracing::warn!(error = %e, "accepting a connection on the xDS port failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = tx.closed() => return,
        };
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        let (timeout, td) = (tls.handshake_timeout, tls.trust_domain.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(peer = %addr, error = %e, "TLS handshake failed on the xDS port");
                    return;
                }
                Err(_) => {
                    tracing::info!(peer = %addr, ?timeout, "TLS handshake timed out on the xDS port");
                    return;
                }
            };
            let chain = stream.get_ref().1.peer_certificates().unwrap_or(&[]);
            let identity = match identity_from_chain(chain, &td) {
                Ok(id) => PeerIdentity::Verified(id),
                Err(e) => {
                    tracing::warn!(peer = %addr, error = %e, "client certificate has no usable identity; its requests will be refused");
                    PeerIdentity::Refused(e)
                }
            };
            let info = PeerInfo {
                remote_addr: Some(addr),
                identity,
            };
            let _ = tx.send(Ok(Conn::Tls(Box::new(stream), info))).await;
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::testing::TestCa;
    use crate::tls::{ClientTlsFiles, ServerTlsFiles, mtls_client_config, mtls_server_config};
    use tokio_rustls::TlsConnector;
    use tokio_rustls::rustls::pki_types::ServerName;
    use tokio_stream::StreamExt;

    struct Setup {
        dir: PathBufGuard,
        ca: TestCa,
        server: ServerTlsFiles,
    }

    /// A temp dir removed on drop.
    struct PathBufGuard(std::path::PathBuf);
    impl Drop for PathBufGuard {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn setup(name: &str) -> Setup {
        let dir = std::env::temp_dir().join(format!("weft-identity-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = TestCa::new("ca").unwrap();
        let client_ca = ca.write(&dir, "ca").unwrap();
        let (cert, key) = ca
            .server(&["localhost", "127.0.0.1"])
            .unwrap()
            .write(&dir, "server")
            .unwrap();
        Setup {
            dir: PathBufGuard(dir),
            ca,
            server: ServerTlsFiles {
                cert,
                key,
                client_ca,
            },
        }
    }

    fn client(s: &Setup, name: &str, uri: &str) -> TlsConnector {
        let (cert, key) = s.ca.client(&[uri]).unwrap().write(&s.dir.0, name).unwrap();
        let files = ClientTlsFiles {
            ca: s.server.client_ca.clone(),
            cert,
            key,
            server_name: None,
        };
        TlsConnector::from(mtls_client_config(&files).unwrap())
    }

    async fn serve(s: &Setup, timeout: Duration, reload: Duration) -> (SocketAddr, Incoming) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = TlsIncoming {
            config: mtls_server_config(&s.server, reload).unwrap(),
            trust_domain: TrustDomain::new("weft.test").unwrap(),
            handshake_timeout: timeout,
            max_handshakes: 16,
        };
        (addr, incoming(listener, Some(tls)))
    }

    #[tokio::test]
    async fn stalled_handshake_does_not_hold_up_others_and_identity_reaches_the_conn() {
        let s = setup("stall");
        let (addr, mut conns) = serve(&s, Duration::from_millis(500), Duration::MAX).await;
        // A client that connects and never speaks TLS.
        let _silent = TcpStream::connect(addr).await.unwrap();
        let connector = client(&s, "web", "spiffe://weft.test/ns/default/svc/web");
        let start = std::time::Instant::now();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let _tls = connector.connect(name, tcp).await.unwrap();
        let conn = tokio::time::timeout(Duration::from_secs(5), conns.next())
            .await
            .expect("a verified connection")
            .unwrap()
            .unwrap();
        assert!(
            start.elapsed() < Duration::from_millis(400),
            "{:?}",
            start.elapsed()
        );
        match conn.connect_info().identity {
            PeerIdentity::Verified(id) => assert_eq!(id.service, "web"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn client_without_certificate_or_from_another_ca_never_reaches_the_server() {
        let s = setup("nocert");
        let (addr, mut conns) = serve(&s, Duration::from_secs(2), Duration::MAX).await;
        // No client certificate.
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        for c in tokio_rustls::rustls::pki_types::CertificateDer::pem_file_iter(&s.server.client_ca)
            .unwrap()
        {
            roots.add(c.unwrap()).unwrap();
        }
        let no_cert =
            tokio_rustls::rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        // TLS 1.3 clients learn of the refusal on their first read.
        if let Ok(mut tls) = TlsConnector::from(Arc::new(no_cert))
            .connect(name.clone(), tcp)
            .await
        {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 1];
            let r = tls.read(&mut buf).await;
            assert!(
                r.is_err(),
                "the server must refuse a client without a certificate: {r:?}"
            );
        }
        // A certificate from another CA.
        let other = setup("nocert-other");
        let (cert, key) = other
            .ca
            .client(&["spiffe://weft.test/ns/default/svc/web"])
            .unwrap()
            .write(&other.dir.0, "web")
            .unwrap();
        // Trusting our server's CA, so that only the server's check of the client certificate
        // can fail.
        let files = ClientTlsFiles {
            ca: s.server.client_ca.clone(),
            cert,
            key,
            server_name: None,
        };
        let connector = TlsConnector::from(mtls_client_config(&files).unwrap());
        let tcp = TcpStream::connect(addr).await.unwrap();
        if let Ok(mut tls) = connector.connect(name, tcp).await {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 1];
            let r = tls.read(&mut buf).await;
            assert!(r.is_err(), "the server must refuse the certificate: {r:?}");
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(500), conns.next())
                .await
                .is_err(),
            "no connection may reach tonic"
        );
    }

    #[tokio::test]
    async fn renewed_server_certificate_is_served_without_restart() {
        let s = setup("reload");
        let (addr, mut conns) = serve(&s, Duration::from_secs(2), Duration::ZERO).await;
        let connector = client(&s, "web", "spiffe://weft.test/ns/default/svc/web");
        let name = ServerName::try_from("localhost").unwrap();
        let serial = |tls: &tokio_rustls::client::TlsStream<TcpStream>| {
            tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
        };
        let first = connector
            .connect(name.clone(), TcpStream::connect(addr).await.unwrap())
            .await
            .unwrap();
        let _ = conns.next().await;
        s.ca.server(&["localhost"])
            .unwrap()
            .write(&s.dir.0, "server")
            .unwrap();
        let second = connector
            .connect(name, TcpStream::connect(addr).await.unwrap())
            .await
            .unwrap();
        assert_ne!(serial(&first), serial(&second));
    }
}
