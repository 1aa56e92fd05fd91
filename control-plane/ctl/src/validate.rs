//! `weftctl validate`: registry files and Weft CRD YAML checked offline, by the control
//! plane's own code, so a problem reads exactly as the server would report it.
//!
//! - Registry files (anything without `apiVersion`/`kind`) are validated together, as one
//!   `--registry-file` set, by `weft_source_file::parse_files`: the schema of each file
//!   (`weft_registry::schema`) and then names defined in two files. A problem reads as the
//!   control plane prints it at startup before exiting 64: `file: field path: reason`.
//! - CRD documents (`TrafficRoute`, `TrafficPolicy`, `ExternalService` of
//!   `mesh.weft.dev/v1alpha1`, several per file with `---`) are decoded by `weft_crds::decode`
//!   and validated by `weft_crds`' `validate`, what the Kubernetes source runs; a problem
//!   reads `file: Kind namespace/name: field: reason`, the object's `Accepted=False` message
//!   behind the file and object. Objects of other kinds (a Deployment in the same manifest)
//!   are skipped and listed, not refused: they are not Weft's to judge.
//!
//! What it does not do: check references across objects (a route to a service that does not
//! exist is legal, as on the server: it becomes routable when the service appears), or talk
//! to a control plane or a cluster.

use std::path::PathBuf;

use serde::Serialize;
use serde::de::DeserializeOwned;
use weft_crds::{ExternalService, TrafficPolicy, TrafficRoute, ValidationError};
use weft_source_file::FileSourceError;

/// Weft's CRD group/version, the only one served.
const WEFT_API_VERSION: &str = "mesh.weft.dev/v1alpha1";
const WEFT_GROUP: &str = "mesh.weft.dev";
const WEFT_KINDS: [&str; 3] = ["TrafficRoute", "TrafficPolicy", "ExternalService"];

/// The outcome of one `validate` run: `-o json` prints it as is.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// True when there is no problem.
    pub ok: bool,
    pub files: Vec<FileReport>,
    /// Every problem, in file order; each has its printed line in `message`.
    pub problems: Vec<Problem>,
}

/// What one file held.
#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    pub file: String,
    /// `registry`, `crd`, or `unreadable`.
    pub kind: &'static str,
    /// True when none of the problems is this file's.
    pub ok: bool,
    /// Registry files: how many services, endpoints, routes and policies (when valid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistryCounts>,
    /// CRD files: every Weft object, `Kind namespace/name`, valid or not.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<String>,
    /// CRD files: documents of other kinds, `apiVersion Kind name`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

/// What a valid registry file declares.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RegistryCounts {
    pub services: usize,
    pub endpoints: usize,
    pub routes: usize,
    pub policies: usize,
}

/// One problem with one field of one file.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub file: String,
    /// The object (`TrafficRoute shop/web`) for CRD documents.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// Field path: `services[0].endpoints[1].port`, `spec.rules[0].timeout`; `.` for the
    /// value as a whole; absent for a file that could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub reason: String,
    /// The line printed for it, the server's wording.
    pub message: String,
}

/// Validates `paths` (each at most once: the control plane also reads a file named twice
/// once). `namespace` is the namespace of CRD documents that name none, as `kubectl apply`
/// would put them in.
pub fn validate_files(paths: &[PathBuf], namespace: &str) -> Report {
    let mut unique: Vec<&PathBuf> = Vec::with_capacity(paths.len());
    for p in paths {
        if !unique.contains(&p) {
            unique.push(p);
        }
    }
    let mut files = Vec::new();
    let mut problems = Vec::new();
    let mut registry: Vec<(PathBuf, String)> = Vec::new();
    for path in unique {
        let file = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(source) => {
                let reason = source.to_string();
                let err = FileSourceError::Read {
                    path: path.clone(),
                    source,
                };
                problems.push(Problem {
                    file: file.clone(),
                    object: None,
                    field: None,
                    reason,
                    message: err.to_string(),
                });
                files.push(FileReport::new(file, "unreadable"));
                continue;
            }
        };
        match kubernetes_documents(&text) {
            Some(docs) => {
                let mut report = FileReport::new(file.clone(), "crd");
                validate_crds(&file, docs, namespace, &mut report, &mut problems);
                files.push(report);
            }
            None => {
                files.push(FileReport::new(file, "registry"));
                registry.push((path.clone(), text));
            }
        }
    }
    if !registry.is_empty() {
        validate_registry(registry, &mut files, &mut problems);
    }
    // Registry files are judged as a set after the loop; list problems in argument order.
    problems.sort_by_key(|p| files.iter().position(|f| f.file == p.file));
    for f in &mut files {
        f.ok = !problems.iter().any(|p| p.file == f.file);
    }
    Report {
        ok: problems.is_empty(),
        files,
        problems,
    }
}

impl FileReport {
    fn new(file: String, kind: &'static str) -> Self {
        Self {
            file,
            kind,
            ok: false,
            registry: None,
            objects: Vec::new(),
            skipped: Vec::new(),
        }
    }
}

/// The file's YAML documents when it is Kubernetes YAML: some document has `apiVersion` or
/// `kind` at its top. `None` for a registry file, which then goes to the registry's decoder,
/// whose error names the line, as the server's does. A file that is not YAML at all is
/// Kubernetes YAML if a line starts with `apiVersion:` or `kind:`, so a broken manifest is
/// reported as a manifest; otherwise it is a registry file too.
fn kubernetes_documents(text: &str) -> Option<Vec<Result<serde_json::Value, String>>> {
    let mut docs = Vec::new();
    let mut broken = false;
    for de in serde_yaml_ng::Deserializer::from_str(text) {
        match <serde_json::Value as serde::Deserialize>::deserialize(de) {
            Ok(v) => docs.push(Ok(v)),
            Err(e) => {
                docs.push(Err(e.to_string()));
                // The parser cannot resynchronise after a syntax error.
                broken = true;
                break;
            }
        }
    }
    let is_object = |d: &Result<serde_json::Value, String>| matches!(d, Ok(v) if v.get("apiVersion").is_some() || v.get("kind").is_some());
    let looks_like_one = || {
        text.lines()
            .any(|l| l.starts_with("apiVersion:") || l.starts_with("kind:"))
    };
    if docs.iter().any(is_object) || (broken && looks_like_one()) {
        Some(docs)
    } else {
        None
    }
}

fn validate_crds(
    file: &str,
    docs: Vec<Result<serde_json::Value, String>>,
    namespace: &str,
    report: &mut FileReport,
    problems: &mut Vec<Problem>,
) {
    let only_one = docs.len() == 1;
    for (i, doc) in docs.into_iter().enumerate() {
        // Documents are counted from 1, as editors count lines.
        let where_ = if only_one {
            String::new()
        } else {
            format!("document {}: ", i + 1)
        };
        let mut value = match doc {
            Ok(serde_json::Value::Null) => continue, // an empty document (`---` at the end)
            Ok(v) => v,
            Err(e) => {
                problems.push(Problem {
                    file: file.to_string(),
                    object: None,
                    field: Some(".".to_string()),
                    reason: format!("not valid YAML: {e}"),
                    message: format!("{file}: {where_}not valid YAML: {e}"),
                });
                continue;
            }
        };
        let text = |key: &str| value.get(key).and_then(|v| v.as_str()).unwrap_or_default();
        let (api_version, kind) = (text("apiVersion").to_string(), text("kind").to_string());
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or_default()
            .to_string();
        let group = api_version.split_once('/').map_or("", |(g, _)| g);
        if group != WEFT_GROUP {
            report.skipped.push(
                format!("{api_version} {kind} {name}")
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
            );
            continue;
        }
        let field_problem = |field: &str, reason: String| Problem {
            file: file.to_string(),
            object: Some(format!("{kind} {name}")),
            field: Some(field.to_string()),
            message: format!("{file}: {where_}{kind} {name}: {field}: {reason}"),
            reason,
        };
        if api_version != WEFT_API_VERSION {
            problems.push(field_problem(
                "apiVersion",
                format!("`{api_version}` is not served; Weft's resources are {WEFT_API_VERSION}"),
            ));
            continue;
        }
        if !WEFT_KINDS.contains(&kind.as_str()) {
            problems.push(field_problem(
                "kind",
                format!(
                    "`{kind}` is not a kind of {WEFT_API_VERSION}; it has {}",
                    WEFT_KINDS.join(", ")
                ),
            ));
            continue;
        }
        default_namespace(&mut value, namespace);
        let checked = match kind.as_str() {
            "TrafficRoute" => check::<TrafficRoute>(value, |o| o.validate().map(drop)),
            "TrafficPolicy" => check::<TrafficPolicy>(value, |o| o.validate().map(drop)),
            _ => check::<ExternalService>(value, |o| o.validate().map(drop)),
        };
        match checked {
            Ok(object) => report.objects.push(object),
            Err(e) => {
                let object = format!("{} {}/{}", e.kind, e.namespace, e.name);
                report.objects.push(object.clone());
                for p in &e.problems {
                    problems.push(Problem {
                        file: file.to_string(),
                        object: Some(object.clone()),
                        field: Some(p.field.clone()),
                        reason: p.reason.clone(),
                        message: format!("{file}: {where_}{object}: {}: {}", p.field, p.reason),
                    });
                }
            }
        }
    }
}

/// Puts `namespace` into an object that names none: the API server would, and the registry
/// name of a route or policy is `<namespace>.<name>`, which is invalid with no namespace.
fn default_namespace(value: &mut serde_json::Value, namespace: &str) {
    let Some(obj) = value.as_object_mut() else {
        return;
    };
    let meta = obj
        .entry("metadata")
        .or_insert_with(|| serde_json::Value::Object(Default::default()));
    if let Some(meta) = meta.as_object_mut() {
        let missing = meta
            .get("namespace")
            .and_then(|n| n.as_str())
            .is_none_or(str::is_empty);
        if missing {
            meta.insert(
                "namespace".to_string(),
                serde_json::Value::String(namespace.to_string()),
            );
        }
    }
}

/// Decodes and validates one object; its `Kind namespace/name` when valid.
fn check<K>(
    value: serde_json::Value,
    validate: impl FnOnce(&K) -> Result<(), ValidationError>,
) -> Result<String, ValidationError>
where
    K: kube::Resource<DynamicType = ()> + DeserializeOwned,
{
    let obj: K = weft_crds::decode(value)?;
    validate(&obj)?;
    Ok(format!(
        "{} {}/{}",
        K::kind(&()),
        obj.meta().namespace.clone().unwrap_or_default(),
        obj.meta().name.clone().unwrap_or_default()
    ))
}

/// The registry files as one set, as `--registry-file a --registry-file b` loads them.
fn validate_registry(
    set: Vec<(PathBuf, String)>,
    files: &mut [FileReport],
    problems: &mut Vec<Problem>,
) {
    match weft_source_file::parse_files(set.clone()) {
        Ok(_) => {
            for (path, text) in &set {
                let file = path.display().to_string();
                // Already validated above; decoded again only to count per file.
                let counts = weft_registry::parse_document(&file, text)
                    .map(|doc| RegistryCounts {
                        services: doc.services.len(),
                        endpoints: doc.services.iter().map(|s| s.endpoints.len()).sum(),
                        routes: doc.routes.len(),
                        policies: doc.policies.len(),
                    })
                    .unwrap_or_default();
                if let Some(f) = files.iter_mut().find(|f| f.file == file) {
                    f.registry = Some(counts);
                }
            }
        }
        Err(FileSourceError::Invalid(errs)) => {
            for e in errs.0 {
                problems.push(Problem {
                    message: e.to_string(),
                    file: e.origin,
                    object: None,
                    field: Some(e.path),
                    reason: e.reason,
                });
            }
        }
        Err(e @ FileSourceError::Conflict { .. }) => {
            let message = e.to_string();
            if let FileSourceError::Conflict { file, field, .. } = &e {
                let reason = e
                    .by_file()
                    .remove(file)
                    .and_then(|r| r.strip_prefix(&format!("{field}: ")).map(str::to_string))
                    .unwrap_or_else(|| message.clone());
                problems.push(Problem {
                    file: file.clone(),
                    object: None,
                    field: Some(field.clone()),
                    reason,
                    message,
                });
            }
        }
        Err(e) => {
            // Read errors cannot happen here (the files are read already), but if the file
            // source grows a new refusal it must still fail the run.
            let file = set
                .first()
                .map(|(p, _)| p.display().to_string())
                .unwrap_or_default();
            problems.push(Problem {
                file,
                object: None,
                field: None,
                reason: e.to_string(),
                message: e.to_string(),
            });
        }
    }
}

/// The human output: every problem's line, or one `ok` line per file.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    if !report.ok {
        for p in &report.problems {
            out.push_str(&p.message);
            out.push('\n');
        }
        let bad = report.files.iter().filter(|f| !f.ok).count();
        out.push_str(&format!(
            "invalid: {} problem{} in {bad} of {} file{}\n",
            report.problems.len(),
            plural(report.problems.len()),
            report.files.len(),
            plural(report.files.len()),
        ));
        return out;
    }
    for f in &report.files {
        let what = match (&f.registry, f.objects.is_empty()) {
            (Some(c), _) => format!(
                "registry file: {} service{}, {} endpoint{}, {} route{}, {} polic{}",
                c.services,
                plural(c.services),
                c.endpoints,
                plural(c.endpoints),
                c.routes,
                plural(c.routes),
                c.policies,
                if c.policies == 1 { "y" } else { "ies" },
            ),
            (None, false) => f.objects.join(", "),
            (None, true) => "no Weft object".to_string(),
        };
        out.push_str(&format!("{}: ok: {what}", f.file));
        if !f.skipped.is_empty() {
            out.push_str(&format!(" (skipped, not Weft's: {})", f.skipped.join(", ")));
        }
        out.push('\n');
    }
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}
