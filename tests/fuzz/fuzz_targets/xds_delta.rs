//! The xDS Delta request state machine (`StreamState`) against a model client: arbitrary
//! requests (subscribe/unsubscribe, wildcard, ACK/NACK, stale nonces, initial versions) interleaved with
//! cache changes. Invariants are listed in tests/fuzz/src/xds.rs and docs/fuzzing.md.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_fuzz::xds::{Harness, Input};
use weft_xds_server::Variant;

fuzz_target!(|input: Input| {
    Harness::new(Variant::Delta, input.only_type).run(input.ops);
});
