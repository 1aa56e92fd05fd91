//! The file source: registry documents (YAML or JSON), alone and as a set of files.
//!
//! Input: up to three files' contents separated by NUL bytes (`a.yaml`, `b.yaml`, `c.yaml`).
//! Invariants: no panic; an error names one of the files; what is accepted validates again
//! (document and each object), round-trips through JSON, and has unique keys.
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use weft_fuzz::{assert_keys_unique, assert_object_valid};
use weft_registry::{RegistryDoc, parse_document};
use weft_source_file::{FileSourceError, parse_files};

const NAMES: [&str; 3] = ["a.yaml", "b.yaml", "c.yaml"];

fuzz_target!(|data: &[u8]| {
    let files: Vec<(PathBuf, String)> = data
        .split(|&b| b == 0)
        .take(NAMES.len())
        .zip(NAMES)
        .map(|(bytes, name)| {
            (
                PathBuf::from(name),
                String::from_utf8_lossy(bytes).into_owned(),
            )
        })
        .collect();

    for (path, text) in &files {
        let origin = path.display().to_string();
        match parse_document(&origin, text) {
            Ok(doc) => check_doc(&origin, &doc),
            Err(errs) => {
                assert!(!errs.0.is_empty(), "an error without a problem");
                for e in &errs.0 {
                    assert_eq!(e.origin, origin, "error does not name its file");
                    assert!(!e.path.is_empty() && !e.reason.is_empty(), "{e:?}");
                }
            }
        }
    }

    match parse_files(files) {
        Ok(objects) => {
            objects.iter().for_each(assert_object_valid);
            assert_keys_unique(&objects);
        }
        Err(e) => {
            let by_file = e.by_file();
            assert!(!by_file.is_empty());
            for file in by_file.keys() {
                assert!(NAMES.contains(&file.as_str()), "error names {file:?}");
            }
            if let FileSourceError::Conflict {
                file, other_file, ..
            } = &e
            {
                assert_ne!(file, other_file, "a conflict within one file");
            }
        }
    }
});

fn check_doc(origin: &str, doc: &RegistryDoc) {
    assert!(weft_registry::schema::validate_document(origin, doc).is_empty());
    let json = serde_json::to_string(doc).expect("a document serialises");
    match parse_document(origin, &json) {
        Ok(again) => assert_eq!(&again, doc, "JSON round trip changed the document"),
        Err(e) => panic!("accepted document is refused as JSON {json}: {e}"),
    }
    let objects = doc.clone().into_objects();
    objects.iter().for_each(assert_object_valid);
    assert_keys_unique(&objects);
}
