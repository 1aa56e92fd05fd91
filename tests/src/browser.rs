//! Headless Chromium for the tests that look at a page, driven through chromedriver with the W3C
//! WebDriver HTTP protocol (plain JSON over HTTP/1.1 on loopback, so no WebDriver crate).
//!
//! Uses Debian's `chromium` and `chromium-driver` (`/usr/bin/chromium`, `/usr/bin/chromedriver`;
//! `$WEFT_CHROMIUM` / `$WEFT_CHROMEDRIVER` override). Their absence is an error saying how to
//! install them, never a skipped test.
//!
//! Cleanup does not rely on chromedriver: killing chromedriver leaves its Chromium running
//! (reparented to init), so [`Browser`]'s drop ends the session, waits for the processes running
//! on its throwaway profile to exit (stopping them by PID after 3 s), then kills chromedriver and
//! removes the profile.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tokio::process::Command;

use crate::{Proc, TestCtx, free_port, wait_for_port};

/// The W3C key under which an element reference travels.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

const INSTALL_HINT: &str = "install Debian's `chromium` and `chromium-driver` \
    (`apt-get install chromium chromium-driver`; CI's .ci/run installs them)";

/// The chromedriver binary: `$WEFT_CHROMEDRIVER` or `/usr/bin/chromedriver`.
pub fn chromedriver_bin() -> Result<PathBuf> {
    tool("WEFT_CHROMEDRIVER", "/usr/bin/chromedriver")
}

/// The Chromium binary: `$WEFT_CHROMIUM` or `/usr/bin/chromium`.
pub fn chromium_bin() -> Result<PathBuf> {
    tool("WEFT_CHROMIUM", "/usr/bin/chromium")
}

fn tool(var: &str, default: &str) -> Result<PathBuf> {
    let p = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    ensure!(
        p.is_file(),
        "{} is missing (${var} to use another): {INSTALL_HINT}",
        p.display()
    );
    Ok(p)
}

/// One chromedriver process with one headless Chromium session.
pub struct Browser {
    /// chromedriver; dropped (killed) after [`Browser`]'s own drop has ended the session.
    _driver: Proc,
    port: u16,
    session: String,
    profile: PathBuf,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("port", &self.port)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

/// The browser's console and network messages, as chromedriver reports them.
#[derive(Debug, Clone)]
pub struct LogEntry {
    pub level: String,
    pub source: String,
    pub message: String,
}

impl Browser {
    /// Starts chromedriver on a free loopback port (log `<artifacts>/chromedriver.log`) and
    /// opens a session on a fresh profile, with a 1280×1000 window.
    pub async fn start(ctx: &TestCtx) -> Result<Self> {
        let driver_bin = chromedriver_bin()?;
        let chromium = chromium_bin()?;
        let port = free_port()?;
        let profile = std::env::temp_dir().join(format!(
            "weft-chromium-{}-{}-{port}",
            ctx.name(),
            std::process::id()
        ));
        if profile.exists() {
            std::fs::remove_dir_all(&profile)
                .with_context(|| format!("removing {}", profile.display()))?;
        }
        std::fs::create_dir_all(&profile)
            .with_context(|| format!("creating {}", profile.display()))?;
        let mut cmd = Command::new(driver_bin);
        cmd.arg(format!("--port={port}"));
        let mut driver = Proc::spawn(ctx, "chromedriver", cmd, false, false)?;
        wait_for_port(port, Duration::from_secs(10)).await?;
        driver.ensure_running()?;
        let mut b = Self {
            _driver: driver,
            port,
            session: String::new(),
            profile,
        };
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": chromium.display().to_string(),
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--window-size=1280,1000",
                    format!("--user-data-dir={}", b.profile.display()),
                ],
            },
        }}});
        let v = b.call("POST", "/session", Some(caps)).await?;
        b.session = v
            .get("sessionId")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("new session answered without a sessionId: {v}"))?
            .to_string();
        Ok(b)
    }

    /// Navigates to `url` and waits for its load event.
    pub async fn goto(&self, url: &str) -> Result<()> {
        self.session_call("POST", "/url", Some(json!({ "url": url })))
            .await
            .map(drop)
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) in the page and returns what
    /// it returns.
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Result<Value> {
        self.session_call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// The rendered text of the first element matching `css` (what a user sees: hidden
    /// elements give ""), `None` when nothing matches.
    pub async fn text(&self, css: &str) -> Result<Option<String>> {
        let found = self
            .session_call(
                "POST",
                "/elements",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await?;
        let Some(id) = found
            .as_array()
            .and_then(|a| a.first())
            .and_then(|e| e.get(ELEMENT_KEY))
            .and_then(Value::as_str)
        else {
            return Ok(None);
        };
        let text = self
            .session_call("GET", &format!("/element/{id}/text"), None)
            .await?;
        Ok(text.as_str().map(str::to_string))
    }

    /// Resizes the window to `width` × `height` CSS pixels.
    pub async fn set_window_size(&self, width: u32, height: u32) -> Result<()> {
        self.session_call(
            "POST",
            "/window/rect",
            Some(json!({ "width": width, "height": height })),
        )
        .await
        .map(drop)
    }

    /// A PNG of the viewport.
    pub async fn screenshot_png(&self) -> Result<Vec<u8>> {
        let v = self.session_call("GET", "/screenshot", None).await?;
        let b64 = v
            .as_str()
            .ok_or_else(|| anyhow!("screenshot is not a string: {v}"))?;
        let png = decode_base64(b64)?;
        ensure!(
            png.starts_with(b"\x89PNG\r\n\x1a\n"),
            "the screenshot is not a PNG"
        );
        Ok(png)
    }

    /// The browser log entries since the last call (chromedriver hands each entry out once),
    /// or `None` if this chromedriver serves neither the Selenium nor the legacy log endpoint.
    pub async fn browser_log(&self) -> Result<Option<Vec<LogEntry>>> {
        for path in ["/se/log", "/log"] {
            let url = format!("/session/{}{path}", self.session);
            let (status, v) = self
                .request("POST", &url, Some(json!({"type": "browser"})))
                .await?;
            if status != 200 {
                continue;
            }
            let entries = v
                .get("value")
                .and_then(Value::as_array)
                .ok_or_else(|| anyhow!("browser log is not a list: {v}"))?;
            let field = |e: &Value, k: &str| {
                e.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            return Ok(Some(
                entries
                    .iter()
                    .map(|e| LogEntry {
                        level: field(e, "level"),
                        source: field(e, "source"),
                        message: field(e, "message"),
                    })
                    .collect(),
            ));
        }
        Ok(None)
    }

    async fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        self.call(method, &format!("/session/{}{path}", self.session), body)
            .await
    }

    /// One WebDriver command; its `value`, or an error with WebDriver's error code and message.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let (status, mut v) = self.request(method, path, body).await?;
        let value = v.get_mut("value").map(Value::take).unwrap_or(Value::Null);
        if status != 200 {
            let code = value.get("error").and_then(Value::as_str).unwrap_or("?");
            let msg = value.get("message").and_then(Value::as_str).unwrap_or("");
            bail!("WebDriver {method} {path}: {status} {code}: {msg}");
        }
        Ok(value)
    }

    async fn request(&self, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value)> {
        // Session creation starts the browser: slow on a busy 2-core machine.
        let timeout = Duration::from_secs(60);
        tokio::time::timeout(timeout, self.request_inner(method, path, body))
            .await
            .map_err(|_| anyhow!("WebDriver {method} {path} timed out after {timeout:?}"))?
    }

    async fn request_inner(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .with_context(|| format!("connecting to chromedriver on 127.0.0.1:{}", self.port))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        let driver = tokio::spawn(conn);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, format!("127.0.0.1:{}", self.port))
            .header(
                http::header::CONTENT_TYPE,
                "application/json; charset=utf-8",
            )
            .header(http::header::CONNECTION, "close")
            .body(Full::new(Bytes::from(body)))?;
        let resp = sender
            .send_request(req)
            .await
            .with_context(|| format!("WebDriver {method} {path}"))?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        driver.abort();
        let v = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "WebDriver {method} {path}: {status}, not JSON: {}",
                String::from_utf8_lossy(&bytes)
            )
        })?;
        Ok((status, v))
    }

    /// Ends the session with a blocking request: drop cannot await, and it must work while a
    /// failed test unwinds.
    fn delete_session_blocking(&self) -> std::io::Result<()> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "DELETE /session/{} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
            self.session, self.port
        )?;
        // chromedriver keeps the connection open after answering, so read just the response.
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    return Ok(());
                }
            }
        }
    }

    /// PIDs of the processes running on our profile: the browser and its zygotes, renderers
    /// and utilities all carry `--user-data-dir=<profile>` on their command line.
    fn our_processes(&self) -> Vec<u32> {
        let needle = format!("--user-data-dir={}", self.profile.display());
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| contains(&c, needle.as_bytes()))
            })
            .collect()
    }

    /// Waits for the browser's processes to go after the session ended (they take a moment),
    /// then stops any left by PID: a failed `DELETE` or a hung browser must not outlive the
    /// test.
    fn stop_browser(&self) {
        for round in 0..50 {
            let left = self.our_processes();
            if left.is_empty() {
                return;
            }
            if round == 30 {
                eprintln!("Chromium outlived its session; stopping pids {left:?}");
                // SIGTERM: Chromium takes its renderers and crash handler down with it.
                let _ = std::process::Command::new("kill")
                    .args(left.iter().map(u32::to_string))
                    .status();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty()
            && let Err(e) = self.delete_session_blocking()
        {
            eprintln!("ending the WebDriver session {}: {e}", self.session);
        }
        // Also without a session: creating one may have started the browser, then failed.
        self.stop_browser();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Standard base64 with padding, whitespace ignored (WebDriver's screenshot encoding).
pub fn decode_base64(s: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for (i, c) in s.bytes().filter(|c| !c.is_ascii_whitespace()).enumerate() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => bail!("invalid base64 byte {c:#04x} at {i}"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_base64() {
        for (enc, dec) in [
            ("", ""),
            ("Zg==", "f"),
            ("Zm8=", "fo"),
            ("Zm9v", "foo"),
            ("Zm9vYg==", "foob"),
            ("Zm9v\nYmFy", "foobar"),
        ] {
            assert_eq!(decode_base64(enc).unwrap(), dec.as_bytes(), "{enc}");
        }
        assert_eq!(decode_base64("+/+/").unwrap(), [0xfb, 0xff, 0xbf]);
        assert!(decode_base64("Zm9v!").is_err());
    }
}
