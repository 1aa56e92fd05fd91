//! W3C trace context: `traceparent`/`tracestate` parsing never panics and round-trips.
//!
//! Input: text lines; the first is a `traceparent` value, every further line one `tracestate`
//! header value (so seeds are readable header dumps).
#![no_main]

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use weft_trace_context::{
    SpanContext, SpanId, TraceParent, inject, parse_traceparent, parse_tracestate, start_span,
};

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n');
    let traceparent = lines.next().unwrap_or_default();
    let tracestate: Vec<&[u8]> = lines.collect();

    let parsed = parse_traceparent(traceparent);
    if let Ok(tp) = &parsed {
        check_traceparent(traceparent, tp);
    }

    let ts = parse_tracestate(tracestate.iter().copied());
    assert!(ts.members.len() <= 32, "more than 32 members kept");
    for (i, (k, _)) in ts.members.iter().enumerate() {
        assert!(
            !ts.members[..i].iter().any(|(other, _)| other == k),
            "duplicate key {k:?} kept"
        );
    }
    // Parsing is idempotent: the kept members re-serialised parse to themselves.
    let joined = ts
        .members
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    assert_eq!(parse_tracestate([joined.as_bytes()]), ts);

    // Through real headers: what start_span reads, inject writes and the next hop reads back.
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(traceparent) {
        headers.insert("traceparent", v);
    }
    for value in &tracestate {
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.append("tracestate", v);
        }
    }
    let ctx = start_span(&headers, false);
    assert_ne!(ctx.span_id, SpanId([0; 8]));
    match (headers.get("traceparent"), &ctx.parent_id) {
        (Some(_), Some(parent)) => {
            let tp = parsed
                .as_ref()
                .expect("a continued trace had a valid traceparent");
            assert_eq!(ctx.trace_id, tp.trace_id);
            assert_eq!(*parent, tp.parent_id);
            assert_ne!(
                ctx.span_id, tp.parent_id,
                "a hop reused its caller's span id"
            );
            assert_eq!(ctx.sampled, tp.flags & 1 == 1);
            assert!(ctx.discarded.is_none());
        }
        (Some(_), None) => {
            assert!(ctx.discarded.is_some(), "a discarded traceparent says why");
            assert!(
                ctx.tracestate.members.is_empty(),
                "tracestate used without traceparent"
            );
        }
        (None, parent) => assert!(parent.is_none() && ctx.discarded.is_none()),
    }
    next_hop_round_trip(&ctx);
});

fn check_traceparent(input: &[u8], tp: &TraceParent) {
    assert_ne!(tp.version, 0xff);
    assert_ne!(tp.trace_id.0, [0; 16]);
    assert_ne!(tp.parent_id.0, [0; 8]);
    let text = format!(
        "{:02x}-{}-{}-{:02x}",
        tp.version, tp.trace_id, tp.parent_id, tp.flags
    );
    assert_eq!(parse_traceparent(text.as_bytes()).as_ref(), Ok(tp));
    // Version 00 is strict: the only accepted spelling is the canonical one (plus OWS).
    if tp.version == 0 {
        let trimmed = std::str::from_utf8(input)
            .expect("an accepted traceparent is ASCII")
            .trim_matches([' ', '\t']);
        assert_eq!(trimmed, text);
    }
}

/// What this hop injects, the next hop continues: same trace, our span as its parent, same
/// sampled flag and tracestate.
fn next_hop_round_trip(ctx: &SpanContext) {
    let mut out = HeaderMap::new();
    inject(ctx, &mut out);
    let next = start_span(&out, !ctx.sampled);
    assert_eq!(next.trace_id, ctx.trace_id);
    assert_eq!(next.parent_id, Some(ctx.span_id));
    assert_eq!(next.sampled, ctx.sampled);
    assert_eq!(next.tracestate, ctx.tracestate);
    assert!(next.discarded.is_none());
}
