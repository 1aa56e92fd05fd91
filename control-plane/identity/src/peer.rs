//! The identity of a TLS peer, read from the leaf of its verified certificate chain.

use tokio_rustls::rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::{Identity, SpiffeError, TrustDomain};

/// Why a peer's certificate does not give a usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("the peer presented no client certificate")]
    NoCertificate,
    #[error("the peer's certificate cannot be parsed: {0}")]
    Unparsable(String),
    #[error(
        "the peer's certificate has no URI SAN; it must carry exactly one, a SPIFFE ID such as \
         spiffe://<trust-domain>/ns/<namespace>/svc/<service>"
    )]
    NoUriSan,
    #[error(
        "the peer's certificate has {} URI SANs ({}); it must carry exactly one SPIFFE ID",
        .0.len(),
        .0.join(", ")
    )]
    SeveralUriSans(Vec<String>),
    #[error("the peer's URI SAN is not a usable SPIFFE ID: {0}")]
    Spiffe(#[from] SpiffeError),
    #[error("the peer's SPIFFE ID `{id}` is not in trust domain `{expected}`")]
    WrongTrustDomain { id: String, expected: String },
}

/// The workload identity of a peer whose chain rustls has already verified: the leaf (first
/// certificate) must carry exactly one URI SAN, a SPIFFE ID in `trust_domain` naming a
/// namespace and a service. Several URI SANs are refused rather than picking one, since which
/// one was meant is ambiguous and a CA that issues such certificates is not issuing SPIFFE
/// SVIDs.
pub fn identity_from_chain(
    chain: &[CertificateDer<'_>],
    trust_domain: &TrustDomain,
) -> Result<Identity, PeerError> {
    let leaf = chain.first().ok_or(PeerError::NoCertificate)?;
    let (_, cert) =
        X509Certificate::from_der(leaf).map_err(|e| PeerError::Unparsable(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PeerError::Unparsable(e.to_string()))?;
    let uris: Vec<String> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let uri = match uris.as_slice() {
        [] => return Err(PeerError::NoUriSan),
        [one] => one,
        _ => return Err(PeerError::SeveralUriSans(uris)),
    };
    let identity = Identity::parse(uri)?;
    if identity.trust_domain() != trust_domain {
        return Err(PeerError::WrongTrustDomain {
            id: identity.to_string(),
            expected: trust_domain.to_string(),
        });
    }
    Ok(identity)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::testing::TestCa;

    fn leaf(pem: &str) -> Vec<CertificateDer<'static>> {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    }

    fn td() -> TrustDomain {
        TrustDomain::new("weft.test").unwrap()
    }

    #[test]
    fn one_spiffe_uri_san_gives_the_identity() {
        let ca = TestCa::new("ca").unwrap();
        let c = ca
            .client(&["spiffe://weft.test/ns/default/svc/web"])
            .unwrap();
        let id = identity_from_chain(&leaf(&c.cert), &td()).unwrap();
        assert_eq!(
            (id.namespace.as_str(), id.service.as_str()),
            ("default", "web")
        );
    }

    #[test]
    fn exactly_one_uri_san() {
        let ca = TestCa::new("ca").unwrap();
        let none = ca.server(&["localhost"]).unwrap();
        assert_eq!(
            identity_from_chain(&leaf(&none.cert), &td()),
            Err(PeerError::NoUriSan)
        );
        let two = ca
            .client(&[
                "spiffe://weft.test/ns/default/svc/web",
                "spiffe://weft.test/ns/default/svc/api",
            ])
            .unwrap();
        let err = identity_from_chain(&leaf(&two.cert), &td()).unwrap_err();
        assert!(
            matches!(err, PeerError::SeveralUriSans(ref v) if v.len() == 2),
            "{err}"
        );
        assert!(err.to_string().contains("svc/api"), "{err}");
        assert_eq!(
            identity_from_chain(&[], &td()),
            Err(PeerError::NoCertificate)
        );
    }

    #[test]
    fn uri_must_be_a_workload_spiffe_id_in_the_trust_domain() {
        let ca = TestCa::new("ca").unwrap();
        let other = ca
            .client(&["spiffe://evil.test/ns/default/svc/web"])
            .unwrap();
        let err = identity_from_chain(&leaf(&other.cert), &td()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the peer's SPIFFE ID `spiffe://evil.test/ns/default/svc/web` is not in trust \
             domain `weft.test`"
        );
        let https = ca.client(&["https://weft.test/web"]).unwrap();
        assert!(matches!(
            identity_from_chain(&leaf(&https.cert), &td()),
            Err(PeerError::Spiffe(SpiffeError::Scheme(_)))
        ));
        let no_ns = ca.client(&["spiffe://weft.test/svc/web"]).unwrap();
        assert!(matches!(
            identity_from_chain(&leaf(&no_ns.cert), &td()),
            Err(PeerError::Spiffe(SpiffeError::NoWorkload(_)))
        ));
    }
}
