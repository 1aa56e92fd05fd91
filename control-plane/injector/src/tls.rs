//! The webhook's serving certificate, reloaded from its files when they change.
//!
//! Both cert-manager and a chart-generated Secret reach the pod as a mounted Secret, which
//! the kubelet updates in place (an atomic symlink swap) when the certificate is renewed. A
//! webhook that read the files once would serve the old certificate until restarted and then
//! fail every admission once it expired; so the files are read again, at most once per
//! interval, on a TLS handshake. A pair that does not load (e.g. read between the two files'
//! updates) is logged and the previous certificate kept.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

use crate::error::InjectError;

/// How often [`tls_config`] looks at the certificate files again.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(60);

/// A TLS server config for [`crate::serve`] from a PEM certificate chain (leaf first) and a
/// PEM private key (PKCS#8, PKCS#1 or SEC1), using the ring provider and offering h2 and
/// http/1.1 over ALPN. The files are read now (an error if they do not load) and again at
/// most every [`DEFAULT_RELOAD_INTERVAL`], so a renewed certificate is served within about a
/// minute without a restart.
pub fn tls_config(cert_pem: &Path, key_pem: &Path) -> Result<Arc<ServerConfig>, InjectError> {
    tls_config_with_reload(cert_pem, key_pem, DEFAULT_RELOAD_INTERVAL)
}

/// [`tls_config`] with another reload interval (`Duration::MAX` never reloads).
pub fn tls_config_with_reload(
    cert_pem: &Path,
    key_pem: &Path,
    reload_every: Duration,
) -> Result<Arc<ServerConfig>, InjectError> {
    let provider = Arc::new(ring::default_provider());
    let files = Files {
        cert: cert_pem.to_path_buf(),
        key: key_pem.to_path_buf(),
    };
    let (pems, certified) = files.load(&provider)?;
    let resolver = Reloading {
        files,
        provider: Arc::clone(&provider),
        reload_every,
        state: Mutex::new(State {
            pems,
            certified,
            checked: Instant::now(),
        }),
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
}

/// The files' bytes, to tell whether they changed since the last load.
type Pems = (Vec<u8>, Vec<u8>);

impl Files {
    fn read(&self) -> Result<Pems, InjectError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| InjectError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        Ok((read(&self.cert)?, read(&self.key)?))
    }

    fn load(&self, provider: &CryptoProvider) -> Result<(Pems, Arc<CertifiedKey>), InjectError> {
        let pems = self.read()?;
        let certified = self.parse(&pems, provider)?;
        Ok((pems, certified))
    }

    fn parse(
        &self,
        (cert, key): &Pems,
        provider: &CryptoProvider,
    ) -> Result<Arc<CertifiedKey>, InjectError> {
        let pem_error = |path: &Path, message: String| InjectError::Pem {
            path: path.to_path_buf(),
            message,
        };
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_error(&self.cert, e.to_string()))?;
        if chain.is_empty() {
            return Err(pem_error(&self.cert, "no CERTIFICATE block".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| pem_error(&self.key, format!("no usable private key: {e}")))?;
        // Also checks that the key belongs to the certificate, so a half-rotated pair is
        // refused here rather than failing every handshake.
        Ok(Arc::new(CertifiedKey::from_der(chain, key, provider)?))
    }
}

#[derive(Debug)]
struct State {
    pems: Pems,
    certified: Arc<CertifiedKey>,
    checked: Instant,
}

#[derive(Debug)]
struct Reloading {
    files: Files,
    provider: Arc<CryptoProvider>,
    reload_every: Duration,
    state: Mutex<State>,
}

impl Reloading {
    fn current(&self) -> Arc<CertifiedKey> {
        // A panic elsewhere while holding the lock leaves the state intact (it is only ever
        // replaced whole), so a poisoned lock is still usable.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.checked.elapsed() >= self.reload_every {
            state.checked = Instant::now();
            // Blocking reads on the handshake path, but of two small files once per interval.
            match self.files.read() {
                Ok(pems) if pems != state.pems => match self.files.parse(&pems, &self.provider) {
                    Ok(certified) => {
                        tracing::info!(cert = %self.files.cert.display(), "webhook certificate reloaded");
                        state.certified = certified;
                        state.pems = pems;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook certificate not reloaded; keeping the previous one");
                    }
                },
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "webhook certificate not reloaded; keeping the previous one");
                }
            }
        }
        Arc::clone(&state.certified)
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}
