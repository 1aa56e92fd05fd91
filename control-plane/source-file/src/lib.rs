//! The file source: registry YAML files, validated as a whole and hot-reloaded.
//!
//! What it does:
//! - [`FileSource::load`] reads and validates every file at startup and refuses to start on any
//!   error (the binary exits 64), so a typo never reaches a client.
//! - [`FileSource::run`] polls the files' content and, on a change, re-reads all of them. A
//!   valid set replaces what the source held (one `Init, InitApply*, InitDone` relist); an
//!   invalid or unreadable one changes nothing: the last good configuration keeps serving and the
//!   error is logged, counted and shown in `/debug/sources` until a valid write clears it.
//! - Polling hashes content rather than watching inodes or mtimes, so an editor's
//!   write-temp-and-rename and a Kubernetes ConfigMap's symlink swap are both just "the content
//!   changed".
//!
//! What it does not do: watch directories for new files (the file list is fixed at startup),
//! merge with other sources (the hub does that), or validate anything itself beyond
//! cross-file name conflicts (`weft_registry::parse_document` owns the schema).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::time::MissedTickBehavior;
use weft_registry::{Object, SchemaErrors, SourceEvent, SourceHandle, parse_document};
use xxhash_rust::xxh3::Xxh3;

/// Why a set of registry files was refused.
#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    #[error("{}: cannot read registry file: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Every schema problem of every file, each naming its file, field path and reason.
    #[error("{0}")]
    Invalid(SchemaErrors),
    /// The same service, route or policy defined in two files. Files are one flat namespace: a
    /// silent "first file wins" would make the result depend on flag order.
    #[error(
        "{file}: {field}: {what} is also defined in {other_file} ({other_field}); define it in \
         one file only"
    )]
    Conflict {
        file: String,
        field: String,
        /// E.g. "service `echo`", "a policy for service `echo`".
        what: String,
        other_file: String,
        other_field: String,
    },
}

impl FileSourceError {
    /// The error split by file, as `/debug/sources` shows it: file path -> reason(s).
    pub fn by_file(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        match self {
            FileSourceError::Read { path, source } => {
                out.insert(
                    path.display().to_string(),
                    format!("cannot read registry file: {source}"),
                );
            }
            FileSourceError::Invalid(errs) => {
                for e in &errs.0 {
                    let entry: &mut String = out.entry(e.origin.clone()).or_default();
                    if !entry.is_empty() {
                        entry.push('\n');
                    }
                    entry.push_str(&format!("{}: {}", e.path, e.reason));
                }
            }
            FileSourceError::Conflict {
                file,
                field,
                what,
                other_file,
                other_field,
            } => {
                out.insert(
                    file.clone(),
                    format!(
                        "{field}: {what} is also defined in {other_file} ({other_field}); \
                         define it in one file only"
                    ),
                );
            }
        }
        out
    }
}

#[derive(Clone, Default)]
struct Metrics {
    reloads: Counter,
    reload_errors: Counter,
    last_success: Gauge,
}

/// See the crate documentation.
pub struct FileSource {
    paths: Vec<PathBuf>,
    source: SourceHandle,
    /// Hash of the last content acted on, valid or not, so one bad write is reported once
    /// rather than on every poll.
    last_seen: u64,
    /// A changed hash seen by the previous poll and not yet acted on. A change is applied only
    /// once two polls in a row read the same content: a file caught between a writer's truncate
    /// and write reads as empty, which is a valid (empty) registry and would otherwise withdraw
    /// every service for a moment.
    pending: Option<u64>,
    metrics: Metrics,
}

impl std::fmt::Debug for FileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSource")
            .field("paths", &self.paths)
            .field("source", &self.source.name())
            .finish_non_exhaustive()
    }
}

/// What one poll read: each file's content or why it could not be read.
type Reads = Vec<(PathBuf, io::Result<String>)>;

impl FileSource {
    /// Reads and validates every file; on any error returns it (the binary exits 64 at startup).
    /// On success emits Init, InitApply(all objects of all files), InitDone on `source`.
    pub fn load(paths: Vec<PathBuf>, source: SourceHandle) -> Result<FileSource, FileSourceError> {
        // The same file named twice would conflict with itself; it means "this file" once.
        let mut unique = Vec::with_capacity(paths.len());
        for p in paths {
            if !unique.contains(&p) {
                unique.push(p);
            }
        }
        let reads = read_all(&unique);
        let hash = content_hash(&reads);
        let objects = parse_all(reads)?;
        let count = objects.len();
        emit(&source, objects);
        source.set_info("content_hash", format!("{hash:016x}"));
        source.set_info("files", unique.len().to_string());
        let metrics = Metrics::default();
        metrics.last_success.set(1);
        tracing::info!(files = ?unique, objects = count, "registry files loaded");
        Ok(FileSource {
            paths: unique,
            source,
            last_seen: hash,
            pending: None,
            metrics,
        })
    }

    /// Registers `weft_file_reloads_total`, `weft_file_reload_errors_total` and
    /// `weft_file_last_reload_success`.
    pub fn register_metrics(&self, reg: &mut MetricsRegistry) {
        let m = &self.metrics;
        // prometheus-client appends `_total` to counter names.
        reg.register(
            "weft_file_reloads",
            "Reloads of the registry files after a content change, valid or not",
            m.reloads.clone(),
        );
        reg.register(
            "weft_file_reload_errors",
            "Reloads refused because a registry file was invalid or unreadable",
            m.reload_errors.clone(),
        );
        reg.register(
            "weft_file_last_reload_success",
            "1 if the last load or reload of the registry files was applied, 0 if it was refused",
            m.last_success.clone(),
        );
    }

    /// Polls the files every `interval` (content hash, so editors' rename-and-replace and
    /// Kubernetes ConfigMap symlink swaps both work); on change re-reads ALL files and, if all
    /// are valid, re-emits Init/InitApply*/InitDone. A change is acted on once two consecutive
    /// polls read the same content, so within one to two intervals of the write. If any file is invalid (or unreadable),
    /// nothing changes: the previous good config keeps serving, the error is logged, counted and
    /// set as the source's errors; a later valid write clears the errors.
    pub async fn run(mut self, interval: Duration, shutdown: impl Future<Output = ()>) {
        // A zero period would make `interval` panic.
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first tick fires at once; `load` has just read the files.
        tick.tick().await;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => {}
            }
            let paths = self.paths.clone();
            // Reading may block (a slow or hung network filesystem); keep it off the runtime's
            // worker threads.
            let reads = match tokio::task::spawn_blocking(move || read_all(&paths)).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "registry file read task failed");
                    continue;
                }
            };
            self.poll_once(reads);
        }
    }

    /// Acts on what one poll read, if it differs from what was last acted on and the previous
    /// poll read the same.
    fn poll_once(&mut self, reads: Reads) {
        let hash = content_hash(&reads);
        if hash == self.last_seen {
            self.pending = None;
            return;
        }
        if self.pending != Some(hash) {
            // Not yet settled; see `pending`.
            self.pending = Some(hash);
            return;
        }
        self.pending = None;
        self.last_seen = hash;
        self.metrics.reloads.inc();
        match parse_all(reads) {
            Ok(objects) => {
                let count = objects.len();
                emit(&self.source, objects);
                self.source.set_errors(BTreeMap::new());
                self.source.set_info("content_hash", format!("{hash:016x}"));
                self.metrics.last_success.set(1);
                tracing::info!(files = ?self.paths, objects = count, "registry files reloaded");
            }
            Err(e) => {
                let by_file = e.by_file();
                for (file, reason) in &by_file {
                    tracing::error!(
                        file = %file,
                        reason = %reason,
                        "registry file rejected; keeping the previous configuration"
                    );
                }
                self.source.set_errors(by_file);
                self.metrics.reload_errors.inc();
                self.metrics.last_success.set(0);
            }
        }
    }
}

fn read_all(paths: &[PathBuf]) -> Reads {
    paths
        .iter()
        .map(|p| (p.clone(), std::fs::read_to_string(p)))
        .collect()
}

/// One hash over every file's path and content (or read error), so any change to any file,
/// however it was made, changes it.
fn content_hash(reads: &Reads) -> u64 {
    let mut h = Xxh3::new();
    for (path, content) in reads {
        h.update(path.as_os_str().as_encoded_bytes());
        h.update(&[0]);
        match content {
            Ok(text) => {
                h.update(b"ok");
                h.update(&(text.len() as u64).to_le_bytes());
                h.update(text.as_bytes());
            }
            Err(e) => {
                h.update(b"err");
                h.update(e.to_string().as_bytes());
            }
        }
        h.update(&[0]);
    }
    h.digest()
}

/// What a load does once the files are read: every file's schema, then conflicts between
/// files. Public so the fuzz targets (tests/fuzz) reach it without touching a file system.
#[doc(hidden)]
pub fn parse_files(files: Vec<(PathBuf, String)>) -> Result<Vec<Object>, FileSourceError> {
    parse_all(files.into_iter().map(|(p, text)| (p, Ok(text))).collect())
}

/// Validates every file and the set as a whole; returns the objects of all of them.
fn parse_all(reads: Reads) -> Result<Vec<Object>, FileSourceError> {
    let mut docs = Vec::with_capacity(reads.len());
    for (path, content) in reads {
        let text = content.map_err(|source| FileSourceError::Read {
            path: path.clone(),
            source,
        })?;
        docs.push((path, text));
    }
    let mut errors = Vec::new();
    let mut parsed = Vec::with_capacity(docs.len());
    for (path, text) in &docs {
        match parse_document(&path.display().to_string(), text) {
            Ok(doc) => parsed.push((path.as_path(), doc)),
            // Collect every file's problems so one edit-reload cycle can fix them all.
            Err(e) => errors.extend(e.0),
        }
    }
    if !errors.is_empty() {
        return Err(FileSourceError::Invalid(SchemaErrors(errors)));
    }
    check_conflicts(&parsed)?;
    Ok(parsed
        .into_iter()
        .flat_map(|(_, doc)| doc.into_objects())
        .collect())
}

/// Where a name was first defined: file and field path.
type Defined<'a> = HashMap<String, (&'a Path, String)>;

fn check_conflicts(parsed: &[(&Path, weft_registry::RegistryDoc)]) -> Result<(), FileSourceError> {
    let mut services: Defined = HashMap::new();
    let mut routes: Defined = HashMap::new();
    let mut policies: Defined = HashMap::new();
    // `policy_for` would pick one of two policies for a service arbitrarily; the schema forbids
    // that within a document, and the files are one document split up.
    let mut policy_targets: Defined = HashMap::new();
    for (path, doc) in parsed {
        for (i, s) in doc.services.iter().enumerate() {
            claim(
                &mut services,
                path,
                &s.name,
                format!("services[{i}].name"),
                || format!("service `{}`", s.name),
            )?;
        }
        for (i, r) in doc.routes.iter().enumerate() {
            claim(
                &mut routes,
                path,
                &r.name,
                format!("routes[{i}].name"),
                || format!("route `{}`", r.name),
            )?;
        }
        for (i, p) in doc.policies.iter().enumerate() {
            claim(
                &mut policies,
                path,
                &p.name,
                format!("policies[{i}].name"),
                || format!("policy `{}`", p.name),
            )?;
            claim(
                &mut policy_targets,
                path,
                &p.service,
                format!("policies[{i}].service"),
                || format!("a policy for service `{}`", p.service),
            )?;
        }
    }
    Ok(())
}

/// Records `name` as defined at `path`/`field`, or fails naming both places. Duplicates within
/// one file are the schema's to report, so only other files count here.
fn claim<'a>(
    seen: &mut Defined<'a>,
    path: &'a Path,
    name: &str,
    field: String,
    what: impl FnOnce() -> String,
) -> Result<(), FileSourceError> {
    match seen.get(name) {
        Some((other, other_field)) if *other != path => Err(FileSourceError::Conflict {
            file: path.display().to_string(),
            field,
            what: what(),
            other_file: other.display().to_string(),
            other_field: other_field.clone(),
        }),
        Some(_) => Ok(()),
        None => {
            seen.insert(name.to_string(), (path, field));
            Ok(())
        }
    }
}

fn emit(source: &SourceHandle, objects: Vec<Object>) {
    let mut events = Vec::with_capacity(objects.len() + 2);
    events.push(SourceEvent::Init);
    events.extend(objects.into_iter().map(SourceEvent::InitApply));
    events.push(SourceEvent::InitDone);
    source.apply(events);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use weft_registry::Hub;

    #[test]
    fn parse_files_is_a_load_without_reading() {
        let one = "services:\n  - name: web\n    endpoints: [{address: 10.0.0.1, port: 80}]\n";
        let objects = parse_files(vec![(PathBuf::from("a.yaml"), one.to_string())]).unwrap();
        assert_eq!(objects.len(), 2, "{objects:?}");
        let err = parse_files(vec![
            (PathBuf::from("a.yaml"), one.to_string()),
            (PathBuf::from("b.yaml"), one.to_string()),
        ])
        .unwrap_err();
        assert!(matches!(err, FileSourceError::Conflict { .. }), "{err}");
    }

    fn reads(path: &Path, text: &str) -> Reads {
        vec![(path.to_path_buf(), Ok(text.to_string()))]
    }

    const ONE: &str = "services: [{name: a, endpoints: [{address: 10.0.0.1, port: 1}]}]";
    const TWO: &str = "services: [{name: a, endpoints: [{address: 10.0.0.1, port: 2}]}]";

    fn port(hub: &Hub) -> Option<u16> {
        hub.current()
            .registry
            .services
            .get("a")
            .and_then(|s| s.instances.first())
            .map(|i| i.endpoint.port)
    }

    /// Builds a loaded source without touching the disk.
    fn loaded(hub: &std::sync::Arc<Hub>, path: &Path, text: &str) -> FileSource {
        let source = hub.add_source("file");
        let r = reads(path, text);
        let hash = content_hash(&r);
        emit(&source, parse_all(r).unwrap());
        FileSource {
            paths: vec![path.to_path_buf()],
            source,
            last_seen: hash,
            pending: None,
            metrics: Metrics::default(),
        }
    }

    #[test]
    fn a_change_is_applied_once_two_polls_agree() {
        let hub = Hub::new();
        let path = Path::new("r.yaml");
        let mut src = loaded(&hub, path, ONE);
        assert_eq!(port(&hub), Some(1));
        src.poll_once(reads(path, TWO));
        assert_eq!(port(&hub), Some(1), "applied before settling");
        src.poll_once(reads(path, TWO));
        assert_eq!(port(&hub), Some(2));
        assert_eq!(src.metrics.reloads.get(), 1);
    }

    #[test]
    fn a_torn_read_seen_once_is_never_applied() {
        let hub = Hub::new();
        let path = Path::new("r.yaml");
        let mut src = loaded(&hub, path, ONE);
        let generation = hub.current().generation;
        // Truncated by a writer at the moment of the poll, written by the next one.
        src.poll_once(reads(path, ""));
        src.poll_once(reads(path, ONE));
        src.poll_once(reads(path, ONE));
        assert_eq!(hub.current().generation, generation);
        assert_eq!(src.metrics.reloads.get(), 0);
    }

    #[test]
    fn a_persisting_error_is_counted_once() {
        let hub = Hub::new();
        let path = Path::new("r.yaml");
        let mut src = loaded(&hub, path, ONE);
        let bad = "services: [{name: a, endpoints: [{address: 10.0.0.1, port: 0}]}]";
        for _ in 0..5 {
            src.poll_once(reads(path, bad));
        }
        assert_eq!(src.metrics.reload_errors.get(), 1);
        assert_eq!(hub.sources()[0].errors_total, 1);
        assert_eq!(port(&hub), Some(1));
    }
}
