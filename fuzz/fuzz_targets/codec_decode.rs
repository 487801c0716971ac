//! Untrusted NATS messages through the MarketPrism payload decoder: it must never panic, and
//! an accepted row must keep its decimals exact (see `prism_fuzz::codec_decode`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    prism_fuzz::codec_decode(data);
});
