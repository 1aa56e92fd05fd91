#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The CRDs checked in under charts/weft/crds must be what the code generates.

use std::path::PathBuf;

use weft_crds::generate::{CHART_CRDS_DIR, check};

#[test]
fn checked_in_crds_match_the_code() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(CHART_CRDS_DIR);
    let stale = check(&dir).unwrap();
    assert!(
        stale.is_empty(),
        "these CRD files differ from what control-plane/crds generates: {}\n\
         run `make crds` (cargo run -q -p weft-crds -- charts/weft/crds) and commit the result",
        stale
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
}
