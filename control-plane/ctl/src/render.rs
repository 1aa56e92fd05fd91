//! The human tables of `status`, `config` and `endpoints`, from the admin documents. Pure:
//! the current time is passed in, so a fixture renders the same way every time.

use std::collections::BTreeSet;

use crate::docs::{Client, Clients, Endpoints, Instance, ProxyConfig, Rejection, Service};
use crate::table::{
    Table, age_since, api, one_line, or_dash, short_version, type_rank, type_short,
};

/// The four columns `status` always shows, in this order.
const STATUS_TYPES: [&str; 4] = ["CDS", "EDS", "LDS", "RDS"];

/// `weftctl status`: one row per stream, then every resource a client currently rejects.
pub fn status(doc: &Clients, now_ms: i64) -> String {
    let mut clients: Vec<&Client> = doc.clients.iter().collect();
    clients.sort_by(|a, b| (&a.node_id, a.stream_id).cmp(&(&b.node_id, b.stream_id)));
    if clients.is_empty() {
        return "No xDS client is connected.\n".to_string();
    }
    let mut table = Table::new(&[
        "NODE", "STREAM", "API", "FLAVOUR", "CDS", "EDS", "LDS", "RDS",
    ]);
    let mut rejected = Table::new(&[
        "NODE", "STREAM", "TYPE", "RESOURCE", "VERSION", "AGE", "REASON",
    ]);
    for c in &clients {
        let mut row = vec![
            or_dash(Some(&c.node_id)),
            c.stream_id.to_string(),
            api(&c.variant, &c.service),
            or_dash(Some(&c.flavor)),
        ];
        for short in STATUS_TYPES {
            let cell = c
                .types
                .iter()
                .find(|(url, _)| type_short(url) == short)
                .map_or_else(
                    || "-".to_string(),
                    |(_, t)| {
                        let mut cell = or_state(t.state.as_deref());
                        // The version the proxy holds: what it last ACKed.
                        if let Some(v) = t.last_acked_version.as_deref().filter(|v| !v.is_empty()) {
                            cell.push(' ');
                            cell.push_str(&short_version(Some(v)));
                        }
                        if let Some(since) = t.state_since_unix_ms {
                            cell.push(' ');
                            cell.push_str(&age_since(Some(since), now_ms));
                        }
                        cell
                    },
                );
            row.push(cell);
        }
        table.row(row);
        let mut types: Vec<_> = c.types.iter().collect();
        types.sort_by_key(|(url, _)| type_rank(url));
        for (url, t) in types {
            for r in &t.rejected {
                rejected.row(vec![
                    or_dash(Some(&c.node_id)),
                    c.stream_id.to_string(),
                    type_short(url),
                    or_dash(Some(&r.name)),
                    short_version(r.version.as_deref()),
                    age_since(r.at_unix_ms, now_ms),
                    one_line(&r.reason),
                ]);
            }
        }
    }
    let mut out = table.render();
    out.push('\n');
    if rejected.is_empty() {
        out.push_str("No resource is rejected.\n");
    } else {
        out.push_str("Rejected resources:\n");
        out.push_str(&rejected.render());
    }
    out
}

fn or_state(state: Option<&str>) -> String {
    match state {
        Some(s) if !s.is_empty() => s.to_string(),
        // A control plane older than weftctl reports no state.
        _ => "?".to_string(),
    }
}

/// What `weftctl config` shows: which types, and which resources by name (none = all).
#[derive(Debug, Clone, Default)]
pub struct ConfigFilter {
    /// Short type names (`CDS`, ...), upper case; empty means every type.
    pub types: BTreeSet<String>,
    /// Resource names; empty means every resource.
    pub names: BTreeSet<String>,
}

impl ConfigFilter {
    pub fn wants_type(&self, type_url: &str) -> bool {
        self.types.is_empty() || self.types.contains(&type_short(type_url))
    }

    pub fn wants_name(&self, name: &str) -> bool {
        self.names.is_empty() || self.names.contains(name)
    }

    /// The server's document with only what the filter keeps, for `-o json`.
    pub fn apply_json(&self, mut doc: serde_json::Value) -> serde_json::Value {
        let streams = doc
            .get_mut("streams")
            .and_then(|s| s.as_array_mut())
            .into_iter()
            .flatten();
        for stream in streams {
            let Some(types) = stream.get_mut("types").and_then(|t| t.as_object_mut()) else {
                continue;
            };
            types.retain(|url, _| self.wants_type(url));
            for t in types.values_mut() {
                if let Some(res) = t.get_mut("resources").and_then(|r| r.as_array_mut()) {
                    res.retain(|r| {
                        self.wants_name(r.get("name").and_then(|n| n.as_str()).unwrap_or(""))
                    });
                }
            }
        }
        doc
    }
}

/// `weftctl config <node>`: per stream, its types and every resource it was sent.
pub fn proxy_config(doc: &ProxyConfig, filter: &ConfigFilter, now_ms: i64) -> String {
    let mut out = String::new();
    let mut streams: Vec<_> = doc.streams.iter().collect();
    streams.sort_by_key(|s| s.stream_id);
    let mut details = Vec::new();
    for (i, s) in streams.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!(
            "Node {}, stream {}: {}, {} flavour\n",
            doc.node_id,
            s.stream_id,
            api(&s.variant, &s.service),
            or_dash(Some(&s.flavor)),
        ));
        let mut types: Vec<_> = s
            .types
            .iter()
            .filter(|(url, _)| filter.wants_type(url))
            .collect();
        types.sort_by_key(|(url, _)| type_rank(url));
        if types.is_empty() {
            out.push_str("No type matches.\n");
            continue;
        }
        let mut summary = Table::new(&["TYPE", "STATE", "ACKED", "CURRENT", "RESOURCES"]);
        let mut resources = Table::new(&[
            "TYPE", "NAME", "VERSION", "CURRENT", "STATE", "BYTES", "REJECTED",
        ]);
        for (url, t) in &types {
            let short = type_short(url);
            summary.row(vec![
                short.clone(),
                or_state(t.state.as_deref()),
                short_version(t.last_acked_version.as_deref()),
                short_version(t.current_version.as_deref()),
                t.resources.len().to_string(),
            ]);
            let mut res: Vec<_> = t
                .resources
                .iter()
                .filter(|r| filter.wants_name(&r.name))
                .collect();
            res.sort_by(|a, b| a.name.cmp(&b.name));
            for r in res {
                resources.row(vec![
                    short.clone(),
                    or_dash(Some(&r.name)),
                    short_version(r.version.as_deref()),
                    r.current_version
                        .as_deref()
                        .map_or_else(|| "(removed)".to_string(), |v| short_version(Some(v))),
                    or_state(r.state.as_deref()),
                    r.bytes.map_or_else(|| "-".to_string(), |b| b.to_string()),
                    rejection(r.rejected.as_ref(), now_ms),
                ]);
                // Whole resources only when asked for by name: a full dump of every
                // resource is /debug/config_dump's job.
                if !filter.names.is_empty()
                    && let Some(text) = &r.resource
                {
                    details.push(format!(
                        "--- {short} {} (stream {}, version {}) ---\n{text}\n",
                        r.name,
                        s.stream_id,
                        short_version(r.version.as_deref()),
                    ));
                }
            }
        }
        out.push('\n');
        out.push_str(&summary.render());
        out.push('\n');
        if resources.is_empty() {
            out.push_str("No resource matches.\n");
        } else {
            out.push_str(&resources.render());
        }
    }
    if streams.is_empty() {
        out.push_str(&format!("Node {} has no stream.\n", doc.node_id));
    }
    for d in details {
        out.push('\n');
        out.push_str(&d);
    }
    out
}

fn rejection(r: Option<&Rejection>, now_ms: i64) -> String {
    match r {
        None => "-".to_string(),
        Some(r) => format!(
            "{} {} ago: {}",
            short_version(r.version.as_deref()),
            age_since(r.at_unix_ms, now_ms),
            one_line(&r.reason)
        ),
    }
}

/// `weftctl endpoints`: every service, one line each.
pub fn services(doc: &Endpoints) -> String {
    if doc.services.is_empty() {
        return "The registry has no service.\n".to_string();
    }
    let mut services: Vec<_> = doc.services.iter().collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    let mut t = Table::new(&["SERVICE", "PROTOCOL", "INSTANCES", "HEALTHY", "SOURCES"]);
    for s in services {
        let healthy = s.instances.iter().filter(|i| i.health == "healthy").count();
        let sources: BTreeSet<&str> = s.instances.iter().map(|i| i.source.as_str()).collect();
        let sources: Vec<&str> = sources.into_iter().filter(|s| !s.is_empty()).collect();
        t.row(vec![
            s.name.clone(),
            or_dash(Some(&s.protocol)),
            s.instances.len().to_string(),
            healthy.to_string(),
            if sources.is_empty() {
                "-".to_string()
            } else {
                sources.join(",")
            },
        ]);
    }
    t.render()
}

/// `weftctl endpoints <service>`: the service's instances.
pub fn instances(s: &Service) -> String {
    let mut out = format!(
        "Service {} ({}), {} instance{}\n",
        s.name,
        or_dash(Some(&s.protocol)),
        s.instances.len(),
        if s.instances.len() == 1 { "" } else { "s" }
    );
    if s.instances.is_empty() {
        return out;
    }
    let mut instances: Vec<&Instance> = s.instances.iter().collect();
    instances.sort_by(|a, b| (&a.address, a.port, &a.id).cmp(&(&b.address, b.port, &b.id)));
    let mut t = Table::new(&[
        "ADDRESS", "WEIGHT", "ZONE", "HEALTH", "SOURCE", "ID", "METADATA",
    ]);
    for i in instances {
        t.row(vec![
            socket(&i.address, i.port),
            i.weight.map_or_else(|| "-".to_string(), |w| w.to_string()),
            or_dash(i.zone.as_deref()),
            or_dash(Some(&i.health)),
            or_dash(Some(&i.source)),
            or_dash(Some(&i.id)),
            metadata(i),
        ]);
    }
    out.push('\n');
    out.push_str(&t.render());
    out
}

/// `address:port`, bracketing IPv6 addresses as URLs do, so the port is unambiguous.
fn socket(address: &str, port: u64) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

fn metadata(i: &Instance) -> String {
    if i.metadata.is_empty() {
        return "-".to_string();
    }
    i.metadata
        .iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn fixture<T: serde::de::DeserializeOwned>(name: &str) -> T {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    /// The fixtures' clock: 10 minutes after the streams connected.
    const NOW: i64 = 1_795_427_562_669;

    #[test]
    fn status_shows_each_type_and_every_rejection() {
        let out = status(&fixture("clients.json"), NOW);
        let expected = "\
NODE          STREAM  API        FLAVOUR  CDS                  EDS                 LDS                  RDS
envoy-delta   3       Delta ADS  envoy    SYNCED 5d1c9a0e 9m   SYNCED 0e2f4a6b 9m  SYNCED 77aa01c3 9m   NACKED 9f3c1a2b 10s
envoy-demo    2       SotW ADS   envoy    SYNCED b705507a 10m  STALE 3c4d5e6f 2s   SYNCED 77aa01c3 10m  SYNCED 9f3c1a2b 10m
grpc-echo     5       SotW ADS   grpc     SYNCED 1b2c3d4e 5m   SYNCED 2a2a2a2a 5m  SYNCED 3b3b3b3b 5m   SYNCED 4c4c4c4c 5m
per-type-eds  7       SotW EDS   envoy    -                    STALE 40s           -                    -

Rejected resources:
NODE         STREAM  TYPE  RESOURCE   VERSION   AGE  REASON
envoy-delta  3       RDS   weft_http  d00dfeed  10s  Proto constraint validation failed (RouteValidationError.VirtualHosts[0]): value is required
";
        assert_eq!(out, expected, "\n{out}");
    }

    #[test]
    fn status_without_clients_says_so() {
        assert_eq!(
            status(&Clients::default(), NOW),
            "No xDS client is connected.\n"
        );
    }

    #[test]
    fn config_lists_resources_with_their_rejection() {
        let out = proxy_config(&fixture("proxy_config.json"), &ConfigFilter::default(), NOW);
        let expected = "\
Node envoy-delta, stream 3: Delta ADS, envoy flavour

TYPE  STATE   ACKED     CURRENT   RESOURCES
CDS   SYNCED  5d1c9a0e  5d1c9a0e  2
EDS   SYNCED  0e2f4a6b  0e2f4a6b  2
LDS   SYNCED  77aa01c3  77aa01c3  1
RDS   NACKED  9f3c1a2b  d00dfeed  1

TYPE  NAME       VERSION   CURRENT    STATE   BYTES  REJECTED
CDS   echo       aa11bb22  aa11bb22   SYNCED  231    -
CDS   web        cc33dd44  cc33dd44   SYNCED  220    -
EDS   echo       ee55ff66  ee55ff66   SYNCED  174    -
EDS   old        12121212  (removed)  STALE   -      -
LDS   weft_http  77aa01c3  77aa01c3   SYNCED  1204   -
RDS   weft_http  9f3c1a2b  d00dfeed   NACKED  388    d00dfeed 10s ago: Proto constraint validation failed (RouteValidationError.VirtualHosts[0]): value is required
";
        assert_eq!(out, expected, "\n{out}");
    }

    #[test]
    fn config_filters_by_type_and_name_and_shows_a_named_resource() {
        let filter = ConfigFilter {
            types: ["CDS".to_string()].into(),
            names: ["web".to_string()].into(),
        };
        let out = proxy_config(&fixture("proxy_config.json"), &filter, NOW);
        assert!(out.contains("CDS   web "), "{out}");
        assert!(!out.contains("echo"), "{out}");
        assert!(!out.contains("RDS"), "{out}");
        assert!(
            out.contains("--- CDS web (stream 3, version cc33dd44) ---\nCluster { name: \"web\""),
            "{out}"
        );
        let doc: serde_json::Value = fixture("proxy_config.json");
        let json = filter.apply_json(doc);
        let types = json["streams"][0]["types"].as_object().unwrap();
        assert_eq!(types.len(), 1);
        let (_, cds) = types.iter().next().unwrap();
        assert_eq!(cds["resources"].as_array().unwrap().len(), 1);
        assert_eq!(cds["resources"][0]["name"], "web");
    }

    #[test]
    fn endpoints_list_services_then_one_service_in_detail() {
        let doc: Endpoints = fixture("endpoints.json");
        assert_eq!(
            services(&doc),
            "\
SERVICE  PROTOCOL  INSTANCES  HEALTHY  SOURCES
echo     grpc      1          1        registration
web      http      3          1        file
"
        );
        let web = doc.services.iter().find(|s| s.name == "web").unwrap();
        assert_eq!(
            instances(web),
            "\
Service web (http), 3 instances

ADDRESS            WEIGHT  ZONE  HEALTH     SOURCE  ID                 METADATA
127.0.0.1:18081    1       z1    healthy    file    127.0.0.1:18081    version=v1
127.0.0.1:18082    3       z2    draining   file    127.0.0.1:18082    -
[2001:db8::1]:443  1       -     unhealthy  file    [2001:db8::1]:443  canary=true,version=v2
"
        );
    }
}
