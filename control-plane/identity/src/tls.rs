//! rustls configs for mTLS, with the serving certificate re-read from its files when they
//! change.
//!
//! Certificates reach a pod as a mounted Secret (cert-manager, SPIRE's helper, a chart), which
//! the kubelet updates in place when the certificate is renewed. A server that read the files
//! once would serve the old certificate until restarted and fail every handshake once it
//! expired; so the files are read again, at most once per interval, on a handshake. A pair that
//! does not load (e.g. read between the two files' updates) is logged and the previous
//! certificate kept.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};

/// How often the certificate files are looked at again.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(60);

/// Why a TLS config could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("TLS certificate and key: {0}")]
    Rustls(#[from] tokio_rustls::rustls::Error),
    #[error("client CA {path}: {message}")]
    ClientCa { path: PathBuf, message: String },
}

/// The ring provider: the workspace builds no aws-lc (a C and cmake build) anywhere.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// A certificate chain (leaf first) and its key, from PEM files, served by SNI-less resolution
/// and re-read when the files change. Use as `ServerConfig::with_cert_resolver`.
#[derive(Debug)]
pub struct ReloadingCert {
    files: KeyPairFiles,
    provider: Arc<CryptoProvider>,
    reload_every: Duration,
    state: Mutex<State>,
}

impl ReloadingCert {
    /// Reads the files now (an error if they do not load) and again at most every
    /// `reload_every` (`Duration::MAX` never reloads).
    pub fn new(
        cert_pem: &Path,
        key_pem: &Path,
        reload_every: Duration,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let files = KeyPairFiles {
            cert: cert_pem.to_path_buf(),
            key: key_pem.to_path_buf(),
        };
        let pems = files.read()?;
        let certified = files.parse(&pems, &provider)?;
        Ok(Self {
            files,
            provider,
            reload_every,
            state: Mutex::new(State {
                pems,
                certified,
                checked: Instant::now(),
            }),
        })
    }

    /// The current certificate, re-reading the files first if the interval has passed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        // A panic elsewhere while holding the lock leaves the state intact (it is only ever
        // replaced whole), so a poisoned lock is still usable.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.checked.elapsed() >= self.reload_every {
            state.checked = Instant::now();
            // Blocking reads on the handshake path, but of two small files once per interval.
            match self.files.read() {
                Ok(pems) if pems != state.pems => match self.files.parse(&pems, &self.provider) {
                    Ok(certified) => {
                        tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                        state.certified = certified;
                        state.pems = pems;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS certificate not reloaded; keeping the previous one");
                    }
                },
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "TLS certificate not reloaded; keeping the previous one");
                }
            }
        }
        Arc::clone(&state.certified)
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

#[derive(Debug)]
struct State {
    pems: Pems,
    certified: Arc<CertifiedKey>,
    checked: Instant,
}

#[derive(Debug)]
struct KeyPairFiles {
    cert: PathBuf,
    key: PathBuf,
}

/// The files' bytes, to tell whether they changed since the last load.
type Pems = (Vec<u8>, Vec<u8>);

impl KeyPairFiles {
    fn read(&self) -> Result<Pems, TlsError> {
        Ok((read(&self.cert)?, read(&self.key)?))
    }

    fn parse(
        &self,
        (cert, key): &Pems,
        provider: &CryptoProvider,
    ) -> Result<Arc<CertifiedKey>, TlsError> {
        let chain = certs(&self.cert, cert)?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Pem {
            path: self.key.clone(),
            message: format!("no usable private key: {e}"),
        })?;
        // Also checks that the key belongs to the certificate, so a half-rotated pair is
        // refused here rather than failing every handshake.
        Ok(Arc::new(CertifiedKey::from_der(chain, key, provider)?))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            message: "no CERTIFICATE block".into(),
        });
    }
    Ok(chain)
}

fn roots(ca_pem: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certs(ca_pem, &read(ca_pem)?)? {
        store.add(cert).map_err(|e| TlsError::ClientCa {
            path: ca_pem.to_path_buf(),
            message: e.to_string(),
        })?;
    }
    Ok(store)
}

/// Files of an mTLS server: its certificate chain and key, and the CA(s) client certificates
/// must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// A server config that requires a client certificate signed by `files.client_ca`, serves
/// `files.cert` (re-read every `reload_every` when changed) and offers h2 only over ALPN (gRPC).
/// The client CA is read once: a new CA bundle needs a restart.
pub fn mtls_server_config(
    files: &ServerTlsFiles,
    reload_every: Duration,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let resolver =
        ReloadingCert::new(&files.cert, &files.key, reload_every, Arc::clone(&provider))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(&files.client_ca)?),
        Arc::clone(&provider),
    )
    .build()
    .map_err(|e| TlsError::ClientCa {
        path: files.client_ca.clone(),
        message: e.to_string(),
    })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A server config without client authentication (the injector webhook's), from a reloading
/// certificate, offering `alpn`.
pub fn server_config(
    cert_pem: &Path,
    key_pem: &Path,
    reload_every: Duration,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let resolver = ReloadingCert::new(cert_pem, key_pem, reload_every, Arc::clone(&provider))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Files of an mTLS client: the CA that signs the server's certificate, and the client's own
/// certificate chain and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Name to verify the server's certificate against; the URL's host when `None`.
    pub server_name: Option<String>,
}

/// PEM bytes of a client's CA, certificate and key.
pub type ClientPems = (Vec<u8>, Vec<u8>, Vec<u8>);

impl ClientTlsFiles {
    /// The three files' PEM bytes (CA, certificate, key), checked to parse, for clients that
    /// build their own config (tonic's `ClientTlsConfig`).
    pub fn load_pems(&self) -> Result<ClientPems, TlsError> {
        let ca = read(&self.ca)?;
        certs(&self.ca, &ca)?;
        let cert = read(&self.cert)?;
        let key = read(&self.key)?;
        // Same checks as the server's: a key that is not the certificate's is refused now.
        KeyPairFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
        .parse(&(cert.clone(), key.clone()), &ring::default_provider())?;
        Ok((ca, cert, key))
    }
}

/// tonic's client TLS config (ring provider) from the files, read now: a gRPC client calls it
/// on every (re)connect, so a renewed client certificate is used from the next connection on.
pub fn tonic_client_tls(
    files: &ClientTlsFiles,
) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
    let (ca, cert, key) = files.load_pems()?;
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .identity(tonic::transport::Identity::from_pem(cert, key));
    if let Some(name) = &files.server_name {
        tls = tls.domain_name(name.clone());
    }
    Ok(tls)
}

/// A client config presenting `files.cert` and trusting only `files.ca`, offering h2 (gRPC).
pub fn mtls_client_config(files: &ClientTlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let chain = certs(&files.cert, &read(&files.cert)?)?;
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?).map_err(|e| TlsError::Pem {
        path: files.key.clone(),
        message: format!("no usable private key: {e}"),
    })?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(&files.ca)?)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
