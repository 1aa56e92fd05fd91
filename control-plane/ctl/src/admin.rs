//! Reading debug documents from the control plane's admin port.

use std::time::Duration;

use reqwest::{StatusCode, Url};

/// Why a document could not be read. Each names the URL asked, so a wrong `--admin` is
/// obvious from the message alone.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// `--admin` does not parse as a URL.
    #[error("--admin `{given}` is not a URL: {reason}")]
    BadUrl { given: String, reason: String },
    /// No connection: nothing listens there, the host does not resolve, TLS failed.
    #[error("cannot reach the control plane's admin port at {url}: {detail} (is --admin right?)")]
    Unreachable {
        url: String,
        detail: String,
        #[source]
        source: reqwest::Error,
    },
    /// Connected (or tried to) but no answer in time.
    #[error(
        "the control plane's admin port at {url} did not answer within {} (is --admin right?)",
        humantime::format_duration(*after)
    )]
    Timeout {
        url: String,
        after: Duration,
        #[source]
        source: reqwest::Error,
    },
    /// The thing asked for does not exist (404): the server's own message, e.g. `no connected
    /// xDS client has node id envoy-9`.
    #[error("{message}")]
    NotFound { url: String, message: String },
    /// The admin port does not serve this page at all: a control plane older than weftctl.
    #[error("the control plane at {base} does not serve {path} (is it older than this weftctl?)")]
    NotServed { base: String, path: String },
    /// Any other non-2xx answer.
    #[error("{url}: HTTP {status}: {message}")]
    Status {
        url: String,
        status: StatusCode,
        message: String,
    },
    /// 2xx, but not the JSON document expected.
    #[error("{url}: the answer is not the JSON document weftctl expects: {source}")]
    BadDocument {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    /// Anything else reqwest reports (a broken body, a redirect loop).
    #[error("{url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

impl AdminError {
    /// True when the server answered that the node or service asked for does not exist, as
    /// opposed to weftctl not getting an answer at all.
    pub fn is_not_found(&self) -> bool {
        matches!(self, AdminError::NotFound { .. })
    }
}

/// A client of one control plane's admin port.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: Url,
    http: reqwest::Client,
    timeout: Duration,
}

impl AdminClient {
    /// `admin` is the admin port's base URL; `host:port` alone means `http://host:port`.
    pub fn new(admin: &str, timeout: Duration) -> Result<Self, AdminError> {
        let bad = |reason: String| AdminError::BadUrl {
            given: admin.to_string(),
            reason,
        };
        // Without a scheme `localhost:19000` would parse as scheme `localhost`.
        let text = if admin.contains("://") {
            admin.to_string()
        } else {
            format!("http://{admin}")
        };
        let base = Url::parse(&text).map_err(|e| bad(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(bad(format!(
                "scheme `{}` is not http or https",
                base.scheme()
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("weftctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            base,
            http,
            timeout,
        })
    }

    /// The URL of `path` (`/debug/clients`) with `query`, under the base URL's own path, so a
    /// control plane behind a path-prefix proxy works.
    pub fn url(&self, path: &str, query: &[(&str, &str)]) -> Url {
        let mut url = self.base.clone();
        let joined = format!(
            "{}/{}",
            self.base.path().trim_end_matches('/'),
            path.trim_start_matches('/')
        );
        url.set_path(&joined);
        url.set_query(None);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// GETs `path` and decodes it as JSON.
    pub async fn get(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<serde_json::Value, AdminError> {
        let url = self.url(path, query);
        let shown = url.to_string();
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| self.transport(&shown, e))?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| self.transport(&shown, e))?;
        if status.is_success() {
            return serde_json::from_str(&body)
                .map_err(|source| AdminError::BadDocument { url: shown, source });
        }
        let message = body.trim().to_string();
        if status == StatusCode::NOT_FOUND {
            // weft-admin's answer for a page it does not have (`docs/admin.md`).
            if message.starts_with("no admin page at ") {
                return Err(AdminError::NotServed {
                    base: self.base.to_string(),
                    path: path.to_string(),
                });
            }
            return Err(AdminError::NotFound {
                url: shown,
                message,
            });
        }
        Err(AdminError::Status {
            url: shown,
            status,
            message,
        })
    }

    fn transport(&self, url: &str, e: reqwest::Error) -> AdminError {
        if e.is_timeout() {
            AdminError::Timeout {
                url: url.to_string(),
                after: self.timeout,
                source: e,
            }
        } else if e.is_connect() {
            AdminError::Unreachable {
                url: url.to_string(),
                detail: innermost(&e),
                source: e,
            }
        } else {
            AdminError::Http {
                url: url.to_string(),
                source: e,
            }
        }
    }
}

/// The root cause of a transport error (`Connection refused (os error 111)`): reqwest's and
/// hyper's outer layers only say "error sending request" and "client error (Connect)".
fn innermost(e: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn client(admin: &str) -> AdminClient {
        AdminClient::new(admin, Duration::from_secs(1)).unwrap()
    }

    #[test]
    fn urls_keep_the_base_path_and_encode_the_query() {
        assert_eq!(
            client("http://127.0.0.1:19000")
                .url("/debug/proxy_config", &[("node", "envoy~1 a&b")])
                .as_str(),
            "http://127.0.0.1:19000/debug/proxy_config?node=envoy%7E1+a%26b"
        );
        assert_eq!(
            client("https://mesh.example/weft/")
                .url("/debug/clients", &[])
                .as_str(),
            "https://mesh.example/weft/debug/clients"
        );
        assert_eq!(
            client("localhost:19000")
                .url("/debug/clients", &[])
                .as_str(),
            "http://localhost:19000/debug/clients"
        );
    }

    #[test]
    fn a_url_that_is_not_http_is_refused() {
        let e = AdminClient::new("ftp://x", Duration::from_secs(1)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--admin `ftp://x` is not a URL: scheme `ftp` is not http or https"
        );
        assert!(AdminClient::new("http://", Duration::from_secs(1)).is_err());
    }
}
