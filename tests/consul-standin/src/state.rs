//! The stand-in's data: one agent on one node, its services and checks, the KV store and the
//! raft-like index that blocking queries compare against.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Map, Value, json};

/// Node name of the single agent the stand-in pretends to be.
pub(crate) const NODE: &str = "weft-standin";
const NODE_ID: &str = "4b0c2d1e-7a4f-4c6e-9d0a-5e1f00c0a5e1";
/// Consul's own service: real catalogs always list it, so clients must cope with it.
const CONSUL_SERVICE: &str = "consul";

#[derive(Debug, Clone)]
pub(crate) struct Service {
    id: String,
    name: String,
    tags: Vec<String>,
    address: String,
    port: u64,
    meta: BTreeMap<String, String>,
    weights_passing: i64,
    weights_warning: i64,
    create_index: u64,
    modify_index: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct Check {
    id: String,
    name: String,
    /// Empty for node-level checks (`serfHealth`, `_node_maintenance`).
    service_id: String,
    service_name: String,
    status: String,
    output: String,
    notes: String,
    kind: &'static str,
    ttl: Option<Duration>,
    ttl_deadline: Option<Instant>,
    interval: String,
    timeout: String,
    target: String,
    deregister_after: Option<Duration>,
    critical_since: Option<Instant>,
    create_index: u64,
    modify_index: u64,
}

#[derive(Debug, Clone)]
struct KvEntry {
    value: Vec<u8>,
    flags: u64,
    create_index: u64,
    modify_index: u64,
}

/// An error answered to the client as Consul would (status code + plain-text body).
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: u16,
    pub(crate) message: String,
}

impl ApiError {
    fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct State {
    index: u64,
    pub(crate) datacenter: String,
    node_address: String,
    node_meta: BTreeMap<String, String>,
    services: BTreeMap<String, Service>,
    checks: BTreeMap<String, Check>,
    kv: BTreeMap<String, KvEntry>,
    /// Deleted keys and the index of their deletion, so a recurse watch on a prefix wakes on a
    /// delete (Consul keeps tombstones for the same reason).
    kv_tombstones: BTreeMap<String, u64>,
    catalog_index: u64,
    health_index: HashMap<String, u64>,
    node_index: u64,
    kv_index: u64,
    /// Bumped by `reset_index`: blocked queries return at once, as Consul's state store
    /// "abandon" after a snapshot restore makes them do.
    pub(crate) abandon: u64,
    pub(crate) requests: HashMap<String, u64>,
}

fn status_ok(status: &str) -> bool {
    matches!(status, "passing" | "warning" | "critical")
}

impl State {
    pub(crate) fn new(datacenter: &str, node_meta: BTreeMap<String, String>) -> State {
        let mut st = State {
            index: 1,
            datacenter: datacenter.to_string(),
            node_address: "127.0.0.1".to_string(),
            node_meta,
            services: BTreeMap::new(),
            checks: BTreeMap::new(),
            kv: BTreeMap::new(),
            kv_tombstones: BTreeMap::new(),
            catalog_index: 1,
            health_index: HashMap::new(),
            node_index: 1,
            kv_index: 1,
            abandon: 0,
            requests: HashMap::new(),
        };
        st.checks.insert(
            "serfHealth".to_string(),
            Check {
                id: "serfHealth".to_string(),
                name: "Serf Health Status".to_string(),
                service_id: String::new(),
                service_name: String::new(),
                status: "passing".to_string(),
                output: "Agent alive and reachable".to_string(),
                notes: String::new(),
                kind: "",
                ttl: None,
                ttl_deadline: None,
                interval: String::new(),
                timeout: String::new(),
                target: String::new(),
                deregister_after: None,
                critical_since: None,
                create_index: 1,
                modify_index: 1,
            },
        );
        st
    }

    fn bump(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    pub(crate) fn index(&self) -> u64 {
        self.index
    }

    fn touch_service_name(&mut self, name: &str, idx: u64) {
        self.health_index.insert(name.to_string(), idx);
    }

    // ----- agent: services -----

    pub(crate) fn register(&mut self, body: &Value, now: Instant) -> Result<(), ApiError> {
        let obj = body
            .as_object()
            .ok_or_else(|| ApiError::new(400, "Request decode failed: expected a JSON object"))?;
        let name = get_str(obj, "Name").unwrap_or_default();
        if name.is_empty() {
            return Err(ApiError::new(400, "Missing service name"));
        }
        let id = get_str(obj, "ID")
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| name.clone());
        let tags = get(obj, "Tags")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let address = get_str(obj, "Address").unwrap_or_default();
        let port = get(obj, "Port").and_then(Value::as_u64).unwrap_or(0);
        let meta = get(obj, "Meta")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                        (k.clone(), v)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let weights = get(obj, "Weights").and_then(Value::as_object);
        let weights_passing = weights
            .and_then(|w| get(w, "Passing"))
            .and_then(Value::as_i64)
            .unwrap_or(1);
        let weights_warning = weights
            .and_then(|w| get(w, "Warning"))
            .and_then(Value::as_i64)
            .unwrap_or(1);

        let mut defs: Vec<&Map<String, Value>> = Vec::new();
        if let Some(c) = get(obj, "Check").and_then(Value::as_object) {
            defs.push(c);
        }
        if let Some(cs) = get(obj, "Checks").and_then(Value::as_array) {
            for c in cs {
                let c = c
                    .as_object()
                    .ok_or_else(|| ApiError::new(400, "Invalid check: expected an object"))?;
                defs.push(c);
            }
        }
        // Consul's naming: one check is `service:<id>`, several are `service:<id>:<n>`.
        let several = defs.len() > 1;
        let mut new_checks = Vec::new();
        for (i, def) in defs.iter().enumerate() {
            let check_id = get_str(def, "CheckID")
                .or_else(|| get_str(def, "ID"))
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| {
                    if several {
                        format!("service:{id}:{}", i + 1)
                    } else {
                        format!("service:{id}")
                    }
                });
            new_checks.push(parse_check(def, &check_id, &id, &name, now)?);
        }

        let idx = self.bump();
        let old = self.services.remove(&id);
        let create_index = old.as_ref().map_or(idx, |s| s.create_index);
        if let Some(old) = old.as_ref().filter(|o| o.name != name) {
            self.touch_service_name(&old.name.clone(), idx);
        }
        // Re-registration replaces the service's checks; a check that keeps its id keeps its
        // status unless the registration sets one (so re-registering does not flap health).
        let old_checks: Vec<String> = self
            .checks
            .values()
            .filter(|c| c.service_id == id && !c.id.starts_with("_service_maintenance:"))
            .map(|c| c.id.clone())
            .collect();
        let mut previous = HashMap::new();
        for cid in old_checks {
            if let Some(c) = self.checks.remove(&cid) {
                previous.insert(cid, c);
            }
        }
        for (mut check, explicit_status) in new_checks {
            if let Some(prev) = previous.get(&check.id) {
                if !explicit_status {
                    check.status = prev.status.clone();
                    check.output = prev.output.clone();
                    check.critical_since = prev.critical_since;
                    check.ttl_deadline = prev.ttl_deadline.or(check.ttl_deadline);
                }
                check.create_index = prev.create_index;
            } else {
                check.create_index = idx;
            }
            check.modify_index = idx;
            self.checks.insert(check.id.clone(), check);
        }
        // Maintenance checks follow the service's (possibly new) name.
        for c in self.checks.values_mut() {
            if c.service_id == id {
                c.service_name = name.clone();
            }
        }
        self.services.insert(
            id.clone(),
            Service {
                id,
                name: name.clone(),
                tags,
                address,
                port,
                meta,
                weights_passing,
                weights_warning,
                create_index,
                modify_index: idx,
            },
        );
        self.catalog_index = idx;
        self.touch_service_name(&name, idx);
        Ok(())
    }

    pub(crate) fn deregister(&mut self, id: &str) -> Result<(), ApiError> {
        let Some(svc) = self.services.remove(id) else {
            return Err(ApiError::new(404, format!("Unknown service ID {id:?}")));
        };
        self.checks.retain(|_, c| c.service_id != id);
        let idx = self.bump();
        self.catalog_index = idx;
        self.touch_service_name(&svc.name, idx);
        Ok(())
    }

    pub(crate) fn service_maintenance(
        &mut self,
        id: &str,
        enable: bool,
        reason: &str,
    ) -> Result<(), ApiError> {
        let Some(svc) = self.services.get(id) else {
            return Err(ApiError::new(404, format!("Unknown service ID {id:?}")));
        };
        let name = svc.name.clone();
        let check_id = format!("_service_maintenance:{id}");
        if enable == self.checks.contains_key(&check_id) {
            return Ok(());
        }
        let idx = self.bump();
        if enable {
            self.checks.insert(
                check_id.clone(),
                maintenance_check(&check_id, id, &name, reason, idx),
            );
        } else {
            self.checks.remove(&check_id);
        }
        self.touch_service_name(&name, idx);
        Ok(())
    }

    pub(crate) fn node_maintenance(&mut self, enable: bool, reason: &str) {
        let check_id = "_node_maintenance";
        if enable == self.checks.contains_key(check_id) {
            return;
        }
        let idx = self.bump();
        if enable {
            let mut c = maintenance_check(check_id, "", "", reason, idx);
            c.name = "Node Maintenance Mode".to_string();
            self.checks.insert(check_id.to_string(), c);
        } else {
            self.checks.remove(check_id);
        }
        self.node_index = idx;
    }

    // ----- agent: checks -----

    /// `pass|warn|fail|update`: only TTL checks may be updated this way, as in Consul.
    pub(crate) fn update_ttl(
        &mut self,
        check_id: &str,
        status: &str,
        output: Option<String>,
        now: Instant,
    ) -> Result<(), ApiError> {
        let Some(check) = self.checks.get_mut(check_id) else {
            return Err(ApiError::new(404, format!("Unknown check ID {check_id:?}")));
        };
        let Some(ttl) = check.ttl else {
            return Err(ApiError::new(
                500,
                format!("CheckID {check_id:?} does not have associated TTL"),
            ));
        };
        check.ttl_deadline = Some(now + ttl);
        self.set_status(check_id, status, output, now)
    }

    /// Sets a check's status; the index only moves when status or output change, because a
    /// Consul agent only syncs changed checks to the catalog.
    pub(crate) fn set_status(
        &mut self,
        check_id: &str,
        status: &str,
        output: Option<String>,
        now: Instant,
    ) -> Result<(), ApiError> {
        if !status_ok(status) {
            return Err(ApiError::new(
                400,
                format!("Invalid check status: {status:?}"),
            ));
        }
        let Some(check) = self.checks.get(check_id) else {
            return Err(ApiError::new(404, format!("Unknown check ID {check_id:?}")));
        };
        let output = output.unwrap_or_else(|| check.output.clone());
        if check.status == status && check.output == output {
            return Ok(());
        }
        let idx = self.bump();
        let Some(check) = self.checks.get_mut(check_id) else {
            return Ok(());
        };
        if status == "critical" {
            if check.status != "critical" {
                check.critical_since = Some(now);
            }
        } else {
            check.critical_since = None;
        }
        check.status = status.to_string();
        check.output = output;
        check.modify_index = idx;
        let service_name = check.service_name.clone();
        if check.service_id.is_empty() {
            self.node_index = idx;
        } else {
            self.touch_service_name(&service_name, idx);
        }
        Ok(())
    }

    /// Expires TTL checks and reaps services critical for longer than their
    /// `DeregisterCriticalServiceAfter`. Returns whether anything changed.
    pub(crate) fn tick(&mut self, now: Instant) -> bool {
        let expired: Vec<String> = self
            .checks
            .values()
            .filter(|c| c.status != "critical" && c.ttl_deadline.is_some_and(|d| d <= now))
            .map(|c| c.id.clone())
            .collect();
        let mut changed = false;
        for cid in expired {
            let out = "TTL expired".to_string();
            if self.set_status(&cid, "critical", Some(out), now).is_ok() {
                changed = true;
            }
        }
        let reap: BTreeSet<String> = self
            .checks
            .values()
            .filter(|c| !c.service_id.is_empty())
            .filter(|c| match (c.deregister_after, c.critical_since) {
                (Some(after), Some(since)) => c.status == "critical" && since + after <= now,
                _ => false,
            })
            .map(|c| c.service_id.clone())
            .collect();
        for sid in reap {
            if self.deregister(&sid).is_ok() {
                changed = true;
            }
        }
        changed
    }

    pub(crate) fn reset_index(&mut self, to: u64) {
        let to = to.max(1);
        self.index = to;
        for s in self.services.values_mut() {
            s.create_index = s.create_index.min(to);
            s.modify_index = s.modify_index.min(to);
        }
        for c in self.checks.values_mut() {
            c.create_index = c.create_index.min(to);
            c.modify_index = c.modify_index.min(to);
        }
        for e in self.kv.values_mut() {
            e.create_index = e.create_index.min(to);
            e.modify_index = e.modify_index.min(to);
        }
        for t in self.kv_tombstones.values_mut() {
            *t = (*t).min(to);
        }
        for h in self.health_index.values_mut() {
            *h = (*h).min(to);
        }
        self.catalog_index = self.catalog_index.min(to);
        self.node_index = self.node_index.min(to);
        self.kv_index = self.kv_index.min(to);
        self.abandon += 1;
    }

    // ----- views -----

    pub(crate) fn agent_services(&self) -> Value {
        let mut out = Map::new();
        for s in self.services.values() {
            out.insert(
                s.id.clone(),
                json!({
                    "ID": s.id,
                    "Service": s.name,
                    "Tags": s.tags,
                    "Meta": s.meta,
                    "Port": s.port,
                    "Address": s.address,
                    "Weights": {"Passing": s.weights_passing, "Warning": s.weights_warning},
                    "EnableTagOverride": false,
                    "Datacenter": self.datacenter,
                }),
            );
        }
        Value::Object(out)
    }

    pub(crate) fn agent_service(&self, id: &str) -> Option<Value> {
        self.agent_services().get(id).cloned()
    }

    pub(crate) fn agent_checks(&self) -> Value {
        let mut out = Map::new();
        for c in self.checks.values() {
            let mut v = self.check_json(c);
            if let Some(o) = v.as_object_mut() {
                o.remove("CreateIndex");
                o.remove("ModifyIndex");
            }
            out.insert(c.id.clone(), v);
        }
        Value::Object(out)
    }

    fn check_json(&self, c: &Check) -> Value {
        let tags = self
            .services
            .get(&c.service_id)
            .map(|s| s.tags.clone())
            .unwrap_or_default();
        json!({
            "Node": NODE,
            "CheckID": c.id,
            "Name": c.name,
            "Status": c.status,
            "Notes": c.notes,
            "Output": c.output,
            "ServiceID": c.service_id,
            "ServiceName": c.service_name,
            "ServiceTags": tags,
            "Type": c.kind,
            "Interval": c.interval,
            "Timeout": c.timeout,
            "Definition": {
                "HTTP": if c.kind == "http" { c.target.as_str() } else { "" },
                "GRPC": if c.kind == "grpc" { c.target.as_str() } else { "" },
                "TCP": if c.kind == "tcp" { c.target.as_str() } else { "" },
                "Interval": c.interval,
                "Timeout": c.timeout,
                "DeregisterCriticalServiceAfter": c.deregister_after.map(format_duration).unwrap_or_default(),
            },
            "CreateIndex": c.create_index,
            "ModifyIndex": c.modify_index,
        })
    }

    fn node_json(&self) -> Value {
        json!({
            "ID": NODE_ID,
            "Node": NODE,
            "Address": self.node_address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {"lan": self.node_address, "wan": self.node_address},
            "Meta": self.node_meta,
            "CreateIndex": 1,
            "ModifyIndex": 1,
        })
    }

    /// `/v1/catalog/services`: name -> union of the instances' tags, with Consul's own service.
    pub(crate) fn catalog_services(&self) -> (u64, Value) {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        out.insert(CONSUL_SERVICE.to_string(), BTreeSet::new());
        for s in self.services.values() {
            out.entry(s.name.clone())
                .or_default()
                .extend(s.tags.iter().cloned());
        }
        (self.catalog_index.max(1), json!(out))
    }

    pub(crate) fn health_index(&self, name: &str) -> u64 {
        let svc = self
            .health_index
            .get(name)
            .copied()
            .unwrap_or(self.catalog_index);
        svc.max(self.node_index).max(1)
    }

    /// `/v1/health/service/<name>`: every instance with its node and all its checks (node
    /// checks included, as Consul does).
    pub(crate) fn health_service(
        &self,
        name: &str,
        passing_only: bool,
        tags: &[String],
    ) -> (u64, Value) {
        let node_checks: Vec<Value> = self
            .checks
            .values()
            .filter(|c| c.service_id.is_empty())
            .map(|c| self.check_json(c))
            .collect();
        let mut entries = Vec::new();
        if name == CONSUL_SERVICE {
            entries.push(json!({
                "Node": self.node_json(),
                "Service": {
                    "ID": CONSUL_SERVICE, "Service": CONSUL_SERVICE, "Tags": [], "Address": "",
                    "Meta": {}, "Port": 8300, "Weights": {"Passing": 1, "Warning": 1},
                    "EnableTagOverride": false, "CreateIndex": 1, "ModifyIndex": 1,
                },
                "Checks": node_checks,
            }));
        }
        for s in self.services.values().filter(|s| s.name == name) {
            if !tags.iter().all(|t| s.tags.contains(t)) {
                continue;
            }
            let mut checks = node_checks.clone();
            checks.extend(
                self.checks
                    .values()
                    .filter(|c| c.service_id == s.id)
                    .map(|c| self.check_json(c)),
            );
            let all_passing = checks
                .iter()
                .all(|c| c.get("Status").and_then(Value::as_str) == Some("passing"));
            if passing_only && !all_passing {
                continue;
            }
            entries.push(json!({
                "Node": self.node_json(),
                "Service": {
                    "ID": s.id,
                    "Service": s.name,
                    "Tags": s.tags,
                    "Address": s.address,
                    "Meta": s.meta,
                    "Port": s.port,
                    "Weights": {"Passing": s.weights_passing, "Warning": s.weights_warning},
                    "EnableTagOverride": false,
                    "CreateIndex": s.create_index,
                    "ModifyIndex": s.modify_index,
                },
                "Checks": checks,
            }));
        }
        (self.health_index(name), Value::Array(entries))
    }

    // ----- KV -----

    pub(crate) fn kv_index(&self, key: &str, recurse: bool) -> u64 {
        let matches = |k: &str| {
            if recurse {
                k.starts_with(key)
            } else {
                k == key
            }
        };
        let live = self
            .kv
            .iter()
            .filter(|(k, _)| matches(k))
            .map(|(_, e)| e.modify_index)
            .max()
            .unwrap_or(0);
        let dead = self
            .kv_tombstones
            .iter()
            .filter(|(k, _)| matches(k))
            .map(|(_, i)| *i)
            .max()
            .unwrap_or(0);
        let idx = live.max(dead);
        if idx == 0 { self.kv_index.max(1) } else { idx }
    }

    /// `GET /v1/kv/<key>`; `None` when nothing matches (Consul answers 404).
    pub(crate) fn kv_get(&self, key: &str, recurse: bool) -> Option<Vec<Value>> {
        let entries: Vec<Value> = self
            .kv
            .iter()
            .filter(|(k, _)| {
                if recurse {
                    k.starts_with(key)
                } else {
                    k.as_str() == key
                }
            })
            .map(|(k, e)| {
                let value = if e.value.is_empty() {
                    Value::Null
                } else {
                    Value::String(base64::engine::general_purpose::STANDARD.encode(&e.value))
                };
                json!({
                    "Key": k,
                    "Flags": e.flags,
                    "Value": value,
                    "LockIndex": 0,
                    "CreateIndex": e.create_index,
                    "ModifyIndex": e.modify_index,
                })
            })
            .collect();
        if entries.is_empty() {
            None
        } else {
            Some(entries)
        }
    }

    pub(crate) fn kv_raw(&self, key: &str) -> Option<Vec<u8>> {
        self.kv.get(key).map(|e| e.value.clone())
    }

    pub(crate) fn kv_keys(&self, prefix: &str, separator: Option<&str>) -> Vec<String> {
        let mut out = BTreeSet::new();
        for k in self.kv.keys().filter(|k| k.starts_with(prefix)) {
            let rest = &k[prefix.len()..];
            match separator
                .filter(|s| !s.is_empty())
                .and_then(|s| rest.find(s).map(|i| i + s.len()))
            {
                Some(end) => out.insert(format!("{prefix}{}", &rest[..end])),
                None => out.insert(k.clone()),
            };
        }
        out.into_iter().collect()
    }

    /// Returns false when a `cas` condition fails.
    pub(crate) fn kv_put(
        &mut self,
        key: &str,
        value: Vec<u8>,
        flags: u64,
        cas: Option<u64>,
    ) -> bool {
        let current = self.kv.get(key).map(|e| e.modify_index);
        if let Some(cas) = cas {
            let ok = match current {
                None => cas == 0,
                Some(m) => m == cas,
            };
            if !ok {
                return false;
            }
        }
        let idx = self.bump();
        let create_index = self.kv.get(key).map_or(idx, |e| e.create_index);
        self.kv.insert(
            key.to_string(),
            KvEntry {
                value,
                flags,
                create_index,
                modify_index: idx,
            },
        );
        self.kv_tombstones.remove(key);
        self.kv_index = idx;
        true
    }

    pub(crate) fn kv_delete(&mut self, key: &str, recurse: bool, cas: Option<u64>) -> bool {
        if cas.is_some_and(|cas| self.kv.get(key).map(|e| e.modify_index) != Some(cas)) {
            return false;
        }
        let doomed: Vec<String> = self
            .kv
            .keys()
            .filter(|k| {
                if recurse {
                    k.starts_with(key)
                } else {
                    k.as_str() == key
                }
            })
            .cloned()
            .collect();
        if doomed.is_empty() {
            return true;
        }
        let idx = self.bump();
        for k in doomed {
            self.kv.remove(&k);
            self.kv_tombstones.insert(k, idx);
        }
        self.kv_index = idx;
        true
    }
}

fn maintenance_check(
    check_id: &str,
    service_id: &str,
    service_name: &str,
    reason: &str,
    idx: u64,
) -> Check {
    Check {
        id: check_id.to_string(),
        name: "Service Maintenance Mode".to_string(),
        service_id: service_id.to_string(),
        service_name: service_name.to_string(),
        status: "critical".to_string(),
        output: String::new(),
        notes: if reason.is_empty() {
            "Maintenance mode is enabled for this service, but no reason was provided. This is a default message.".to_string()
        } else {
            reason.to_string()
        },
        kind: "maintenance",
        ttl: None,
        ttl_deadline: None,
        interval: String::new(),
        timeout: String::new(),
        target: String::new(),
        deregister_after: None,
        critical_since: None,
        create_index: idx,
        modify_index: idx,
    }
}

/// Parses one check definition; the bool says whether `Status` was given explicitly.
fn parse_check(
    def: &Map<String, Value>,
    check_id: &str,
    service_id: &str,
    service_name: &str,
    now: Instant,
) -> Result<(Check, bool), ApiError> {
    let dur = |field: &str| -> Result<Option<Duration>, ApiError> {
        match get(def, field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => parse_duration(s)
                .map(Some)
                .ok_or_else(|| ApiError::new(400, format!("Invalid check: bad {field} {s:?}"))),
            // Consul's JSON decoder takes bare numbers as nanoseconds.
            Some(Value::Number(n)) => Ok(n.as_u64().map(Duration::from_nanos)),
            Some(other) => Err(ApiError::new(
                400,
                format!("Invalid check: bad {field} {other}"),
            )),
        }
    };
    let ttl = dur("TTL")?;
    let interval = dur("Interval")?;
    let timeout = dur("Timeout")?;
    let deregister_after = dur("DeregisterCriticalServiceAfter")?;
    let (kind, target) = if ttl.is_some() {
        ("ttl", String::new())
    } else if let Some(u) = get_str(def, "HTTP").filter(|s| !s.is_empty()) {
        ("http", u)
    } else if let Some(u) = get_str(def, "GRPC").filter(|s| !s.is_empty()) {
        ("grpc", u)
    } else if let Some(u) = get_str(def, "TCP").filter(|s| !s.is_empty()) {
        ("tcp", u)
    } else if get(def, "Args")
        .or_else(|| get(def, "ScriptArgs"))
        .is_some()
    {
        ("script", String::new())
    } else {
        return Err(ApiError::new(
            400,
            "Invalid check: TTL must be > 0 for TTL checks, or one of HTTP, GRPC, TCP or Args must be given",
        ));
    };
    if kind != "ttl" && interval.is_none_or(|d| d.is_zero()) {
        return Err(ApiError::new(
            400,
            "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP or UDP checks",
        ));
    }
    if ttl.is_some_and(|d| d.is_zero()) {
        return Err(ApiError::new(
            400,
            "Invalid check: TTL must be > 0 for TTL checks",
        ));
    }
    let explicit = get_str(def, "Status").filter(|s| !s.is_empty());
    let status = explicit.clone().unwrap_or_else(|| "critical".to_string());
    if !status_ok(&status) {
        return Err(ApiError::new(
            400,
            format!("Invalid check status: {status:?}"),
        ));
    }
    let name = get_str(def, "Name")
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("Service '{service_name}' check"));
    Ok((
        Check {
            id: check_id.to_string(),
            name,
            service_id: service_id.to_string(),
            service_name: service_name.to_string(),
            critical_since: (status == "critical").then_some(now),
            status,
            output: String::new(),
            notes: get_str(def, "Notes").unwrap_or_default(),
            kind,
            ttl,
            ttl_deadline: ttl.map(|t| now + t),
            interval: interval.map(format_duration).unwrap_or_default(),
            timeout: timeout.map(format_duration).unwrap_or_default(),
            target,
            deregister_after,
            create_index: 0,
            modify_index: 0,
        },
        explicit.is_some(),
    ))
}

/// Case-insensitive field lookup: Consul's decoder accepts `ID`, `id`, `Id`, and snake_case
/// for the multi-word fields.
fn get<'a>(obj: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    obj.get(field).or_else(|| {
        let want = field.to_ascii_lowercase();
        obj.iter()
            .find(|(k, _)| k.replace('_', "").to_ascii_lowercase() == want)
            .map(|(_, v)| v)
    })
}

fn get_str(obj: &Map<String, Value>, field: &str) -> Option<String> {
    get(obj, field).and_then(Value::as_str).map(str::to_string)
}

/// Go's `time.ParseDuration` subset Consul users write: `500ms`, `10s`, `1m30s`, `1.5h`; a
/// bare number is taken as seconds (as Consul's `wait` parameter allows).
pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if let Ok(secs) = s.parse::<f64>() {
        return (secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_end == 0 {
            return None;
        }
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * mult;
        rest = &rest[unit_end..];
    }
    Some(Duration::from_secs_f64(total))
}

fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}
