//! Typed reads of single JSON fields, each error naming the field, the value and why.
//!
//! Payload structs capture every field they use as a borrowed `&RawValue` (the exact text of
//! the value inside the message), and these helpers turn that text into the column's type.
//! Reading through raw text, rather than letting serde convert, is what lets a dead-letter
//! reason say which field was wrong, and lets decimals stay exact.

use std::borrow::Cow;

use serde_json::value::RawValue;

use super::decimal;
use super::DecodeError;

/// A field as captured from the payload: `None` when absent or `null`.
pub(crate) type Field<'a> = Option<&'a RawValue>;

/// Values quoted in errors are cut to this many bytes, so a dead-letter reason stays short
/// even when a field holds a large object.
pub(crate) const ERROR_VALUE_BYTES_MAX: usize = 64;

/// The value's text for an error message, cut at [`ERROR_VALUE_BYTES_MAX`] on a char boundary.
pub(crate) fn excerpt(text: &str) -> String {
    if text.len() <= ERROR_VALUE_BYTES_MAX {
        return text.to_owned();
    }
    let mut end = ERROR_VALUE_BYTES_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// The JSON kind of a raw value, for "expected X, got Y" messages.
fn kind(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'"') => "a string",
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

fn wrong_type(field: &str, expected: &'static str, raw: &RawValue) -> DecodeError {
    DecodeError::WrongType {
        field: field.to_owned(),
        expected,
        found: format!("{} `{}`", kind(raw), excerpt(raw.get())),
    }
}

/// The field, or [`DecodeError::MissingField`].
pub(crate) fn required<'a>(field: &str, raw: Field<'a>) -> Result<&'a RawValue, DecodeError> {
    raw.ok_or_else(|| DecodeError::MissingField {
        field: field.to_owned(),
    })
}

/// The contents of a JSON string, borrowed from the payload unless it holds escapes.
pub(crate) fn string<'a>(field: &str, raw: &'a RawValue) -> Result<Cow<'a, str>, DecodeError> {
    let text = raw.get();
    let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) else {
        return Err(wrong_type(field, "a string", raw));
    };
    if !inner.contains('\\') {
        return Ok(Cow::Borrowed(inner));
    }
    // RawValue has already validated the string, so unescaping can only fail on a serde_json bug;
    // report it as a wrong value rather than panic.
    serde_json::from_str::<String>(text)
        .map(Cow::Owned)
        .map_err(|_| wrong_type(field, "a valid JSON string", raw))
}

/// A JSON integer that fits `i64` (epoch milliseconds and the like). `1.0` and `"1"` are rejected.
pub(crate) fn int(field: &str, raw: &RawValue) -> Result<i64, DecodeError> {
    raw.get()
        .parse::<i64>()
        .map_err(|_| wrong_type(field, "an integer", raw))
}

/// A non-negative JSON integer that fits `u64`.
pub(crate) fn uint(field: &str, raw: &RawValue) -> Result<u64, DecodeError> {
    raw.get()
        .parse::<u64>()
        .map_err(|_| wrong_type(field, "a non-negative integer", raw))
}

/// `true` or `false`.
pub(crate) fn boolean(field: &str, raw: &RawValue) -> Result<bool, DecodeError> {
    match raw.get() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(wrong_type(field, "a boolean", raw)),
    }
}

/// A decimal given as a JSON string or a JSON number, parsed exactly into `Decimal64(8)`.
pub(crate) fn decimal(field: &str, raw: &RawValue) -> Result<i64, DecodeError> {
    let text = raw.get();
    let digits: Cow<'_, str> = match text.as_bytes().first() {
        Some(b'"') => string(field, raw)?,
        Some(b'-' | b'0'..=b'9') => Cow::Borrowed(text),
        _ => return Err(wrong_type(field, "a decimal string or number", raw)),
    };
    decimal::parse(&digits).map_err(|reason| DecodeError::BadDecimal {
        field: field.to_owned(),
        value: excerpt(&digits),
        reason,
    })
}

/// The decimal value of a plain string or number without building a field name: the fast path
/// for orderbook levels. `None` means "take the slow path", which reports the error properly.
pub(crate) fn decimal_fast(raw: &RawValue) -> Option<i64> {
    let text = raw.get();
    let digits = match text.as_bytes().first()? {
        b'"' => text
            .strip_prefix('"')?
            .strip_suffix('"')
            .filter(|t| !t.contains('\\'))?,
        b'-' | b'0'..=b'9' => text,
        _ => return None,
    };
    decimal::parse(digits).ok()
}

/// A required string field.
pub(crate) fn req_string<'a>(field: &str, raw: Field<'a>) -> Result<Cow<'a, str>, DecodeError> {
    string(field, required(field, raw)?)
}

/// A required decimal field.
pub(crate) fn req_decimal(field: &str, raw: Field<'_>) -> Result<i64, DecodeError> {
    decimal(field, required(field, raw)?)
}

/// A decimal field that reads as zero when absent or null.
pub(crate) fn decimal_or_zero(field: &str, raw: Field<'_>) -> Result<i64, DecodeError> {
    raw.map_or(Ok(0), |raw| decimal(field, raw))
}

/// A required integer field.
pub(crate) fn req_int(field: &str, raw: Field<'_>) -> Result<i64, DecodeError> {
    int(field, required(field, raw)?)
}

/// Days since 1970-01-01 for a `YYYY-MM-DD` date (ClickHouse `Date`, which ends in 2149).
pub(crate) fn date(field: &str, raw: &RawValue) -> Result<u16, DecodeError> {
    let text = string(field, raw)?;
    let invalid = || DecodeError::InvalidValue {
        field: field.to_owned(),
        value: excerpt(&text),
        reason: "expected a date YYYY-MM-DD between 1970-01-01 and 2149-06-06",
    };
    let bytes = text.as_bytes();
    if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
        return Err(invalid());
    }
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        if !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (Some(year), Some(month), Some(day)) = (number(0..4), number(5..7), number(8..10)) else {
        return Err(invalid());
    };
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(invalid());
    }
    u16::try_from(days_from_civil(year, month, day)).map_err(|_| invalid())
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's civil-days algorithm).
pub(crate) fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).expect("test JSON is valid")
    }

    #[test]
    fn strings_without_escapes_are_borrowed_and_escapes_are_decoded() {
        let plain = raw(r#""BTC-USDT""#);
        assert!(matches!(
            string("symbol", &plain),
            Ok(Cow::Borrowed("BTC-USDT"))
        ));
        let escaped = raw(r#""BTC\u002dUSDT""#);
        assert_eq!(string("symbol", &escaped).unwrap(), "BTC-USDT");
    }

    #[test]
    fn a_number_where_a_string_belongs_names_the_field() {
        let err = string("symbol", &raw("42")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "field `symbol`: expected a string, found a number `42`"
        );
    }

    #[test]
    fn integers_reject_fractions_and_strings() {
        assert_eq!(int("ts_ms", &raw("1761714312456")), Ok(1_761_714_312_456));
        assert!(int("ts_ms", &raw("1761714312456.0")).is_err());
        assert!(int("ts_ms", &raw(r#""1761714312456""#)).is_err());
        assert!(uint("last_update_id", &raw("-1")).is_err());
    }

    #[test]
    fn decimals_come_from_strings_and_numbers_alike() {
        assert_eq!(decimal("price", &raw(r#""0.0001""#)), Ok(10_000));
        assert_eq!(decimal("price", &raw("0.0001")), Ok(10_000));
        assert_eq!(decimal("price", &raw("1e-4")), Ok(10_000));
        let err = decimal("price", &raw("true")).unwrap_err();
        assert!(err.to_string().contains("field `price`"), "{err}");
        let err = decimal("price", &raw(r#""12,5""#)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "field `price`: `12,5` is not a valid Decimal64(8): not a decimal number"
        );
    }

    #[test]
    fn long_values_are_cut_in_error_messages() {
        let long = format!("\"{}\"", "x".repeat(500));
        let err = int("ts_ms", &raw(&long)).unwrap_err();
        assert!(err.to_string().len() < 200, "{err}");
    }

    #[test]
    fn dates_become_days_since_the_epoch() {
        assert_eq!(date("maturity_date", &raw(r#""1970-01-01""#)), Ok(0));
        assert_eq!(date("maturity_date", &raw(r#""2025-12-26""#)), Ok(20_448));
        assert_eq!(date("maturity_date", &raw(r#""2024-02-29""#)), Ok(19_782));
        for bad in [
            "2023-02-29",
            "2025-13-01",
            "1969-12-31",
            "2025-1-01",
            "20251226xx",
        ] {
            assert!(
                date("maturity_date", &raw(&format!("\"{bad}\""))).is_err(),
                "{bad}"
            );
        }
    }
}
