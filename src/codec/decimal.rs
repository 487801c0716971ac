//! Exact conversion of decimal text into ClickHouse `Decimal64(8)` (an `i64` scaled by 10^8).
//!
//! MarketPrism sends prices and quantities as decimal strings (`"112345.67000000"`) and some
//! values as JSON numbers (`0.0001`, `1e-4`). Both arrive here as text: strings directly, numbers
//! as the exact characters of the JSON document (serde_json's `RawValue`), so no value ever takes
//! a round trip through `f64`.
//!
//! Accepted grammar: `[+-]? digits ('.' digits)? ([eE] [+-]? digits)?`. Leading zeros are allowed;
//! empty parts (`".5"`, `"5."`), whitespace, `NaN` and `Infinity` are not.
//!
//! Digits beyond the eighth fractional place are rounded half to even (banker's rounding), with
//! every digit of the text taken into account. Rounding rather than rejecting is deliberate: some
//! exchanges publish funding rates with 10 to 13 fractional digits, and a column declared
//! `Decimal64(8)` cannot hold them, so dead-lettering those messages would lose real data.
//!
//! The result must fit the column's storage, an `Int64`, so its magnitude is at most
//! [`SCALED_ABS_MAX`] (`92233720368.54775807`); anything larger is [`DecimalError::Overflow`].
//! That is past the 18 digits `Decimal64(8)` declares: ClickHouse's text parsers reject such
//! values, but RowBinary carries the `Int64` as it is, and the server stores, compares and sums
//! it correctly (checked on ClickHouse 26.9 with an 11-digit value). The open interest of the
//! largest markets in USD passes 10^10, and dead-lettering it would lose real data.

/// Digits after the decimal point in `Decimal64(8)`.
pub const SCALE_DIGITS: u32 = 8;

/// 10^[`SCALE_DIGITS`]: one unit of the column in scaled integer form.
pub const SCALE: i64 = 100_000_000;

/// Largest magnitude of a scaled value: the `Int64` that stores a `Decimal64(8)`.
pub const SCALED_ABS_MAX: u64 = i64::MAX as u64;

/// Significant digits kept exactly while parsing, in a `u64` (10^19 - 1 < 2^64); later digits
/// only matter for rounding. A result has at most 18 significant digits, so when all 19 kept
/// digits sit above the eighth fractional place the value overflows anyway unless the first dropped
/// digit is the rounding digit (kept apart for that case); otherwise the dropped digits lie below
/// the rounding position, where only "were they all zero" matters.
const SIGNIFICANT_DIGITS_MAX: u32 = 19;

/// Exponents are clamped to this magnitude while being read, so huge exponents cannot overflow
/// the arithmetic; any clamped value is far outside the representable range either way.
const EXPONENT_ABS_MAX: i64 = 1_000_000;

/// Why a text is not a valid `Decimal64(8)` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecimalError {
    /// The text is empty.
    #[error("empty text")]
    Empty,
    /// The text does not follow the decimal grammar.
    #[error("not a decimal number")]
    Syntax,
    /// The value does not fit Decimal64(8).
    #[error("out of range for Decimal64(8) (magnitude at most 92233720368.54775807)")]
    Overflow,
}

/// Parses decimal text exactly into an `i64` scaled by 10^8, rounding half to even past the
/// eighth fractional digit.
pub fn parse(text: &str) -> Result<i64, DecimalError> {
    let bytes = text.as_bytes();
    if bytes.is_empty() {
        return Err(DecimalError::Empty);
    }
    let mut i = 0;
    let negative = match bytes[0] {
        b'-' => {
            i += 1;
            true
        }
        b'+' => {
            i += 1;
            false
        }
        _ => false,
    };

    // The significand: `mantissa * 10^(dropped - frac_digits)` plus whatever `sticky` remembers.
    let mut mantissa: u64 = 0;
    let mut significant: u32 = 0;
    let mut dropped: i64 = 0;
    // The first digit that did not fit, and whether any later one was non-zero.
    let mut first_dropped: u8 = 0;
    let mut sticky = false;
    let mut push_digit = |digit: u8| {
        if significant < SIGNIFICANT_DIGITS_MAX {
            mantissa = mantissa * 10 + u64::from(digit);
            if mantissa != 0 {
                significant += 1;
            }
        } else {
            if dropped == 0 {
                first_dropped = digit;
            } else {
                sticky |= digit != 0;
            }
            dropped += 1;
        }
    };

    let int_start = i;
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        push_digit(bytes[i] - b'0');
        i += 1;
    }
    if i == int_start {
        return Err(DecimalError::Syntax);
    }
    let mut frac_digits: i64 = 0;
    if i < bytes.len() && bytes[i] == b'.' {
        i += 1;
        let frac_start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            push_digit(bytes[i] - b'0');
            i += 1;
        }
        if i == frac_start {
            return Err(DecimalError::Syntax);
        }
        frac_digits = (i - frac_start) as i64;
    }
    let mut exponent: i64 = 0;
    if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
        i += 1;
        let exp_negative = match bytes.get(i) {
            Some(b'-') => {
                i += 1;
                true
            }
            Some(b'+') => {
                i += 1;
                false
            }
            _ => false,
        };
        let exp_start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            exponent = (exponent * 10 + i64::from(bytes[i] - b'0')).min(EXPONENT_ABS_MAX);
            i += 1;
        }
        if i == exp_start {
            return Err(DecimalError::Syntax);
        }
        if exp_negative {
            exponent = -exponent;
        }
    }
    if i != bytes.len() {
        return Err(DecimalError::Syntax);
    }

    if mantissa == 0 {
        return Ok(0);
    }
    // value * 10^8 = mantissa * 10^shift (+ the sticky remainder below mantissa's last digit).
    let shift = exponent - frac_digits + dropped + i64::from(SCALE_DIGITS);
    let magnitude: u64 = if shift == 0 && dropped > 0 {
        // Nineteen kept digits end exactly at the eighth fractional place: the first dropped
        // digit rounds, half to even.
        let round_up = first_dropped > 5 || (first_dropped == 5 && (sticky || mantissa % 2 == 1));
        mantissa + u64::from(round_up)
    } else if shift >= 0 {
        // A non-zero mantissa times 10^19 or more is always past the Int64 range.
        if shift > 18 {
            return Err(DecimalError::Overflow);
        }
        mantissa
            .checked_mul(10u64.pow(shift as u32))
            .ok_or(DecimalError::Overflow)?
    } else {
        let sticky = sticky || first_dropped != 0;
        let down = -shift;
        // mantissa < 10^19, so dividing by 10^20 or more leaves less than a tenth of a unit.
        if down > i64::from(SIGNIFICANT_DIGITS_MAX) {
            0
        } else {
            let divisor = 10u64.pow(down as u32);
            let quotient = mantissa / divisor;
            let remainder = mantissa % divisor;
            let half = divisor / 2;
            let round_up = remainder > half || (remainder == half && (sticky || quotient % 2 == 1));
            quotient + u64::from(round_up)
        }
    };
    if magnitude > SCALED_ABS_MAX {
        return Err(DecimalError::Overflow);
    }
    // Cannot fail: magnitude <= SCALED_ABS_MAX == i64::MAX.
    let magnitude = magnitude as i64;
    Ok(if negative { -magnitude } else { magnitude })
}

/// Appends the canonical text of a scaled value: optional `-`, integer digits, `.`, exactly
/// eight fractional digits (`"112345.60000000"`, MarketPrism's own string format).
/// Hand-rolled rather than `write!`: orderbooks format two values per level, hundreds per message.
pub fn write(scaled: i64, out: &mut String) {
    // 20 digits for u64::MAX, a point, a sign: 22 bytes; 24 leaves slack.
    let mut buf = [0u8; 24];
    let mut at = buf.len();
    let mut rest = scaled.unsigned_abs();
    for _ in 0..SCALE_DIGITS {
        at -= 1;
        buf[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    at -= 1;
    buf[at] = b'.';
    loop {
        at -= 1;
        buf[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if scaled < 0 {
        at -= 1;
        buf[at] = b'-';
    }
    // ASCII digits, '.' and '-' only; pushed as chars, since checking the slice as UTF-8 cost
    // more than the formatting.
    out.extend(buf[at..].iter().map(|&b| char::from(b)));
}

/// The value of `text` when it is already canonical, the text [`write()`] gives for that value:
/// `-?(0|[1-9][0-9]*)\.[0-9]{8}` within range, not a negative zero. None for anything else,
/// which [`parse()`] reads. MarketPrism's collectors publish order book levels in this form, so
/// their text can be stored as it came instead of being parsed in general and written again.
pub fn parse_canonical(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    let (negative, digits) = match bytes.split_first()? {
        (b'-', rest) => (true, rest),
        _ => (false, bytes),
    };
    let point = digits.len().checked_sub(SCALE_DIGITS as usize + 1)?;
    let int = &digits[..point];
    // At most 11 integer digits (the range ends at 92233720368.54775807): with the 8 fractional
    // ones, 19 digits, which a u64 holds without overflow.
    if digits[point] != b'.'
        || int.is_empty()
        || int.len() > 11
        || (int.len() > 1 && int[0] == b'0')
    {
        return None;
    }
    let mut value: u64 = 0;
    for &b in int.iter().chain(&digits[point + 1..]) {
        if !b.is_ascii_digit() {
            return None;
        }
        value = value * 10 + u64::from(b - b'0');
    }
    if value > SCALED_ABS_MAX || (negative && value == 0) {
        return None;
    }
    let value = value as i64;
    Some(if negative { -value } else { value })
}

/// The canonical text of a scaled value (see [`write()`]).
pub fn format(scaled: i64) -> String {
    let mut out = String::with_capacity(24);
    write(scaled, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn marketprism_price_strings_parse_exactly() {
        assert_eq!(parse("112345.67000000"), Ok(11_234_567_000_000));
        assert_eq!(parse("0.00120000"), Ok(120_000));
        assert_eq!(parse("1"), Ok(SCALE));
        assert_eq!(parse("-2.5"), Ok(-250_000_000));
        assert_eq!(parse("+2.5"), Ok(250_000_000));
        assert_eq!(parse("007.10"), Ok(710_000_000));
    }

    #[test]
    fn only_the_written_form_is_canonical() {
        assert_eq!(parse_canonical("112345.60000000"), Some(11_234_560_000_000));
        assert_eq!(parse_canonical("0.00000001"), Some(1));
        assert_eq!(parse_canonical("-1.50000000"), Some(-150_000_000));
        assert_eq!(parse_canonical("92233720368.54775807"), Some(i64::MAX));
        for text in [
            "",
            "112345.6",
            "112345.600000000",
            "0112345.60000000",
            "-0.00000000",
            "+1.00000000",
            ".00000000",
            "1,00000000",
            "92233720368.54775808",
            "100000000000.00000000",
            "1e0.00000000",
        ] {
            assert_eq!(parse_canonical(text), None, "{text}");
        }
    }

    #[test]
    fn zero_in_every_spelling_is_zero() {
        for text in [
            "0",
            "-0",
            "0.0",
            "0e10",
            "-0.00000000000",
            "000",
            "0E-999999999999",
        ] {
            assert_eq!(parse(text), Ok(0), "{text}");
        }
    }

    #[test]
    fn exponents_from_json_floats_are_exact() {
        assert_eq!(parse("1e-4"), Ok(10_000));
        assert_eq!(parse("1E-4"), Ok(10_000));
        assert_eq!(parse("1.5e3"), Ok(150_000_000_000));
        assert_eq!(parse("1.5e+3"), Ok(150_000_000_000));
        assert_eq!(parse("2.5e-8"), Ok(2)); // 2.5 units: tie, rounds to even 2
        assert_eq!(parse("3.5e-8"), Ok(4)); // 3.5 units: tie, rounds to even 4
        assert_eq!(parse("112350.1"), Ok(11_235_010_000_000));
    }

    #[test]
    fn digits_past_the_eighth_round_half_to_even() {
        assert_eq!(parse("0.000000005"), Ok(0));
        assert_eq!(parse("0.000000015"), Ok(2));
        assert_eq!(parse("0.0000000150"), Ok(2));
        assert_eq!(parse("0.000000025"), Ok(2));
        assert_eq!(
            parse("0.0000000250000000000000000000000000000000000001"),
            Ok(3)
        );
        assert_eq!(parse("0.000000024999999999"), Ok(2));
        assert_eq!(parse("0.000000026"), Ok(3));
        assert_eq!(parse("-0.000000026"), Ok(-3));
        assert_eq!(parse("0.000033218473"), Ok(3_322));
        assert_eq!(
            parse("1.000000000000000000000000000000000000000000000000001"),
            Ok(SCALE)
        );
        assert_eq!(
            parse("0.0000000000000000000000000000000000000000009"),
            Ok(0)
        );
    }

    #[test]
    fn many_trailing_zeros_are_accepted() {
        assert_eq!(
            parse("1.500000000000000000000000000000000000000000000"),
            Ok(150_000_000)
        );
        assert_eq!(
            parse("00000000000000000000000000000000000000000000001.5"),
            Ok(150_000_000)
        );
    }

    #[test]
    fn values_past_the_int64_storage_overflow() {
        assert_eq!(parse("9999999999.99999999"), Ok(999_999_999_999_999_999));
        assert_eq!(parse("11893954563"), Ok(1_189_395_456_300_000_000));
        assert_eq!(parse("92233720368.54775807"), Ok(i64::MAX));
        assert_eq!(parse("-92233720368.54775807"), Ok(-i64::MAX));
        assert_eq!(parse("92233720368.547758065"), Ok(i64::MAX - 1));
        assert_eq!(parse("92233720368.5477580651"), Ok(i64::MAX));
        assert_eq!(parse("92233720368.54775808"), Err(DecimalError::Overflow));
        assert_eq!(parse("92233720368.547758075"), Err(DecimalError::Overflow));
        assert_eq!(parse("1e11"), Err(DecimalError::Overflow));
        assert_eq!(
            parse("1e999999999999999999999"),
            Err(DecimalError::Overflow)
        );
        assert_eq!(
            parse("123456789012345678901234567890123456789012"),
            Err(DecimalError::Overflow)
        );
        assert_eq!(parse("1e-999999999999999999999"), Ok(0));
    }

    #[test]
    fn malformed_text_is_rejected() {
        assert_eq!(parse(""), Err(DecimalError::Empty));
        for text in [
            "-", "+", ".5", "5.", "1..2", "1.2.3", "abc", "NaN", "Infinity", " 1", "1 ", "1e",
            "1e+", "0x10", "1,5", "--1", "1_000",
        ] {
            assert_eq!(parse(text), Err(DecimalError::Syntax), "{text}");
        }
    }

    #[test]
    fn canonical_text_has_eight_fractional_digits() {
        assert_eq!(format(11_234_560_000_000), "112345.60000000");
        assert_eq!(format(0), "0.00000000");
        assert_eq!(format(-1), "-0.00000001");
        assert_eq!(format(i64::MIN), "-92233720368.54775808");
        assert_eq!(format(i64::MAX), "92233720368.54775807");
    }

    /// The reference: a mantissa and a decimal exponent evaluated with i128 arithmetic.
    fn reference(mantissa: i64, exp10: i32) -> Result<i64, DecimalError> {
        let shift = exp10 + SCALE_DIGITS as i32;
        let m = i128::from(mantissa);
        let scaled = if shift >= 0 {
            10i128
                .checked_pow(shift as u32)
                .and_then(|p| m.checked_mul(p))
                .ok_or(DecimalError::Overflow)?
        } else if -shift > 30 {
            0
        } else {
            let p = 10i128.pow((-shift) as u32);
            let (q, r) = (m.abs() / p, m.abs() % p);
            let up = 2 * r > p || (2 * r == p && q % 2 == 1);
            (q + i128::from(up)) * m.signum()
        };
        if scaled.unsigned_abs() > u128::from(SCALED_ABS_MAX) {
            Err(DecimalError::Overflow)
        } else {
            Ok(scaled as i64)
        }
    }

    /// Writes `mantissa * 10^exp10` as text with `frac` fractional digits and an exponent.
    fn render(mantissa: i64, frac: u32, exp10: i32) -> String {
        let digits = mantissa.unsigned_abs().to_string();
        let padded = format!("{digits:0>width$}", width = frac as usize + 1);
        let (int_part, frac_part) = padded.split_at(padded.len() - frac as usize);
        let sign = if mantissa < 0 { "-" } else { "" };
        let exp = exp10 + frac as i32;
        let mut text = format!("{sign}{int_part}");
        if frac > 0 {
            text.push('.');
            text.push_str(frac_part);
        }
        if exp != 0 {
            text.push_str(&format!("e{exp}"));
        }
        text
    }

    /// A reference on the digit strings themselves, for texts longer than any integer type.
    fn reference_digits(int_part: &str, frac_part: &str) -> Result<i64, DecimalError> {
        let padded = format!("{frac_part:0<8}");
        let (kept_frac, rest) = padded.split_at(8);
        let kept = format!("{int_part}{kept_frac}");
        let kept = kept.trim_start_matches('0');
        if kept.len() > 19 {
            return Err(DecimalError::Overflow);
        }
        let quotient: u64 = if kept.is_empty() {
            0
        } else {
            kept.parse().expect("digits")
        };
        let round_up = match rest.as_bytes().first() {
            None => false,
            Some(b'6'..=b'9') => true,
            Some(b'5') => rest[1..].bytes().any(|b| b != b'0') || quotient % 2 == 1,
            Some(_) => false,
        };
        let value = quotient + u64::from(round_up);
        if value > SCALED_ABS_MAX {
            Err(DecimalError::Overflow)
        } else {
            Ok(value as i64)
        }
    }

    proptest! {
        #[test]
        fn long_digit_strings_round_like_a_digit_string_reference(
            int_part in "[0-9]{1,20}",
            frac_part in "[0-9]{0,40}",
            tie in any::<bool>(),
        ) {
            // Bias towards exact ties at the ninth digit, where half-to-even matters.
            let frac_part = if tie && frac_part.len() > 8 {
                format!("{}5{}", &frac_part[..8], "0".repeat(frac_part.len() - 9))
            } else {
                frac_part
            };
            let text = if frac_part.is_empty() { int_part.clone() } else { format!("{int_part}.{frac_part}") };
            prop_assert_eq!(parse(&text), reference_digits(&int_part, &frac_part), "text {}", text);
        }

        /// Canonical means exactly: what `write` gives for the value `parse` reads.
        #[test]
        fn parse_canonical_takes_exactly_the_text_format_gives(
            text in "-?[0-9]{0,13}(\\.[0-9]{0,10})?|-?(0|[1-9][0-9]{0,11})\\.[0-9]{8}|[0-9.+e-]{0,12}",
        ) {
            let canonical = parse(&text).ok().filter(|&v| format(v) == text);
            prop_assert_eq!(parse_canonical(&text), canonical, "text {}", text);
        }

        #[test]
        fn parse_canonical_reads_every_formatted_value(
            scaled in -(SCALED_ABS_MAX as i64)..=(SCALED_ABS_MAX as i64)
        ) {
            prop_assert_eq!(parse_canonical(&format(scaled)), Some(scaled));
        }

        #[test]
        fn parse_inverts_format_for_every_representable_value(
            scaled in -(SCALED_ABS_MAX as i64)..=(SCALED_ABS_MAX as i64)
        ) {
            prop_assert_eq!(parse(&format(scaled)), Ok(scaled));
        }

        #[test]
        fn parse_agrees_with_an_i128_reference(
            mantissa in any::<i64>(),
            frac in 0u32..20,
            exp10 in -40i32..20,
        ) {
            let text = render(mantissa, frac, exp10);
            prop_assert_eq!(parse(&text), reference(mantissa, exp10), "text {}", text);
        }

        #[test]
        fn shortest_float_text_parses_like_the_digit_reference(
            value in any::<f64>().prop_filter("finite", |v| v.is_finite())
        ) {
            // Rust's `{}` for f64 is the shortest text that round-trips, as Python's repr is,
            // written without an exponent.
            let text = format!("{value}");
            let (negative, body) = match text.strip_prefix('-') {
                Some(body) => (true, body),
                None => (false, text.as_str()),
            };
            let (int_part, frac_part) = body.split_once('.').unwrap_or((body, ""));
            let expected = reference_digits(int_part, frac_part).map(|v| if negative { -v } else { v });
            prop_assert_eq!(parse(&text), expected, "text {}", text);
        }
    }
}
