//! JSONEachRow passthrough bodies: checking rows and joining them into one request body.
//!
//! Subjects without a typed codec are stored by handing their JSON objects to ClickHouse as
//! `JSONEachRow`. Each row must be exactly one JSON object: an empty row would insert nothing
//! (a silent drop) and two objects on one row would insert twice, so such rows are rejected as
//! poison here, before any request, with a reason for the dead letters.

use serde::de::IgnoredAny;

/// Checks that `row` is exactly one JSON object (surrounding whitespace allowed).
pub fn check_json_row(row: &[u8]) -> Result<(), String> {
    let trimmed = row.trim_ascii();
    if trimmed.is_empty() {
        return Err("empty JSON row".to_owned());
    }
    if trimmed[0] != b'{' {
        return Err("JSON row is not an object".to_owned());
    }
    // `from_slice` rejects trailing data, so a second object on the same row fails here.
    serde_json::from_slice::<IgnoredAny>(trimmed)
        .map(|_| ())
        .map_err(|e| format!("invalid JSON row: {e}"))
}

/// Joins rows into a JSONEachRow body, one row per line.
pub fn json_each_row_body<R: AsRef<[u8]>>(rows: &[R]) -> Vec<u8> {
    let len = rows.iter().map(|r| r.as_ref().len() + 1).sum();
    let mut body = Vec::with_capacity(len);
    for row in rows {
        body.extend_from_slice(row.as_ref());
        body.push(b'\n');
    }
    body
}

/// Splits a newline-separated body into its lines, for [`super::Sink::insert_json_isolating`].
/// A final newline does not start another line; any other empty line is kept (and will be
/// reported as poison) so that line numbers stay the caller's record numbers.
pub fn split_lines(body: &[u8]) -> Vec<&[u8]> {
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    if body.is_empty() {
        return Vec::new();
    }
    body.split(|&b| b == b'\n').collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_object_per_row_is_accepted() {
        assert_eq!(check_json_row(br#"{"a":1}"#), Ok(()));
        assert_eq!(check_json_row(b"  {\"a\": \"x\\ny\"}\n"), Ok(()));
    }

    #[test]
    fn empty_non_object_broken_and_doubled_rows_are_rejected() {
        for row in [
            &b""[..],
            b"   ",
            b"[1,2]",
            b"42",
            br#"{"a":"#,
            br#"{"a":1}{"a":2}"#,
        ] {
            assert!(
                check_json_row(row).is_err(),
                "{:?}",
                String::from_utf8_lossy(row)
            );
        }
    }

    #[test]
    fn body_has_one_line_per_row() {
        assert_eq!(
            json_each_row_body(&[&b"{}"[..], b"{\"a\":1}"]),
            b"{}\n{\"a\":1}\n"
        );
        assert!(json_each_row_body::<&[u8]>(&[]).is_empty());
    }

    #[test]
    fn lines_are_split_without_a_phantom_last_line() {
        assert_eq!(split_lines(b"{}\n{\"a\":1}\n"), [&b"{}"[..], b"{\"a\":1}"]);
        assert_eq!(split_lines(b"{}\n\n{}"), [&b"{}"[..], b"", b"{}"]);
        assert!(split_lines(b"").is_empty());
        assert!(split_lines(b"\n").is_empty());
    }
}
