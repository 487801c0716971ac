//! Arbitrary bytes as a segment file: recovery, reading, verify and dump must not panic and
//! must hand out only records whose CRC checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    prism_wal::fuzzing::recovery(data);
});
