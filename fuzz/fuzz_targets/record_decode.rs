//! Arbitrary bytes through the segment header check, record framing and envelope decoding.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    prism_wal::fuzzing::record_decode(data);
});
