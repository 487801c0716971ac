//! Classification of ClickHouse failures into what the drain should do about them.
//!
//! Every failed request ends up as an [`InsertError`] carrying an [`ErrorClass`]:
//!
//! - [`ErrorClass::Retryable`]: the server or the network is unwell (connection refused or reset,
//!   timeouts, HTTP 5xx without an exception code, memory limits, too many parts, read-only replicas).
//!   The same batch is retried later with backoff; the WAL keeps the backlog.
//! - [`ErrorClass::Poison`]: the rows' content is rejected (parse and type errors, enum values outside
//!   the set, values an expression refuses). The batch is bisected and the offending rows go to the
//!   dead-letter table. One poison case is about the batch, not a row: "Too many partitions for
//!   single INSERT block" (rows spread over more months than one insert may hold); the isolation
//!   splits such a batch by partition instead of bisecting it.
//! - [`ErrorClass::Schema`]: the target does not match what the relay writes (missing table, database
//!   or column, a setting the server does not know). It is not the rows' fault: the drain retries
//!   slowly and reports not-ready until an operator fixes the target, and never dead-letters.
//! - [`ErrorClass::Auth`]: the server refuses the relay itself: authentication failed (unknown user,
//!   wrong or missing password), the user lacks a grant or may only read, or the TLS handshake
//!   failed on trust (certificate not valid for the name, unknown issuer, the server wants a
//!   client certificate). No retry can fix it, yet an operator can, on the server, at any time:
//!   the drain reports it as such, retries slowly and reports not-ready; it never exits and
//!   never dead-letters.
//!
//! [`ErrorClass::needs_operator`] is true for the last two: the classes a retry cannot fix.
//!
//! **Unknown codes are retryable.** Guessing "poison" for an error we do not recognise would move
//! good rows out of the main tables into dead letters for good; guessing "retryable" only delays
//! them (they wait in the WAL) and keeps the failure visible on the metrics and logs until someone
//! looks. Losing data by guessing is the worse mistake, so the default is the one that cannot lose.
//!
//! The classification is a pure function of the exception code, the message text and the body
//! format, so it is tested table-driven without a server.

use std::fmt;

/// What the drain should do with a failed insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Transient: retry the same batch later (same rows, same order, same token).
    Retryable,
    /// The rows' content is rejected: isolate the bad rows and dead-letter them.
    Poison,
    /// The target schema or configuration does not match: retry slowly, report not-ready.
    Schema,
    /// The server refuses the relay's credentials, grants or TLS identity: retry slowly, report
    /// not-ready.
    Auth,
}

impl ErrorClass {
    /// True for the classes no retry can fix, only an operator ([`ErrorClass::Schema`] and
    /// [`ErrorClass::Auth`]): the drain retries them slowly and reports them as such.
    pub fn needs_operator(self) -> bool {
        matches!(self, ErrorClass::Schema | ErrorClass::Auth)
    }

    /// What to tell the operator about a failure of a class no retry can fix; `None` for the
    /// classes the relay handles by itself.
    pub fn operator_hint(self) -> Option<&'static str> {
        match self {
            ErrorClass::Auth => Some(
                "ClickHouse refuses the relay (authentication, grants or TLS identity): no retry can fix this; \
                 fix the user, its password or grants on the server, or [clickhouse] user/password/TLS settings; \
                 the relay retries slowly and the WAL keeps the data meanwhile",
            ),
            ErrorClass::Schema => Some(
                "ClickHouse's database or table does not match what the relay writes: no retry can fix this; \
                 fix it (`prism-relay check` names the change); the relay retries slowly and the WAL keeps the data meanwhile",
            ),
            ErrorClass::Retryable | ErrorClass::Poison => None,
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorClass::Retryable => "retryable",
            ErrorClass::Poison => "poison",
            ErrorClass::Schema => "schema",
            ErrorClass::Auth => "auth",
        })
    }
}

/// A classified ClickHouse failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class} ClickHouse error{}: {message}", code.map(|c| format!(" (code {c})")).unwrap_or_default())]
pub struct InsertError {
    /// What the caller should do about it.
    pub class: ErrorClass,
    /// The server's exception text or the transport error, cut to [`ERROR_TEXT_BYTES_MAX`]:
    /// it is logged and copied into every dead letter it isolates.
    pub message: String,
    /// The ClickHouse exception code when the server sent one.
    pub code: Option<u32>,
}

/// Longest error text kept, in bytes. ClickHouse's exception texts are a few hundred bytes; a
/// longer one (a server quoting a whole row, or a broken peer) is cut, so a poison batch of many
/// rows does not copy a huge text into each of its dead letters.
pub const ERROR_TEXT_BYTES_MAX: usize = 4 * 1024;

/// `text` cut to at most [`ERROR_TEXT_BYTES_MAX`] bytes (at a character boundary) with a note of
/// how many bytes were cut.
pub fn bounded_error_text(mut text: String) -> String {
    if text.len() <= ERROR_TEXT_BYTES_MAX {
        return text;
    }
    let total = text.len();
    let mut end = ERROR_TEXT_BYTES_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(&format!(" [... {} more bytes cut]", total - end));
    text
}

impl InsertError {
    /// Builds an error whose class is derived from its code and (whole) message.
    pub fn classified(code: Option<u32>, message: impl Into<String>, format: BodyFormat) -> Self {
        let message = message.into();
        InsertError {
            class: classify(code, &message, format),
            message: bounded_error_text(message),
            code,
        }
    }

    /// True for "Too many partitions for single INSERT block": a poison failure that splitting
    /// the rows by partition resolves without bisecting (see [`super::isolate`]).
    pub fn is_too_many_partitions(&self) -> bool {
        self.code == Some(code::TOO_MANY_PARTS) && self.message.contains(TOO_MANY_PARTITIONS_MARKER)
    }

    /// A transient failure that carries no server exception (connection, timeout).
    pub fn retryable(message: impl Into<String>) -> Self {
        InsertError {
            class: ErrorClass::Retryable,
            message: bounded_error_text(message.into()),
            code: None,
        }
    }
}

/// The body format of the request that failed; a few codes mean different things per format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// Typed rows serialized by the client; a short read means the row layout does not match the table.
    RowBinary,
    /// Text rows (JSONEachRow passthrough); a short read means a truncated row.
    Text,
    /// No body (a query or DDL statement).
    None,
}

/// ClickHouse exception codes, named as in the server's `ErrorCodes.cpp`.
mod code {
    pub const CANNOT_PARSE_TEXT: u32 = 6;
    pub const THERE_IS_NO_COLUMN: u32 = 8;
    pub const NOT_FOUND_COLUMN_IN_BLOCK: u32 = 10;
    pub const NO_SUCH_COLUMN_IN_TABLE: u32 = 16;
    pub const CANNOT_PARSE_ESCAPE_SEQUENCE: u32 = 25;
    pub const CANNOT_PARSE_QUOTED_STRING: u32 = 26;
    pub const CANNOT_PARSE_INPUT_ASSERTION_FAILED: u32 = 27;
    pub const ATTEMPT_TO_READ_AFTER_EOF: u32 = 32;
    pub const CANNOT_READ_ALL_DATA: u32 = 33;
    pub const BAD_ARGUMENTS: u32 = 36;
    pub const CANNOT_PARSE_DATE: u32 = 38;
    pub const CANNOT_PARSE_DATETIME: u32 = 41;
    pub const ILLEGAL_COLUMN: u32 = 44;
    pub const UNKNOWN_IDENTIFIER: u32 = 47;
    pub const LOGICAL_ERROR: u32 = 49;
    pub const TYPE_MISMATCH: u32 = 53;
    pub const UNKNOWN_TABLE: u32 = 60;
    pub const ARGUMENT_OUT_OF_BOUND: u32 = 69;
    pub const CANNOT_CONVERT_TYPE: u32 = 70;
    pub const CANNOT_PARSE_NUMBER: u32 = 72;
    pub const UNKNOWN_FORMAT: u32 = 73;
    pub const UNKNOWN_DATABASE: u32 = 81;
    pub const UNKNOWN_SETTING: u32 = 115;
    pub const INCORRECT_DATA: u32 = 117;
    pub const CANNOT_READ_ARRAY_FROM_TEXT: u32 = 130;
    pub const TOO_LARGE_STRING_SIZE: u32 = 131;
    pub const TIMEOUT_EXCEEDED: u32 = 159;
    pub const SIZES_OF_ARRAYS_DOESNT_MATCH: u32 = 190;
    pub const READONLY: u32 = 164;
    pub const UNKNOWN_USER: u32 = 192;
    pub const WRONG_PASSWORD: u32 = 193;
    pub const REQUIRED_PASSWORD: u32 = 194;
    pub const IP_ADDRESS_NOT_ALLOWED: u32 = 195;
    pub const ACCESS_DENIED: u32 = 497;
    pub const AUTHENTICATION_FAILED: u32 = 516;
    pub const TOO_MANY_SIMULTANEOUS_QUERIES: u32 = 202;
    pub const NO_FREE_CONNECTION: u32 = 203;
    pub const SOCKET_TIMEOUT: u32 = 209;
    pub const NETWORK_ERROR: u32 = 210;
    pub const MEMORY_LIMIT_EXCEEDED: u32 = 241;
    pub const TABLE_IS_READ_ONLY: u32 = 242;
    pub const TOO_MANY_PARTS: u32 = 252;
    pub const TOO_FEW_LIVE_REPLICAS: u32 = 285;
    pub const UNKNOWN_STATUS_OF_INSERT: u32 = 319;
    pub const VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE: u32 = 321;
    pub const CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN: u32 = 349;
    pub const FUNCTION_THROW_IF_VALUE_IS_NON_ZERO: u32 = 395;
    pub const DECIMAL_OVERFLOW: u32 = 407;
    pub const SYSTEM_ERROR: u32 = 425;
    pub const VIOLATED_CONSTRAINT: u32 = 469;
    pub const CANNOT_PARSE_UUID: u32 = 376;
    pub const CANNOT_PARSE_BOOL: u32 = 467;
    pub const UNKNOWN_ELEMENT_OF_ENUM: u32 = 691;
    pub const KEEPER_EXCEPTION: u32 = 999;
}

/// Message fragments that mark an enum value outside the type's set. ClickHouse 18.16 reports these
/// as LOGICAL_ERROR (49) or BAD_ARGUMENTS (36), modern servers as UNKNOWN_ELEMENT_OF_ENUM (691).
const ENUM_VALUE_MARKERS: &[&str] = &["Unknown element", "Unexpected value"];

/// TOO_MANY_PARTS (252) is also raised when one INSERT block spans too many partitions; that is a
/// property of the batch's rows which splitting resolves, not a server that needs time. It is
/// classified poison so it is never retried as is, and the isolation splits such a batch by
/// partition rather than in halves ([`InsertError::is_too_many_partitions`]).
const TOO_MANY_PARTITIONS_MARKER: &str = "Too many partitions for single INSERT block";

/// The client's own validation (modern servers) rejects an enum value the table does not define.
const CLIENT_ENUM_MISMATCH_MARKER: &str = "is not present in the database schema";

/// Transport errors without an exception code that mean the TLS handshake failed on trust, as
/// rustls and OpenSSL word them: a certificate the relay does not accept, or a server that does
/// not accept the relay's (or wants one). A handshake cut short by the network is not among them
/// (it is retryable like any dropped connection).
const TLS_TRUST_MARKERS: &[&str] = &[
    "invalid peer certificate",
    "certificate verify failed",
    "UnknownIssuer",
    "NotValidForName",
    "BadCertificate",
    "CertificateRequired",
    "UnknownCA",
    "self signed certificate",
    "self-signed certificate",
    "unable to get local issuer certificate",
    "certificate has expired",
];

/// Bare HTTP statuses (no ClickHouse exception, e.g. from a proxy in front of the server) that
/// refuse the client rather than the request.
const HTTP_REFUSAL_MARKERS: &[&str] = &["401 Unauthorized", "403 Forbidden"];

/// Classifies a failure from its ClickHouse exception code (if any), its message and the body format.
pub fn classify(code: Option<u32>, message: &str, format: BodyFormat) -> ErrorClass {
    use code::*;
    let Some(code) = code else {
        // No exception code: transport failures, timeouts, bare HTTP statuses (proxies, 5xx);
        // a refused TLS identity or a proxy's refusal is the operator's to fix.
        if TLS_TRUST_MARKERS
            .iter()
            .chain(HTTP_REFUSAL_MARKERS)
            .any(|m| message.contains(m))
        {
            return ErrorClass::Auth;
        }
        return ErrorClass::Retryable;
    };
    let about_enum_value = ENUM_VALUE_MARKERS.iter().any(|m| message.contains(m));
    match code {
        // The server refuses the relay: who it is, or what it may do (READONLY is the user's
        // `readonly` setting; a replica that is read-only is TABLE_IS_READ_ONLY below).
        UNKNOWN_USER
        | WRONG_PASSWORD
        | REQUIRED_PASSWORD
        | IP_ADDRESS_NOT_ALLOWED
        | ACCESS_DENIED
        | AUTHENTICATION_FAILED
        | READONLY => ErrorClass::Auth,

        // The server needs time, memory, merges or replicas.
        TIMEOUT_EXCEEDED
        | TOO_MANY_SIMULTANEOUS_QUERIES
        | NO_FREE_CONNECTION
        | SOCKET_TIMEOUT
        | NETWORK_ERROR
        | MEMORY_LIMIT_EXCEEDED
        | TABLE_IS_READ_ONLY
        | TOO_FEW_LIVE_REPLICAS
        | UNKNOWN_STATUS_OF_INSERT
        | SYSTEM_ERROR
        | KEEPER_EXCEPTION => ErrorClass::Retryable,
        TOO_MANY_PARTS if message.contains(TOO_MANY_PARTITIONS_MARKER) => ErrorClass::Poison,
        TOO_MANY_PARTS => ErrorClass::Retryable,

        // The target does not have what the relay writes.
        NO_SUCH_COLUMN_IN_TABLE
        | THERE_IS_NO_COLUMN
        | NOT_FOUND_COLUMN_IN_BLOCK
        | ILLEGAL_COLUMN
        | UNKNOWN_IDENTIFIER
        | UNKNOWN_TABLE
        | UNKNOWN_DATABASE
        // A setting or format of a newer server generation: the configured profile is wrong.
        | UNKNOWN_SETTING
        | UNKNOWN_FORMAT => ErrorClass::Schema,

        // A short read of a RowBinary body cannot come from row values (the client writes every
        // field with its length); it means the row type does not match the table's columns.
        ATTEMPT_TO_READ_AFTER_EOF | CANNOT_READ_ALL_DATA if format == BodyFormat::RowBinary => {
            ErrorClass::Schema
        }
        ATTEMPT_TO_READ_AFTER_EOF | CANNOT_READ_ALL_DATA if format == BodyFormat::Text => {
            ErrorClass::Poison
        }

        // The rows' values are rejected.
        CANNOT_PARSE_TEXT
        | CANNOT_PARSE_ESCAPE_SEQUENCE
        | CANNOT_PARSE_QUOTED_STRING
        | CANNOT_PARSE_INPUT_ASSERTION_FAILED
        | CANNOT_PARSE_DATE
        | CANNOT_PARSE_DATETIME
        | TYPE_MISMATCH
        | ARGUMENT_OUT_OF_BOUND
        | CANNOT_CONVERT_TYPE
        | CANNOT_PARSE_NUMBER
        | INCORRECT_DATA
        | CANNOT_READ_ARRAY_FROM_TEXT
        | TOO_LARGE_STRING_SIZE
        | SIZES_OF_ARRAYS_DOESNT_MATCH
        | VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
        | CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
        | CANNOT_PARSE_UUID
        | CANNOT_PARSE_BOOL
        | FUNCTION_THROW_IF_VALUE_IS_NON_ZERO
        | DECIMAL_OVERFLOW
        | VIOLATED_CONSTRAINT
        | UNKNOWN_ELEMENT_OF_ENUM
            if format != BodyFormat::None =>
        {
            ErrorClass::Poison
        }
        // These two codes are generic; they are about the rows only when they name a value.
        BAD_ARGUMENTS | LOGICAL_ERROR if about_enum_value && format != BodyFormat::None => {
            ErrorClass::Poison
        }

        // Anything else, including the codes above when no rows were sent: see the module docs.
        _ => ErrorClass::Retryable,
    }
}

/// Finds the exception code in a ClickHouse error text: `Code: 60, e.displayText() = ...` (18.16)
/// or `Code: 60. DB::Exception: ...` (modern). The first occurrence wins.
pub fn parse_exception_code(message: &str) -> Option<u32> {
    const MARKER: &str = "Code: ";
    let start = message.find(MARKER)? + MARKER.len();
    let digits: &str = {
        let rest = &message[start..];
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        &rest[..end]
    };
    digits.parse().ok()
}

/// Converts an error of the `clickhouse` crate into a classified error.
pub fn from_client_error(error: &clickhouse::error::Error, format: BodyFormat) -> InsertError {
    use clickhouse::error::Error as E;
    // With its sources, so the io error kind behind a network error is visible.
    let message = prism_wal::ErrorChain(error).to_string();
    match error {
        // The server answered with an exception (or a bare HTTP status).
        // The server's own text is the reason (without the crate's "bad response" prefix).
        E::BadResponse(text) => {
            InsertError::classified(parse_exception_code(text), text.trim(), format)
        }
        // Client-side validation against the table's columns (modern servers only).
        E::SchemaMismatch(text) if text.contains(CLIENT_ENUM_MISMATCH_MARKER) => InsertError {
            class: ErrorClass::Poison,
            message,
            code: None,
        },
        E::SchemaMismatch(_) | E::InvalidColumnsHeader(_) => InsertError {
            class: ErrorClass::Schema,
            message,
            code: None,
        },
        // The client cannot even form the request as configured.
        E::InvalidParams(_) | E::Unsupported(_) => InsertError {
            class: ErrorClass::Schema,
            message,
            code: None,
        },
        // Connection refused or reset, timeouts, broken bodies, and anything the crate adds later:
        // retryable, except a TLS handshake refused on trust (see `classify` without a code).
        _ => InsertError::classified(None, message, format),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (code, message, format, expected class); messages are real server texts.
    const CASES: &[(Option<u32>, &str, BodyFormat, ErrorClass)] = {
        use BodyFormat::{None as NoBody, RowBinary, Text};
        use ErrorClass::{Auth, Poison, Retryable, Schema};
        &[
            // Transport and bare statuses.
            (None, "network error: connection refused", RowBinary, Retryable),
            (None, "timeout expired", RowBinary, Retryable),
            (None, "503 Service Unavailable", Text, Retryable),
            (None, "Unknown element 'x' for type Enum8", Text, Retryable),
            // Retryable server states.
            (Some(159), "Code: 159. DB::Exception: Timeout exceeded", RowBinary, Retryable),
            // The server refuses the relay: no retry fixes it.
            (Some(164), "Code: 164. DB::Exception: Cannot execute query in readonly mode", RowBinary, Auth),
            (Some(192), "Code: 192, e.displayText() = DB::Exception: Unknown user relay", RowBinary, Auth),
            (Some(193), "Code: 193, e.displayText() = DB::Exception: Wrong password for user default", NoBody, Auth),
            (Some(194), "Code: 194. DB::Exception: Password required for user relay", Text, Auth),
            (Some(195), "Code: 195. DB::Exception: User relay is not allowed to connect from address 10.0.0.7", RowBinary, Auth),
            (Some(497), "Code: 497. DB::Exception: relay: Not enough privileges. To execute this query it's necessary to have grant INSERT(timestamp) ON marketprism_hot.trades. (ACCESS_DENIED)", RowBinary, Auth),
            (Some(516), "Code: 516. DB::Exception: relay: Authentication failed: password is incorrect, or there is no user with such name. (AUTHENTICATION_FAILED)", NoBody, Auth),
            (None, "network error: client error (Connect): invalid peer certificate: UnknownIssuer", RowBinary, Auth),
            (None, "error:0A000086:SSL routines:tls_post_process_server_certificate:certificate verify failed", NoBody, Auth),
            (None, "received fatal alert: CertificateRequired", Text, Auth),
            (None, "401 Unauthorized", RowBinary, Auth),
            (None, "tls handshake eof", RowBinary, Retryable),
            (Some(202), "Code: 202. Too many simultaneous queries", RowBinary, Retryable),
            (Some(203), "Code: 203. No free connection", RowBinary, Retryable),
            (Some(209), "Code: 209. Timeout exceeded while reading from socket", RowBinary, Retryable),
            (Some(210), "Code: 210. Connection refused", RowBinary, Retryable),
            (Some(241), "Code: 241. Memory limit (total) exceeded", RowBinary, Retryable),
            (Some(242), "Code: 242. Table is in readonly mode", RowBinary, Retryable),
            (Some(252), "Code: 252. Too many parts (300). Merges are processing significantly slower than inserts", RowBinary, Retryable),
            (Some(285), "Code: 285. Number of alive replicas (0) is less than requested quorum", RowBinary, Retryable),
            (Some(319), "Code: 319. Unknown status, client must retry", RowBinary, Retryable),
            (Some(425), "Code: 425. System error", RowBinary, Retryable),
            (Some(999), "Code: 999. Coordination::Exception: Connection loss", RowBinary, Retryable),
            // Unknown and generic codes default to retryable.
            (Some(1002), "Code: 1002. DB::Exception: something new", RowBinary, Retryable),
            (Some(36), "Code: 36. DB::Exception: Unknown codec family", RowBinary, Retryable),
            (Some(49), "Code: 49. DB::Exception: Logical error: some invariant", Text, Retryable),
            // Poison: values rejected, as the servers word it.
            (Some(6), "Code: 6, e.displayText() = DB::Exception: Cannot parse string 'abc' as UInt32: syntax error", RowBinary, Poison),
            (Some(26), "Code: 26. Cannot parse quoted string", Text, Poison),
            (Some(27), "Code: 27, e.displayText() = DB::Exception: Cannot parse input: expected \" before: abc", Text, Poison),
            (Some(33), "Code: 33, e.displayText() = DB::Exception: Unexpected end of stream while parsing JSONEachRow format", Text, Poison),
            (Some(32), "Code: 32. Attempt to read after eof", Text, Poison),
            (Some(38), "Code: 38. Cannot parse date", Text, Poison),
            (Some(41), "Code: 41. Cannot parse datetime", Text, Poison),
            (Some(53), "Code: 53. Type mismatch", Text, Poison),
            (Some(69), "Code: 69. Argument out of bound", Text, Poison),
            (Some(70), "Code: 70. Cannot convert type", Text, Poison),
            (Some(72), "Code: 72. Cannot parse number", Text, Poison),
            (Some(117), "Code: 117, e.displayText() = DB::Exception: Unknown field found while parsing JSONEachRow format: zz", Text, Poison),
            (Some(407), "Code: 407. Decimal math overflow", RowBinary, Poison),
            (Some(190), "Code: 190. Elements 'a' and 'b' of Nested data structure 'n' have different array sizes", Text, Poison),
            (Some(321), "Code: 321. Value 300 is out of range of UInt8", Text, Poison),
            (Some(349), "Code: 349. Cannot insert NULL value into a column of type 'String'", Text, Poison),
            (Some(469), "Code: 469. Constraint `price_positive` is violated", RowBinary, Poison),
            (Some(691), "Code: 691. DB::Exception: Unknown element 'x' for enum. (UNKNOWN_ELEMENT_OF_ENUM)", Text, Poison),
            (Some(49), "Code: 49, e.displayText() = DB::Exception: Unknown element 'bogus' for type Enum8('buy' = 1, 'sell' = 2)", Text, Poison),
            (Some(36), "Code: 36. DB::Exception: Unexpected value 7 in enum: (BAD_ARGUMENTS)", RowBinary, Poison),
            (Some(252), "Code: 252. Too many partitions for single INSERT block (more than 100)", RowBinary, Poison),
            // A short RowBinary read means the row type does not match the table.
            (Some(33), "Code: 33, e.displayText() = DB::Exception: Cannot read all data. Bytes read: 1. Bytes expected: 8.", RowBinary, Schema),
            (Some(32), "Code: 32. Attempt to read after eof", RowBinary, Schema),
            // Schema: the target lacks what is written.
            (Some(16), "Code: 16, e.displayText() = DB::Exception: No such column zz in table t", RowBinary, Schema),
            (Some(47), "Code: 47. Missing columns: 'x'", NoBody, Schema),
            (Some(60), "Code: 60, e.displayText() = DB::Exception: Table default.nope doesn't exist.", RowBinary, Schema),
            (Some(81), "Code: 81, e.displayText() = DB::Exception: Database nodb doesn't exist", Text, Schema),
            (Some(115), "Code: 115, e.displayText() = DB::Exception: Unknown setting insert_deduplication_token", RowBinary, Schema),
            (Some(73), "Code: 73, e.displayText() = DB::Exception: Unknown format RowBinaryWithNamesAndTypes", NoBody, Schema),
            // Without a body, value codes are not about rows.
            (Some(6), "Code: 6. Cannot parse string", NoBody, Retryable),
        ]
    };

    #[test]
    fn every_listed_failure_gets_its_documented_class() {
        for (code, message, format, expected) in CASES {
            assert_eq!(
                classify(*code, message, *format),
                *expected,
                "code {code:?}, format {format:?}, message {message:?}"
            );
        }
    }

    #[test]
    fn long_error_texts_are_cut_at_a_character_boundary_and_short_ones_kept() {
        let short = "Code: 27. DB::Exception: Cannot parse input".to_string();
        assert_eq!(bounded_error_text(short.clone()), short);
        // A multi-byte character straddles the cut.
        let long = format!(
            "{}é{}",
            "a".repeat(ERROR_TEXT_BYTES_MAX - 1),
            "b".repeat(10_000)
        );
        let cut = bounded_error_text(long.clone());
        assert!(
            cut.len() < ERROR_TEXT_BYTES_MAX + 64,
            "{} bytes kept",
            cut.len()
        );
        assert!(cut.starts_with(&"a".repeat(ERROR_TEXT_BYTES_MAX - 1)));
        assert!(cut.ends_with(&format!(
            "[... {} more bytes cut]",
            long.len() - (ERROR_TEXT_BYTES_MAX - 1)
        )));
        let error = InsertError::classified(Some(27), long, BodyFormat::RowBinary);
        assert_eq!(
            error.class,
            ErrorClass::Poison,
            "classified on the whole text"
        );
        assert!(error.message.len() < ERROR_TEXT_BYTES_MAX + 64);
    }

    #[test]
    fn codes_listed_in_messages_match_the_code_argument() {
        for (code, message, _, _) in CASES {
            if code.is_some() {
                assert_eq!(parse_exception_code(message), *code, "{message}");
            }
        }
    }

    #[test]
    fn exception_code_is_parsed_from_legacy_and_modern_texts() {
        assert_eq!(
            parse_exception_code(
                "Code: 60, e.displayText() = DB::Exception: Table x doesn't exist."
            ),
            Some(60)
        );
        assert_eq!(
            parse_exception_code("Code: 241. DB::Exception: Memory limit exceeded. (MEMORY_LIMIT_EXCEEDED) (version 23.8.1)"),
            Some(241)
        );
        assert_eq!(parse_exception_code("Code: 115"), Some(115));
        assert_eq!(parse_exception_code("503 Service Unavailable"), None);
        assert_eq!(parse_exception_code("Code: x"), None);
        assert_eq!(parse_exception_code(""), None);
    }

    #[test]
    fn client_bad_response_is_classified_by_its_exception_code() {
        let error = clickhouse::error::Error::BadResponse(
            "Code: 60, e.displayText() = DB::Exception: Table default.nope doesn't exist.".into(),
        );
        let classified = from_client_error(&error, BodyFormat::RowBinary);
        assert_eq!(classified.class, ErrorClass::Schema);
        assert_eq!(classified.code, Some(60));
        assert!(
            classified.message.starts_with("Code: 60"),
            "{}",
            classified.message
        );
    }

    #[test]
    fn client_timeouts_and_network_errors_are_retryable() {
        let timeout = from_client_error(&clickhouse::error::Error::TimedOut, BodyFormat::RowBinary);
        assert_eq!(timeout.class, ErrorClass::Retryable);
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let network = clickhouse::error::Error::Network(Box::new(refused));
        let classified = from_client_error(&network, BodyFormat::Text);
        assert_eq!(classified.class, ErrorClass::Retryable);
        assert!(
            classified.message.contains("refused"),
            "{}",
            classified.message
        );
    }

    #[test]
    fn client_side_enum_validation_is_poison_and_other_mismatches_are_schema() {
        let enum_value = clickhouse::error::Error::SchemaMismatch(
            "While processing column side defined as Enum8('buy' = 1): Enum8 value 7 is not present in the database schema".into(),
        );
        assert_eq!(
            from_client_error(&enum_value, BodyFormat::RowBinary).class,
            ErrorClass::Poison
        );
        let types =
            clickhouse::error::Error::SchemaMismatch("column price: expected Decimal64".into());
        assert_eq!(
            from_client_error(&types, BodyFormat::RowBinary).class,
            ErrorClass::Schema
        );
    }

    #[test]
    fn error_display_names_class_and_code() {
        let error =
            InsertError::classified(Some(60), "Table t doesn't exist", BodyFormat::RowBinary);
        assert_eq!(
            error.to_string(),
            "schema ClickHouse error (code 60): Table t doesn't exist"
        );
        assert_eq!(
            InsertError::retryable("timeout").to_string(),
            "retryable ClickHouse error: timeout"
        );
    }
}
