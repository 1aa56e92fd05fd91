//! The Grafana dashboard the chart ships (charts/weft/dashboards/weft.json), read and held
//! against what a real process exposes on `/metrics`. Shared, through `#[path]`, by
//! control-plane/app/tests/dashboard.rs (everything but `weft_sidecar_*`) and
//! tests/tests/dashboard_sidecar.rs (`weft_sidecar_*`), so that both judge the same way.
//!
//! PromQL is read by a small scanner, not a full parser: it knows selectors, label matchers,
//! ranges, function calls, aggregations with `by`/`without`, binary-operator modifiers and
//! `label_replace`, which is all a dashboard needs. What it cannot read is reported, never
//! skipped, so an expression it misreads fails the test rather than passing it unchecked.

#![allow(dead_code)] // each test file uses a different subset

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The datasource every panel, target and query variable must use: the `datasource`
/// template variable, so the dashboard works against whichever Prometheus Grafana has.
pub const DATASOURCE_UID: &str = "${datasource}";

/// Labels Prometheus adds when it scrapes (the target's), so no process exposes them.
pub const TARGET_LABELS: &[&str] = &[
    "job",
    "instance",
    "namespace",
    "pod",
    "container",
    "endpoint",
];

/// Series Prometheus makes up for every target rather than scraping them.
pub const PROMETHEUS_SERIES: &[&str] = &["up"];

/// Functions that take a counter's range; a counter anywhere else is a mistake (its raw
/// value restarts with the process).
const COUNTER_FUNCTIONS: &[&str] = &["rate", "irate", "increase", "resets"];

/// Ranges must follow the dashboard's time picker, not a number that suits one scrape
/// interval.
const RANGES: &[&str] = &["$__rate_interval", "$__range"];

/// Grafana's own variables, always defined.
const GRAFANA_VARIABLES: &[&str] = &[
    "__rate_interval",
    "__range",
    "__interval",
    "__interval_ms",
    "__range_s",
    "__range_ms",
];

const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "inf", "nan"];

const MODIFIERS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Unit ids of Grafana's standard units that this dashboard may use; a misspelt unit is
/// shown raw by Grafana and silently loses scaling.
pub const KNOWN_UNITS: &[&str] = &[
    "none",
    "short",
    "s",
    "ms",
    "ops",
    "reqps",
    "cps",
    "percentunit",
    "percent",
    "bytes",
];

pub fn dashboard_path(repo_root: &Path) -> PathBuf {
    repo_root.join("charts/weft/dashboards/weft.json")
}

pub fn load(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// One PromQL expression of the dashboard, and where it is.
#[derive(Debug, Clone)]
pub struct Query {
    pub place: String,
    pub expr: String,
    pub legend: Option<String>,
    /// Labels the query reads outside the expression (a variable's `label_values(.., label)`).
    pub reads_labels: Vec<String>,
    /// Only the series' labels are read (`label_values`), not their values, so how a
    /// counter or gauge may be read does not apply.
    pub labels_only: bool,
}

/// Panels, including those inside rows (collapsed rows keep theirs in `panels`).
pub fn panels(dash: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            if let Some(inner) = p.get("panels") {
                walk(inner, out);
            }
        }
    }
    let mut out = Vec::new();
    if let Some(list) = dash.get("panels") {
        walk(list, &mut out);
    }
    out
}

fn title(p: &Value) -> &str {
    p.get("title")
        .and_then(Value::as_str)
        .unwrap_or("<untitled>")
}

/// The text of a query variable's query: a string, or `{"query": ...}` (Grafana 10+).
fn variable_query(v: &Value) -> Option<&str> {
    match v.get("query") {
        Some(Value::String(s)) => Some(s),
        Some(q) => q.get("query").and_then(Value::as_str),
        None => None,
    }
}

/// Every PromQL expression: panel targets, and query variables' `label_values(expr, label)`.
pub fn queries(dash: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    for p in panels(dash) {
        for (i, t) in p
            .get("targets")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let Some(expr) = t.get("expr").and_then(Value::as_str) else {
                continue;
            };
            let refid = t.get("refId").and_then(Value::as_str).unwrap_or("?");
            out.push(Query {
                place: format!("panel \"{}\" target {refid} (#{i})", title(p)),
                expr: expr.to_string(),
                legend: t
                    .get("legendFormat")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                reads_labels: Vec::new(),
                labels_only: false,
            });
        }
    }
    for v in variables(dash) {
        if v.get("type").and_then(Value::as_str) != Some("query") {
            continue;
        }
        let name = v.get("name").and_then(Value::as_str).unwrap_or("?");
        let place = format!("variable ${name}");
        let Some(q) = variable_query(v) else {
            out.push(Query {
                place,
                expr: String::new(),
                legend: None,
                reads_labels: Vec::new(),
                labels_only: true,
            });
            continue;
        };
        let (expr, label) = split_label_values(q).unwrap_or_else(|| (q.to_string(), None));
        out.push(Query {
            place,
            expr,
            legend: None,
            reads_labels: label.into_iter().collect(),
            labels_only: true,
        });
    }
    out
}

pub fn variables(dash: &Value) -> Vec<&Value> {
    dash.pointer("/templating/list")
        .and_then(Value::as_array)
        .map(|l| l.iter().collect())
        .unwrap_or_default()
}

/// `label_values(expr, label)` -> (expr, Some(label)); `label_values(label)` -> ("", label).
fn split_label_values(q: &str) -> Option<(String, Option<String>)> {
    let inner = q
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?
        .trim();
    match inner.rfind(',') {
        Some(i) => Some((
            inner[..i].trim().to_string(),
            Some(inner[i + 1..].trim().to_string()),
        )),
        None => Some((String::new(), Some(inner.to_string()))),
    }
}

// ---------------------------------------------------------------------------------------------
// PromQL
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// A `{...}` matcher list.
    Matchers(Vec<Matcher>),
    /// The text inside `[...]`.
    Range(String),
    Str(String),
    Var(String),
    Number,
    Op,
    LParen,
    RParen,
    Comma,
}

fn ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn read_string(chars: &[char], i: &mut usize) -> Result<String, String> {
    let quote = chars[*i];
    *i += 1;
    let mut s = String::new();
    while *i < chars.len() {
        let c = chars[*i];
        *i += 1;
        if c == quote {
            return Ok(s);
        }
        if c == '\\' && quote != '`' {
            if let Some(&n) = chars.get(*i) {
                s.push(n);
                *i += 1;
            }
            continue;
        }
        s.push(c);
    }
    Err(format!("unterminated string starting with {quote}"))
}

/// One label matcher: `label op "value"`.
#[derive(Debug, Clone, PartialEq)]
pub struct Matcher {
    pub label: String,
    pub op: String,
    pub value: String,
}

fn read_matchers(chars: &[char], i: &mut usize) -> Result<Vec<Matcher>, String> {
    *i += 1; // '{'
    let mut labels = Vec::new();
    loop {
        while chars.get(*i).is_some_and(|c| c.is_whitespace()) {
            *i += 1;
        }
        match chars.get(*i) {
            Some('}') => {
                *i += 1;
                return Ok(labels);
            }
            Some(',') => {
                *i += 1;
                continue;
            }
            Some(&c) if ident_start(c) => {}
            Some(c) => return Err(format!("unexpected `{c}` in label matchers")),
            None => return Err("unterminated label matchers".into()),
        }
        let start = *i;
        while chars.get(*i).is_some_and(|&c| ident_char(c)) {
            *i += 1;
        }
        let label: String = chars[start..*i].iter().collect();
        while chars.get(*i).is_some_and(|c| c.is_whitespace()) {
            *i += 1;
        }
        let op_start = *i;
        while chars.get(*i).is_some_and(|c| "=!~".contains(*c)) {
            *i += 1;
        }
        let op: String = chars[op_start..*i].iter().collect();
        if !["=", "!=", "=~", "!~"].contains(&op.as_str()) {
            return Err(format!("bad matcher operator `{op}`"));
        }
        while chars.get(*i).is_some_and(|c| c.is_whitespace()) {
            *i += 1;
        }
        if !chars.get(*i).is_some_and(|c| "\"'`".contains(*c)) {
            return Err("a label matcher needs a quoted value".into());
        }
        let value = read_string(chars, i)?;
        labels.push(Matcher { label, op, value });
    }
}

fn tokenize(expr: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            _ if c.is_whitespace() => i += 1,
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '"' | '\'' | '`' => out.push(Tok::Str(read_string(&chars, &mut i)?)),
            '{' => out.push(Tok::Matchers(read_matchers(&chars, &mut i)?)),
            '[' => {
                let start = i + 1;
                while i < chars.len() && chars[i] != ']' {
                    i += 1;
                }
                if i == chars.len() {
                    return Err("unterminated range".into());
                }
                out.push(Tok::Range(chars[start..i].iter().collect()));
                i += 1;
            }
            '(' => {
                out.push(Tok::LParen);
                i += 1;
            }
            ')' => {
                out.push(Tok::RParen);
                i += 1;
            }
            ',' => {
                out.push(Tok::Comma);
                i += 1;
            }
            '$' => {
                i += 1;
                let name: String = if chars.get(i) == Some(&'{') {
                    let start = i + 1;
                    while i < chars.len() && chars[i] != '}' {
                        i += 1;
                    }
                    let n: String = chars[start..i.min(chars.len())].iter().collect();
                    i += 1;
                    n.split([':', '.']).next().unwrap_or_default().to_string()
                } else {
                    let start = i;
                    while chars.get(i).is_some_and(|&c| ident_char(c)) {
                        i += 1;
                    }
                    chars[start..i].iter().collect()
                };
                out.push(Tok::Var(name));
            }
            _ if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                while chars
                    .get(i)
                    .is_some_and(|&c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
                {
                    i += 1;
                }
                out.push(Tok::Number);
            }
            _ if ident_start(c) => {
                let start = i;
                while chars.get(i).is_some_and(|&c| ident_char(c)) {
                    i += 1;
                }
                out.push(Tok::Ident(chars[start..i].iter().collect()));
            }
            _ if "+-*/%^=!<>~@".contains(c) => {
                out.push(Tok::Op);
                i += 1;
            }
            _ => return Err(format!("unexpected character `{c}`")),
        }
    }
    Ok(out)
}

/// One metric selector in an expression.
#[derive(Debug, Clone, PartialEq)]
pub struct Selector {
    pub name: String,
    pub matchers: Vec<Matcher>,
    /// The `[...]` after it, if any.
    pub range: Option<String>,
    /// The function whose argument it is directly (`rate`, `sum`, ...), if any.
    pub function: Option<String>,
}

/// What an expression reads.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Analysis {
    pub selectors: Vec<Selector>,
    /// Labels of `by (...)`, `without (...)`, `on (...)`, `ignoring (...)`, `group_*(...)`.
    pub grouping: Vec<String>,
    /// Whether an aggregation (`sum`, `count`, ...) appears.
    pub aggregates: bool,
    /// Labels `label_replace` creates.
    pub created: Vec<String>,
    /// Template variables it uses (without `$`).
    pub variables: Vec<String>,
    /// (matcher operator, variable) for each variable used in a label matcher's value.
    pub matcher_variables: Vec<(String, String)>,
    /// Every `[...]` range, selector or subquery.
    pub ranges: Vec<String>,
}

struct Frame {
    function: Option<String>,
    commas: usize,
}

pub fn analyse(expr: &str) -> Result<Analysis, String> {
    let toks = tokenize(expr)?;
    let mut a = Analysis::default();
    let mut stack: Vec<Frame> = Vec::new();
    let mut i = 0;
    let label_list = |i: &mut usize, a: &mut Analysis| -> Result<(), String> {
        if toks.get(*i) != Some(&Tok::LParen) {
            return Ok(()); // group_left without labels
        }
        *i += 1;
        loop {
            match toks.get(*i) {
                Some(Tok::Ident(l)) => a.grouping.push(l.clone()),
                Some(Tok::Comma) => {}
                Some(Tok::RParen) => {
                    *i += 1;
                    return Ok(());
                }
                other => return Err(format!("unexpected {other:?} in a label list")),
            }
            *i += 1;
        }
    };
    while i < toks.len() {
        match &toks[i] {
            Tok::Ident(name) if MODIFIERS.contains(&name.as_str()) => {
                i += 1;
                label_list(&mut i, &mut a)?;
                continue;
            }
            Tok::Ident(name) if KEYWORDS.contains(&name.as_str()) => {}
            Tok::Ident(name) if AGGREGATIONS.contains(&name.as_str()) => {
                a.aggregates = true;
                i += 1;
                if let Some(Tok::Ident(m)) = toks.get(i)
                    && (m == "by" || m == "without")
                {
                    i += 1;
                    label_list(&mut i, &mut a)?;
                }
                if toks.get(i) != Some(&Tok::LParen) {
                    return Err(format!("aggregation `{name}` without an argument list"));
                }
                stack.push(Frame {
                    function: Some(name.clone()),
                    commas: 0,
                });
                i += 1;
                // `sum(...) by (x)`: the modifier after the arguments is read where it comes.
                continue;
            }
            Tok::Ident(name) if toks.get(i + 1) == Some(&Tok::LParen) => {
                stack.push(Frame {
                    function: Some(name.clone()),
                    commas: 0,
                });
                i += 2;
                continue;
            }
            Tok::Ident(name) => {
                let mut sel = Selector {
                    name: name.clone(),
                    matchers: Vec::new(),
                    range: None,
                    function: stack.last().and_then(|f| f.function.clone()),
                };
                if let Some(Tok::Matchers(m)) = toks.get(i + 1) {
                    sel.matchers.clone_from(m);
                    for mt in m {
                        for v in string_variables(&mt.value) {
                            a.variables.push(v.clone());
                            a.matcher_variables.push((mt.op.clone(), v));
                        }
                    }
                    i += 1;
                }
                if let Some(Tok::Range(r)) = toks.get(i + 1) {
                    sel.range = Some(r.clone());
                    a.ranges.push(r.clone());
                    collect_variables(r, &mut a.variables);
                    i += 1;
                }
                a.selectors.push(sel);
            }
            Tok::Matchers(_) => return Err("label matchers without a metric name".into()),
            Tok::Range(r) => {
                // A subquery's range, after a parenthesised expression.
                a.ranges.push(r.clone());
                collect_variables(r, &mut a.variables);
            }
            Tok::Str(s) => {
                if let Some(f) = stack.last()
                    && f.function.as_deref() == Some("label_replace")
                    && f.commas == 1
                {
                    a.created.push(s.clone());
                }
            }
            Tok::Var(v) => a.variables.push(v.clone()),
            Tok::LParen => stack.push(Frame {
                function: None,
                commas: 0,
            }),
            Tok::RParen => {
                if stack.pop().is_none() {
                    return Err("unbalanced `)`".into());
                }
            }
            Tok::Comma => match stack.last_mut() {
                Some(f) => f.commas += 1,
                None => return Err("`,` outside of a call".into()),
            },
            Tok::Number | Tok::Op => {}
        }
        i += 1;
    }
    if !stack.is_empty() {
        return Err("unbalanced `(`".into());
    }
    if a.selectors.is_empty() {
        return Err("no metric in the expression".into());
    }
    Ok(a)
}

/// `$name` and `${name}` references in a matcher's value.
fn string_variables(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        rest = &rest[at + 1..];
        let name: String = if let Some(inner) = rest.strip_prefix('{') {
            inner
                .split(['}', ':', '.'])
                .next()
                .unwrap_or_default()
                .to_string()
        } else {
            rest.chars().take_while(|&c| ident_char(c)).collect()
        };
        if !name.is_empty() {
            out.push(name);
        }
    }
    out
}

fn collect_variables(text: &str, out: &mut Vec<String>) {
    if let Ok(toks) = tokenize(text) {
        for t in toks {
            if let Tok::Var(v) = t {
                out.push(v);
            }
        }
    }
}

/// The `{{label}}` references of a legend format.
pub fn legend_labels(legend: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = legend;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        out.push(after[..end].trim().to_string());
        rest = &after[end + 2..];
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The exposition (`/metrics`)
// ---------------------------------------------------------------------------------------------

/// What one `/metrics` scrape (or several, merged) exposes.
#[derive(Debug, Default, Clone)]
pub struct Exposition {
    /// Family name (as in `# TYPE`) -> type.
    pub families: BTreeMap<String, String>,
    /// Sample name (`..._total`, `..._bucket`, ...) -> label names seen on its series.
    pub series: BTreeMap<String, BTreeSet<String>>,
}

impl Exposition {
    pub fn parse(text: &str) -> Exposition {
        let mut e = Exposition::default();
        e.merge(text);
        e
    }

    pub fn merge(&mut self, text: &str) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    self.families.insert(name.to_string(), kind.to_string());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let name_end = line
                .find(|c: char| c == '{' || c.is_whitespace())
                .unwrap_or(line.len());
            let name = &line[..name_end];
            let labels = self.series.entry(name.to_string()).or_default();
            if line[name_end..].starts_with('{') {
                labels.extend(label_names(&line[name_end + 1..]));
            }
        }
    }

    /// The sample names a family of this type has, as Prometheus stores them.
    pub fn sample_names(family: &str, kind: &str) -> Vec<String> {
        match kind {
            "counter" => vec![format!("{family}_total")],
            "histogram" | "gaugehistogram" => vec![
                format!("{family}_bucket"),
                format!("{family}_sum"),
                format!("{family}_count"),
            ],
            "summary" => vec![
                family.to_string(),
                format!("{family}_sum"),
                format!("{family}_count"),
            ],
            "info" => vec![format!("{family}_info")],
            _ => vec![family.to_string()],
        }
    }

    /// Sample name -> (family, type), for every family.
    pub fn samples(&self) -> BTreeMap<String, (String, String)> {
        let mut out = BTreeMap::new();
        for (family, kind) in &self.families {
            for s in Self::sample_names(family, kind) {
                out.insert(s, (family.clone(), kind.clone()));
            }
        }
        out
    }
}

/// Label names of `a="x",b="y\"z"} 1` (the text after `{`).
fn label_names(s: &str) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '}' => break,
            ',' | ' ' => i += 1,
            _ => {
                let start = i;
                while i < chars.len() && chars[i] != '=' {
                    i += 1;
                }
                out.push(
                    chars[start..i]
                        .iter()
                        .collect::<String>()
                        .trim()
                        .to_string(),
                );
                i += 1; // '='
                if chars.get(i) == Some(&'"') {
                    let _ = read_string(&chars, &mut i);
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------------------

/// What [`check`] found.
#[derive(Debug, Default)]
pub struct Report {
    pub problems: Vec<String>,
    /// Families the dashboard reads (of those `wanted`).
    pub used_families: BTreeSet<String>,
    /// Metric names checked.
    pub checked: BTreeSet<String>,
}

/// Holds the dashboard's queries against `exposed`, for the metric names `wanted` selects:
/// every name must be a sample name the process exposes, counters must be read through
/// `rate`/`increase` and gauges must not be, and every label a query names must be on the
/// series it reads. `what` names the process in messages.
pub fn check(
    queries: &[Query],
    exposed: &Exposition,
    what: &str,
    wanted: &dyn Fn(&str) -> bool,
) -> Report {
    let mut r = Report::default();
    let samples = exposed.samples();
    for q in queries {
        if q.expr.trim().is_empty() {
            if q.reads_labels.is_empty() {
                r.problems.push(format!("{}: no query", q.place));
            }
            continue;
        }
        let a = match analyse(&q.expr) {
            Ok(a) => a,
            Err(e) => {
                r.problems
                    .push(format!("{}: cannot read `{}`: {e}", q.place, q.expr));
                continue;
            }
        };
        let mine: Vec<&Selector> = a.selectors.iter().filter(|s| wanted(&s.name)).collect();
        if mine.is_empty() {
            continue;
        }
        let all_mine = mine.len() == a.selectors.len();
        let mut labels_here: BTreeSet<String> =
            TARGET_LABELS.iter().map(|s| s.to_string()).collect();
        for s in &mine {
            r.checked.insert(s.name.clone());
            if PROMETHEUS_SERIES.contains(&s.name.as_str()) {
                for m in s.matchers.iter().map(|m| &m.label) {
                    if !TARGET_LABELS.contains(&m.as_str()) {
                        r.problems.push(format!(
                            "{}: `{}` only has target labels, not `{m}`",
                            q.place, s.name
                        ));
                    }
                }
                continue;
            }
            let Some((family, kind)) = samples.get(&s.name) else {
                r.problems.push(format!(
                    "{}: {what} does not expose `{}`{}",
                    q.place,
                    s.name,
                    hint(&s.name, exposed)
                ));
                continue;
            };
            r.used_families.insert(family.clone());
            let in_counter_fn = s.range.is_some()
                && s.function
                    .as_deref()
                    .is_some_and(|f| COUNTER_FUNCTIONS.contains(&f));
            let counter_like = kind == "counter"
                || kind == "histogram"
                || (kind == "summary" && s.name != *family);
            if counter_like && !in_counter_fn && !q.labels_only {
                r.problems.push(format!(
                    "{}: `{}` is a {kind} sample: read it with rate()/increase() over a range",
                    q.place, s.name
                ));
            }
            if !counter_like && in_counter_fn {
                r.problems.push(format!(
                    "{}: `{}` is a {kind}: rate()/increase() of it means nothing",
                    q.place, s.name
                ));
            }
            let has = exposed.series.get(&s.name).cloned().unwrap_or_default();
            if kind == "histogram" && s.name.ends_with("_bucket") {
                labels_here.insert("le".into());
            }
            for m in s.matchers.iter().map(|m| &m.label) {
                if !TARGET_LABELS.contains(&m.as_str()) && !has.contains(m) {
                    r.problems.push(format!(
                        "{}: `{}` has no label `{m}` (its series have {:?})",
                        q.place, s.name, has
                    ));
                }
            }
            labels_here.extend(has);
        }
        for range in &a.ranges {
            if !RANGES.contains(&range.trim()) {
                r.problems.push(format!(
                    "{}: range `[{range}]`: use [$__rate_interval] (or [$__range] for a total)",
                    q.place
                ));
            }
        }
        if !all_mine {
            continue; // labels of another process's metrics are that test's business
        }
        labels_here.extend(a.created.iter().cloned());
        for g in &a.grouping {
            if !labels_here.contains(g) {
                r.problems.push(format!(
                    "{}: groups by `{g}`, which no metric of `{}` has",
                    q.place, q.expr
                ));
            }
        }
        for l in &q.reads_labels {
            if !labels_here.contains(l) {
                r.problems.push(format!(
                    "{}: reads label `{l}`, which `{}` does not have",
                    q.place, q.expr
                ));
            }
        }
        if let Some(legend) = &q.legend {
            // After an aggregation only its grouping labels (and label_replace's) survive.
            let survive: BTreeSet<String> = if a.aggregates {
                a.grouping.iter().chain(&a.created).cloned().collect()
            } else {
                labels_here.clone()
            };
            for l in legend_labels(legend) {
                if !survive.contains(&l) {
                    r.problems.push(format!(
                        "{}: legend names `{{{{{l}}}}}`, which the result of `{}` does not carry",
                        q.place, q.expr
                    ));
                }
            }
        }
    }
    r
}

fn hint(name: &str, exposed: &Exposition) -> String {
    if let Some(kind) = exposed.families.get(name) {
        let names = Exposition::sample_names(name, kind);
        return format!(" (it is a {kind}: its samples are {names:?})");
    }
    let close: Vec<&String> = exposed
        .families
        .keys()
        .filter(|f| name.starts_with(f.as_str()) || f.starts_with(name))
        .collect();
    if close.is_empty() {
        String::from(
            " (and no family of that name: a Family without any series is not shown, so the test must make one)",
        )
    } else {
        format!(" (families with a similar name: {close:?})")
    }
}

/// Checks of the dashboard's structure that need no process: the datasource variable, ids,
/// layout, units, defined variables.
pub fn lint(dash: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let ds = serde_json::json!({"type": "prometheus", "uid": DATASOURCE_UID});
    let schema = dash
        .get("schemaVersion")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    if !(36..=41).contains(&schema) {
        problems.push(format!(
            "schemaVersion {schema}: expected 36..=41 (Grafana 9-11)"
        ));
    }
    if dash
        .get("uid")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        problems.push("no dashboard uid: provisioning would make a new one each time".into());
    }
    if !dash.get("id").is_some_and(Value::is_null) {
        problems.push("`id` must be null: Grafana assigns it".into());
    }
    if dash.get("__inputs").is_some() {
        problems.push(
            "`__inputs` is for manual import; provisioned dashboards use the datasource variable"
                .into(),
        );
    }
    let vars = variables(dash);
    let mut defined: BTreeSet<String> = GRAFANA_VARIABLES.iter().map(|s| s.to_string()).collect();
    for v in &vars {
        if let Some(n) = v.get("name").and_then(Value::as_str) {
            defined.insert(n.to_string());
        }
        if v.get("type").and_then(Value::as_str) == Some("query")
            && v.get("datasource") != Some(&ds)
        {
            problems.push(format!(
                "variable {:?}: datasource must be {ds}",
                v.get("name")
            ));
        }
    }
    let dsvar = vars
        .iter()
        .find(|v| v.get("name").and_then(Value::as_str) == Some("datasource"));
    match dsvar {
        Some(v)
            if v.get("type").and_then(Value::as_str) == Some("datasource")
                && v.get("query").and_then(Value::as_str) == Some("prometheus") => {}
        _ => problems
            .push("no template variable `datasource` of type datasource, query prometheus".into()),
    }
    // Only Grafana's own built-in annotation may name a datasource by uid.
    for a in dash
        .pointer("/annotations/list")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let d = a.get("datasource");
        let builtin = d.and_then(|d| d.get("type")).and_then(Value::as_str) == Some("grafana");
        if !builtin && d != Some(&ds) {
            problems.push(format!(
                "annotation {:?}: datasource must be {ds}",
                a.get("name")
            ));
        }
    }
    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, u64, u64, u64, u64)> = Vec::new();
    for p in panels(dash) {
        let t = title(p).to_string();
        match p.get("id").and_then(Value::as_u64) {
            Some(id) if ids.insert(id) => {}
            Some(id) => problems.push(format!("panel \"{t}\": id {id} is used twice")),
            None => problems.push(format!("panel \"{t}\": no id")),
        }
        let g = |k: &str| p.pointer(&format!("/gridPos/{k}")).and_then(Value::as_u64);
        match (g("x"), g("y"), g("w"), g("h")) {
            (Some(x), Some(y), Some(w), Some(h)) if x + w <= 24 && w > 0 && h > 0 => {
                for (other, ox, oy, ow, oh) in &boxes {
                    if x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h {
                        problems.push(format!("panel \"{t}\" overlaps \"{other}\""));
                    }
                }
                boxes.push((t.clone(), x, y, w, h));
            }
            _ => problems.push(format!("panel \"{t}\": bad gridPos {:?}", p.get("gridPos"))),
        }
        let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
        if kind == "row" {
            continue;
        }
        if p.get("datasource") != Some(&ds) {
            problems.push(format!("panel \"{t}\": datasource must be {ds}"));
        }
        if p.get("description")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            problems.push(format!("panel \"{t}\": no description"));
        }
        match p
            .pointer("/fieldConfig/defaults/unit")
            .and_then(Value::as_str)
        {
            Some(u) if KNOWN_UNITS.contains(&u) => {}
            other => problems.push(format!(
                "panel \"{t}\": unit {other:?} is not one of {KNOWN_UNITS:?}"
            )),
        }
        let targets = p.get("targets").and_then(Value::as_array);
        if targets.is_none_or(|t| t.is_empty()) {
            problems.push(format!("panel \"{t}\": no targets"));
        }
        let mut refs = BTreeSet::new();
        for tg in targets.into_iter().flatten() {
            if tg.get("datasource") != Some(&ds) {
                problems.push(format!("panel \"{t}\": a target's datasource must be {ds}"));
            }
            let refid = tg.get("refId").and_then(Value::as_str).unwrap_or("");
            if refid.is_empty() || !refs.insert(refid.to_string()) {
                problems.push(format!(
                    "panel \"{t}\": refId {refid:?} missing or repeated"
                ));
            }
        }
    }
    // A multi-value or All variable expands to `a|b` or `.*`: only a regex matcher reads it.
    let multi: BTreeSet<&str> = vars
        .iter()
        .filter(|v| {
            v.get("multi").and_then(Value::as_bool) == Some(true)
                || v.get("includeAll").and_then(Value::as_bool) == Some(true)
        })
        .filter_map(|v| v.get("name").and_then(Value::as_str))
        .collect();
    for q in queries(dash) {
        if q.expr.is_empty() {
            continue;
        }
        if let Ok(a) = analyse(&q.expr) {
            for v in &a.variables {
                if !defined.contains(v) {
                    problems.push(format!("{}: uses ${v}, which is not defined", q.place));
                }
            }
            for (op, v) in &a.matcher_variables {
                if multi.contains(v.as_str()) && op != "=~" && op != "!~" {
                    problems.push(format!(
                        "{}: ${v} takes several values: match it with =~, not {op}",
                        q.place
                    ));
                }
            }
        }
    }
    problems
}
