//! Generation of realistic MarketPrism messages for `loadgen`.
//!
//! A [`Generator`] yields one message at a time (subject, `Nats-Msg-Id` and JSON payload) in
//! buffers it reuses, so generating costs no allocation per message once the buffers have
//! grown. Payloads follow the MarketPrism collector formats field by field: decimal strings
//! for trade prices and quantities and for long/short ratios, JSON floats for funding, open
//! interest and liquidation figures (written like Python's `json.dumps`, exponents
//! included), `[price_str, qty_str]` order book levels, epoch milliseconds in `ts_ms`.
//!
//! Identity guarantees, within one run (one generator):
//! - every `Nats-Msg-Id` embeds the run id and a run-wide counter, so ids never repeat and
//!   runs with different run ids never collide in JetStream's duplicate window;
//! - every trade has its own `trade_id` and every liquidation its own `liquidation_id`, both
//!   prefixed with the run id;
//! - `ts_ms` strictly increases per (exchange, market_type, symbol, data_type), so the
//!   timestamp-keyed identities of order books and of the six low-frequency types never
//!   repeat. When messages go out faster than one per millisecond per market, `ts_ms` runs
//!   ahead of the wall clock; a later run on the same markets should then start after the
//!   previous run's last `ts_ms` (see `LoadgenOptions::ts_start_ms`).
//!
//! Market types follow the exchanges: Binance and OKX carry `spot` and `perpetual` (funding,
//! open interest, liquidations and long/short ratios exist on perpetuals only), Deribit
//! carries `options` with the volatility index of BTC and ETH. Output depends only on the
//! configuration, the seed and the `now_ms` values passed in.

use std::fmt;
use std::io::Write as _;
use std::str::FromStr;

use super::prng::SplitMix64;
use super::{DataType, ToolError};

/// Most order book levels per side a message may carry (MarketPrism snapshots carry 100).
pub const ORDERBOOK_DEPTH_MAX: u16 = 100;

/// Fixed-point scale of prices and quantities: 8 decimal places, like `Decimal64(8)`.
const E8: i64 = 100_000_000;

/// A market type, the third subject token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MarketType {
    Spot,
    Perpetual,
    Options,
}

impl MarketType {
    pub const fn name(self) -> &'static str {
        match self {
            MarketType::Spot => "spot",
            MarketType::Perpetual => "perpetual",
            MarketType::Options => "options",
        }
    }
}

/// Relative weights of the eight data types in the generated traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    /// Weight per data type, indexed by [`DataType::index`].
    pub weights: [u32; 8],
}

impl Default for Mix {
    /// Close to production: mostly trades and order books, the six periodic or
    /// event-driven types sharing the rest.
    fn default() -> Self {
        Mix {
            weights: [55, 35, 2, 2, 2, 1, 1, 2],
        }
    }
}

impl Mix {
    /// The string form of the default, for command-line defaults.
    pub const DEFAULT_STR: &'static str = "trade=55,orderbook=35,funding_rate=2,open_interest=2,\
         liquidation=2,lsr_top_position=1,lsr_all_account=1,volatility_index=2";

    /// Only `dt`, for tests and targeted loads.
    pub fn only(dt: DataType) -> Self {
        let mut weights = [0; 8];
        weights[dt.index()] = 1;
        Mix { weights }
    }

    /// Every data type with the same weight.
    pub fn uniform() -> Self {
        Mix { weights: [1; 8] }
    }

    pub fn weight(&self, dt: DataType) -> u32 {
        self.weights[dt.index()]
    }
}

impl FromStr for Mix {
    type Err = String;

    /// Parses `type=weight` pairs separated by commas; types not named get weight 0.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut weights = [0u32; 8];
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("expected type=weight, got {part:?}"))?;
            let dt: DataType = name.trim().parse()?;
            weights[dt.index()] = weight
                .trim()
                .parse()
                .map_err(|e| format!("weight of {name}: {e}"))?;
        }
        if weights.iter().all(|&w| w == 0) {
            return Err("the mix needs at least one positive weight".to_string());
        }
        Ok(Mix { weights })
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for dt in DataType::ALL {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{}={}", dt.name(), self.weight(dt))?;
        }
        Ok(())
    }
}

/// What the generator needs to know.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    pub exchanges: Vec<String>,
    /// Dash-separated upper-case symbols (`BTC-USDT`); Deribit uses their base currency.
    pub symbols: Vec<String>,
    pub mix: Mix,
    /// Levels per side of each order book, 1..=[`ORDERBOOK_DEPTH_MAX`].
    pub orderbook_depth: u16,
    /// Goes into every message id and every trade and liquidation id.
    pub run_id: String,
    pub seed: u64,
}

/// One generated message, borrowed from the generator's buffers until the next call.
#[derive(Debug, Clone, Copy)]
pub struct Generated<'a> {
    pub data_type: DataType,
    /// Run-wide counter of this message, from 0.
    pub n: u64,
    pub subject: &'a str,
    pub msg_id: &'a str,
    pub payload: &'a [u8],
}

/// Deribit publishes volatility indices for these currencies only.
const DERIBIT_CURRENCIES: [&str; 2] = ["BTC", "ETH"];

#[derive(Debug)]
struct Market {
    exchange: String,
    market_type: MarketType,
    symbol: String,
    /// Mid price in units of 1e-8, random-walking by whole ticks.
    mid_e8: i64,
    tick_e8: i64,
    /// Last `ts_ms` used per data type, so the next one is strictly greater.
    last_ts_ms: [i64; 8],
    /// Binance-style order book update id; `None` for OKX, which sends null.
    last_update_id: Option<u64>,
}

/// Yields MarketPrism messages; see the module documentation for its guarantees.
#[derive(Debug)]
pub struct Generator {
    rng: SplitMix64,
    run_id: String,
    orderbook_depth: u16,
    markets: Vec<Market>,
    /// Markets eligible per data type.
    markets_by_type: [Vec<usize>; 8],
    /// Cumulative effective weights (0 for types without an eligible market).
    cumulative: [u64; 8],
    skipped: Vec<DataType>,
    n: u64,
    /// Greatest `ts_ms` written so far.
    ts_max_ms: i64,
    trade_seq: u64,
    liquidation_seq: u64,
    subject: String,
    msg_id: String,
    payload: Vec<u8>,
}

fn valid_token(s: &str, allowed: impl Fn(char) -> bool) -> bool {
    !s.is_empty() && s.chars().all(allowed)
}

/// Characters a run id may hold: it goes into subjects' neighbours (message ids) and JSON
/// strings unescaped, so it stays plain.
pub fn valid_run_id(s: &str) -> bool {
    valid_token(s, |c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn base_price_e8(currency: &str) -> (i64, i64) {
    // (mid, tick) near late-2025 levels; only the magnitudes matter.
    match currency {
        "BTC" => (112_345 * E8, E8 / 10),
        "ETH" => (4_012 * E8, E8 / 100),
        "SOL" => (191 * E8, E8 / 100),
        "BNB" => (1_104 * E8, E8 / 100),
        _ => (12 * E8, E8 / 10_000),
    }
}

fn market_types_for(exchange: &str) -> &'static [MarketType] {
    if exchange == "deribit" {
        &[MarketType::Options]
    } else {
        &[MarketType::Spot, MarketType::Perpetual]
    }
}

/// Whether MarketPrism carries `dt` on markets of this exchange and type.
pub fn carries(exchange: &str, market_type: MarketType, dt: DataType) -> bool {
    match dt {
        DataType::Trade | DataType::Orderbook => {
            exchange != "deribit" && matches!(market_type, MarketType::Spot | MarketType::Perpetual)
        }
        DataType::FundingRate
        | DataType::OpenInterest
        | DataType::Liquidation
        | DataType::LsrTopPosition
        | DataType::LsrAllAccount => exchange != "deribit" && market_type == MarketType::Perpetual,
        DataType::VolatilityIndex => exchange == "deribit" && market_type == MarketType::Options,
    }
}

impl Generator {
    pub fn new(cfg: &GeneratorConfig) -> Result<Self, ToolError> {
        if !valid_run_id(&cfg.run_id) {
            return Err(ToolError::Options(format!(
                "run id {:?} must be non-empty ASCII letters, digits, '-' or '_'",
                cfg.run_id
            )));
        }
        if cfg.orderbook_depth == 0 || cfg.orderbook_depth > ORDERBOOK_DEPTH_MAX {
            return Err(ToolError::Options(format!(
                "orderbook depth {} is outside 1..={ORDERBOOK_DEPTH_MAX}",
                cfg.orderbook_depth
            )));
        }
        let mut rng = SplitMix64::new(cfg.seed);
        let mut markets = Vec::new();
        for exchange in &cfg.exchanges {
            if !valid_token(exchange, |c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'
            }) {
                return Err(ToolError::Options(format!(
                    "exchange {exchange:?} must be lower-case letters, digits or '_'"
                )));
            }
            for &market_type in market_types_for(exchange) {
                let mut symbols_done: Vec<String> = Vec::new();
                for symbol in &cfg.symbols {
                    if !valid_token(symbol, |c| {
                        c.is_ascii_uppercase() || c.is_ascii_digit() || c == '-'
                    }) {
                        return Err(ToolError::Options(format!(
                            "symbol {symbol:?} must be upper-case letters, digits or '-'"
                        )));
                    }
                    let currency = symbol.split('-').next().unwrap_or(symbol);
                    let symbol = if exchange == "deribit" {
                        if !DERIBIT_CURRENCIES.contains(&currency) {
                            continue;
                        }
                        currency.to_string()
                    } else {
                        symbol.clone()
                    };
                    if symbols_done.contains(&symbol) {
                        continue;
                    }
                    symbols_done.push(symbol.clone());
                    let (mid_e8, tick_e8) = base_price_e8(currency);
                    let last_update_id =
                        (exchange != "okx").then(|| 70_000_000_000 + rng.below(1_000_000_000));
                    markets.push(Market {
                        exchange: exchange.clone(),
                        market_type,
                        symbol,
                        mid_e8,
                        tick_e8,
                        last_ts_ms: [i64::MIN; 8],
                        last_update_id,
                    });
                }
            }
        }
        let mut markets_by_type: [Vec<usize>; 8] = Default::default();
        for (i, m) in markets.iter().enumerate() {
            for dt in DataType::ALL {
                if carries(&m.exchange, m.market_type, dt) {
                    markets_by_type[dt.index()].push(i);
                }
            }
        }
        let mut cumulative = [0u64; 8];
        let mut skipped = Vec::new();
        let mut total = 0u64;
        for dt in DataType::ALL {
            let w = u64::from(cfg.mix.weight(dt));
            if w > 0 && markets_by_type[dt.index()].is_empty() {
                skipped.push(dt);
            } else if w > 0 {
                total += w;
            }
            cumulative[dt.index()] = total;
        }
        if total == 0 {
            return Err(ToolError::Options(format!(
                "no configured market carries any data type of the mix (exchanges {:?}, symbols {:?})",
                cfg.exchanges, cfg.symbols
            )));
        }
        Ok(Generator {
            rng,
            run_id: cfg.run_id.clone(),
            orderbook_depth: cfg.orderbook_depth,
            markets,
            markets_by_type,
            cumulative,
            skipped,
            n: 0,
            ts_max_ms: i64::MIN,
            trade_seq: 0,
            liquidation_seq: 0,
            subject: String::with_capacity(64),
            msg_id: String::with_capacity(96),
            payload: Vec::with_capacity(8 * 1024),
        })
    }

    /// Data types with a positive weight that no configured market carries (they are not
    /// generated; e.g. `volatility_index` without `deribit`).
    pub fn skipped_types(&self) -> &[DataType] {
        &self.skipped
    }

    /// The greatest `ts_ms` generated so far (`i64::MIN` before the first message); a
    /// later run that starts past it cannot repeat a timestamp identity of this one.
    pub fn ts_max_ms(&self) -> i64 {
        self.ts_max_ms
    }

    /// How many messages were generated so far.
    pub fn generated(&self) -> u64 {
        self.n
    }

    /// The next message; `now_ms` is the wall clock in epoch milliseconds (the message's
    /// `ts_ms` is `now_ms`, or one past the market's previous `ts_ms` if that is not greater).
    pub fn next_message(&mut self, now_ms: i64) -> Generated<'_> {
        let dt = self.pick_type();
        let candidates = &self.markets_by_type[dt.index()];
        let mi = candidates[self.rng.below(candidates.len() as u64) as usize];
        let n = self.n;
        self.n += 1;

        let market = &mut self.markets[mi];
        let last = market.last_ts_ms[dt.index()];
        let ts_ms = if now_ms > last { now_ms } else { last + 1 };
        market.last_ts_ms[dt.index()] = ts_ms;
        self.ts_max_ms = self.ts_max_ms.max(ts_ms);
        // Random walk by whole ticks, floored so prices stay positive.
        let step = self.rng.range_inclusive(-3, 3);
        market.mid_e8 = (market.mid_e8 + step * market.tick_e8).max(100 * market.tick_e8);

        self.subject.clear();
        self.subject.push_str(dt.name());
        self.subject.push('.');
        self.subject.push_str(&market.exchange);
        self.subject.push('.');
        self.subject.push_str(market.market_type.name());
        self.subject.push('.');
        self.subject.push_str(&market.symbol);

        self.msg_id.clear();
        for part in [dt.name(), &market.exchange, &market.symbol, &self.run_id] {
            self.msg_id.push_str(part);
            self.msg_id.push(':');
        }
        push_u64_str(&mut self.msg_id, n);

        self.payload.clear();
        let collected_ts_ms = ts_ms - self.rng.range_inclusive(1, 40);
        let mut o = Obj::new(&mut self.payload);
        o.str("exchange", &market.exchange);
        o.str("market_type", market.market_type.name());
        o.str("symbol", &market.symbol);
        o.str("data_type", dt.name());
        let rng = &mut self.rng;
        match dt {
            DataType::Trade => {
                self.trade_seq += 1;
                o.key("trade_id");
                o.buf.push(b'"');
                o.buf.extend_from_slice(self.run_id.as_bytes());
                o.buf.push(b'-');
                push_u64(o.buf, self.trade_seq);
                o.buf.push(b'"');
                let price = market.mid_e8 + rng.range_inclusive(-2, 2) * market.tick_e8;
                o.dec_e8("price", price);
                o.dec_e8("quantity", rng.range_inclusive(10_000, 2 * E8));
                o.str("side", if rng.coin() { "buy" } else { "sell" });
                o.int("trade_ts_ms", collected_ts_ms - rng.range_inclusive(1, 150));
            }
            DataType::Orderbook => {
                let depth = self.orderbook_depth;
                for (key, sign) in [("bids", -1i64), ("asks", 1i64)] {
                    o.key(key);
                    o.buf.push(b'[');
                    let mut price = market.mid_e8 + sign * market.tick_e8;
                    for level in 0..depth {
                        if level > 0 {
                            o.buf.push(b',');
                            price += sign * rng.range_inclusive(1, 3) * market.tick_e8;
                        }
                        o.buf.extend_from_slice(b"[\"");
                        push_dec_e8(o.buf, price.max(market.tick_e8));
                        o.buf.extend_from_slice(b"\",\"");
                        push_dec_e8(o.buf, rng.range_inclusive(100_000, 5 * E8));
                        o.buf.extend_from_slice(b"\"]");
                    }
                    o.buf.push(b']');
                }
                match market.last_update_id.as_mut() {
                    Some(id) => {
                        *id += rng.range_inclusive(1, 40) as u64;
                        o.int("last_update_id", *id as i64);
                    }
                    None => o.null("last_update_id"),
                }
            }
            DataType::FundingRate => {
                let mark = market.mid_e8;
                let index = mark - rng.range_inclusive(0, 20) * market.tick_e8;
                o.float_e8("current_funding_rate", rng.range_inclusive(-50_000, 50_000));
                o.float_e8(
                    "estimated_funding_rate",
                    rng.range_inclusive(-50_000, 50_000),
                );
                o.float_e8("mark_price", mark);
                o.float_e8("index_price", index);
                o.float("premium_index", (mark - index) as f64 / index as f64);
                // Binance sends a placeholder equal to now; the others the next 8 h boundary.
                let next = if market.exchange == "binance" {
                    ts_ms
                } else {
                    (ts_ms / 28_800_000 + 1) * 28_800_000
                };
                o.int("next_funding_ts_ms", next);
                o.str("funding_interval", "8h");
            }
            DataType::OpenInterest => {
                // Up to 80,000 contracts: about the open interest of the largest BTC markets.
                let contracts_e8 = rng.range_inclusive(1_000, 80_000) * E8;
                let mark = market.mid_e8;
                o.float_e8("open_interest_value", contracts_e8);
                o.float(
                    "open_interest_usd",
                    (contracts_e8 / E8) as f64 * (mark as f64 / E8 as f64),
                );
                o.float_e8("mark_price", mark);
                o.float_e8("index_price", mark - market.tick_e8);
                o.str("open_interest_unit", "contracts");
            }
            DataType::Liquidation => {
                self.liquidation_seq += 1;
                o.key("liquidation_id");
                o.buf.push(b'"');
                o.buf.extend_from_slice(self.run_id.as_bytes());
                o.buf.extend_from_slice(b"-L");
                push_u64(o.buf, self.liquidation_seq);
                o.buf.push(b'"');
                o.str("side", if rng.coin() { "buy" } else { "sell" });
                o.str("status", "FILLED");
                let price = market.mid_e8;
                let qty = rng.range_inclusive(100_000, 3 * E8);
                o.float_e8("price", price);
                o.float_e8("quantity", qty);
                o.float_e8("filled_quantity", qty);
                o.float(
                    "notional_value",
                    (price as f64 / E8 as f64) * (qty as f64 / E8 as f64),
                );
                o.int(
                    "liquidation_ts_ms",
                    collected_ts_ms - rng.range_inclusive(1, 500),
                );
            }
            DataType::LsrTopPosition | DataType::LsrAllAccount => {
                let long = rng.range_inclusive(30 * E8 / 100, 70 * E8 / 100);
                let short = E8 - long;
                let (long_key, short_key) = if dt == DataType::LsrTopPosition {
                    ("long_position_ratio", "short_position_ratio")
                } else {
                    ("long_account_ratio", "short_account_ratio")
                };
                // long * E8 < 2^57, so the product fits an i64.
                o.dec_e8("long_short_ratio", long * E8 / short);
                o.dec_e8(long_key, long);
                o.dec_e8(short_key, short);
                o.str("period", "5m");
            }
            DataType::VolatilityIndex => {
                let vol = rng.range_inclusive(30 * E8, 80 * E8) / 10_000 * 10_000;
                o.dec_e8("vol_index", vol);
                o.dec_e8("volatility_index", vol);
                o.str("currency", &market.symbol);
            }
        }
        o.int("ts_ms", ts_ms);
        o.int("collected_ts_ms", collected_ts_ms);
        o.str("publisher", "unified-collector");
        o.str("data_source", "marketprism");
        o.finish();

        Generated {
            data_type: dt,
            n,
            subject: &self.subject,
            msg_id: &self.msg_id,
            payload: &self.payload,
        }
    }

    fn pick_type(&mut self) -> DataType {
        let total = self.cumulative[7];
        let r = self.rng.below(total);
        // `new` guarantees total > 0, so some cumulative weight exceeds r.
        let i = self.cumulative.iter().position(|&c| c > r).unwrap_or(0);
        DataType::ALL[i]
    }
}

/// A JSON object being written into a byte buffer. Keys and string values written through
/// it are known not to need escaping (names, validated symbols and run ids).
struct Obj<'a> {
    buf: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Obj<'a> {
    fn new(buf: &'a mut Vec<u8>) -> Self {
        buf.push(b'{');
        Obj { buf, first: true }
    }

    fn key(&mut self, key: &str) {
        if !self.first {
            self.buf.push(b',');
        }
        self.first = false;
        self.buf.push(b'"');
        self.buf.extend_from_slice(key.as_bytes());
        self.buf.extend_from_slice(b"\":");
    }

    fn str(&mut self, key: &str, value: &str) {
        debug_assert!(
            !value.contains(['"', '\\']),
            "unescaped JSON string {value:?}"
        );
        self.key(key);
        self.buf.push(b'"');
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.push(b'"');
    }

    fn int(&mut self, key: &str, value: i64) {
        self.key(key);
        push_i64(self.buf, value);
    }

    fn null(&mut self, key: &str) {
        self.key(key);
        self.buf.extend_from_slice(b"null");
    }

    /// A decimal string with 8 places, the way collectors send exact prices.
    fn dec_e8(&mut self, key: &str, value_e8: i64) {
        self.key(key);
        self.buf.push(b'"');
        push_dec_e8(self.buf, value_e8);
        self.buf.push(b'"');
    }

    /// A JSON float from a fixed-point value (shortest round-trip form, no exponent).
    fn float_e8(&mut self, key: &str, value_e8: i64) {
        self.float(key, value_e8 as f64 / E8 as f64);
    }

    fn float(&mut self, key: &str, value: f64) {
        debug_assert!(value.is_finite());
        self.key(key);
        push_py_float(self.buf, value);
    }

    fn finish(self) {
        self.buf.push(b'}');
    }
}

/// The decimal digits of `v`, written into `digits`.
fn u64_digits(mut v: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &digits[i..]
}

fn push_u64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(u64_digits(v, &mut [0; 20]));
}

fn push_u64_str(s: &mut String, v: u64) {
    for &d in u64_digits(v, &mut [0; 20]) {
        s.push(char::from(d));
    }
}

fn push_i64(buf: &mut Vec<u8>, v: i64) {
    if v < 0 {
        buf.push(b'-');
    }
    push_u64(buf, v.unsigned_abs());
}

/// Writes a float the way the Python collector's `json.dumps` does (`repr`): shortest
/// round-trip digits, `.0` on integral values, and exponent notation below 1e-4 or from
/// 1e16 on (`4.357e-05`, `1e+16`), so decoders meet every form the real feed sends.
fn push_py_float(buf: &mut Vec<u8>, v: f64) {
    let start = buf.len();
    let magnitude = v.abs();
    if v == 0.0 || (1e-4..1e16).contains(&magnitude) {
        // Writing into a Vec<u8> cannot fail; Display never uses exponent notation.
        let _ = write!(buf, "{v}");
        if !buf[start..].contains(&b'.') {
            buf.extend_from_slice(b".0");
        }
        return;
    }
    // Rust writes `4.357e-5`; Python writes a signed exponent of at least two digits.
    let _ = write!(buf, "{v:e}");
    let Some(e) = buf[start..]
        .iter()
        .position(|&c| c == b'e')
        .map(|i| start + i)
    else {
        return;
    };
    let exponent: i64 = std::str::from_utf8(&buf[e + 1..])
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    buf.truncate(e + 1);
    buf.push(if exponent < 0 { b'-' } else { b'+' });
    if exponent.unsigned_abs() < 10 {
        buf.push(b'0');
    }
    push_u64(buf, exponent.unsigned_abs());
}

/// Writes `v / 1e8` with exactly 8 decimals (`112345.67000000`).
fn push_dec_e8(buf: &mut Vec<u8>, v: i64) {
    if v < 0 {
        buf.push(b'-');
    }
    let a = v.unsigned_abs();
    push_u64(buf, a / E8 as u64);
    buf.push(b'.');
    let frac = a % E8 as u64;
    let mut digits = [b'0'; 8];
    let mut f = frac;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (f % 10) as u8;
        f /= 10;
    }
    buf.extend_from_slice(&digits);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::collections::HashSet;

    fn config(mix: Mix) -> GeneratorConfig {
        GeneratorConfig {
            exchanges: vec!["binance".into(), "okx".into(), "deribit".into()],
            symbols: vec!["BTC-USDT".into(), "ETH-USDT".into(), "SOL-USDT".into()],
            mix,
            orderbook_depth: 20,
            run_id: "t1".into(),
            seed: 11,
        }
    }

    #[test]
    fn every_generated_message_decodes_with_the_relays_codec() {
        let mut generator = Generator::new(&config(Mix::uniform())).expect("valid config");
        for i in 0..20_000i64 {
            let g = generator.next_message(1_761_714_300_000 + i);
            if let Err(error) = crate::codec::decode(g.subject, g.payload, "S", g.n) {
                panic!(
                    "{} does not decode: {error}\n{}",
                    g.subject,
                    String::from_utf8_lossy(g.payload)
                );
            }
        }
    }

    fn parse(g: &Generated<'_>) -> Value {
        serde_json::from_slice(g.payload).unwrap_or_else(|e| {
            panic!(
                "payload of {} is not JSON ({e}): {}",
                g.subject,
                String::from_utf8_lossy(g.payload)
            )
        })
    }

    fn s<'v>(v: &'v Value, k: &str) -> &'v str {
        v[k].as_str()
            .unwrap_or_else(|| panic!("{k} is not a string in {v}"))
    }

    fn assert_decimal_string(v: &Value, k: &str) {
        let text = s(v, k);
        let (int, frac) = text
            .split_once('.')
            .unwrap_or_else(|| panic!("{k}={text} has no decimal point"));
        assert!(
            !int.is_empty() && int.chars().all(|c| c.is_ascii_digit()),
            "{k}={text}"
        );
        assert_eq!(frac.len(), 8, "{k}={text}");
        assert!(frac.chars().all(|c| c.is_ascii_digit()), "{k}={text}");
    }

    fn assert_float(v: &Value, k: &str) {
        assert!(v[k].is_number(), "{k} is not a JSON number in {v}");
        assert!(v[k].as_f64().is_some_and(f64::is_finite), "{k} in {v}");
    }

    fn assert_int(v: &Value, k: &str) {
        assert!(
            v[k].is_i64() || v[k].is_u64(),
            "{k} is not an integer in {v}"
        );
    }

    #[test]
    fn decimal_writer_prints_exactly_eight_places() {
        let mut buf = Vec::new();
        push_dec_e8(&mut buf, 11_234_567_000_000);
        assert_eq!(buf, b"112345.67000000");
        buf.clear();
        push_dec_e8(&mut buf, 120_000);
        assert_eq!(buf, b"0.00120000");
        buf.clear();
        push_dec_e8(&mut buf, -5);
        assert_eq!(buf, b"-0.00000005");
        buf.clear();
        push_i64(&mut buf, i64::MIN);
        assert_eq!(buf, i64::MIN.to_string().as_bytes());
        buf.clear();
        push_u64(&mut buf, 0);
        assert_eq!(buf, b"0");
    }

    #[test]
    fn floats_are_written_like_python_json_dumps() {
        let cases: [(f64, &str); 10] = [
            (0.0, "0.0"),
            (0.0001, "0.0001"),
            (0.00004357, "4.357e-05"),
            (-0.000000025, "-2.5e-08"),
            (179_621.0, "179621.0"),
            (112_344.7, "112344.7"),
            (1e16, "1e+16"),
            (1.5e22, "1.5e+22"),
            (2e-100, "2e-100"),
            (-3.0, "-3.0"),
        ];
        for (v, text) in cases {
            let mut buf = Vec::new();
            push_py_float(&mut buf, v);
            assert_eq!(std::str::from_utf8(&buf).unwrap(), text);
            let back: f64 = serde_json::from_slice(&buf).unwrap();
            assert_eq!(back, v, "{text} round-trips");
        }
    }

    #[test]
    fn mix_parses_pairs_and_prints_its_default() {
        let mix: Mix = Mix::DEFAULT_STR.parse().unwrap();
        assert_eq!(mix, Mix::default());
        assert_eq!(mix.to_string().parse::<Mix>().unwrap(), mix);
        let only: Mix = "orderbook=3".parse().unwrap();
        assert_eq!(only.weights, [0, 3, 0, 0, 0, 0, 0, 0]);
        assert!("trade=0".parse::<Mix>().is_err());
        assert!("trades=1".parse::<Mix>().is_err());
        assert!("trade".parse::<Mix>().is_err());
        let trade_and_book =
            Mix::default().weight(DataType::Trade) + Mix::default().weight(DataType::Orderbook);
        assert!(trade_and_book * 10 >= Mix::default().weights.iter().sum::<u32>() * 9);
    }

    #[test]
    fn every_payload_parses_and_carries_the_fields_marketprism_names() {
        let mut g = Generator::new(&config(Mix::uniform())).unwrap();
        let mut seen = HashSet::new();
        for i in 0..4_000 {
            let m = g.next_message(1_761_714_312_456 + i / 4);
            let v = parse(&m);
            seen.insert(m.data_type);
            let tokens: Vec<&str> = m.subject.split('.').collect();
            assert_eq!(tokens.len(), 4, "{}", m.subject);
            assert_eq!(tokens[0], m.data_type.name());
            assert_eq!(s(&v, "data_type"), tokens[0]);
            assert_eq!(s(&v, "exchange"), tokens[1]);
            assert_eq!(s(&v, "market_type"), tokens[2]);
            assert_eq!(s(&v, "symbol"), tokens[3]);
            assert_eq!(s(&v, "publisher"), "unified-collector");
            assert_eq!(s(&v, "data_source"), "marketprism");
            assert_int(&v, "ts_ms");
            assert_int(&v, "collected_ts_ms");
            assert!(v["collected_ts_ms"].as_i64() <= v["ts_ms"].as_i64());
            assert_eq!(
                m.msg_id,
                format!("{}:{}:{}:t1:{}", tokens[0], tokens[1], tokens[3], m.n)
            );
            match m.data_type {
                DataType::Trade => {
                    assert!(s(&v, "trade_id").starts_with("t1-"));
                    assert_decimal_string(&v, "price");
                    assert_decimal_string(&v, "quantity");
                    assert!(["buy", "sell"].contains(&s(&v, "side")));
                    assert_int(&v, "trade_ts_ms");
                }
                DataType::Orderbook => {
                    for side in ["bids", "asks"] {
                        let levels = v[side].as_array().unwrap();
                        assert_eq!(levels.len(), 20);
                        let prices: Vec<f64> = levels
                            .iter()
                            .map(|l| {
                                let l = l.as_array().unwrap();
                                assert_eq!(l.len(), 2);
                                l[0].as_str().unwrap().parse().unwrap()
                            })
                            .collect();
                        // Best first: bids descend, asks ascend.
                        for w in prices.windows(2) {
                            if side == "bids" {
                                assert!(w[0] >= w[1], "{side} {prices:?}");
                            } else {
                                assert!(w[0] < w[1], "{side} {prices:?}");
                            }
                        }
                    }
                    let best_bid: f64 = v["bids"][0][0].as_str().unwrap().parse().unwrap();
                    let best_ask: f64 = v["asks"][0][0].as_str().unwrap().parse().unwrap();
                    assert!(best_bid < best_ask);
                    if tokens[1] == "okx" {
                        assert!(v["last_update_id"].is_null());
                    } else {
                        assert!(v["last_update_id"].is_u64());
                    }
                }
                DataType::FundingRate => {
                    for k in [
                        "current_funding_rate",
                        "estimated_funding_rate",
                        "mark_price",
                        "index_price",
                        "premium_index",
                    ] {
                        assert_float(&v, k);
                    }
                    assert_int(&v, "next_funding_ts_ms");
                    assert_eq!(s(&v, "funding_interval"), "8h");
                }
                DataType::OpenInterest => {
                    for k in [
                        "open_interest_value",
                        "open_interest_usd",
                        "mark_price",
                        "index_price",
                    ] {
                        assert_float(&v, k);
                    }
                    assert_eq!(s(&v, "open_interest_unit"), "contracts");
                }
                DataType::Liquidation => {
                    assert!(s(&v, "liquidation_id").starts_with("t1-L"));
                    assert!(["buy", "sell"].contains(&s(&v, "side")));
                    assert_eq!(s(&v, "status"), "FILLED");
                    for k in ["price", "quantity", "filled_quantity", "notional_value"] {
                        assert_float(&v, k);
                    }
                    assert_int(&v, "liquidation_ts_ms");
                }
                DataType::LsrTopPosition => {
                    for k in [
                        "long_short_ratio",
                        "long_position_ratio",
                        "short_position_ratio",
                    ] {
                        assert_decimal_string(&v, k);
                    }
                    assert_eq!(s(&v, "period"), "5m");
                }
                DataType::LsrAllAccount => {
                    for k in [
                        "long_short_ratio",
                        "long_account_ratio",
                        "short_account_ratio",
                    ] {
                        assert_decimal_string(&v, k);
                    }
                    assert_eq!(s(&v, "period"), "5m");
                }
                DataType::VolatilityIndex => {
                    assert_decimal_string(&v, "vol_index");
                    assert_eq!(s(&v, "vol_index"), s(&v, "volatility_index"));
                    assert_eq!(s(&v, "currency"), tokens[3]);
                }
            }
        }
        assert_eq!(seen.len(), 8, "every data type generated: {seen:?}");
    }

    /// Generates `count` messages with the clock `clock(i)` and asserts that no identity
    /// MarketPrism keys rows by repeats, and that every market carries only what it should.
    fn assert_identities_unique(g: &mut Generator, count: usize, clock: impl Fn(usize) -> i64) {
        let mut msg_ids = HashSet::new();
        let mut trade_keys = HashSet::new();
        let mut liquidation_ids = HashSet::new();
        let mut ts_keys = HashSet::new();
        let mut book_keys = HashSet::new();
        for i in 0..count {
            let m = g.next_message(clock(i));
            assert!(msg_ids.insert(m.msg_id.to_string()), "{}", m.msg_id);
            let v = parse(&m);
            let market = (
                s(&v, "exchange").to_string(),
                s(&v, "market_type").to_string(),
                s(&v, "symbol").to_string(),
            );
            let market_type = match market.1.as_str() {
                "spot" => MarketType::Spot,
                "perpetual" => MarketType::Perpetual,
                "options" => MarketType::Options,
                other => panic!("unknown market type {other}"),
            };
            assert!(
                carries(&market.0, market_type, m.data_type),
                "{}",
                m.subject
            );
            let ts = v["ts_ms"].as_i64().unwrap();
            assert!(
                ts_keys.insert((market.clone(), m.data_type, ts)),
                "ts_ms {ts} repeats for {market:?} {}",
                m.data_type
            );
            match m.data_type {
                DataType::Trade => {
                    let key = (market, s(&v, "trade_id").to_string());
                    assert!(trade_keys.insert(key.clone()), "{key:?}");
                }
                DataType::Orderbook => {
                    let key = (market, v["last_update_id"].as_u64(), ts);
                    assert!(book_keys.insert(key.clone()), "{key:?}");
                }
                DataType::Liquidation => {
                    assert!(liquidation_ids.insert(s(&v, "liquidation_id").to_string()));
                }
                _ => {}
            }
        }
        assert_eq!(msg_ids.len(), count);
        let ts_max = ts_keys.iter().map(|(_, _, ts)| *ts).max();
        assert_eq!(ts_max, Some(g.ts_max_ms()));
    }

    #[test]
    fn a_run_started_past_the_previous_runs_last_ts_repeats_none_of_its_identities() {
        let mut keys = HashSet::new();
        let mut start = 1_761_714_300_000;
        for run_id in ["a", "b"] {
            let mut cfg = config(Mix::uniform());
            cfg.run_id = run_id.into();
            // Same seed on purpose: only the run id and the clock tell the runs apart.
            let mut g = Generator::new(&cfg).unwrap();
            for _ in 0..5_000 {
                // A clock standing still makes ts_ms run ahead of it, the case to cover.
                let m = g.next_message(start);
                let v = parse(&m);
                let key = match m.data_type {
                    DataType::Trade => s(&v, "trade_id").to_string(),
                    _ => v["ts_ms"].to_string(),
                };
                assert!(
                    keys.insert((m.subject.to_string(), m.data_type, key.clone())),
                    "{} {key} repeats across runs",
                    m.subject
                );
                assert!(keys.insert((m.msg_id.to_string(), m.data_type, String::new())));
            }
            start = g.ts_max_ms() + 1;
        }
    }

    #[test]
    fn natural_identities_never_repeat_within_a_run() {
        let mut g = Generator::new(&config(Mix::uniform())).unwrap();
        let now = 1_761_714_300_000;
        // A clock that mostly stands still and sometimes jumps back, the worst case.
        assert_identities_unique(&mut g, 30_000, |i| {
            now + (i as i64 / 1000) - if i % 7 == 0 { 5 } else { 0 }
        });
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 16,
            ..proptest::prelude::ProptestConfig::default()
        })]

        #[test]
        fn identities_are_unique_for_any_seed_mix_markets_and_clock(
            seed in proptest::prelude::any::<u64>(),
            weights in proptest::array::uniform8(0u32..4),
            exchange_mask in 1usize..8,
            symbol_mask in 1usize..8,
            steps in proptest::collection::vec(-20i64..=20, 1..50),
        ) {
            let exchanges: Vec<String> = ["binance", "okx", "deribit"]
                .iter()
                .enumerate()
                .filter(|(i, _)| exchange_mask & (1 << i) != 0)
                .map(|(_, e)| e.to_string())
                .collect();
            let symbols: Vec<String> = ["BTC-USDT", "ETH-USDT", "SOL-USDT"]
                .iter()
                .enumerate()
                .filter(|(i, _)| symbol_mask & (1 << i) != 0)
                .map(|(_, e)| e.to_string())
                .collect();
            proptest::prop_assume!(weights.iter().any(|&w| w > 0));
            let cfg = GeneratorConfig {
                exchanges,
                symbols,
                mix: Mix { weights },
                orderbook_depth: 3,
                run_id: "p".into(),
                seed,
            };
            // Configurations where no market carries the mix are rejected, not generated.
            let Ok(mut g) = Generator::new(&cfg) else {
                return Ok(());
            };
            let base = 1_761_714_300_000i64;
            let clock: Vec<i64> = steps
                .iter()
                .scan(base, |t, d| {
                    *t += d;
                    Some(*t)
                })
                .collect();
            assert_identities_unique(&mut g, 1_000, |i| clock[i % clock.len()]);
        }
    }

    #[test]
    fn market_types_are_consistent_with_exchange_symbol_and_data_type() {
        let mut g = Generator::new(&config(Mix::uniform())).unwrap();
        let mut markets = HashSet::new();
        for _ in 0..20_000 {
            let m = g.next_message(1_761_714_300_000);
            let t: Vec<String> = m.subject.split('.').map(String::from).collect();
            let (exchange, market_type, symbol) = (&t[1], &t[2], &t[3]);
            match exchange.as_str() {
                "deribit" => {
                    assert_eq!(market_type, "options");
                    assert!(["BTC", "ETH"].contains(&symbol.as_str()), "{symbol}");
                    assert_eq!(m.data_type, DataType::VolatilityIndex);
                }
                "binance" | "okx" => {
                    assert!(["spot", "perpetual"].contains(&market_type.as_str()));
                    assert!(symbol.ends_with("-USDT"), "{symbol}");
                    assert_ne!(m.data_type, DataType::VolatilityIndex);
                    if !matches!(m.data_type, DataType::Trade | DataType::Orderbook) {
                        assert_eq!(market_type, "perpetual", "{}", m.subject);
                    }
                }
                other => panic!("unexpected exchange {other}"),
            }
            markets.insert((
                m.data_type,
                exchange.clone(),
                market_type.clone(),
                symbol.clone(),
            ));
        }
        // 2 books+trades x 2 exchanges x 2 types x 3 symbols, 5 perpetual-only types x 2 x 3,
        // and 2 Deribit currencies (SOL has no Deribit volatility index).
        assert_eq!(markets.len(), 2 * 2 * 2 * 3 + 5 * 2 * 3 + 2);
    }

    #[test]
    fn equal_seeds_and_clocks_give_identical_messages() {
        let mut a = Generator::new(&config(Mix::default())).unwrap();
        let mut b = Generator::new(&config(Mix::default())).unwrap();
        for i in 0..1_000 {
            let x = a.next_message(1_761_714_300_000 + i);
            let (xs, xi, xp) = (
                x.subject.to_string(),
                x.msg_id.to_string(),
                x.payload.to_vec(),
            );
            let y = b.next_message(1_761_714_300_000 + i);
            assert_eq!(
                (xs.as_str(), xi.as_str(), xp.as_slice()),
                (y.subject, y.msg_id, y.payload)
            );
        }
    }

    #[test]
    fn default_mix_is_mostly_trades_and_order_books() {
        let mut g = Generator::new(&config(Mix::default())).unwrap();
        let mut counts = [0u32; 8];
        for _ in 0..10_000 {
            counts[g.next_message(0).data_type.index()] += 1;
        }
        assert!((5_200..5_800).contains(&counts[0]), "{counts:?}");
        assert!((3_200..3_800).contains(&counts[1]), "{counts:?}");
        assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
    }

    #[test]
    fn types_without_a_market_are_skipped_and_bad_options_are_rejected() {
        let mut cfg = config(Mix::default());
        cfg.exchanges = vec!["binance".into()];
        let g = Generator::new(&cfg).unwrap();
        assert_eq!(g.skipped_types(), &[DataType::VolatilityIndex]);

        cfg.mix = Mix::only(DataType::VolatilityIndex);
        assert!(matches!(Generator::new(&cfg), Err(ToolError::Options(_))));

        let mut cfg = config(Mix::default());
        cfg.run_id = "has space".into();
        assert!(Generator::new(&cfg).is_err());
        let mut cfg = config(Mix::default());
        cfg.orderbook_depth = ORDERBOOK_DEPTH_MAX + 1;
        assert!(Generator::new(&cfg).is_err());
        let mut cfg = config(Mix::default());
        cfg.symbols = vec!["btc-usdt".into()];
        assert!(Generator::new(&cfg).is_err());
    }

    #[test]
    fn full_depth_order_books_are_the_size_marketprism_sends() {
        let mut cfg = config(Mix::only(DataType::Orderbook));
        cfg.orderbook_depth = ORDERBOOK_DEPTH_MAX;
        let mut g = Generator::new(&cfg).unwrap();
        let m = g.next_message(1_761_714_300_000);
        let v = parse(&m);
        assert_eq!(v["bids"].as_array().unwrap().len(), 100);
        // MarketPrism's 100-level snapshots are 4-7 KB.
        assert!(
            (3_000..9_000).contains(&m.payload.len()),
            "{}",
            m.payload.len()
        );
    }
}
