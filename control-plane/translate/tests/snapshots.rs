//! Snapshot tests: whole translations of a few registries, for both flavours, compared with
//! reviewed files under `tests/snapshots/`. `UPDATE_SNAPSHOTS=1` rewrites them; a missing
//! snapshot is a failure otherwise, so a new case can never pass unreviewed.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType as HttpFilterConfigType;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use prost::{Message, Name};
use weft_translate::{Flavor, Options, Resources, translate};

/// `{:#?}` of the resources with byte lists on one line, followed by the decoded `Any`
/// payloads (the bytes alone are unreviewable).
fn render(res: &Resources) -> String {
    let mut out = compact(&format!("{res:#?}"));
    out.push_str("\n\n// ===== decoded Any payloads =====\n");
    for l in &res.listeners {
        let mut anys = Vec::new();
        for fc in &l.filter_chains {
            for f in &fc.filters {
                if let Some(ConfigType::TypedConfig(any)) = &f.config_type {
                    anys.push(any);
                }
            }
        }
        if let Some(api) = l
            .api_listener
            .as_ref()
            .and_then(|a| a.api_listener.as_ref())
        {
            anys.push(api);
        }
        for any in anys {
            let hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
            out.push_str(&format!("\n// listener {}: {}\n", l.name, any.type_url));
            out.push_str(&compact(&format!("{hcm:#?}")));
            for f in &hcm.http_filters {
                if let Some(HttpFilterConfigType::TypedConfig(any)) = &f.config_type {
                    let what = format!("listener {} http filter {}", l.name, f.name);
                    render_rate_limit(&mut out, &what, any);
                }
            }
        }
    }
    for rc in &res.routes {
        for vh in &rc.virtual_hosts {
            let what = format!("route_config {} virtual_host {}", rc.name, vh.name);
            render_per_filter(&mut out, &what, &vh.typed_per_filter_config);
            for r in &vh.routes {
                let what = format!("{what} route {}", r.name);
                render_per_filter(&mut out, &what, &r.typed_per_filter_config);
            }
        }
    }
    for c in &res.clusters {
        let mut opts: Vec<_> = c.typed_extension_protocol_options.iter().collect();
        opts.sort_by_key(|(k, _)| k.as_str());
        for (key, any) in opts {
            let decoded = HttpProtocolOptions::decode(any.value.as_slice()).unwrap();
            out.push_str(&format!(
                "\n// cluster {}: {key}: {}\n",
                c.name, any.type_url
            ));
            out.push_str(&compact(&format!("{decoded:#?}")));
        }
    }
    out.push('\n');
    out
}

fn render_per_filter(out: &mut String, what: &str, configs: &HashMap<String, Any>) {
    let mut configs: Vec<_> = configs.iter().collect();
    configs.sort_by_key(|(k, _)| k.as_str());
    for (key, any) in configs {
        render_rate_limit(out, &format!("{what}: {key}"), any);
    }
}

/// Decodes `any` if it is a LocalRateLimit (the only per-filter config Weft sends); the Router
/// is empty and needs no rendering.
fn render_rate_limit(out: &mut String, what: &str, any: &Any) {
    if any.type_url != LocalRateLimit::type_url() {
        return;
    }
    let decoded = LocalRateLimit::decode(any.value.as_slice()).unwrap();
    out.push_str(&format!("\n// {what}: {}\n", any.type_url));
    out.push_str(&compact(&format!("{decoded:#?}")));
}

/// Joins `[\n 1,\n 2,\n]` runs of integers onto one line.
fn compact(debug: &str) -> String {
    let lines: Vec<&str> = debug.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if line.ends_with('[') {
            let mut j = i + 1;
            let mut nums = Vec::new();
            while j < lines.len() {
                let t = lines[j].trim().trim_end_matches(',');
                if t.parse::<u64>().is_ok() {
                    nums.push(t);
                    j += 1;
                } else {
                    break;
                }
            }
            if !nums.is_empty() && j < lines.len() && lines[j].trim().starts_with(']') {
                out.push(format!("{}{}{}", line, nums.join(", "), lines[j].trim()));
                i = j + 1;
                continue;
            }
        }
        out.push(line.to_string());
        i += 1;
    }
    out.join("\n")
}

fn check(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.snap"));
    if std::env::var("UPDATE_SNAPSHOTS").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "snapshot {} is missing: run `UPDATE_SNAPSHOTS=1 cargo test -p weft-translate \
             --test snapshots`, review the file, and re-run",
            path.display()
        ),
        Err(e) => panic!("reading {}: {e}", path.display()),
    };
    if expected != actual {
        let (n, (want, got)) = expected
            .lines()
            .chain(std::iter::repeat("<end of file>"))
            .zip(actual.lines().chain(std::iter::repeat("<end of output>")))
            .enumerate()
            .find(|(_, (a, b))| a != b)
            .unwrap_or((0, ("<same lines>", "<same lines>")));
        panic!(
            "snapshot {} differs first at line {}:\n  expected: {want}\n  actual:   {got}\n\
             If the change is intended, re-run with UPDATE_SNAPSHOTS=1 and review the diff.",
            path.display(),
            n + 1
        );
    }
}

fn snapshot(name: &str, yaml: &str) {
    let reg = common::registry(yaml);
    for flavor in Flavor::ALL {
        let res = translate(&reg, &Options::default(), flavor);
        check(&format!("{name}.{}", flavor.as_str()), &render(&res));
    }
}

#[test]
fn demo() {
    snapshot("demo", common::DEMO);
}

#[test]
fn routes() {
    snapshot("routes", common::ROUTES);
}

#[test]
fn policies() {
    snapshot("policies", common::POLICIES);
}

#[test]
fn sidecar_policies() {
    snapshot("sidecar_policies", common::SIDECAR_POLICIES);
}

#[test]
fn empty() {
    snapshot("empty", common::EMPTY);
}

#[test]
fn compact_joins_only_integer_lists() {
    assert_eq!(
        compact("a: [\n    1,\n    2,\n],\nb: [\n    x,\n]"),
        "a: [1, 2],\nb: [\n    x,\n]"
    );
}
