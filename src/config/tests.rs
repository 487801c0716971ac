//! Unit tests of the configuration: defaults, the example file (kept equal to the code),
//! environment overrides, secrets, and validation.

use std::path::{Path, PathBuf};

use super::limits::{GIB, MIB};
use super::*;
use crate::redact::redact;

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn invalid_fields(config: &Config) -> Vec<String> {
    match config.validate() {
        Ok(()) => Vec::new(),
        Err(e) => e.invalid_values().iter().map(|v| v.field.clone()).collect(),
    }
}

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("relay.example.toml")
}

#[test]
fn defaults_are_valid() {
    assert_eq!(
        Config::default().validate().map_err(|e| e.to_string()),
        Ok(())
    );
}

#[test]
fn loading_without_a_file_gives_the_defaults() {
    let config = Config::load_with_env(None, Vec::new()).expect("defaults load");
    assert_eq!(config, Config::default());
    assert_eq!(config.consumer.len(), 1);
    assert_eq!(config.consumer[0].stream, "MARKET_DATA");
    assert_eq!(config.consumer[0].max_deliver, -1);
    assert_eq!(config.metrics.listen.port(), 9094);
}

#[test]
fn example_file_equals_defaults_plus_its_streams_and_consumers() {
    let config = Config::load_with_env(Some(&example_path()), Vec::new())
        .unwrap_or_else(|e| panic!("relay.example.toml must load: {e}"));
    let expected = Config {
        stream: vec![
            StreamConfig {
                name: "MARKET_TRADES".to_owned(),
                subjects: vec!["trade.>".to_owned()],
                ..StreamConfig::default()
            },
            StreamConfig {
                name: "MARKET_BOOKS".to_owned(),
                subjects: vec!["orderbook.>".to_owned()],
                max_age_s: 86_400,
                ..StreamConfig::default()
            },
        ],
        consumer: vec![
            ConsumerConfig::default(),
            ConsumerConfig {
                stream: "MARKET_TRADES".to_owned(),
                durable: "prism-relay-trades".to_owned(),
                filter_subjects: vec!["trade.>".to_owned()],
                ..ConsumerConfig::default()
            },
            ConsumerConfig {
                stream: "MARKET_BOOKS".to_owned(),
                durable: "prism-relay-books".to_owned(),
                filter_subjects: vec!["orderbook.>".to_owned()],
                fetch_batch: 500,
                ..ConsumerConfig::default()
            },
        ],
        ..Config::default()
    };
    assert_eq!(config, expected);
}

#[test]
fn example_file_mentions_every_field_of_every_section() {
    let text = std::fs::read_to_string(example_path()).expect("example readable");
    let value: toml::Value = toml::Value::try_from(Config::default()).expect("serializes");
    let mut missing = Vec::new();
    let mut check = |prefix: &str, table: &toml::Table| {
        for (key, value) in table {
            // Nested tables ([drain.tables.*], [[drain.passthrough]]) are checked below.
            let nested = value.is_table()
                || value
                    .as_array()
                    .is_some_and(|a| a.is_empty() && key == "passthrough");
            if nested {
                continue;
            }
            let written =
                text.contains(&format!("\n{key} = ")) || text.contains(&format!("# {key} = "));
            if !written {
                missing.push(format!("{prefix}.{key}"));
            }
        }
    };
    for (section, body) in value.as_table().expect("table") {
        match body {
            toml::Value::Table(t) => check(section, t),
            toml::Value::Array(items) => {
                for item in items {
                    if let toml::Value::Table(t) = item {
                        check(section, t);
                    }
                }
            }
            _ => {}
        }
    }
    for table in TYPED_TABLES {
        if !text.contains(&format!("[drain.tables.{table}]")) {
            missing.push(format!("drain.tables.{table}"));
        }
    }
    if !text.contains("# [[drain.passthrough]]") {
        missing.push("drain.passthrough".to_owned());
    }
    // Optional fields are absent from the serialized defaults; they must be written
    // commented out.
    for key in [
        "user",
        "password",
        "password_file",
        "token",
        "token_file",
        "creds_file",
        "start_sequence",
        "ttl_days",
        "cluster",
    ] {
        if !text.contains(&format!("# {key} = ")) && !text.contains(&format!("\n{key} = ")) {
            missing.push(key.to_owned());
        }
    }
    assert!(missing.is_empty(), "relay.example.toml lacks {missing:?}");
}

#[test]
fn environment_overrides_scalar_fields_of_sections() {
    let config = Config::load_with_env(
        None,
        env(&[
            ("PRISM_RELAY_CLICKHOUSE_URL", "http://ch.example:8123"),
            ("PRISM_RELAY_NATS_URL", "nats://nats.example:4222"),
            ("PRISM_RELAY_WAL_DIR", "/var/lib/prism-relay/wal"),
            ("PRISM_RELAY_WAL_RECOVERY_MODE", "strict"),
            ("PRISM_RELAY_CLICKHOUSE_TTL_DAYS", "3"),
            ("PRISM_RELAY_CLICKHOUSE_PROFILE", "modern"),
            ("PRISM_RELAY_CLICKHOUSE_CREATE_SCHEMA", "true"),
            ("PRISM_RELAY_METRICS_LISTEN", "127.0.0.1:9100"),
            ("PRISM_RELAY_SHUTDOWN_TIMEOUT_MS", "5000"),
            ("PRISM_RELAY_SHUTDOWN_DRAIN", "true"),
            ("PRISM_RELAY_NATS_TOKEN", "s3cret"),
            // Not a section: belongs to the binary's flags and is left alone.
            ("PRISM_RELAY_CONFIG", "/etc/prism-relay.toml"),
            ("HOME", "/root"),
        ]),
    )
    .expect("overrides apply");
    assert_eq!(config.clickhouse.url, "http://ch.example:8123");
    assert_eq!(config.nats.url, "nats://nats.example:4222");
    assert_eq!(config.wal.dir, PathBuf::from("/var/lib/prism-relay/wal"));
    assert_eq!(config.wal.recovery_mode, RecoveryModeKind::Strict);
    assert_eq!(config.clickhouse.ttl_days, Some(3));
    assert_eq!(config.clickhouse.profile, ClickHouseProfile::Modern);
    assert!(config.clickhouse.create_schema);
    assert_eq!(config.metrics.listen, "127.0.0.1:9100".parse().unwrap());
    assert_eq!(config.shutdown.timeout_ms, 5_000);
    assert!(config.shutdown.drain);
    assert_eq!(config.nats.token.as_deref(), Some("s3cret"));
}

#[test]
fn environment_overrides_win_over_the_file_and_empty_clears_an_option() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("relay.toml");
    std::fs::write(
        &path,
        "[clickhouse]\nttl_days = 7\nurl = \"http://file:8123\"\n",
    )
    .expect("write");
    let config = Config::load_with_env(
        Some(&path),
        env(&[
            ("PRISM_RELAY_CLICKHOUSE_TTL_DAYS", ""),
            ("PRISM_RELAY_CLICKHOUSE_URL", "http://env:8123"),
        ]),
    )
    .expect("loads");
    assert_eq!(config.clickhouse.ttl_days, None);
    assert_eq!(config.clickhouse.url, "http://env:8123");
}

#[test]
fn secrets_in_the_file_are_refused_naming_each_field_and_its_fix_without_showing_them() {
    const SECRET: &str = "Zq7MarkerSecretXy";
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("relay.toml");
    let files = [
        (
            format!("[nats]\nuser = \"alice\"\npassword = \"{SECRET}\"\n"),
            "nats.password",
            "PRISM_RELAY_NATS_PASSWORD",
        ),
        (
            format!("[nats]\ntoken = \"{SECRET}\"\n"),
            "nats.token",
            "nats.token_file",
        ),
        (
            format!("[nats]\nurl = \"nats://alice:{SECRET}@127.0.0.1:4222\"\n"),
            "nats.url",
            "PRISM_RELAY_NATS_URL",
        ),
        (
            format!("[nats]\nurl = \"nats://a:4222,tls://{SECRET}@b:4222\"\n"),
            "nats.url",
            "PRISM_RELAY_NATS_URL",
        ),
        (
            format!("[clickhouse]\npassword = \"{SECRET}\"\n"),
            "clickhouse.password",
            "clickhouse.password_file",
        ),
        (
            format!("[clickhouse]\nurl = \"http://default:{SECRET}@127.0.0.1:8123\"\n"),
            "clickhouse.url",
            "PRISM_RELAY_CLICKHOUSE_URL",
        ),
    ];
    for (text, field, fix) in files {
        std::fs::write(&path, &text).expect("write");
        let err = Config::load_with_env(Some(&path), Vec::new()).expect_err(field);
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(
            matches!(err, ConfigError::SecretInFile { .. }),
            "{field}: {shown}"
        );
        assert_eq!(err.invalid_values()[0].field, field, "{shown}");
        assert!(shown.contains(fix), "{field}: {shown}");
    }
    // A user name in a ClickHouse URL and an empty password are no secrets.
    std::fs::write(
        &path,
        "[clickhouse]\nurl = \"http://default@127.0.0.1:8123\"\npassword = \"\"\n",
    )
    .expect("write");
    Config::load_with_env(Some(&path), Vec::new()).expect("no secret in the file");
}

#[test]
fn secrets_from_the_environment_and_from_files_are_allowed_next_to_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("relay.toml");
    let password = dir.path().join("password");
    std::fs::write(&password, "from-a-file\n").expect("write");
    std::fs::write(
        &path,
        format!(
            "[clickhouse]\npassword_file = {:?}\n",
            password.display().to_string()
        ),
    )
    .expect("write");
    let config = Config::load_with_env(
        Some(&path),
        env(&[
            (
                "PRISM_RELAY_NATS_URL",
                "nats://alice:from-env@127.0.0.1:4222",
            ),
            ("PRISM_RELAY_NATS_USER", ""),
        ]),
    )
    .expect("loads");
    assert_eq!(config.clickhouse.password, "from-a-file");
    assert_eq!(config.nats.url, "nats://alice:from-env@127.0.0.1:4222");
}

#[test]
fn loading_registers_every_secret_so_redaction_hides_it_outside_urls_and_assignments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "Tok/File@Zq7\n").expect("write");
    let token_var = token.display().to_string();
    let text = |secrets: &[&str]| format!("server said: bad credentials {}", secrets.join(" "));
    let secrets = ["Tok/File@Zq7", "Ch/Env@Zq7", "Url/Pw@Zq7"];
    let shown = redact(&text(&secrets)).into_owned();
    assert!(
        shown.contains("Tok/File@Zq7"),
        "not hidden before loading: {shown}"
    );
    Config::load_with_env(
        None,
        env(&[
            ("PRISM_RELAY_NATS_TOKEN_FILE", token_var.as_str()),
            ("PRISM_RELAY_CLICKHOUSE_PASSWORD", "Ch/Env@Zq7"),
            (
                "PRISM_RELAY_CLICKHOUSE_URL",
                "http://default:Url/Pw@Zq7@127.0.0.1:8123",
            ),
        ]),
    )
    .expect("loads");
    let shown = redact(&text(&secrets)).into_owned();
    for secret in secrets {
        assert!(!shown.contains(secret), "{secret}: {shown}");
    }
}

#[test]
fn a_validation_error_quoting_a_url_hides_a_password_the_url_pattern_cannot_find() {
    const SECRET: &str = "Zq7Odd/Pass@word";
    let err = Config::load_with_env(
        None,
        env(&[(
            "PRISM_RELAY_CLICKHOUSE_URL",
            "tcp://default:Zq7Odd/Pass@word@127.0.0.1:9000",
        )]),
    )
    .expect_err("not an HTTP URL");
    let text = err.to_string();
    assert!(text.contains("clickhouse.url"), "{text}");
    assert!(!text.contains("Zq7Odd") && !text.contains(SECRET), "{text}");
}

#[test]
fn every_listed_environment_override_is_accepted() {
    for (section, field) in ENV_OVERRIDES {
        let mut config = Config::default();
        let var = env_var_name(section, field);
        let result = config.apply_env(env(&[(&var, "")]));
        // Numbers reject "", strings accept it; what matters is that no listed name is unknown.
        assert!(
            !matches!(result, Err(ConfigError::UnknownEnv { .. })),
            "{var} is listed but not applied"
        );
    }
}

#[test]
fn unknown_environment_field_is_rejected_naming_it() {
    let err = Config::load_with_env(None, env(&[("PRISM_RELAY_NATS_URLS", "nats://x")]))
        .expect_err("unknown field");
    let text = err.to_string();
    assert!(text.contains("PRISM_RELAY_NATS_URLS"), "{text}");
    assert!(
        text.contains("PRISM_RELAY_NATS_URL"),
        "lists the known ones: {text}"
    );
}

#[test]
fn unparsable_environment_value_is_rejected_naming_the_variable() {
    let err = Config::load_with_env(
        None,
        env(&[("PRISM_RELAY_SHUTDOWN_TIMEOUT_MS", "ten seconds")]),
    )
    .expect_err("not a number");
    assert!(
        err.to_string().contains("PRISM_RELAY_SHUTDOWN_TIMEOUT_MS"),
        "{err}"
    );
    let err = Config::load_with_env(None, env(&[("PRISM_RELAY_WAL_RECOVERY_MODE", "lenient")]))
        .expect_err("not a mode");
    assert!(
        err.to_string().contains("PRISM_RELAY_WAL_RECOVERY_MODE"),
        "{err}"
    );
}

#[test]
fn unknown_field_in_the_file_is_rejected_naming_it() {
    let err = Config::parse_toml("[[consumer]]\nfetch_bach = 10\n").expect_err("unknown");
    assert!(err.to_string().contains("fetch_bach"), "{err}");
    let err = Config::parse_toml("[nats]\nurll = \"x\"\n").expect_err("unknown");
    assert!(err.to_string().contains("urll"), "{err}");
    let err = Config::parse_toml("[drain.tables.trades]\nrow_max = 1\n").expect_err("unknown");
    assert!(err.to_string().contains("row_max"), "{err}");
    let err = Config::parse_toml("[sink]\n").expect_err("unknown section");
    assert!(err.to_string().contains("sink"), "{err}");
}

#[test]
fn out_of_range_value_is_rejected_with_field_path_value_range_and_fix() {
    let config = Config::parse_toml(
        "[[consumer]]\ndurable = \"a\"\n[[consumer]]\ndurable = \"b\"\nfetch_batch = 0\n",
    )
    .expect("parses");
    let err = config.validate().expect_err("fetch_batch 0");
    let values = err.invalid_values();
    assert_eq!(values.len(), 1, "{err}");
    assert_eq!(values[0].field, "consumer[1].fetch_batch");
    assert_eq!(values[0].value, "0");
    assert_eq!(values[0].allowed, "1 ..= 10000 messages");
    assert!(
        values[0].fix.contains("raise fetch_batch"),
        "{}",
        values[0].fix
    );
    let text = err.to_string();
    assert!(text.contains("consumer[1].fetch_batch = 0"), "{text}");
}

#[test]
fn each_kind_of_invalid_value_is_rejected_naming_the_field() {
    type Case = (&'static str, fn(&mut Config));
    let cases: Vec<Case> = vec![
        ("nats.url", |c| c.nats.url = "http://127.0.0.1:4222".into()),
        ("nats.connect_timeout_ms", |c| c.nats.connect_timeout_ms = 0),
        ("nats.request_timeout_ms", |c| {
            c.nats.request_timeout_ms = 1_000_000
        }),
        ("nats.password", |c| c.nats.user = Some("u".into())),
        ("nats", |c| {
            c.nats.token = Some("t".into());
            c.nats.creds_file = Some("x.creds".into());
        }),
        ("stream[0].name", |c| {
            c.stream.push(stream("MARKET.TRADES", "trade.>"))
        }),
        ("stream[0].name", |c| {
            c.stream.push(stream("ORDERBOOK_SNAP", "orderbook.>"))
        }),
        ("stream[0].subjects[0]", |c| {
            c.stream.push(stream("S", "trade.>.x"))
        }),
        ("stream[0].subjects", |c| {
            let mut s = stream("S", "x");
            s.subjects.clear();
            c.stream.push(s);
        }),
        ("stream[0].max_age_s", |c| {
            let mut s = stream("S", "x.>");
            s.max_age_s = 5;
            c.stream.push(s);
        }),
        ("stream[0].max_bytes", |c| {
            let mut s = stream("S", "x.>");
            s.max_bytes = 0;
            c.stream.push(s);
        }),
        ("stream[0].max_msgs", |c| {
            let mut s = stream("S", "x.>");
            s.max_msgs = -5;
            c.stream.push(s);
        }),
        ("stream[0].duplicate_window_s", |c| {
            let mut s = stream("S", "x.>");
            s.max_age_s = 60;
            s.duplicate_window_s = 120;
            c.stream.push(s);
        }),
        ("stream[0].replicas", |c| {
            let mut s = stream("S", "x.>");
            s.replicas = 0;
            c.stream.push(s);
        }),
        ("stream[1].name", |c| {
            c.stream.push(stream("S", "x.>"));
            c.stream.push(stream("S", "y.>"));
        }),
        ("consumer[0].durable", |c| {
            c.consumer[0].durable = "a b".into()
        }),
        ("consumer[0].stream", |c| {
            c.consumer[0].stream = String::new()
        }),
        ("consumer[0].filter_subjects[1]", |c| {
            c.consumer[0].filter_subjects = vec!["trade.>".into(), "trade.>".into()]
        }),
        ("consumer[0].filter_subjects[0]", |c| {
            c.consumer[0].filter_subjects = vec!["trade..x".into()]
        }),
        ("consumer[0].start_sequence", |c| {
            c.consumer[0].deliver_policy = DeliverPolicyKind::ByStartSequence
        }),
        ("consumer[0].start_sequence", |c| {
            c.consumer[0].start_sequence = Some(5)
        }),
        ("consumer[0].ack_wait_ms", |c| {
            c.consumer[0].ack_wait_ms = 10
        }),
        ("consumer[0].max_ack_pending", |c| {
            c.consumer[0].max_ack_pending = 0;
        }),
        ("consumer[0].max_deliver", |c| c.consumer[0].max_deliver = 3),
        ("consumer[0].fetch_batch", |c| {
            c.consumer[0].fetch_batch = 50_000
        }),
        ("consumer[0].fetch_batch", |c| {
            c.consumer[0].max_ack_pending = 10
        }),
        ("consumer[0].fetch_bytes_max", |c| {
            c.consumer[0].fetch_bytes_max = 1024
        }),
        ("consumer[0].fetch_expires_ms", |c| {
            c.consumer[0].fetch_expires_ms = 10
        }),
        ("consumer[0].fetch_expires_ms", |c| {
            c.consumer[0].ack_wait_ms = 2_000;
            c.consumer[0].fetch_expires_ms = 5_000;
        }),
        ("consumer[1].durable", |c| {
            c.consumer.push(ConsumerConfig::default())
        }),
        ("wal.dir", |c| c.wal.dir = PathBuf::new()),
        ("wal.segment_bytes_max", |c| c.wal.segment_bytes_max = 1),
        ("wal.group_bytes_max", |c| c.wal.group_bytes_max = 128 * MIB),
        ("wal.budget_bytes_max", |c| {
            c.wal.budget_bytes_max = 100 * MIB
        }),
        ("wal.retention_bytes_max", |c| {
            c.wal.retention_bytes_max = 8 * GIB
        }),
        ("wal.retention_segments_max", |c| {
            c.wal.retention_segments_max = u32::MAX
        }),
        ("wal.retention_age_s", |c| c.wal.retention_age_s = u64::MAX),
        ("clickhouse.url", |c| {
            c.clickhouse.url = "tcp://127.0.0.1:9000".into()
        }),
        ("clickhouse.database", |c| {
            c.clickhouse.database = "market-prism".into()
        }),
        ("clickhouse.insert_timeout_ms", |c| {
            c.clickhouse.insert_timeout_ms = 0
        }),
        ("clickhouse.connect_timeout_ms", |c| {
            c.clickhouse.connect_timeout_ms = 0
        }),
        ("clickhouse.ttl_days", |c| c.clickhouse.ttl_days = Some(0)),
        ("clickhouse.ttl_days", |c| {
            c.clickhouse.ttl_days = Some(3);
            c.clickhouse.profile = ClickHouseProfile::Legacy;
        }),
        ("clickhouse.async_insert", |c| {
            c.clickhouse.async_insert = true;
            c.clickhouse.profile = ClickHouseProfile::Legacy;
        }),
        ("drain.flush_interval_ms", |c| c.drain.flush_interval_ms = 0),
        ("drain.retry_backoff_initial_ms", |c| {
            c.drain.retry_backoff_initial_ms = 0
        }),
        ("drain.retry_backoff_max_ms", |c| {
            c.drain.retry_backoff_max_ms = 50
        }),
        ("drain.dead_letter_table", |c| {
            c.drain.dead_letter_table = "1bad".into()
        }),
        ("drain.tables.trades.rows_max", |c| {
            c.drain.tables.get_mut("trades").unwrap().rows_max = 0
        }),
        ("drain.tables.orderbooks.bytes_max", |c| {
            c.drain.tables.get_mut("orderbooks").unwrap().bytes_max = 10
        }),
        ("drain.tables.liquidations.flush_interval_ms", |c| {
            c.drain
                .tables
                .get_mut("liquidations")
                .unwrap()
                .flush_interval_ms = 0
        }),
        ("drain.tables.trade", |c| {
            c.drain.tables.insert("trade".into(), TableBatch::TRADES);
        }),
        ("drain.passthrough[0].data_type", |c| {
            c.drain.passthrough.push(route("trade", "raw_trades"))
        }),
        ("drain.passthrough[0].data_type", |c| {
            c.drain.passthrough.push(route("ticker.x", "tickers"))
        }),
        ("drain.passthrough[1].data_type", |c| {
            c.drain.passthrough.push(route("ticker", "tickers"));
            c.drain.passthrough.push(route("ticker", "tickers2"));
        }),
        ("drain.passthrough[0].table", |c| {
            c.drain.passthrough.push(route("ticker", "trades"))
        }),
        ("shutdown.timeout_ms", |c| c.shutdown.timeout_ms = 1),
        ("metrics.connections_max", |c| c.metrics.connections_max = 0),
        ("metrics.header_read_timeout_ms", |c| {
            c.metrics.header_read_timeout_ms = 0
        }),
        ("metrics.request_timeout_ms", |c| {
            c.metrics.header_read_timeout_ms = 20_000;
            c.metrics.request_timeout_ms = 10_000;
        }),
        ("metrics.ready_insert_failing_s", |c| {
            c.metrics.ready_insert_failing_s = 0
        }),
        ("metrics.backlog_poll_interval_s", |c| {
            c.metrics.backlog_poll_interval_s = 0
        }),
    ];
    for (field, mutate) in cases {
        let mut config = Config::default();
        mutate(&mut config);
        let fields = invalid_fields(&config);
        assert!(
            fields.iter().any(|f| f == field),
            "expected {field} to be rejected, got {fields:?}"
        );
    }
}

#[test]
fn valid_edge_values_are_accepted() {
    let mut config = Config::default();
    config.stream.push(StreamConfig {
        max_age_s: 0,
        max_bytes: -1,
        max_msgs: -1,
        ..stream("MARKET_TRADES", "trade.>")
    });
    config.consumer[0].deliver_policy = DeliverPolicyKind::ByStartSequence;
    config.consumer[0].start_sequence = Some(1);
    config.consumer[0].max_deliver = CONSUMER_MAX_DELIVER_MIN;
    config.consumer[0].ack_policy = AckPolicyKind::All;
    config.nats.user = Some("u".into());
    config.nats.password = Some("p".into());
    config.nats.url = "nats://a:4222, tls://b:4222,127.0.0.1:4222".into();
    config.drain.passthrough.push(route("ticker", "tickers"));
    config
        .drain
        .tables
        .insert("tickers".into(), TableBatch::LOW_FREQUENCY);
    assert_eq!(invalid_fields(&config), Vec::<String>::new());
}

#[test]
fn partial_table_limits_keep_that_tables_other_defaults() {
    let config = Config::parse_toml("[drain.tables.orderbooks]\nrows_max = 100\n").expect("parses");
    let books = config.drain.table_batch("orderbooks");
    assert_eq!(books.rows_max, 100);
    assert_eq!(books.bytes_max, TableBatch::ORDERBOOKS.bytes_max);
    assert_eq!(config.drain.table_batch("trades"), TableBatch::TRADES);
    assert_eq!(
        config.drain.table_batch("tickers"),
        TableBatch::LOW_FREQUENCY
    );
    assert_eq!(config.drain.tables.len(), TYPED_TABLES.len());
}

#[test]
fn all_problems_are_reported_at_once() {
    let mut config = Config::default();
    config.consumer[0].fetch_batch = 0;
    config.shutdown.timeout_ms = 0;
    config.wal.segment_bytes_max = 0;
    let err = config.validate().expect_err("three problems");
    assert!(err.invalid_values().len() >= 3, "{err}");
}

#[test]
fn redacted_config_hides_secrets() {
    let mut config = Config::default();
    config.nats.token = Some("tok".into());
    config.clickhouse.password = "pw".into();
    let shown = toml::to_string(&config.redacted()).expect("serializes");
    assert!(
        !shown.contains("tok\"") && !shown.contains("\"pw\""),
        "{shown}"
    );
}

#[test]
fn debug_output_of_the_configuration_hides_passwords_tokens_and_url_credentials() {
    const SECRET: &str = "Zq7MarkerSecretXy";
    let mut config = Config::default();
    config.nats.url = format!("nats://alice:{SECRET}@127.0.0.1:4222");
    config.nats.user = Some("alice".into());
    config.nats.password = Some(SECRET.into());
    config.clickhouse.url = format!("http://default:{SECRET}@127.0.0.1:8123");
    config.clickhouse.password = SECRET.into();
    let shown = format!("{config:?} {:?} {:?}", config.nats, config.clickhouse);
    assert!(!shown.contains(SECRET), "{shown}");
    config.nats.user = None;
    config.nats.password = None;
    config.nats.token = Some(SECRET.into());
    let shown = format!("{config:#?}");
    assert!(!shown.contains(SECRET), "{shown}");
    assert!(
        shown.contains("127.0.0.1:4222"),
        "the rest stays visible: {shown}"
    );
}

#[test]
fn validation_errors_about_urls_holding_a_password_do_not_show_the_password() {
    const SECRET: &str = "Zq7MarkerSecretXy";
    let mut config = Config::default();
    config.nats.url = format!("http://alice:{SECRET}@127.0.0.1:4222");
    config.clickhouse.url = format!("tcp://default:{SECRET}@127.0.0.1:9000");
    let err = config.validate().expect_err("both URLs are invalid");
    let text = err.to_string();
    assert!(!text.contains(SECRET), "{text}");
    assert!(
        text.contains("nats.url") && text.contains("clickhouse.url"),
        "{text}"
    );
}

#[test]
fn a_table_name_that_collides_with_the_unrouted_lane_or_a_data_table_is_rejected_by_name() {
    let mut config = Config::default();
    config.drain.passthrough.push(route("ticker", "_unrouted"));
    assert!(
        invalid_fields(&config).contains(&"drain.passthrough[0].table".to_owned()),
        "{:?}",
        invalid_fields(&config)
    );
    for table in ["_unrouted", "trades"] {
        let mut config = Config::default();
        config.drain.dead_letter_table = table.into();
        assert!(
            invalid_fields(&config).contains(&"drain.dead_letter_table".to_owned()),
            "{table}: {:?}",
            invalid_fields(&config)
        );
    }
}

fn stream(name: &str, subject: &str) -> StreamConfig {
    StreamConfig {
        name: name.to_owned(),
        subjects: vec![subject.to_owned()],
        ..StreamConfig::default()
    }
}

fn route(data_type: &str, table: &str) -> PassthroughRoute {
    PassthroughRoute {
        data_type: data_type.to_owned(),
        table: table.to_owned(),
    }
}

#[test]
fn tls_files_that_cannot_work_are_refused_naming_the_field_and_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("client.pem");
    std::fs::write(&cert, "certificate").expect("write");
    let missing = dir.path().join("missing.pem");
    let mut c = Config::default();
    c.nats.tls_cert_file = Some(cert.clone());
    c.nats.tls_ca_file = Some(missing.clone());
    c.clickhouse.tls_key_file = Some(cert.clone());
    let err = c.validate().expect_err("refused");
    let text = err.to_string();
    // A certificate without its key (and the other way round), in each section.
    assert!(
        text.contains("nats.tls_key_file = <unset>") && text.contains("set nats.tls_key_file"),
        "{text}"
    );
    assert!(
        text.contains("clickhouse.tls_cert_file = <unset>")
            && text.contains("set clickhouse.tls_cert_file"),
        "{text}"
    );
    // A file that is not there names its path and the fix.
    assert!(
        text.contains(&format!("nats.tls_ca_file = {}", missing.display()))
            && text.contains("fix the path or make it readable"),
        "{text}"
    );
    // TLS files with a plain http:// ClickHouse URL would be ignored: refused instead.
    assert!(
        text.contains("clickhouse.url = http://127.0.0.1:8123") && text.contains("https://"),
        "{text}"
    );
    c.clickhouse.url = "https://ch.example:8443".into();
    c.clickhouse.tls_cert_file = Some(cert.clone());
    c.nats.tls_key_file = Some(cert);
    c.nats.tls_ca_file = None;
    assert_eq!(c.validate().map_err(|e| e.to_string()), Ok(()));
    assert!(c.nats.tls_wanted());
}

#[test]
fn an_nkey_seed_file_is_read_checked_and_hidden_and_a_file_without_a_seed_is_refused_without_its_content(
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let pair = nkeys::KeyPair::new_user();
    let seed = pair.seed().expect("a new key has a seed");
    let seed_file = dir.path().join("relay.nk");
    std::fs::write(&seed_file, format!("{seed}\n")).expect("write");
    let config = Config::load_with_env(
        None,
        env(&[(
            "PRISM_RELAY_NATS_NKEY_FILE",
            &seed_file.display().to_string(),
        )]),
    )
    .expect("loads");
    assert_eq!(config.nats.nkey_seed.as_deref(), Some(seed.as_str()));
    assert!(!format!("{config:?}").contains(seed.as_str()));
    assert!(!format!("{:?}", config.redacted()).contains(seed.as_str()));
    let said = format!("signing with {seed} failed");
    assert!(!redact(&said).contains(seed.as_str()), "{}", redact(&said));

    let not_a_seed = dir.path().join("public.nk");
    std::fs::write(&not_a_seed, pair.public_key()).expect("write");
    let err = Config::load_with_env(
        None,
        env(&[(
            "PRISM_RELAY_NATS_NKEY_FILE",
            &not_a_seed.display().to_string(),
        )]),
    )
    .expect_err("a public key is not a seed");
    let err = prism_wal::ErrorChain(&err).to_string();
    assert!(
        err.contains("nats.nkey_file") && err.contains("not an NKey user seed"),
        "{err}"
    );
    assert!(!err.contains(&pair.public_key()), "{err}");

    let mut both = Config::default();
    both.nats.nkey_file = Some(seed_file);
    both.nats.token = Some("t".into());
    assert!(invalid_fields(&both).contains(&"nats".to_owned()));
}

#[test]
fn the_log_format_comes_from_the_file_or_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, "[log]\nformat = \"json\"\n").expect("write");
    let config = Config::load_with_env(Some(&path), Vec::new()).expect("loads");
    assert_eq!(config.log.format, LogFormat::Json);
    let config = Config::load_with_env(Some(&path), env(&[("PRISM_RELAY_LOG_FORMAT", "human")]))
        .expect("loads");
    assert_eq!(config.log.format, LogFormat::Human);
    assert!(Config::load_with_env(None, env(&[("PRISM_RELAY_LOG_FORMAT", "xml")])).is_err());
}

#[test]
fn cluster_fields_are_validated_naming_the_field_and_the_fix() {
    let mut config = Config::default();
    config.clickhouse.cluster = Some("marketprism-2".into());
    config.clickhouse.replica_urls = vec!["http://ch-2:8123".into()];
    assert_eq!(config.validate().map_err(|e| e.to_string()), Ok(()));

    config.clickhouse.cluster = Some("bad name".into());
    config.clickhouse.zookeeper_path = "/clickhouse/tables/{shard}/shared".into();
    config.clickhouse.replica_urls = vec!["ch-2:9000".into()];
    assert_eq!(
        invalid_fields(&config),
        [
            "clickhouse.cluster",
            "clickhouse.zookeeper_path",
            "clickhouse.replica_urls"
        ]
    );
    let err = config.validate().expect_err("three problems").to_string();
    assert!(err.contains("each table needs a path of its own"), "{err}");

    let mut config = Config::default();
    config.clickhouse.zookeeper_path = "/x/'{table}".into();
    config.clickhouse.replica_urls = vec!["http://ch-2:8123".into()];
    assert_eq!(
        invalid_fields(&config),
        ["clickhouse.zookeeper_path", "clickhouse.replica_urls"]
    );
    let err = config
        .validate()
        .expect_err("replicas without a cluster")
        .to_string();
    assert!(err.contains("set clickhouse.cluster"), "{err}");
}

#[test]
fn the_cluster_and_its_zookeeper_path_come_from_the_environment_too() {
    let config = Config::load_with_env(
        None,
        env(&[
            ("PRISM_RELAY_CLICKHOUSE_CLUSTER", "marketprism"),
            (
                "PRISM_RELAY_CLICKHOUSE_ZOOKEEPER_PATH",
                "/ch/{shard}/{table}",
            ),
        ]),
    )
    .expect("valid overrides");
    assert_eq!(config.clickhouse.cluster.as_deref(), Some("marketprism"));
    assert_eq!(config.clickhouse.zookeeper_path, "/ch/{shard}/{table}");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, "[clickhouse]\ncluster = \"marketprism\"\n").expect("write");
    let config = Config::load_with_env(Some(&path), env(&[("PRISM_RELAY_CLICKHOUSE_CLUSTER", "")]))
        .expect("an empty value clears the cluster");
    assert_eq!(config.clickhouse.cluster, None);
}

#[test]
fn default_byte_limits_let_rows_max_cut_a_backlogs_batches() {
    // The largest payload of each typed table in MarketPrism's traffic (MARKETPRISM.md: order
    // book snapshots of 100 levels up to 7 KB, the others about half a kilobyte at most). A
    // byte limit below rows_max of them would cut a backlog into smaller inserts than rows_max
    // says, and each insert is a part ClickHouse writes and merges.
    let payload_bytes_max = |table: &str| -> u64 {
        match table {
            "orderbooks" => 7 * 1024,
            _ => 512,
        }
    };
    let config = Config::default();
    for table in TYPED_TABLES {
        let batch = config.drain.table_batch(table);
        assert!(
            batch.bytes_max >= u64::from(batch.rows_max) * payload_bytes_max(table),
            "{table}: bytes_max {} is reached before rows_max {} rows",
            batch.bytes_max,
            batch.rows_max
        );
    }
}
