//! Time the codec alone: microseconds to decode one generated MarketPrism message into its
//! row, best of 7 passes over 20,000 messages, for trades and for order books of 20 and 100
//! levels a side. No servers; a measurement for docs/PERFORMANCE.md, not a test.
//!
//! ```text
//! cargo run --release --example decode
//! ```

use std::time::Instant;

use prism_relay::tools::gen::{Generator, GeneratorConfig, Mix};

const MESSAGES: usize = 20_000;
const PASSES: usize = 7;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for (label, mix, depth) in [
        ("trade", "trade=1", 20),
        ("order book, 20 levels a side", "orderbook=1", 20),
        ("order book, 100 levels a side", "orderbook=1", 100),
    ] {
        let mut generator = Generator::new(&GeneratorConfig {
            exchanges: vec!["binance".into(), "okx".into()],
            symbols: vec!["BTC-USDT".into(), "ETH-USDT".into()],
            mix: mix.parse::<Mix>()?,
            orderbook_depth: depth,
            run_id: "decode".into(),
            seed: 1,
        })?;
        let messages: Vec<(String, Vec<u8>)> = (0..MESSAGES)
            .map(|i| {
                let m = generator.next_message(1_760_000_000_000 + i as i64);
                (m.subject.to_owned(), m.payload.to_vec())
            })
            .collect();
        let bytes: usize = messages.iter().map(|(_, p)| p.len()).sum();
        let mut best = f64::MAX;
        for _ in 0..PASSES {
            let started = Instant::now();
            for (seq, (subject, payload)) in messages.iter().enumerate() {
                prism_relay::codec::decode(subject, payload, "BENCH", seq as u64)?;
            }
            best = best.min(started.elapsed().as_secs_f64());
        }
        println!(
            "{label}: {:.2} us per message ({} bytes on average; best of {PASSES})",
            best / MESSAGES as f64 * 1e6,
            bytes / MESSAGES,
        );
    }
    Ok(())
}
