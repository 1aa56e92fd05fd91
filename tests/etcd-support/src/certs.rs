//! Throwaway TLS certificates made with the `openssl` command line.

use std::path::PathBuf;
use std::process::Command;

/// A throwaway CA (`ca`) with a server certificate for 127.0.0.1 and localhost (`server`:
/// cert, key) and a client certificate (`client`: cert, key), all PEM files in `dir`, valid
/// for a day. The directory is removed on drop.
pub struct Certs {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server: (PathBuf, PathBuf),
    pub client: (PathBuf, PathBuf),
}

impl Certs {
    /// Makes them with `openssl` in a fresh temp dir named after `name`; panics (with
    /// openssl's stderr) if that fails.
    pub fn make(name: &str) -> Certs {
        let dir = crate::fresh_temp_dir(&format!("weft-certs-{name}"))
            .expect("creating the certificates' temp dir");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl must be installed");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=weft-test-ca",
        ]);
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )
        .expect("writing server.ext");
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")
            .expect("writing client.ext");
        for who in ["server", "client"] {
            run(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{who}.key"),
                "-out",
                &format!("{who}.csr"),
                "-subj",
                &format!("/CN=weft-{who}"),
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{who}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{who}.pem"),
                "-days",
                "1",
                "-extfile",
                &format!("{who}.ext"),
            ]);
        }
        Certs {
            ca: dir.join("ca.pem"),
            server: (dir.join("server.pem"), dir.join("server.key")),
            client: (dir.join("client.pem"), dir.join("client.key")),
            dir,
        }
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
