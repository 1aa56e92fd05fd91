#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

use super::*;
use http::{HeaderMap, HeaderName, HeaderValue};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SPEC_EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

fn hex<const N: usize>(s: &str) -> [u8; N] {
    decode_hex::<N>(s.as_bytes()).unwrap()
}

fn tp(s: &str) -> Result<TraceParent, InvalidTraceParent> {
    parse_traceparent(s.as_bytes())
}

fn malformed(s: &str) {
    assert!(
        matches!(tp(s), Err(InvalidTraceParent::Malformed(_))),
        "expected Malformed for {s:?}, got {:?}",
        tp(s)
    );
}

fn ts(values: &[&str]) -> Vec<(String, String)> {
    parse_tracestate(values.iter().map(|v| v.as_bytes())).members
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

fn headers(list: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in list {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    map
}

// ---------------------------------------------------------------------------------------------
// traceparent

#[test]
fn spec_examples_parse() {
    let sampled = tp(SPEC_EXAMPLE).unwrap();
    assert_eq!(
        sampled,
        TraceParent {
            version: 0,
            trace_id: TraceId(hex(TRACE)),
            parent_id: SpanId(hex(PARENT)),
            flags: 1,
        }
    );
    assert_eq!(sampled.trace_id.to_string(), TRACE);
    assert_eq!(sampled.parent_id.to_string(), PARENT);

    let unsampled = tp("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
    assert_eq!(unsampled.flags, 0);

    // Other examples of the spec and of the W3C test suite.
    assert!(tp("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").is_ok());
    assert!(tp("00-12345678901234567890123456789012-1234567890123456-01").is_ok());
}

#[test]
fn unknown_flags_are_kept_on_parse() {
    assert_eq!(tp(&SPEC_EXAMPLE.replace("-01", "-09")).unwrap().flags, 0x09);
    assert_eq!(tp(&SPEC_EXAMPLE.replace("-01", "-ff")).unwrap().flags, 0xff);
}

#[test]
fn uppercase_hex_is_invalid() {
    malformed("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01");
    malformed("00-4bf92f3577b34da6a3ce929d0e0e473A-00f067aa0ba902b7-01");
    malformed("00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01");
    malformed("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A");
    malformed("0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    malformed("FF-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
}

#[test]
fn wrong_lengths_are_invalid() {
    // version
    malformed("0-12345678901234567890123456789012-1234567890123456-01");
    malformed("000-12345678901234567890123456789012-1234567890123456-01");
    malformed("0000-12345678901234567890123456789012-1234567890123456-01");
    // trace-id
    malformed("00-1234567890123456789012345678901-1234567890123456-01");
    malformed("00-123456789012345678901234567890123-1234567890123456-01");
    // parent-id
    malformed("00-12345678901234567890123456789012-123456789012345-01");
    malformed("00-12345678901234567890123456789012-12345678901234567-01");
    // trace-flags
    malformed("00-12345678901234567890123456789012-1234567890123456-1");
    malformed("00-12345678901234567890123456789012-1234567890123456-001");
    // whole value
    malformed("");
    malformed("00");
    malformed("00-");
    malformed("00-12345678901234567890123456789012-1234567890123456");
    malformed("00-12345678901234567890123456789012-1234567890123456-");
}

#[test]
fn bad_separators_and_characters_are_invalid() {
    malformed("00_12345678901234567890123456789012-1234567890123456-01");
    malformed("00-12345678901234567890123456789012_1234567890123456-01");
    malformed("00-12345678901234567890123456789012-1234567890123456_01");
    malformed("00 12345678901234567890123456789012 1234567890123456 01");
    malformed(
        "00-12345678901234567890123456789012-1234567890123456-01"
            .replace('-', ":")
            .as_str(),
    );
    // illegal characters in each field (W3C test suite)
    malformed(".0-12345678901234567890123456789012-1234567890123456-01");
    malformed("0.-12345678901234567890123456789012-1234567890123456-01");
    malformed("00-.2345678901234567890123456789012-1234567890123456-01");
    malformed("00-1234567890123456789012345678901.-1234567890123456-01");
    malformed("00-12345678901234567890123456789012-.234567890123456-01");
    malformed("00-12345678901234567890123456789012-123456789012345.-01");
    malformed("00-12345678901234567890123456789012-1234567890123456-.0");
    malformed("00-12345678901234567890123456789012-1234567890123456-0.");
    malformed("00-1234567890123456789012345678901g-1234567890123456-01");
    malformed("00-+2345678901234567890123456789012-1234567890123456-01");
}

#[test]
fn non_ascii_is_invalid() {
    let mut value = SPEC_EXAMPLE.as_bytes().to_vec();
    value[10] = 0xe9;
    assert!(matches!(
        parse_traceparent(&value),
        Err(InvalidTraceParent::Malformed(_))
    ));
    assert!(matches!(
        parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01é".as_bytes()),
        Err(InvalidTraceParent::Malformed(_))
    ));
    assert!(matches!(
        parse_traceparent("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-é".as_bytes()),
        Err(InvalidTraceParent::Malformed(_))
    ));
}

#[test]
fn version_ff_is_invalid() {
    assert_eq!(
        tp("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        Err(InvalidTraceParent::VersionFf)
    );
    assert_eq!(
        tp("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more"),
        Err(InvalidTraceParent::VersionFf)
    );
}

#[test]
fn version_00_with_trailing_data_is_invalid() {
    malformed(&format!("{SPEC_EXAMPLE}-what-the-future-will-be-like"));
    malformed(&format!("{SPEC_EXAMPLE}-"));
    malformed(&format!("{SPEC_EXAMPLE}."));
    malformed(&format!("{SPEC_EXAMPLE}0"));
}

#[test]
fn future_versions_parse_their_first_four_fields() {
    let exact = tp("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
    assert_eq!(exact.version, 0xcc);
    assert_eq!(exact.trace_id, TraceId(hex(TRACE)));
    assert_eq!(exact.parent_id, SpanId(hex(PARENT)));
    assert_eq!(exact.flags, 1);

    let extra =
        tp("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-will-be-like")
            .unwrap();
    assert_eq!(extra, exact);
    assert_eq!(
        tp("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-")
            .unwrap()
            .version,
        1
    );
    assert_eq!(
        tp("fe-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x")
            .unwrap()
            .version,
        0xfe
    );
    // Unknown fields are not parsed, so anything (ASCII) may follow the dash.
    assert!(tp("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-XYZ_!").is_ok());
}

#[test]
fn future_versions_without_dash_or_too_short_are_invalid() {
    malformed("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01extra");
    malformed(
        "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01.what-the-future-will-be-like",
    );
    malformed("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-011");
    // shorter than 55 characters
    malformed("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1");
    malformed("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7");
    // fields of the wrong shape
    malformed("cc-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01");
    malformed("cc-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01-x");
    malformed("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0X-x");
}

#[test]
fn zero_ids_are_invalid() {
    assert_eq!(
        tp("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
        Err(InvalidTraceParent::ZeroTraceId)
    );
    assert_eq!(
        tp("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
        Err(InvalidTraceParent::ZeroParentId)
    );
    assert_eq!(
        tp("cc-00000000000000000000000000000000-00f067aa0ba902b7-01-x"),
        Err(InvalidTraceParent::ZeroTraceId)
    );
    assert_eq!(
        tp("cc-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
        Err(InvalidTraceParent::ZeroParentId)
    );
    // One non-zero byte is enough.
    assert!(tp("00-00000000000000000000000000000001-0000000000000100-01").is_ok());
}

#[test]
fn surrounding_ows_is_not_part_of_the_value() {
    for value in [
        format!(" {SPEC_EXAMPLE}"),
        format!("\t{SPEC_EXAMPLE}"),
        format!("{SPEC_EXAMPLE} "),
        format!("{SPEC_EXAMPLE}\t"),
        format!("\t {SPEC_EXAMPLE} \t"),
    ] {
        assert_eq!(tp(&value), tp(SPEC_EXAMPLE), "{value:?}");
    }
    // Whitespace inside is not OWS.
    malformed("00-4bf92f3577b34da6a3ce929d0e0e4736 -00f067aa0ba902b7-01");
}

#[test]
fn multiple_traceparent_headers_start_a_new_trace() {
    for second in [
        "00-12345678901234567890123456789012-1234567890123456-01",
        SPEC_EXAMPLE, // even the same value twice
    ] {
        let h = headers(&[
            ("traceparent", SPEC_EXAMPLE),
            ("TraceParent", second),
            ("tracestate", "foo=1"),
        ]);
        let ctx = start_span(&h, false);
        assert_eq!(ctx.discarded, Some(InvalidTraceParent::Multiple));
        assert_ne!(ctx.trace_id, TraceId(hex(TRACE)));
        assert_ne!(
            ctx.trace_id,
            TraceId(hex("12345678901234567890123456789012"))
        );
        assert_eq!(ctx.parent_id, None);
        assert!(ctx.tracestate.members.is_empty());
    }
}

#[test]
fn invalid_traceparent_starts_a_new_trace_without_tracestate() {
    for (value, why) in [
        (
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            InvalidTraceParent::ZeroTraceId,
        ),
        (
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            InvalidTraceParent::ZeroParentId,
        ),
        (
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            InvalidTraceParent::VersionFf,
        ),
    ] {
        for sample_new in [false, true] {
            let h = headers(&[("traceparent", value), ("tracestate", "foo=1,bar=2")]);
            let ctx = start_span(&h, sample_new);
            assert_eq!(ctx.discarded.as_ref(), Some(&why));
            assert_ne!(ctx.trace_id, TraceId(hex(TRACE)));
            assert_ne!(ctx.trace_id.0, [0; 16]);
            assert_ne!(ctx.span_id.0, [0; 8]);
            assert_eq!(ctx.parent_id, None);
            assert_eq!(ctx.sampled, sample_new);
            assert!(ctx.tracestate.members.is_empty());
        }
    }

    let h = headers(&[
        (
            "traceparent",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ),
        ("tracestate", "foo=1"),
    ]);
    let ctx = start_span(&h, true);
    assert!(matches!(
        ctx.discarded,
        Some(InvalidTraceParent::Malformed(_))
    ));
    assert!(ctx.sampled);

    // An empty header is present and invalid.
    let ctx = start_span(&headers(&[("traceparent", "")]), false);
    assert!(matches!(
        ctx.discarded,
        Some(InvalidTraceParent::Malformed(_))
    ));

    // A non-ASCII header value (obs-text) is invalid.
    let mut h = HeaderMap::new();
    let mut bytes = SPEC_EXAMPLE.as_bytes().to_vec();
    bytes[5] = 0xff;
    h.insert("traceparent", HeaderValue::from_bytes(&bytes).unwrap());
    let ctx = start_span(&h, false);
    assert!(matches!(
        ctx.discarded,
        Some(InvalidTraceParent::Malformed(_))
    ));
    assert_ne!(ctx.trace_id, TraceId(hex(TRACE)));
}

#[test]
fn absent_traceparent_starts_a_new_trace_and_ignores_tracestate() {
    let h = headers(&[("tracestate", "foo=1"), ("trace-parent", SPEC_EXAMPLE)]);
    for sample_new in [false, true] {
        let ctx = start_span(&h, sample_new);
        assert_eq!(ctx.discarded, None);
        assert_eq!(ctx.parent_id, None);
        assert_eq!(ctx.sampled, sample_new);
        assert_ne!(ctx.trace_id, TraceId(hex(TRACE)));
        assert!(ctx.tracestate.members.is_empty());
    }
    // Each new trace gets its own ids.
    let a = start_span(&HeaderMap::new(), false);
    let b = start_span(&HeaderMap::new(), false);
    assert_ne!(a.trace_id, b.trace_id);
    assert_ne!(a.span_id, b.span_id);
}

#[test]
fn header_names_are_case_insensitive() {
    for (tp_name, ts_name) in [
        ("TraceParent", "TraceState"),
        ("TrAcEpArEnT", "TrAcEsTaTe"),
        ("TRACEPARENT", "TRACESTATE"),
    ] {
        let ctx = start_span(
            &headers(&[(tp_name, SPEC_EXAMPLE), (ts_name, "foo=1")]),
            false,
        );
        assert_eq!(ctx.trace_id, TraceId(hex(TRACE)));
        assert_eq!(ctx.tracestate.members, pairs(&[("foo", "1")]));
    }
    // Two headers differing only in case are two traceparent headers.
    let h = headers(&[("traceparent", SPEC_EXAMPLE), ("TRACEPARENT", SPEC_EXAMPLE)]);
    assert_eq!(
        start_span(&h, false).discarded,
        Some(InvalidTraceParent::Multiple)
    );
}

// ---------------------------------------------------------------------------------------------
// tracestate

#[test]
fn tracestate_spec_examples() {
    assert_eq!(
        ts(&["rojo=00f067aa0ba902b7"]),
        pairs(&[("rojo", "00f067aa0ba902b7")])
    );
    assert_eq!(
        ts(&["rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"]),
        pairs(&[("rojo", "00f067aa0ba902b7"), ("congo", "t61rcWkgMzE")])
    );
}

#[test]
fn tracestate_invalid_members_are_dropped_alone() {
    assert_eq!(
        ts(&["foo=1,FOO=2,bar=3,foo.bar=4,baz=5"]),
        pairs(&[("foo", "1"), ("bar", "3"), ("baz", "5")])
    );
    // Bad keys.
    for bad in [
        "foo =1",
        "FOO=1",
        "foo.bar=1",
        "1foo=1",
        "_foo=1",
        "=1",
        "foo@=1",
        "@foo=1",
        "foo@@bar=1",
        "foo@bar@baz=1",
        "foo@1bar=1",
        "Foo@bar=1",
        "foo@Bar=1",
        "fo o=1",
    ] {
        assert_eq!(
            ts(&[&format!("{bad},ok=2")]),
            pairs(&[("ok", "2")]),
            "{bad:?}"
        );
    }
    // Bad values / member shapes.
    for bad in [
        "foo",
        "foo=",
        "foo=bar=baz",
        "foo=a\u{7f}b",
        "foo=\u{e9}",
        "foo=a\tb",
    ] {
        assert_eq!(
            ts(&[&format!("ok=2,{bad}")]),
            pairs(&[("ok", "2")]),
            "{bad:?}"
        );
    }
    // Raw non-ASCII bytes in one member.
    let mut raw = b"ok=2,foo=".to_vec();
    raw.extend_from_slice(&[0xc3, 0xa9]);
    raw.extend_from_slice(b",bar=3");
    assert_eq!(
        parse_tracestate([raw.as_slice()]).members,
        pairs(&[("ok", "2"), ("bar", "3")])
    );
}

#[test]
fn tracestate_valid_keys() {
    let simple = "abcdefghijklmnopqrstuvwxyz0123456789_-*/";
    let multi = format!("{simple}@a-z0-9_-*/");
    let digit_tenant = "0tenant@sys";
    for key in [
        simple,
        multi.as_str(),
        digit_tenant,
        "a",
        "a@b",
        "a*/-_@b*/-_",
    ] {
        assert_eq!(ts(&[&format!("{key}=1")]), pairs(&[(key, "1")]), "{key:?}");
    }
}

#[test]
fn tracestate_key_length_limits() {
    let k256 = "z".repeat(256);
    let k257 = "z".repeat(257);
    assert_eq!(ts(&[&format!("{k256}=1")]).len(), 1);
    assert_eq!(ts(&[&format!("{k257}=1")]).len(), 0);

    let tenant241 = format!("{}@{}", "t".repeat(241), "v".repeat(14));
    assert_eq!(ts(&[&format!("{tenant241}=1")]).len(), 1);
    assert_eq!(ts(&[&format!("{}@v=1", "t".repeat(242))]).len(), 0);
    assert_eq!(ts(&[&format!("t@{}=1", "v".repeat(15))]).len(), 0);
}

#[test]
fn tracestate_values() {
    let all = (0x20u8..=0x7e)
        .filter(|&c| c != b',' && c != b'=')
        .map(char::from)
        .collect::<String>();
    assert_eq!(
        ts(&[&format!("foo={all}")]),
        pairs(&[("foo", all.as_str())])
    );
    // Leading spaces belong to the value; trailing ones are OWS.
    assert_eq!(ts(&["foo= a b  "]), pairs(&[("foo", " a b")]));
    assert_eq!(ts(&["foo=  , bar=1"]), pairs(&[("bar", "1")]));
}

#[test]
fn tracestate_oversized_value_is_dropped() {
    let v256 = "v".repeat(256);
    let v257 = "v".repeat(257);
    assert_eq!(
        ts(&[&format!("a={v256},b={v257},c=1")]),
        pairs(&[("a", v256.as_str()), ("c", "1")])
    );
}

#[test]
fn tracestate_ows_handling() {
    let want = pairs(&[("foo", "1"), ("bar", "2"), ("baz", "3")]);
    assert_eq!(ts(&["foo=1 \t , \t bar=2, \t baz=3"]), want);
    assert_eq!(ts(&["foo=1\t \t,\t \tbar=2,\t \tbaz=3"]), want);
    for one in [" foo=1", "\tfoo=1", "foo=1 ", "foo=1\t", "\t foo=1 \t"] {
        assert_eq!(ts(&[one]), pairs(&[("foo", "1")]), "{one:?}");
    }
}

#[test]
fn tracestate_empty_members_and_headers_are_ignored() {
    assert_eq!(ts(&[""]), pairs(&[]));
    assert_eq!(ts(&[" , ,\t,"]), pairs(&[]));
    assert_eq!(ts(&["foo=1", ""]), pairs(&[("foo", "1")]));
    assert_eq!(ts(&["", "foo=1"]), pairs(&[("foo", "1")]));
    assert_eq!(
        ts(&[",foo=1,,bar=2,"]),
        pairs(&[("foo", "1"), ("bar", "2")])
    );
}

#[test]
fn tracestate_duplicate_keys_keep_the_first() {
    assert_eq!(ts(&["foo=1,foo=2"]), pairs(&[("foo", "1")]));
    assert_eq!(ts(&["foo=1", "foo=2"]), pairs(&[("foo", "1")]));
    assert_eq!(
        ts(&["foo=1,bar=2,foo=3,baz=4"]),
        pairs(&[("foo", "1"), ("bar", "2"), ("baz", "4")])
    );
    // An invalid first occurrence does not shadow a valid later one.
    assert_eq!(ts(&["foo=,foo=2"]), pairs(&[("foo", "2")]));
}

#[test]
fn tracestate_multiple_headers_combine_in_order() {
    assert_eq!(
        ts(&["foo=1,bar=2", "rojo=1,congo=2", "baz=3"]),
        pairs(&[
            ("foo", "1"),
            ("bar", "2"),
            ("rojo", "1"),
            ("congo", "2"),
            ("baz", "3")
        ])
    );
    // Through start_span, from several HTTP header fields.
    let h = headers(&[
        ("traceparent", SPEC_EXAMPLE),
        ("tracestate", "foo=1,bar=2"),
        ("TraceState", "rojo=1"),
        ("tracestate", "baz=3"),
    ]);
    assert_eq!(
        start_span(&h, false).tracestate.members,
        pairs(&[("foo", "1"), ("bar", "2"), ("rojo", "1"), ("baz", "3")])
    );
}

#[test]
fn tracestate_is_capped_at_32_members() {
    let members = (1..=40)
        .map(|i| format!("bar{i:02}={i:02}"))
        .collect::<Vec<_>>();
    let exactly32 = members[..32].join(",");
    assert_eq!(ts(&[&exactly32]).len(), 32);

    let parsed = ts(&[&members[..33].join(",")]);
    assert_eq!(parsed.len(), 32);
    assert_eq!(parsed[0], ("bar01".to_string(), "01".to_string()));
    assert_eq!(parsed[31], ("bar32".to_string(), "32".to_string()));

    // Over several headers, as the W3C test suite sends them.
    let split = [
        members[..10].join(","),
        members[10..20].join(","),
        members[20..30].join(","),
        members[30..40].join(","),
    ];
    let parsed = parse_tracestate(split.iter().map(|s| s.as_bytes())).members;
    assert_eq!(parsed.len(), 32);
    assert_eq!(parsed.last().unwrap().0, "bar32");

    // Invalid and duplicate members do not count towards the cap.
    let mut noisy = vec!["BAD=1".to_string(), "bar01=dup".to_string()];
    noisy.extend(members[..32].iter().cloned());
    let parsed = ts(&[&members[..1].join(","), &noisy.join(",")]);
    assert_eq!(parsed.len(), 32);
    assert_eq!(parsed[0], ("bar01".to_string(), "01".to_string()));
    assert_eq!(parsed[31].0, "bar32");
}

// ---------------------------------------------------------------------------------------------
// start_span / inject

#[test]
fn start_span_continues_the_incoming_trace() {
    let h = headers(&[
        ("traceparent", SPEC_EXAMPLE),
        ("tracestate", "congo=t61rcWkgMzE"),
    ]);
    let ctx = start_span(&h, false);
    assert_eq!(ctx.trace_id, TraceId(hex(TRACE)));
    assert_eq!(ctx.parent_id, Some(SpanId(hex(PARENT))));
    assert_ne!(ctx.span_id, SpanId(hex(PARENT)));
    assert_ne!(ctx.span_id.0, [0; 8]);
    assert!(ctx.sampled);
    assert_eq!(ctx.discarded, None);
    assert_eq!(ctx.tracestate.members, pairs(&[("congo", "t61rcWkgMzE")]));
}

#[test]
fn start_span_chains_over_hops() {
    let mut h = headers(&[("traceparent", SPEC_EXAMPLE)]);
    let mut previous = SpanId(hex(PARENT));
    let mut seen = vec![previous];
    for _ in 0..10 {
        let ctx = start_span(&h, false);
        assert_eq!(ctx.trace_id, TraceId(hex(TRACE)));
        assert_eq!(ctx.parent_id, Some(previous));
        assert!(!seen.contains(&ctx.span_id));
        seen.push(ctx.span_id);
        previous = ctx.span_id;
        let mut out = HeaderMap::new();
        inject(&ctx, &mut out);
        h = out;
    }
}

#[test]
fn sampled_flag_is_honoured() {
    for (flags, sampled) in [
        ("00", false),
        ("01", true),
        ("09", true),
        ("02", false),
        ("ff", true),
    ] {
        let value = format!("00-{TRACE}-{PARENT}-{flags}");
        for sample_new in [false, true] {
            let ctx = start_span(&headers(&[("traceparent", &value)]), sample_new);
            assert_eq!(ctx.sampled, sampled, "{flags} sample_new={sample_new}");
            let mut out = HeaderMap::new();
            inject(&ctx, &mut out);
            // Version 00 defines only the sampled bit; the others are written as zero.
            let want = if sampled { "01" } else { "00" };
            assert!(out["traceparent"].to_str().unwrap().ends_with(want));
        }
    }
}

#[test]
fn inject_round_trips() {
    let h = headers(&[
        ("traceparent", SPEC_EXAMPLE),
        ("tracestate", "rojo=00f067aa0ba902b7 , congo=t61rcWkgMzE"),
    ]);
    let ctx = start_span(&h, false);
    let mut out = HeaderMap::new();
    inject(&ctx, &mut out);

    let written = out["traceparent"].to_str().unwrap();
    assert_eq!(written, format!("00-{TRACE}-{}-01", ctx.span_id));
    assert_eq!(out["tracestate"], "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE");

    let back = parse_traceparent(written.as_bytes()).unwrap();
    assert_eq!(back.version, 0);
    assert_eq!(back.trace_id, ctx.trace_id);
    assert_eq!(back.parent_id, ctx.span_id);
    assert_eq!(back.flags, 1);
    let back_state = parse_tracestate(out.get_all("tracestate").iter().map(HeaderValue::as_bytes));
    assert_eq!(back_state, ctx.tracestate);
}

#[test]
fn inject_downgrades_future_versions_to_00() {
    let h = headers(&[(
        "traceparent",
        "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-will-be-like",
    )]);
    let ctx = start_span(&h, false);
    assert_eq!(ctx.trace_id, TraceId(hex(TRACE)));
    let mut out = h.clone();
    inject(&ctx, &mut out);
    assert_eq!(
        out["traceparent"].to_str().unwrap(),
        format!("00-{TRACE}-{}-01", ctx.span_id)
    );
}

#[test]
fn inject_replaces_incoming_headers_and_leaves_baggage() {
    let mut h = headers(&[
        ("traceparent", SPEC_EXAMPLE),
        (
            "traceparent",
            "00-12345678901234567890123456789012-1234567890123456-01",
        ),
        ("tracestate", "foo=1"),
        ("tracestate", "bar=2"),
        ("baggage", "userId=alice,serverNode=DF%2028"),
        ("baggage", "isProduction=false"),
    ]);
    let ctx = SpanContext {
        trace_id: TraceId(hex(TRACE)),
        span_id: SpanId(hex("b7ad6b7169203331")),
        parent_id: None,
        sampled: false,
        tracestate: TraceState {
            members: pairs(&[("rojo", "1")]),
        },
        discarded: None,
    };
    inject(&ctx, &mut h);
    let tps: Vec<_> = h.get_all("traceparent").iter().collect();
    assert_eq!(tps, [format!("00-{TRACE}-b7ad6b7169203331-00").as_str()]);
    let tss: Vec<_> = h.get_all("tracestate").iter().collect();
    assert_eq!(tss, ["rojo=1"]);
    let baggage: Vec<_> = h.get_all("baggage").iter().collect();
    assert_eq!(
        baggage,
        ["userId=alice,serverNode=DF%2028", "isProduction=false"]
    );
}

#[test]
fn inject_removes_tracestate_when_empty() {
    let mut h = headers(&[("tracestate", "foo=1"), ("baggage", "k=v")]);
    let ctx = start_span(&headers(&[("traceparent", SPEC_EXAMPLE)]), false);
    assert!(ctx.tracestate.members.is_empty());
    inject(&ctx, &mut h);
    assert!(h.get("tracestate").is_none());
    assert_eq!(h["baggage"], "k=v");
    assert!(h.get("traceparent").is_some());
}

#[test]
fn inject_leaves_out_hand_built_invalid_members() {
    let mut members = pairs(&[
        ("BAD", "1"),
        ("ok", "1"),
        ("bad", "a,b"),
        ("crlf", "a\r\nb"),
    ]);
    members.extend((0..40).map(|i| (format!("k{i}"), i.to_string())));
    let ctx = SpanContext {
        trace_id: new_trace_id(),
        span_id: new_span_id(),
        parent_id: None,
        sampled: true,
        tracestate: TraceState { members },
        discarded: None,
    };
    let mut h = HeaderMap::new();
    inject(&ctx, &mut h);
    let written = parse_tracestate([h["tracestate"].as_bytes()]).members;
    assert_eq!(written.len(), 32);
    assert_eq!(written[0], ("ok".to_string(), "1".to_string()));
    assert_eq!(written[1], ("k0".to_string(), "0".to_string()));
}

#[test]
fn new_ids_are_non_zero_and_distinct() {
    let spans: std::collections::HashSet<_> = (0..1000).map(|_| new_span_id()).collect();
    let traces: std::collections::HashSet<_> = (0..1000).map(|_| new_trace_id()).collect();
    assert_eq!(spans.len(), 1000);
    assert_eq!(traces.len(), 1000);
    assert!(spans.iter().all(|s| s.0 != [0; 8]));
    assert!(traces.iter().all(|t| t.0 != [0; 16]));
}

// ---------------------------------------------------------------------------------------------
// property-style

const KEYCHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789_-*/";
const LCALPHA: &[u8] = b"abcdefghijklmnopqrstuvwxyz";

fn pick(rng: &mut StdRng, set: &[u8]) -> char {
    char::from(set[rng.random_range(0..set.len())])
}

fn random_part(rng: &mut StdRng, first: &[u8], max_len: usize) -> String {
    let len = if rng.random_bool(0.1) {
        max_len
    } else {
        rng.random_range(1..=max_len.min(12))
    };
    let mut s = String::new();
    s.push(pick(rng, first));
    for _ in 1..len {
        s.push(pick(rng, KEYCHARS));
    }
    s
}

fn random_key(rng: &mut StdRng) -> String {
    if rng.random_bool(0.3) {
        let tenant = random_part(rng, b"abcdefghijklmnopqrstuvwxyz0123456789", 241);
        let system = random_part(rng, LCALPHA, 14);
        format!("{tenant}@{system}")
    } else {
        random_part(rng, LCALPHA, 256)
    }
}

fn random_value(rng: &mut StdRng) -> String {
    let allowed: Vec<u8> = (0x20u8..=0x7e)
        .filter(|&c| c != b',' && c != b'=')
        .collect();
    let len = if rng.random_bool(0.1) {
        256
    } else {
        rng.random_range(1..=20)
    };
    let mut v: String = (0..len - 1).map(|_| pick(rng, &allowed)).collect();
    v.push(pick(rng, &allowed[1..])); // not a space
    v
}

fn random_ows(rng: &mut StdRng) -> &'static str {
    ["", " ", "\t", " \t ", "  "][rng.random_range(0..5)]
}

#[test]
fn property_random_valid_inputs_round_trip() {
    let mut rng = StdRng::seed_from_u64(0x7ace_c0de);
    for round in 0..2000 {
        // traceparent
        let version: u8 = rng.random_range(0..=0xfe);
        let trace_id = loop {
            let id: [u8; 16] = rng.random();
            if id != [0; 16] {
                break TraceId(id);
            }
        };
        let parent_id = loop {
            let id: [u8; 8] = rng.random();
            if id != [0; 8] {
                break SpanId(id);
            }
        };
        let flags: u8 = rng.random();
        let mut traceparent = format!("{version:02x}-{trace_id}-{parent_id}-{flags:02x}");
        if version > 0 && rng.random_bool(0.5) {
            traceparent.push('-');
            traceparent.push_str(&random_value(&mut rng).replace(' ', "x"));
        }

        // tracestate: random members, some duplicates and invalid ones, over 1..=3 headers
        let mut want: Vec<(String, String)> = Vec::new();
        let mut raw: Vec<String> = Vec::new();
        for _ in 0..rng.random_range(0..40) {
            match rng.random_range(0..10) {
                0 => raw.push(format!(
                    "{}{}",
                    pick(&mut rng, b"ABC.@="),
                    random_key(&mut rng)
                )),
                1 => raw.push(String::new()),
                2 if !want.is_empty() => {
                    let key = want[rng.random_range(0..want.len())].0.clone();
                    raw.push(format!("{key}={}", random_value(&mut rng)));
                }
                _ => {
                    let key = random_key(&mut rng);
                    let value = random_value(&mut rng);
                    let member = format!("{key}={value}");
                    if want.len() < 32 && !want.iter().any(|(k, _)| *k == key) {
                        want.push((key, value.trim_end_matches(' ').to_string()));
                    }
                    raw.push(member);
                }
            }
        }
        let cuts = rng.random_range(1..=3usize);
        let mut header_values = vec![String::new(); cuts];
        for (i, member) in raw.iter().enumerate() {
            let slot = i * cuts / raw.len().max(1);
            let value = &mut header_values[slot];
            if !value.is_empty() {
                value.push_str(random_ows(&mut rng));
                value.push(',');
            }
            value.push_str(random_ows(&mut rng));
            value.push_str(member);
        }

        let mut incoming = HeaderMap::new();
        incoming.insert("traceparent", HeaderValue::from_str(&traceparent).unwrap());
        for v in &header_values {
            incoming.append("tracestate", HeaderValue::from_str(v).unwrap());
        }
        incoming.insert("baggage", HeaderValue::from_static("k=v"));

        let parsed = parse_traceparent(traceparent.as_bytes()).unwrap();
        assert_eq!(
            (
                parsed.version,
                parsed.trace_id,
                parsed.parent_id,
                parsed.flags
            ),
            (version, trace_id, parent_id, flags)
        );

        let sample_new = rng.random_bool(0.5);
        let ctx = start_span(&incoming, sample_new);
        assert_eq!(ctx.discarded, None, "round {round}: {traceparent}");
        assert_eq!(ctx.trace_id, trace_id);
        assert_eq!(ctx.parent_id, Some(parent_id));
        assert_ne!(ctx.span_id, parent_id);
        assert_eq!(ctx.sampled, flags & 1 == 1);
        assert_eq!(
            ctx.tracestate.members, want,
            "round {round}: {header_values:?}"
        );

        let mut outgoing = incoming.clone();
        inject(&ctx, &mut outgoing);
        assert_eq!(outgoing["baggage"], "k=v");
        assert_eq!(outgoing.get_all("traceparent").iter().count(), 1);
        let next = start_span(&outgoing, !sample_new);
        assert_eq!(next.discarded, None);
        assert_eq!(next.trace_id, trace_id);
        assert_eq!(next.parent_id, Some(ctx.span_id));
        assert_eq!(next.sampled, ctx.sampled);
        assert_eq!(next.tracestate, ctx.tracestate);
        let written = parse_traceparent(outgoing["traceparent"].as_bytes()).unwrap();
        assert_eq!(written.version, 0);
        assert_eq!(written.flags, u8::from(ctx.sampled));
    }
}

#[test]
fn property_corrupting_one_character_invalidates() {
    let mut rng = StdRng::seed_from_u64(42);
    for _ in 0..2000 {
        let ctx = SpanContext {
            trace_id: new_trace_id(),
            span_id: new_span_id(),
            parent_id: None,
            sampled: rng.random_bool(0.5),
            tracestate: TraceState::default(),
            discarded: None,
        };
        let mut h = HeaderMap::new();
        inject(&ctx, &mut h);
        let mut value = h["traceparent"].as_bytes().to_vec();
        assert!(parse_traceparent(&value).is_ok());
        let at = rng.random_range(0..value.len());
        let replacement = b"GXz.+_ -A\x80"[rng.random_range(0..10)];
        if value[at] == replacement || (replacement == b' ' && (at == 0 || at == value.len() - 1)) {
            continue; // unchanged, or a space at either end (OWS, not a corruption)
        }
        value[at] = replacement;
        assert!(
            parse_traceparent(&value).is_err(),
            "{:?}",
            String::from_utf8_lossy(&value)
        );
    }
}
