//! The webhook's serving certificate, reloaded from its files when they change.
//!
//! Both cert-manager and a chart-generated Secret reach the pod as a mounted Secret, which
//! the kubelet updates in place (an atomic symlink swap) when the certificate is renewed. A
//! webhook that read the files once would serve the old certificate until restarted and then
//! fail every admission once it expired. The reloading itself is `weft_identity`'s, shared
//! with the gRPC port's mTLS; the webhook only differs in asking for no client certificate
//! (the API server does not present one) and offering http/1.1 as well as h2.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls::ServerConfig;
use weft_identity::TlsError;
use weft_identity::tls::{ReloadingCert, provider};

use crate::error::InjectError;

/// How often [`tls_config`] looks at the certificate files again.
pub const DEFAULT_RELOAD_INTERVAL: Duration = weft_identity::tls::DEFAULT_RELOAD_INTERVAL;

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
    let provider = provider();
    let resolver = ReloadingCert::new(cert_pem, key_pem, reload_every, Arc::clone(&provider))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::from)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
