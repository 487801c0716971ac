//! Replays every file of the WAL fuzz targets' corpora (`fuzz/corpus/<target>/`) through the
//! code those targets run, so the corpus is checked without cargo-fuzz.

use std::path::Path;

/// Corpus folders of fuzz targets outside this crate, replayed elsewhere: `codec_decode`
/// checks the relay's payload decoder, which this crate does not depend on; the fuzz package's
/// own test (`fuzz/tests/corpus.rs`) replays it.
const REPLAYED_ELSEWHERE: &[&str] = &["codec_decode"];

/// A fuzz target of this crate: its name (its corpus folder) and the check it runs on an input.
type Target = (&'static str, fn(&[u8]));

const TARGETS: [Target; 2] = [
    ("record_decode", prism_wal::fuzzing::record_decode),
    ("recovery", prism_wal::fuzzing::recovery),
];

#[test]
fn every_fuzz_corpus_file_passes_its_target_without_panicking() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    let mut replayed = 0;
    let mut seen = Vec::new();
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        if REPLAYED_ELSEWHERE.contains(&name.as_str()) {
            continue;
        }
        // A corpus folder with no replay here would go unchecked by `cargo test`.
        let Some((_, run)) = TARGETS.iter().find(|(target, _)| *target == name) else {
            panic!("corpus {} belongs to no known fuzz target", dir.display());
        };
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "empty corpus {}", dir.display());
        for f in files {
            let bytes = std::fs::read(&f).unwrap();
            run(&bytes);
            replayed += 1;
        }
        seen.push(name);
    }
    for (target, _) in TARGETS {
        assert!(
            seen.iter().any(|s| s == target),
            "no corpus for {target} under {}",
            root.display()
        );
    }
    assert!(replayed >= 8);
}
