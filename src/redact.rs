//! Redaction of secrets in text meant for people: error messages, log lines, printed
//! configuration.
//!
//! [`redact`] is the one function every such path goes through: the binary's error output and its
//! log writer, the configuration's `Debug` and validation errors, and the NATS, ClickHouse and tool
//! errors that quote a URL. It hides
//!
//! - the password of a URL's user info (`nats://alice:secret@host` becomes
//!   `nats://alice:<redacted>@host`), and the whole user info of a URL with a scheme but no
//!   password, which NATS reads as a token (`nats://token@host`);
//! - the value of a `password = ...` or `token = ...` assignment, as a TOML parse error quotes the
//!   offending line of the configuration file.
//!
//! - every exact value registered with [`register_secret`]: the binary registers the secrets it
//!   loaded (passwords, tokens, passwords of URLs, from files or the environment), so a secret a
//!   server or library echoes outside a URL or an assignment, or one whose characters (`/`, `@`,
//!   `:`) defeat the patterns above, is hidden too.
//!
//! Secrets held in configuration fields never reach text in the first place: `Debug` of the
//! configuration prints [`REDACTED`] for them.

use std::borrow::Cow;
use std::sync::RwLock;

/// What a secret is replaced with.
pub const REDACTED: &str = "<redacted>";

/// Keys whose assigned value is a secret, as the configuration file spells them.
const SECRET_KEYS: [&str; 2] = ["password", "token"];

/// Registered secrets a process may hold at most: a relay loads three (NATS password or token,
/// ClickHouse password, a URL's password each), so this only stops a caller registering in a loop
/// from growing the list without bound.
const REGISTERED_SECRETS_MAX: usize = 64;

/// Exact secret values hidden wherever they appear, longest first (so a secret that contains
/// another is replaced whole). A lock, not a channel: registration happens at start-up, reads on
/// every log line, and neither holds it for longer than a string search.
static REGISTERED: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Registers `secret` so that [`redact`] hides it wherever it appears. Empty values are ignored
/// (they would match everywhere); past [`REGISTERED_SECRETS_MAX`] further values are ignored.
pub fn register_secret(secret: &str) {
    if secret.is_empty() {
        return;
    }
    // A poisoned lock only means a panic elsewhere while holding it; the list itself is valid.
    let mut registered = REGISTERED.write().unwrap_or_else(|e| e.into_inner());
    if registered.len() >= REGISTERED_SECRETS_MAX || registered.iter().any(|s| s == secret) {
        return;
    }
    registered.push(secret.to_owned());
    registered.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// `text` with every registered secret replaced by [`REDACTED`].
fn redact_registered(text: &str) -> Cow<'_, str> {
    let registered = REGISTERED.read().unwrap_or_else(|e| e.into_inner());
    let mut out = Cow::Borrowed(text);
    for secret in registered.iter() {
        if out.contains(secret.as_str()) {
            out = Cow::Owned(out.replace(secret.as_str(), REDACTED));
        }
    }
    out
}

/// `text` with every secret it shows replaced by [`REDACTED`] (see the module documentation).
pub fn redact(text: &str) -> Cow<'_, str> {
    match redact_registered(text) {
        Cow::Borrowed(text) => redact_patterns(text),
        Cow::Owned(text) => Cow::Owned(redact_patterns(&text).into_owned()),
    }
}

/// The secrets of the user info of every URL in `text` (one URL or a comma-separated list): the
/// password of `scheme://user:password@host`, and the whole user info of `scheme://name@host` when
/// `bare_user_is_secret` (NATS reads it as a token; for HTTP it is only a user name).
pub fn url_secrets(text: &str, bare_user_is_secret: bool) -> Vec<&str> {
    let mut secrets = Vec::new();
    for word in text.split(|c: char| c == ',' || is_separator(c)) {
        let (scheme, rest) = match word.find("://") {
            Some(at) => word.split_at(at + "://".len()),
            None => ("", word),
        };
        // A password may hold an unencoded '/' or '@', so the user info ends at the last '@'
        // before the query or fragment.
        let before_query = &rest[..rest.find(['?', '#']).unwrap_or(rest.len())];
        let Some(at) = before_query.rfind('@') else {
            continue;
        };
        let userinfo = &rest[..at];
        match userinfo.split_once(':') {
            Some((_user, password)) if !password.is_empty() => secrets.push(password),
            Some(_) => {}
            None if bare_user_is_secret && !scheme.is_empty() && !userinfo.is_empty() => {
                secrets.push(userinfo)
            }
            None => {}
        }
    }
    secrets
}

/// `text` with the secrets of URLs and assignments hidden.
fn redact_patterns(text: &str) -> Cow<'_, str> {
    if !text.contains('@') && !SECRET_KEYS.iter().any(|k| text.contains(k)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        redact_line(line, &mut out);
    }
    if out == text {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(out)
    }
}

/// Appends `line` to `out` with the secrets of its words and assignments hidden.
fn redact_line(line: &str, out: &mut String) {
    let line = redact_assignment(line);
    let mut rest = line.as_ref();
    while !rest.is_empty() {
        let end = rest.find(is_separator).unwrap_or(rest.len());
        let (word, tail) = rest.split_at(end);
        redact_word(word, out);
        let mut chars = tail.chars();
        if let Some(separator) = chars.next() {
            out.push(separator);
        }
        rest = chars.as_str();
    }
}

/// Characters around a URL in messages, lists and quoted values.
fn is_separator(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            ',' | '"' | '\'' | '`' | '(' | ')' | '[' | ']' | '<' | '>'
        )
}

/// Appends `word` to `out`, hiding the secret part of a URL's user info.
fn redact_word(word: &str, out: &mut String) {
    let (scheme, rest) = match word.find("://") {
        Some(at) => word.split_at(at + "://".len()),
        None => ("", word),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        out.push_str(word);
        return;
    };
    let userinfo = &authority[..at];
    match userinfo.split_once(':') {
        Some((user, _password)) => {
            out.push_str(scheme);
            out.push_str(user);
            out.push(':');
            out.push_str(REDACTED);
        }
        // A bare `name@host` without a scheme is an address, not a credential.
        None if scheme.is_empty() => {
            out.push_str(word);
            return;
        }
        None => {
            out.push_str(scheme);
            out.push_str(REDACTED);
        }
    }
    out.push_str(&rest[at..]);
}

/// `line` with the value of a `password = ...` or `token = ...` assignment hidden. Only a key that
/// starts a word counts (`nats.password` in a message names a field, it assigns nothing).
fn redact_assignment(line: &str) -> Cow<'_, str> {
    for key in SECRET_KEYS {
        let mut from = 0;
        while let Some(found) = line[from..].find(key) {
            let start = from + found;
            let after_key = start + key.len();
            from = after_key;
            let starts_word = line[..start]
                .chars()
                .next_back()
                .is_none_or(|c| c.is_whitespace() || c == '|');
            let rest = line[after_key..].trim_start();
            let Some(value) = rest.strip_prefix('=') else {
                continue;
            };
            if !starts_word {
                continue;
            }
            let value_start = line.len() - value.trim_start().len();
            let mut redacted = String::with_capacity(line.len());
            redacted.push_str(&line[..value_start]);
            redacted.push_str(REDACTED);
            return Cow::Owned(redacted);
        }
    }
    Cow::Borrowed(line)
}

/// A writer that passes everything through [`redact`]: the binary's log output goes through it, so
/// no log line shows a secret whatever module logged it.
#[derive(Debug)]
pub struct RedactingWriter<W> {
    inner: W,
}

impl<W> RedactingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> RedactingWriter<W> {
        RedactingWriter { inner }
    }
}

impl<W: std::io::Write> std::io::Write for RedactingWriter<W> {
    /// Log formatters hand over one whole line per call, so a URL is never split across calls.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::str::from_utf8(buf) {
            Ok(text) => self.inner.write_all(redact(text).as_bytes())?,
            Err(_) => self.inner.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_hidden_and_the_rest_is_kept() {
        let cases = [
            (
                "cannot connect to NATS at nats://alice:s3cret@10.0.0.1:4222: refused",
                "cannot connect to NATS at nats://alice:<redacted>@10.0.0.1:4222: refused",
            ),
            (
                "nats://a:x@h1:4222,tls://b:y@h2:4222",
                "nats://a:<redacted>@h1:4222,tls://b:<redacted>@h2:4222",
            ),
            (
                "url = \"http://default:p@ss@ch:8123/?db=x\"",
                "url = \"http://default:<redacted>@ch:8123/?db=x\"",
            ),
            ("nats://tok3n@host:4222", "nats://<redacted>@host:4222"),
            ("alice:pw@host:4222", "alice:<redacted>@host:4222"),
            ("mail ops@example.com", "mail ops@example.com"),
            ("http://127.0.0.1:8123", "http://127.0.0.1:8123"),
        ];
        for (text, expected) in cases {
            assert_eq!(redact(text), expected, "{text}");
        }
    }

    #[test]
    fn secret_assignments_quoted_by_parse_errors_are_hidden() {
        let text = "TOML parse error at line 3\n  |\n3 | password = s3cret oops\n  |\nnats.password = <unset>: set both";
        let shown = redact(text);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("3 | password = <redacted>"), "{shown}");
        assert!(
            shown.contains("nats.password = <unset>: set both"),
            "{shown}"
        );
        assert_eq!(redact("token=abc"), "token=<redacted>");
    }

    #[test]
    fn registered_secrets_are_hidden_wherever_they_appear() {
        // Characters that end a URL's authority or a word, so the URL pattern cannot find them.
        const SECRET: &str = "Zq7/Re:gi@st(er)ed";
        let text = format!("auth failed for password {SECRET} at nats://alice:{SECRET}@h:4222");
        let before = redact(&text).into_owned();
        assert!(
            before.contains("Zq7/Re"),
            "the patterns alone miss it: {before}"
        );
        register_secret(SECRET);
        register_secret("");
        let shown = redact(&text);
        assert!(
            !shown.contains("Zq7/Re") && !shown.contains("st(er)ed"),
            "{shown}"
        );
        assert!(
            shown.contains("auth failed for password <redacted>"),
            "{shown}"
        );
        assert_eq!(redact("nothing secret here"), "nothing secret here");
    }

    #[test]
    fn url_secrets_finds_passwords_and_nats_tokens_but_not_user_names() {
        assert_eq!(
            url_secrets("nats://a:p/w@h1:4222,tls://tok@h2:4222,h3:4222", true),
            vec!["p/w", "tok"]
        );
        assert_eq!(
            url_secrets("http://default@ch:8123", false),
            Vec::<&str>::new()
        );
        assert_eq!(
            url_secrets("http://default:p@ss@ch:8123/?db=x", false),
            vec!["p@ss"]
        );
        assert_eq!(
            url_secrets("http://127.0.0.1:8123", false),
            Vec::<&str>::new()
        );
        assert_eq!(
            url_secrets("http://ch:8123/?q=a@b", false),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn the_log_writer_redacts_what_passes_through() {
        use std::io::Write as _;
        let mut writer = RedactingWriter::new(Vec::new());
        writer
            .write_all(b"WARN error=nats://u:hidden@h:1 refused\n")
            .expect("writes to memory");
        let text = String::from_utf8(writer.inner).expect("utf-8");
        assert_eq!(text, "WARN error=nats://u:<redacted>@h:1 refused\n");
    }
}
