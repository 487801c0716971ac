//! One side of an order book (`bids` or `asks`), read in a single pass over the payload.
//!
//! MarketPrism publishes levels as `[[price, quantity], ...]`; older messages use
//! `[{"price": .., "quantity": ..}, ...]`. Prices and quantities may be decimal strings or JSON
//! numbers. While the array is read, each level is parsed exactly, written into the normalized
//! JSON text stored in the `bids`/`asks` column (`[["p","q"],...]` with eight fractional digits,
//! the text MarketPrism's own collector produces), counted, and compared for the best level.
//!
//! A bad level does not abort deserialization with an opaque serde message: the first error is
//! kept as a [`DecodeError`] naming the side, the level index and the field, and the rest of the
//! array is skipped, so the dead-letter reason is precise.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{decimal, field, DecodeError};

/// Which side a [`Levels`] value reads; fixes the best-level rule and the name in errors.
pub(crate) trait Side {
    /// The payload field name, `bids` or `asks`.
    const NAME: &'static str;
    /// True when `candidate` is a better price than `best` on this side.
    fn better(candidate: i64, best: i64) -> bool;
}

/// Bids: the best level has the highest price.
pub(crate) enum Bids {}
/// Asks: the best level has the lowest price.
pub(crate) enum Asks {}

impl Side for Bids {
    const NAME: &'static str = "bids";
    fn better(candidate: i64, best: i64) -> bool {
        candidate > best
    }
}

impl Side for Asks {
    const NAME: &'static str = "asks";
    fn better(candidate: i64, best: i64) -> bool {
        candidate < best
    }
}

/// Levels of one side, already reduced to what the `orderbooks` row stores.
pub(crate) struct Levels<S> {
    /// Normalized JSON text: `[["112345.60000000","1.23400000"],...]`.
    pub json: String,
    /// Number of levels.
    pub count: u32,
    /// Best `(price, quantity)` by price, scaled by 10^8; `None` for an empty side.
    /// Ties keep the first level, the one the publisher ranked best.
    pub best: Option<(i64, i64)>,
    /// The first bad level, when there was one; the other fields are then incomplete.
    pub error: Option<DecodeError>,
    side: PhantomData<S>,
}

/// Typical levels per side in production is 100, each about 30 bytes of normalized text.
const JSON_CAPACITY_BYTES_INITIAL: usize = 4096;

impl<S: Side> Levels<S> {
    fn new() -> Self {
        Levels {
            json: String::with_capacity(JSON_CAPACITY_BYTES_INITIAL),
            count: 0,
            best: None,
            error: None,
            side: PhantomData,
        }
    }

    fn push(&mut self, price: i64, quantity: i64) {
        self.push_level((price, None), (quantity, None));
    }

    /// Adds a level: each of price and quantity as its value and, when the payload's text of
    /// it is already canonical, that text, copied instead of written again.
    fn push_level(&mut self, price: (i64, Option<&str>), quantity: (i64, Option<&str>)) {
        self.json
            .push_str(if self.count == 0 { "[[\"" } else { ",[\"" });
        self.push_decimal(price);
        self.json.push_str("\",\"");
        self.push_decimal(quantity);
        self.json.push_str("\"]");
        let (price, quantity) = (price.0, quantity.0);
        self.count = self.count.saturating_add(1);
        match self.best {
            Some((best, _)) if !S::better(price, best) => {}
            _ => self.best = Some((price, quantity)),
        }
    }

    /// Appends a value's canonical text: the payload's own when it is canonical already.
    fn push_decimal(&mut self, (value, text): (i64, Option<&str>)) {
        match text {
            Some(text) => self.json.push_str(text),
            None => decimal::write(value, &mut self.json),
        }
    }

    fn finish(&mut self) {
        self.json.push_str(if self.count == 0 { "[]" } else { "]" });
    }

    fn level_field(&self, index: u32, part: &str) -> String {
        format!("{}[{index}].{part}", S::NAME)
    }
}

/// One level as it appears in the payload, in either format.
enum RawLevel<'a> {
    Pair(Option<&'a RawValue>, Option<&'a RawValue>),
    Invalid(&'static str),
}

impl<'de: 'a, 'a> Deserialize<'de> for RawLevel<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawLevelVisitor(PhantomData))
    }
}

/// Keys of a level object; a field identifier reads escaped and unescaped keys alike.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum LevelKey {
    Price,
    Quantity,
    #[serde(other)]
    Other,
}

struct RawLevelVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for RawLevelVisitor<'a> {
    type Value = RawLevel<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[price, quantity] or {\"price\":..,\"quantity\":..}")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let price = seq.next_element::<Option<&'de RawValue>>()?.flatten();
        let quantity = seq.next_element::<Option<&'de RawValue>>()?.flatten();
        // Extra elements (some venues append an order count) carry nothing the row stores.
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(RawLevel::Pair(price, quantity))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut price = None;
        let mut quantity = None;
        while let Some(key) = map.next_key::<LevelKey>()? {
            match key {
                LevelKey::Price => price = map.next_value::<Option<&'de RawValue>>()?,
                LevelKey::Quantity => quantity = map.next_value::<Option<&'de RawValue>>()?,
                LevelKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(RawLevel::Pair(price, quantity))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(RawLevel::Invalid("a string"))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(RawLevel::Invalid("a boolean"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(RawLevel::Invalid("a number"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(RawLevel::Invalid("a number"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(RawLevel::Invalid("a number"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(RawLevel::Invalid("null"))
    }
}

impl<'de, S: Side> Deserialize<'de> for Levels<S> {
    /// The side as written (serde_json has checked that it is well-formed JSON), read by
    /// [`Levels::read_pairs`] when it is what MarketPrism sends, else by the general reader,
    /// which takes every accepted form and names what is wrong.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = <&'de RawValue>::deserialize(deserializer)?;
        if let Some(levels) = Levels::read_pairs(raw.get()) {
            return Ok(levels);
        }
        serde_json::Deserializer::from_str(raw.get())
            .deserialize_any(LevelsVisitor::<S>(PhantomData))
            .map_err(de::Error::custom)
    }
}

/// Skips JSON whitespace from `at`.
fn skip_ws(bytes: &[u8], mut at: usize) -> usize {
    while matches!(bytes.get(at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        at += 1;
    }
    at
}

/// `byte` at `at` (after whitespace): the position after it.
fn expect(bytes: &[u8], at: usize, byte: u8) -> Option<usize> {
    let at = skip_ws(bytes, at);
    (bytes.get(at) == Some(&byte)).then_some(at + 1)
}

/// The value of a level's decimal string, with the string itself when it is canonical (the
/// form MarketPrism publishes, so the common case skips writing the value out again).
fn level_value(text: &str) -> Option<(i64, Option<&str>)> {
    match decimal::parse_canonical(text) {
        Some(value) => Some((value, Some(text))),
        None => decimal::parse(text).ok().map(|value| (value, None)),
    }
}

/// A string without escapes at `at` (after whitespace): its contents and the position after it.
fn plain_string(text: &str, at: usize) -> Option<(&str, usize)> {
    let start = expect(text.as_bytes(), at, b'"')?;
    let len = text.as_bytes()[start..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\')?;
    let end = start + len;
    (text.as_bytes()[end] == b'"').then(|| (&text[start..end], end + 1))
}

impl<S: Side> Levels<S> {
    /// The levels when they are `[["price","quantity"],...]` with decimal strings without
    /// escapes, as MarketPrism publishes them; None for anything else, which the general
    /// reader then reads (with the same result where both read). A direct scan: the general
    /// reader's per-level serde machinery was a quarter of the relay's CPU on order books.
    fn read_pairs(text: &str) -> Option<Levels<S>> {
        let bytes = text.as_bytes();
        let mut levels = Levels::new();
        let mut at = expect(bytes, 0, b'[')?;
        if let Some(end) = expect(bytes, at, b']') {
            levels.finish();
            return (skip_ws(bytes, end) == bytes.len()).then_some(levels);
        }
        loop {
            at = expect(bytes, at, b'[')?;
            let (price, next) = plain_string(text, at)?;
            at = expect(bytes, next, b',')?;
            let (quantity, next) = plain_string(text, at)?;
            at = expect(bytes, next, b']')?;
            levels.push_level(level_value(price)?, level_value(quantity)?);
            at = skip_ws(bytes, at);
            match bytes.get(at)? {
                b',' => at += 1,
                b']' => break,
                _ => return None,
            }
        }
        levels.finish();
        (skip_ws(bytes, at + 1) == bytes.len()).then_some(levels)
    }
}

struct LevelsVisitor<S>(PhantomData<S>);

impl<S: Side> LevelsVisitor<S> {
    fn wrong_type(found: &'static str) -> Levels<S> {
        let mut levels = Levels::new();
        levels.error = Some(DecodeError::WrongType {
            field: S::NAME.to_owned(),
            expected: "an array of levels",
            found: found.to_owned(),
        });
        levels
    }
}

impl<'de, S: Side> Visitor<'de> for LevelsVisitor<S> {
    type Value = Levels<S>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an array of {} levels", S::NAME)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut levels = Levels::<S>::new();
        while let Some(level) = seq.next_element::<RawLevel<'de>>()? {
            let index = levels.count;
            match parse_level(&levels, index, level) {
                Ok((price, quantity)) => levels.push(price, quantity),
                Err(error) => {
                    levels.error = Some(error);
                    while seq.next_element::<IgnoredAny>()?.is_some() {}
                    return Ok(levels);
                }
            }
        }
        levels.finish();
        Ok(levels)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Self::wrong_type("an object"))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Self::wrong_type("a string"))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Self::wrong_type("a boolean"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Self::wrong_type("a number"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Self::wrong_type("a number"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Self::wrong_type("a number"))
    }
}

fn parse_level<S: Side>(
    levels: &Levels<S>,
    index: u32,
    level: RawLevel<'_>,
) -> Result<(i64, i64), DecodeError> {
    match level {
        RawLevel::Invalid(found) => Err(DecodeError::WrongType {
            field: format!("{}[{index}]", S::NAME),
            expected: "[price, quantity] or {\"price\":..,\"quantity\":..}",
            found: found.to_owned(),
        }),
        RawLevel::Pair(price, quantity) => {
            // Field names are built only when a value is bad: a level is parsed hundreds of
            // times per message and almost never fails.
            let value = |raw: Option<&RawValue>, part: &str| -> Result<i64, DecodeError> {
                if let Some(scaled) = raw.and_then(field::decimal_fast) {
                    return Ok(scaled);
                }
                let name = levels.level_field(index, part);
                field::decimal(&name, field::required(&name, raw)?)
            };
            Ok((value(price, "price")?, value(quantity, "quantity")?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bids(json: &str) -> Levels<Bids> {
        serde_json::from_str(json).expect("levels deserialize")
    }

    fn asks(json: &str) -> Levels<Asks> {
        serde_json::from_str(json).expect("levels deserialize")
    }

    /// The general reader alone.
    fn general<S: Side>(json: &str) -> Levels<S> {
        serde_json::Deserializer::from_str(json)
            .deserialize_any(LevelsVisitor::<S>(PhantomData))
            .expect("levels deserialize")
    }

    fn same<S: Side>(a: &Levels<S>, b: &Levels<S>) -> bool {
        (&a.json, a.count, a.best) == (&b.json, b.count, b.best) && a.error.is_none()
    }

    #[test]
    fn the_direct_scan_reads_what_marketprism_sends_as_the_general_reader_does_and_leaves_the_rest_to_it(
    ) {
        for json in [
            "[]",
            " [ ] ",
            r#"[["112345.6","1.234"],["112345.5","2"]]"#,
            "[ [ \"1.5\" , \"2\" ] ,\n\t[\"0.00000001\",\"-3\"] ]",
            r#"[["00012.50","0"]]"#,
        ] {
            let scanned = Levels::<Bids>::read_pairs(json).unwrap_or_else(|| panic!("{json}"));
            assert!(same(&scanned, &general::<Bids>(json)), "{json}");
            let scanned = Levels::<Asks>::read_pairs(json).expect("scanned");
            assert!(same(&scanned, &general::<Asks>(json)), "{json}");
        }
        for json in [
            r#"[["1","2","7"]]"#,
            r#"[[1.5,"2"]]"#,
            r#"[{"price":"1","quantity":"2"}]"#,
            r#"[["1\u0030","2"]]"#,
            r#"[["1","x"]]"#,
            r#"[["1"]]"#,
            r#"[["1","2"],]"#,
            r#"["1"]"#,
            r#"{"1":"2"}"#,
            r#"[["1","2"]] 3"#,
            r#"[["٣","2"]]"#,
        ] {
            assert!(Levels::<Bids>::read_pairs(json).is_none(), "{json}");
        }
        // Through the payload's deserializer either way: escapes and objects still read.
        assert_eq!(
            bids(r#"[["1\u0030","2"]]"#).json,
            r#"[["10.00000000","2.00000000"]]"#
        );
    }

    proptest::proptest! {
        /// Wherever the direct scan reads a side, it reads it as the general reader does, and
        /// it reads every side of valid decimal strings.
        #[test]
        fn the_direct_scan_agrees_with_the_general_reader(
            levels in proptest::collection::vec(
                (
                    "-?[0-9]{0,12}(\\.[0-9]{0,10})?|-?(0|[1-9][0-9]{0,11})\\.[0-9]{8}|[0-9a-z.,]{0,6}",
                    "[0-9]{1,9}(\\.[0-9]{1,8})?|(0|[1-9][0-9]{0,8})\\.[0-9]{8}",
                ),
                0..30,
            ),
            spaces in proptest::collection::vec(" {0,2}", 4),
        ) {
            let json = format!(
                "[{}{}]",
                spaces[0],
                levels
                    .iter()
                    .map(|(p, q)| format!("[\"{p}\",{}\"{q}\"{}]", spaces[1], spaces[2]))
                    .collect::<Vec<_>>()
                    .join(&format!(",{}", spaces[3])),
            );
            let general = general::<Bids>(&json);
            match Levels::<Bids>::read_pairs(&json) {
                Some(scanned) => proptest::prop_assert!(same(&scanned, &general), "{json}"),
                None => proptest::prop_assert!(general.error.is_some(), "not scanned: {json}"),
            }
        }
    }

    #[test]
    fn pairs_of_strings_are_normalized_counted_and_ranked() {
        let levels = bids(r#"[["112345.6","1.234"],["112345.5","2"]]"#);
        assert_eq!(levels.error, None);
        assert_eq!(
            levels.json,
            r#"[["112345.60000000","1.23400000"],["112345.50000000","2.00000000"]]"#
        );
        assert_eq!(levels.count, 2);
        assert_eq!(levels.best, Some((11_234_560_000_000, 123_400_000)));
    }

    #[test]
    fn objects_and_numbers_give_the_same_text_as_string_pairs() {
        let from_objects = asks(
            r#"[{"price":112345.7,"quantity":"0.8","extra":1},{"quantity":1,"price":"112345.8"}]"#,
        );
        let from_pairs = asks(r#"[["112345.70000000","0.80000000"],["112345.8","1"]]"#);
        assert_eq!(from_objects.error, None);
        assert_eq!(from_objects.json, from_pairs.json);
        assert_eq!(from_objects.best, Some((11_234_570_000_000, 80_000_000)));
    }

    #[test]
    fn best_ask_is_the_lowest_price_even_out_of_order() {
        let levels = asks(r#"[["2","1"],["1","5"],["3","1"]]"#);
        assert_eq!(levels.best, Some((SCALE_1, 5 * SCALE_1)));
    }

    const SCALE_1: i64 = decimal::SCALE;

    #[test]
    fn an_empty_side_has_no_best_level() {
        let levels = bids("[]");
        assert_eq!(
            (levels.json.as_str(), levels.count, levels.best),
            ("[]", 0, None)
        );
    }

    #[test]
    fn a_bad_level_names_side_index_and_part() {
        let levels = bids(r#"[["1","1"],["2","x"],["3","1"]]"#);
        assert_eq!(
            levels.error.map(|e| e.to_string()),
            Some(
                "field `bids[1].quantity`: `x` is not a valid Decimal64(8): not a decimal number"
                    .into()
            )
        );
        let levels = asks(r#"[["1"]]"#);
        assert_eq!(
            levels.error.map(|e| e.to_string()),
            Some("field `asks[0].quantity` is missing or null".into())
        );
        let levels = asks(r#"["1"]"#);
        assert!(levels
            .error
            .unwrap()
            .to_string()
            .starts_with("field `asks[0]`: expected"));
        let levels = asks(r#"{"1":"2"}"#);
        assert!(levels
            .error
            .unwrap()
            .to_string()
            .starts_with("field `asks`: expected an array"));
    }
}
