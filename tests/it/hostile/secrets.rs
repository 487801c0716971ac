//! Secrets never leak: every command, run on configurations holding a marker secret in every
//! place a secret can go (URLs, password and token fields, files, the environment), keeps it out
//! of its output and logs, and no flag takes a password.

use std::fs;

use super::command_with_env;
use crate::harness::{free_port, wait_until, Bed, RelayConfig, RelayProc, READY_TIMEOUT, STREAMS};

/// A secret no output may ever show.
const MARKER: &str = "Zq7MarkerSecretXy";

/// Asserts that `output` of `what` does not show the marker and does show `expected`.
fn assert_hidden(what: &str, output: &str, expected: &str) {
    assert!(
        !output.contains(MARKER),
        "{what} printed the secret:\n{output}"
    );
    assert!(
        output.contains(expected),
        "{what} did not get as far as {expected:?}:\n{output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_prints_a_secret_held_in_any_place_of_the_configuration() {
    let bed = Bed::start();
    // `check` reaches ClickHouse only once the consumers' streams exist.
    let js = bed.js().await;
    for (name, subjects) in STREAMS {
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: name.to_string(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
        .expect("create stream");
    }
    let closed = free_port();
    let dir = bed.dir.path();
    let write = |name: &str, config: &RelayConfig| -> String {
        config.write(&dir.join(name)).display().to_string()
    };
    let secret_file = dir.join("secret");
    fs::write(&secret_file, format!("{MARKER}\n")).expect("write secret file");

    // 1. A password in an unreachable NATS URL: check, run, verify and loadgen fail to connect.
    let mut unreachable = bed.config();
    unreachable.nats_url = format!("nats://alice:{MARKER}@127.0.0.1:{closed}");
    let path = write("nats-url.toml", &unreachable);
    for args in [
        vec!["check", "--config", &path],
        vec!["run", "--config", &path],
        vec!["verify", "--config", &path],
        vec![
            "loadgen",
            "--config",
            &path,
            "--count",
            "1",
            "--progress",
            "false",
        ],
    ] {
        let (status, output) = command_with_env(&args, &[]).await;
        assert!(!status.success(), "{args:?} succeeded:\n{output}");
        assert_hidden(&format!("{args:?}"), &output, "NATS");
    }

    // 2. Invalid URLs holding a password: validation names the field, not the secret.
    let mut bad_nats = bed.config();
    bad_nats.nats_url = format!("http://alice:{MARKER}@127.0.0.1:4222");
    let mut bad_ch = bed.config();
    bad_ch.clickhouse_url = format!("tcp://default:{MARKER}@127.0.0.1:9000");
    for (name, config, field) in [
        ("bad-nats.toml", &bad_nats, "nats.url"),
        ("bad-ch.toml", &bad_ch, "clickhouse.url"),
    ] {
        let path = write(name, config);
        for command in ["check", "run", "replay"] {
            let (status, output) = command_with_env(&[command, "--config", &path], &[]).await;
            assert!(!status.success(), "{command} {name} succeeded:\n{output}");
            assert_hidden(&format!("{command} {name}"), &output, field);
        }
    }

    // 3. A password in an unreachable ClickHouse URL: check, schema apply, replay and verify.
    let mut ch_url = bed.config();
    ch_url.clickhouse_url = format!("http://default:{MARKER}@127.0.0.1:{closed}");
    let path = write("ch-url.toml", &ch_url);
    for (args, expected) in [
        (vec!["check", "--config", &path], "clickhouse"),
        (vec!["schema", "apply", "--config", &path], "ClickHouse"),
        (vec!["replay", "--config", &path], "ClickHouse"),
        (vec!["verify", "--config", &path], "ClickHouse"),
    ] {
        let (status, output) = command_with_env(&args, &[]).await;
        assert!(!status.success(), "{args:?} succeeded:\n{output}");
        assert_hidden(&format!("{args:?}"), &output, expected);
    }

    // The commands that need no server succeed on that configuration and stay clean too.
    for (args, expected) in [
        (
            vec!["schema", "print", "--config", &path, "--profile", "legacy"],
            "CREATE TABLE",
        ),
        (vec!["wal", "inspect", "--config", &path], "segments"),
    ] {
        let (status, output) = command_with_env(&args, &[]).await;
        assert!(status.success(), "{args:?} failed:\n{output}");
        assert_hidden(&format!("{args:?}"), &output, expected);
    }

    // 4. Passwords and tokens from fields, files and the environment: every command's output
    // and the running relay's log stay clean. The servers have no authentication, so NATS
    // accepts any credentials and ClickHouse refuses the wrong password.
    let path = write("fields.toml", &bed.config());
    let env_secrets = [
        ("PRISM_RELAY_NATS_USER", "alice"),
        ("PRISM_RELAY_NATS_PASSWORD", MARKER),
        ("PRISM_RELAY_CLICKHOUSE_PASSWORD", MARKER),
    ];
    let (_, output) = command_with_env(&["check", "--config", &path], &env_secrets).await;
    assert_hidden(
        "check with secrets in the environment",
        &output,
        "clickhouse",
    );
    let token_file = secret_file.display().to_string();
    let (_, output) = command_with_env(
        &["check", "--config", &path],
        &[
            ("PRISM_RELAY_NATS_TOKEN_FILE", token_file.as_str()),
            ("PRISM_RELAY_CLICKHOUSE_PASSWORD_FILE", token_file.as_str()),
        ],
    )
    .await;
    assert_hidden("check with secrets in files", &output, "clickhouse");
    // The password file is read: ClickHouse refuses it like the wrong password it is.
    assert!(output.contains("unreachable"), "{output}");

    // The running relay: a ClickHouse that refuses the password is retried and logged.
    let mut running = bed.config();
    running.clickhouse_url = format!("http://default:{MARKER}@127.0.0.1:{closed}");
    let relay = RelayProc::spawn(&bed, "secret-run", &running);
    wait_until(
        "the relay logs that ClickHouse is not ready",
        READY_TIMEOUT,
        || async { relay.log().contains("ClickHouse not ready") },
    )
    .await;
    drop(relay);
    let log = fs::read_to_string(bed.path("secret-run.log")).unwrap_or_default();
    assert_hidden("run", &log, "ClickHouse not ready");

    // 5. No flag takes a password: it would show in `ps`.
    let (status, output) = command_with_env(
        &[
            "verify",
            "--clickhouse-password",
            MARKER,
            "--nats-url",
            "nats://127.0.0.1:1",
        ],
        &[],
    )
    .await;
    assert_eq!(status.code(), Some(2), "the flag was accepted:\n{output}");
}
