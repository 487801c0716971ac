//! Replays every file of the fuzz corpus (`fuzz/corpus/<target>/`) through the code the fuzz
//! targets run, so the corpus is checked without cargo-fuzz.

use std::path::Path;

#[test]
fn every_fuzz_corpus_file_passes_its_target_without_panicking() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let mut replayed = 0;
    for (target, run) in [
        (
            "record_decode",
            prism_wal::fuzzing::record_decode as fn(&[u8]),
        ),
        ("recovery", prism_wal::fuzzing::recovery as fn(&[u8])),
    ] {
        let dir = root.join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "empty corpus {}", dir.display());
        for f in files {
            let bytes = std::fs::read(&f).unwrap();
            run(&bytes);
            replayed += 1;
        }
    }
    assert!(replayed >= 8);
}
