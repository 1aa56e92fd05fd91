//! W3C Trace Context Level 1 (`traceparent`, `tracestate`) for the sidecar's hops.
//!
//! What it does: parses incoming `traceparent`/`tracestate` exactly as the W3C Trace Context
//! Level 1 recommendation says, starts a new trace when the incoming one is absent or invalid,
//! gives each hop a fresh span id whose parent is the caller's span, and writes the headers for
//! the next hop. `tracestate` and `baggage` pass through (tracestate cleaned of invalid members
//! and capped at 32).
//!
//! What it does not do: export spans or decide sampling beyond honouring the sampled flag; the
//! proxy records spans and the binary exports them (OTLP).
//!
//! Why not opentelemetry's propagator: it drops a whole `tracestate` header when one member is
//! invalid and does not follow the spec's rules for future versions; the spec asks for both.
//!
//! ## Interface contract (shared with weft-proxy; keep it stable)

use http::{HeaderMap, HeaderName, HeaderValue};

/// A 16-byte trace id; never all zeros once valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte span id; never all zeros once valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::fmt::Display for SpanId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// A parsed, valid `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The version the sender used (00..=fe). We always send 00.
    pub version: u8,
    pub trace_id: TraceId,
    pub parent_id: SpanId,
    /// trace-flags; bit 0 is `sampled`.
    pub flags: u8,
}

/// Why an incoming `traceparent` was not used (a new trace was started instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTraceParent {
    #[error("traceparent: {0}")]
    Malformed(&'static str),
    #[error("traceparent: version ff is invalid")]
    VersionFf,
    #[error("traceparent: all-zero trace id")]
    ZeroTraceId,
    #[error("traceparent: all-zero parent id")]
    ZeroParentId,
    #[error("traceparent: more than one traceparent header")]
    Multiple,
}

/// `tracestate` list members in order (most recent first), at most 32, all valid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceState {
    pub members: Vec<(String, String)>,
}

/// The trace context of one hop: the span this sidecar starts for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: TraceId,
    /// This hop's new span id.
    pub span_id: SpanId,
    /// The caller's span id (from the incoming traceparent); `None` for a new trace.
    pub parent_id: Option<SpanId>,
    pub sampled: bool,
    pub tracestate: TraceState,
    /// Why the incoming traceparent was discarded, if it was.
    pub discarded: Option<InvalidTraceParent>,
}

/// Parses one `traceparent` header value per the spec (including future versions: a version
/// above 00 is parsed for its first four fields if followed by end-of-string or `-`).
///
/// Optional whitespace (spaces, tabs) around the value is not part of an HTTP field value and is
/// ignored (the W3C test suite sends such values and expects them accepted); everything else is
/// strict: lowercase hex only, version `ff` refused, version `00` exactly 55 characters, a higher
/// version at least 55 characters with a `-` right after the flags if longer, and neither id all
/// zeros.
///
/// ```
/// use weft_trace_context::{parse_traceparent, InvalidTraceParent};
///
/// let tp = parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
/// assert_eq!(tp.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert_eq!(tp.parent_id.to_string(), "00f067aa0ba902b7");
/// assert_eq!(tp.flags & 1, 1);
///
/// // A future version may carry more fields after a `-`.
/// assert!(parse_traceparent(b"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz").is_ok());
/// assert_eq!(
///     parse_traceparent(b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
///     Err(InvalidTraceParent::VersionFf),
/// );
/// ```
pub fn parse_traceparent(value: &[u8]) -> Result<TraceParent, InvalidTraceParent> {
    use InvalidTraceParent::Malformed;

    let v = trim_ows(value);
    if !v.is_ascii() {
        return Err(Malformed("value is not ASCII"));
    }
    // version: 2 lowercase hex digits followed by '-'; otherwise restart the trace.
    let version = match (v.get(..2).and_then(decode_hex::<1>), v.get(2)) {
        (Some([version]), Some(b'-')) => version,
        _ => {
            return Err(Malformed(
                "version is not 2 lowercase hex digits followed by '-'",
            ));
        }
    };
    if version == 0xff {
        return Err(InvalidTraceParent::VersionFf);
    }
    if v.len() < TRACEPARENT_LEN {
        return Err(Malformed("shorter than 55 characters"));
    }
    if version == 0 && v.len() != TRACEPARENT_LEN {
        return Err(Malformed("version 00 must be exactly 55 characters"));
    }
    // A higher version: the flags must be followed by end-of-string or '-'.
    if v.len() > TRACEPARENT_LEN && v[TRACEPARENT_LEN] != b'-' {
        return Err(Malformed("trace-flags not followed by '-' or end of value"));
    }
    let trace_id = match (decode_hex::<16>(&v[3..35]), v[35]) {
        (Some(id), b'-') => TraceId(id),
        _ => {
            return Err(Malformed(
                "trace-id is not 32 lowercase hex digits followed by '-'",
            ));
        }
    };
    let parent_id = match (decode_hex::<8>(&v[36..52]), v[52]) {
        (Some(id), b'-') => SpanId(id),
        _ => {
            return Err(Malformed(
                "parent-id is not 16 lowercase hex digits followed by '-'",
            ));
        }
    };
    let Some([flags]) = decode_hex::<1>(&v[53..55]) else {
        return Err(Malformed("trace-flags is not 2 lowercase hex digits"));
    };
    if trace_id.0 == [0; 16] {
        return Err(InvalidTraceParent::ZeroTraceId);
    }
    if parent_id.0 == [0; 8] {
        return Err(InvalidTraceParent::ZeroParentId);
    }
    Ok(TraceParent {
        version,
        trace_id,
        parent_id,
        flags,
    })
}

/// Combines every `tracestate` header value (comma-joined, in order), drops invalid or
/// duplicate-key members, keeps at most 32.
///
/// List members are separated by `,` with optional spaces/tabs around them; empty members are
/// ignored. An invalid member (bad key, bad value, no `=`, non-ASCII) is dropped on its own, the
/// rest of the header is kept. Of members with the same key the first is kept. After the 32nd kept
/// member the rest are dropped (the spec truncates from the end).
///
/// ```
/// use weft_trace_context::parse_tracestate;
///
/// let ts = parse_tracestate([&b"rojo=00f067aa0ba902b7 , BAD=1"[..], b"congo=t61rcWkgMzE,rojo=x"]);
/// assert_eq!(
///     ts.members,
///     vec![
///         ("rojo".to_string(), "00f067aa0ba902b7".to_string()),
///         ("congo".to_string(), "t61rcWkgMzE".to_string()),
///     ],
/// );
/// ```
pub fn parse_tracestate<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> TraceState {
    let mut members: Vec<(String, String)> = Vec::new();
    'values: for value in values {
        for member in value.split(|&b| b == b',') {
            if members.len() >= MAX_TRACESTATE_MEMBERS {
                break 'values;
            }
            let Some((key, val)) = parse_member(member) else {
                continue;
            };
            if members.iter().any(|(k, _)| *k == key) {
                continue;
            }
            members.push((key, val));
        }
    }
    TraceState { members }
}

/// Starts this hop's span from incoming request headers (header names case-insensitive, as
/// `HeaderMap` already is). `sample_new` decides the sampled flag of a trace started here.
///
/// With exactly one valid `traceparent` the span continues that trace: same trace id, the
/// caller's span as parent, the caller's sampled flag, and the incoming `tracestate` (cleaned).
/// Otherwise (absent, invalid, or more than one header) a new trace starts: new trace id, no
/// parent, sampled = `sample_new`, empty `tracestate` (the spec forbids using `tracestate` when
/// `traceparent` could not be used), and `discarded` says why when a header was present.
///
/// ```
/// use http::HeaderMap;
/// use weft_trace_context::{start_span, SpanId, TraceId};
///
/// let mut headers = HeaderMap::new();
/// headers.insert("TraceParent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
/// headers.insert("tracestate", "congo=t61rcWkgMzE".parse().unwrap());
///
/// let ctx = start_span(&headers, false);
/// assert_eq!(ctx.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert_eq!(ctx.parent_id.map(|p| p.to_string()).as_deref(), Some("00f067aa0ba902b7"));
/// assert_ne!(ctx.span_id.to_string(), "00f067aa0ba902b7");
/// assert!(ctx.sampled);
/// assert_eq!(ctx.tracestate.members.len(), 1);
/// assert_eq!(ctx.discarded, None);
///
/// // No traceparent: a new trace, sampled as the caller of start_span decides.
/// let fresh = start_span(&HeaderMap::new(), true);
/// assert!(fresh.parent_id.is_none() && fresh.sampled && fresh.discarded.is_none());
/// ```
pub fn start_span(headers: &HeaderMap, sample_new: bool) -> SpanContext {
    let mut incoming = headers.get_all(TRACEPARENT).iter();
    let parsed = match (incoming.next(), incoming.next()) {
        (None, _) => None,
        (Some(_), Some(_)) => Some(Err(InvalidTraceParent::Multiple)),
        (Some(value), None) => Some(parse_traceparent(value.as_bytes())),
    };
    match parsed {
        Some(Ok(tp)) => SpanContext {
            trace_id: tp.trace_id,
            span_id: new_span_id_other_than(tp.parent_id),
            parent_id: Some(tp.parent_id),
            sampled: tp.flags & FLAG_SAMPLED != 0,
            tracestate: parse_tracestate(
                headers
                    .get_all(TRACESTATE)
                    .iter()
                    .map(HeaderValue::as_bytes),
            ),
            discarded: None,
        },
        other => SpanContext {
            trace_id: new_trace_id(),
            span_id: new_span_id(),
            parent_id: None,
            sampled: sample_new,
            tracestate: TraceState::default(),
            discarded: other.and_then(Result::err),
        },
    }
}

/// Writes `traceparent` (version 00, this span as parent) and `tracestate` (when non-empty)
/// into outgoing headers, replacing any incoming ones; leaves `baggage` alone.
///
/// Only the sampled bit is written in the flags (the only flag version 00 defines). `tracestate`
/// members are written in order, comma-joined; a member that is not valid per the spec (possible
/// only if the caller built the `TraceState` by hand) is left out, as is anything past 32.
///
/// ```
/// use http::HeaderMap;
/// use weft_trace_context::{inject, SpanContext, SpanId, TraceId, TraceState};
///
/// let ctx = SpanContext {
///     trace_id: TraceId([0x4b; 16]),
///     span_id: SpanId([0x01; 8]),
///     parent_id: None,
///     sampled: true,
///     tracestate: TraceState { members: vec![("rojo".into(), "1".into())] },
///     discarded: None,
/// };
/// let mut headers = HeaderMap::new();
/// headers.insert("baggage", "userId=alice".parse().unwrap());
/// inject(&ctx, &mut headers);
/// assert_eq!(headers["traceparent"], "00-4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b-0101010101010101-01");
/// assert_eq!(headers["tracestate"], "rojo=1");
/// assert_eq!(headers["baggage"], "userId=alice");
/// ```
pub fn inject(ctx: &SpanContext, headers: &mut HeaderMap) {
    let flags = if ctx.sampled { FLAG_SAMPLED } else { 0 };
    let traceparent = format!("00-{}-{}-{flags:02x}", ctx.trace_id, ctx.span_id);
    match HeaderValue::try_from(traceparent) {
        Ok(value) => {
            headers.insert(TRACEPARENT, value);
        }
        // Unreachable: the value is lowercase hex and dashes.
        Err(_) => {
            headers.remove(TRACEPARENT);
        }
    }

    let mut tracestate = String::new();
    let mut written = 0;
    for (key, value) in &ctx.tracestate.members {
        if written == MAX_TRACESTATE_MEMBERS {
            break;
        }
        if !valid_key(key.as_bytes()) || !valid_value(value.as_bytes()) {
            continue;
        }
        if written > 0 {
            tracestate.push(',');
        }
        tracestate.push_str(key);
        tracestate.push('=');
        tracestate.push_str(value);
        written += 1;
    }
    match HeaderValue::try_from(tracestate) {
        Ok(value) if !value.is_empty() => {
            headers.insert(TRACESTATE, value);
        }
        _ => {
            headers.remove(TRACESTATE);
        }
    }
}

/// A new random, non-zero span id.
pub fn new_span_id() -> SpanId {
    loop {
        let id: [u8; 8] = rand::random();
        if id != [0; 8] {
            return SpanId(id);
        }
    }
}

/// A new random, non-zero trace id.
pub fn new_trace_id() -> TraceId {
    loop {
        let id: [u8; 16] = rand::random();
        if id != [0; 16] {
            return TraceId(id);
        }
    }
}

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// Length of a version-00 `traceparent`, and the minimum length of any version.
const TRACEPARENT_LEN: usize = 55;
const FLAG_SAMPLED: u8 = 0x01;
const MAX_TRACESTATE_MEMBERS: usize = 32;

/// A span id that is neither zero nor `parent` (so a hop never reuses its caller's id).
fn new_span_id_other_than(parent: SpanId) -> SpanId {
    loop {
        let id = new_span_id();
        if id != parent {
            return id;
        }
    }
}

/// Strips optional whitespace (SP, HTAB) from both ends.
fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Decodes exactly `2 * N` lowercase hex digits.
fn decode_hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

/// One `tracestate` list member (OWS around it ignored); `None` when empty or invalid.
fn parse_member(member: &[u8]) -> Option<(String, String)> {
    let member = trim_ows(member);
    let eq = member.iter().position(|&b| b == b'=')?;
    let (key, value) = (&member[..eq], &member[eq + 1..]);
    if !valid_key(key) || !valid_value(value) {
        return None;
    }
    // Both are ASCII once valid.
    let key = String::from_utf8(key.to_vec()).ok()?;
    let value = String::from_utf8(value.to_vec()).ok()?;
    Some((key, value))
}

fn is_keychar(c: u8) -> bool {
    matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'/')
}

/// `key = simple-key / multi-tenant-key` (Trace Context Level 1):
/// `simple-key = lcalpha 0*255(keychar)`,
/// `multi-tenant-key = tenant-id "@" system-id`,
/// `tenant-id = (lcalpha / DIGIT) 0*240(keychar)`, `system-id = lcalpha 0*13(keychar)`.
fn valid_key(key: &[u8]) -> bool {
    fn part(s: &[u8], first_may_be_digit: bool, max_len: usize) -> bool {
        match s.split_first() {
            Some((&first, rest)) => {
                s.len() <= max_len
                    && (first.is_ascii_lowercase()
                        || (first_may_be_digit && first.is_ascii_digit()))
                    && rest.iter().all(|&c| is_keychar(c))
            }
            None => false,
        }
    }
    let mut halves = key.splitn(2, |&b| b == b'@');
    match (halves.next(), halves.next()) {
        (Some(simple), None) => part(simple, false, 256),
        (Some(tenant), Some(system)) => part(tenant, true, 241) && part(system, false, 14),
        _ => false,
    }
}

/// `value = 0*255(chr) nblk-chr`, `chr = %x20 / nblk-chr`,
/// `nblk-chr = %x21-2B / %x2D-3C / %x3E-7E`: 1..=256 printable ASCII without `,` and `=`, not
/// ending in a space.
fn valid_value(value: &[u8]) -> bool {
    (1..=256).contains(&value.len())
        && value
            .iter()
            .all(|&c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=')
        && value.last() != Some(&b' ')
}

#[cfg(test)]
mod tests;
