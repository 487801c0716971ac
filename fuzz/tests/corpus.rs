//! Replays every file of `corpus/codec_decode/` through the check the `codec_decode` fuzz
//! target runs, so a plain `cargo test` (no cargo-fuzz, no sanitizer build) covers the corpus,
//! including minimized crash inputs added after a fix. The WAL targets' corpora are replayed by
//! prism-wal's own integration tests.

use std::path::{Path, PathBuf};

use prism_relay::codec::{decode, DataType};

fn corpus_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/codec_decode");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_codec_corpus_file_passes_the_fuzz_check() {
    let files = corpus_files();
    assert!(!files.is_empty(), "empty codec_decode corpus");
    for file in &files {
        let bytes = std::fs::read(file).expect("corpus file");
        prism_fuzz::codec_decode(&bytes);
    }
}

#[test]
fn the_seed_of_every_data_type_decodes_into_its_table() {
    let files = corpus_files();
    for data_type in DataType::ALL {
        let seed = files
            .iter()
            .find(|f| f.file_name().and_then(|n| n.to_str()) == Some(data_type.name()))
            .unwrap_or_else(|| panic!("no seed named {data_type} in corpus/codec_decode"));
        let bytes = std::fs::read(seed).expect("seed file");
        let (subject, payload) = prism_fuzz::split_input(&bytes).expect("seed has a selector");
        assert_eq!(
            DataType::from_subject(&subject),
            Some(data_type),
            "{}",
            seed.display()
        );
        let row = decode(&subject, payload, "MARKET_DATA", 1)
            .unwrap_or_else(|e| panic!("{}: {e}", seed.display()));
        assert_eq!(row.table(), data_type.table());
    }
}
