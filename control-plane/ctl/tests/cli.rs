//! What weftctl says when it gets no usable answer: nothing listening, no answer in time, a
//! control plane without the page. No control plane runs here; the ports are fakes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use common::{free_port, weftctl};

#[test]
fn nothing_listening_exits_3_naming_the_url() {
    let port = free_port();
    let admin = format!("http://127.0.0.1:{port}");
    let run = weftctl(&["--admin", &admin, "status"]);
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.stderr.starts_with(&format!(
            "weftctl: cannot reach the control plane's admin port at {admin}/debug/clients: "
        )) && run.stderr.ends_with(" (is --admin right?)\n"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("refused"), "{}", run.stderr);
}

#[test]
fn a_silent_port_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accepts and never answers.
    let _hold = std::thread::spawn(move || {
        let conns: Vec<_> = listener.incoming().take(1).collect();
        std::thread::sleep(Duration::from_secs(5));
        drop(conns);
    });
    let run = weftctl(&[
        "--admin",
        &format!("127.0.0.1:{port}"),
        "--timeout",
        "300ms",
        "status",
    ]);
    assert_eq!(run.code, 3, "{run:?}");
    assert_eq!(
        run.stderr,
        format!(
            "weftctl: the control plane's admin port at http://127.0.0.1:{port}/debug/clients \
             did not answer within 300ms (is --admin right?)\n"
        )
    );
}

/// Answers one request with weft-admin's 404 for a page it does not have.
fn old_control_plane() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Some(Ok(mut conn)) = listener.incoming().next() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let body = "no admin page at /debug/proxy_config; see /\n";
            let _ = write!(
                conn,
                "HTTP/1.1 404 Not Found\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

#[test]
fn a_control_plane_without_the_page_is_called_older() {
    let port = old_control_plane();
    let run = weftctl(&[
        "--admin",
        &format!("http://127.0.0.1:{port}"),
        "config",
        "envoy-1",
    ]);
    assert_eq!(run.code, 3, "{run:?}");
    assert_eq!(
        run.stderr,
        format!(
            "weftctl: the control plane at http://127.0.0.1:{port}/ does not serve \
             /debug/proxy_config (is it older than this weftctl?)\n"
        )
    );
}

#[test]
fn bad_usage_exits_2() {
    assert_eq!(weftctl(&["config"]).code, 2);
    assert_eq!(weftctl(&["validate"]).code, 2);
    assert_eq!(weftctl(&["config", "x", "--type", "sds"]).code, 2);
    let run = weftctl(&["--admin", "ftp://x", "status"]);
    assert_eq!(run.code, 3, "{run:?}");
    assert_eq!(
        run.stderr,
        "weftctl: --admin `ftp://x` is not a URL: scheme `ftp` is not http or https\n"
    );
}
