//! `weft-crds [--check] [DIR]`: writes Weft's CRD YAML files into DIR (default
//! `charts/weft/crds`), or with `--check` only reports which ones are stale.
//!
//! Exit status: 0 done / up to date; 1 `--check` found stale files; 2 usage or I/O error.

use std::path::PathBuf;
use std::process::ExitCode;

use weft_crds::generate::{CHART_CRDS_DIR, check, write_all};

const USAGE: &str = "usage: weft-crds [--check] [DIR]   (DIR defaults to charts/weft/crds)";

fn main() -> ExitCode {
    let mut check_only = false;
    let mut dir: Option<PathBuf> = None;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--check" => check_only = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            a if a.starts_with('-') => {
                eprintln!("weft-crds: unknown option `{a}`\n{USAGE}");
                return ExitCode::from(2);
            }
            a => {
                if dir.is_some() {
                    eprintln!("weft-crds: more than one directory given\n{USAGE}");
                    return ExitCode::from(2);
                }
                dir = Some(PathBuf::from(a));
            }
        }
    }
    let dir = dir.unwrap_or_else(|| PathBuf::from(CHART_CRDS_DIR));

    if check_only {
        match check(&dir) {
            Ok(stale) if stale.is_empty() => ExitCode::SUCCESS,
            Ok(stale) => {
                for p in &stale {
                    eprintln!("weft-crds: {} is out of date", p.display());
                }
                eprintln!("weft-crds: run `make crds` to regenerate");
                ExitCode::from(1)
            }
            Err(e) => {
                eprintln!("weft-crds: {e}");
                ExitCode::from(2)
            }
        }
    } else {
        match write_all(&dir) {
            Ok(written) => {
                for p in &written {
                    println!("wrote {}", p.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("weft-crds: {e}");
                ExitCode::from(2)
            }
        }
    }
}
