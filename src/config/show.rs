//! The effective configuration as TOML, for `prism-relay config`: every value after the file, the
//! environment overrides and the derived defaults, each marked with where it came from, secrets
//! redacted.
//!
//! It is separate because it is the one reader of the whole model and of [`Origins`] at once; it
//! renders from the model's own serialization, so a field added to the model shows up here
//! without a change.

use std::fmt::Write as _;

use super::{Config, Origins};
use crate::redact::{redact, REDACTED};

/// The top-level sections in the order `relay.example.toml` has them.
const SECTION_ORDER: [&str; 8] = [
    "nats",
    "stream",
    "consumer",
    "wal",
    "clickhouse",
    "drain",
    "metrics",
    "shutdown",
];

/// Field names whose values are secrets, as the file spells them.
const SECRET_FIELDS: [&str; 2] = ["password", "token"];

impl Config {
    /// The configuration as TOML that loads back to the same values, each line of a value ending
    /// with `# default`, `# file`, `# env PRISM_RELAY_…` or `# derived from <field>`. Unset
    /// optional fields are left out; a secret that is set shows as a comment, `<redacted>`.
    pub fn render_effective(&self, origins: &Origins) -> String {
        let mut out = String::new();
        let Ok(toml::Value::Table(root)) = toml::Value::try_from(self) else {
            // The model serializes to a table by construction (its tests load the example).
            return out;
        };
        for section in SECTION_ORDER.iter().copied().chain(
            root.keys()
                .map(String::as_str)
                .filter(|k| !SECTION_ORDER.contains(k)),
        ) {
            match root.get(section) {
                Some(toml::Value::Table(table)) => {
                    render_table(&mut out, section, section, table, origins)
                }
                Some(toml::Value::Array(items)) => {
                    for (i, item) in items.iter().enumerate() {
                        if let toml::Value::Table(table) = item {
                            let _ = write!(out, "\n[[{section}]]\n");
                            render_fields(
                                &mut out,
                                section,
                                &format!("{section}[{i}]"),
                                table,
                                origins,
                            );
                        }
                    }
                }
                _ => {}
            }
        }
        // Secrets the loader registered (read from files or the environment) and URL user info
        // are caught here even where a field name does not say "password".
        redact(&out).into_owned()
    }
}

/// `[header]` and its fields, then its nested tables and arrays of tables.
fn render_table(
    out: &mut String,
    header: &str,
    path: &str,
    table: &toml::Table,
    origins: &Origins,
) {
    let _ = write!(out, "\n[{header}]\n");
    render_fields(out, header, path, table, origins);
}

/// The scalar fields of `table`, then its nested tables. `header` names the table in TOML
/// (`drain.tables`), `path` names it for [`Origins`] (`consumer[1]`).
fn render_fields(
    out: &mut String,
    header: &str,
    path: &str,
    table: &toml::Table,
    origins: &Origins,
) {
    let mut nested = Vec::new();
    for (key, value) in table {
        let field = format!("{path}.{key}");
        let is_table_array = value
            .as_array()
            .is_some_and(|a| !a.is_empty() && a.iter().all(toml::Value::is_table));
        if value.is_table() || is_table_array {
            nested.push((key, value));
            continue;
        }
        if SECRET_FIELDS.contains(&key.as_str()) {
            // A secret is never printed; a set one shows as a comment, so the output still loads
            // (without it: secrets come from password_file, token_file or the environment).
            if value.as_str().is_some_and(|s| !s.is_empty()) {
                let _ = writeln!(out, "# {key} is set ({}): {REDACTED}", origins.get(&field));
            }
            continue;
        }
        let _ = writeln!(out, "{key} = {value}  # {}", origins.get(&field));
    }
    for (key, value) in nested {
        let field = format!("{path}.{key}");
        let header = format!("{header}.{key}");
        match value {
            toml::Value::Table(inner) => render_table(out, &header, &field, inner, origins),
            toml::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let toml::Value::Table(inner) = item {
                        let _ = write!(out, "\n[[{header}]]\n");
                        render_fields(out, &header, &format!("{field}[{i}]"), inner, origins);
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    #[test]
    fn the_rendered_configuration_loads_back_to_the_same_values() {
        let text = "[[stream]]\nname = \"S\"\nsubjects = [\"s.>\"]\n\n[wal]\nsegment_bytes_max = 1048576\n\n\
                    [[drain.passthrough]]\ndata_type = \"ticker\"\ntable = \"tickers\"\n\n\
                    [drain.tables.trades]\nrows_max = 5000\n";
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, text).expect("write");
        let (config, origins) = Config::load_with_origins(Some(&path), Vec::new()).expect("loads");
        let rendered = config.render_effective(&origins);
        let back = Config::parse_toml(&rendered).unwrap_or_else(|e| panic!("{e}\n{rendered}"));
        assert_eq!(back, config, "{rendered}");
        assert!(
            rendered.contains("segment_bytes_max = 1048576  # file"),
            "{rendered}"
        );
        assert!(
            rendered.contains("group_bytes_max = 1048576  # derived from wal.segment_bytes_max"),
            "{rendered}"
        );
        assert!(rendered.contains("rows_max = 5000  # file"), "{rendered}");
        assert!(rendered.contains("[[drain.passthrough]]"), "{rendered}");
        assert!(
            rendered.contains("table = \"tickers\"  # file"),
            "{rendered}"
        );
    }
}
