//! Secrets never leak: every command, run with a marker secret in every place a secret can go
//! (password and token files, the environment, URLs given in the environment), keeps it out of
//! its output and logs; a configuration file holding a secret is refused without showing it; and
//! no flag takes a password, nor a URL flag credentials.

use std::fs;

use super::command_with_env;
use crate::harness::{free_port, relay_bin, wait_until, Bed, RelayConfig, READY_TIMEOUT, STREAMS};

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

    // 1. A password in an unreachable NATS URL from the environment: check, run, verify and
    // loadgen fail to connect.
    let path = write("plain.toml", &bed.config());
    let nats_url = format!("nats://alice:{MARKER}@127.0.0.1:{closed}");
    let nats_env = [("PRISM_RELAY_NATS_URL", nats_url.as_str())];
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
            "--no-progress",
        ],
    ] {
        let (status, output) = command_with_env(&args, &nats_env).await;
        assert!(!status.success(), "{args:?} succeeded:\n{output}");
        assert_hidden(&format!("{args:?}"), &output, "NATS");
    }

    // 2. Invalid URLs holding a password, from the environment: validation names the field, not
    // the secret.
    let bad_nats = format!("http://alice:{MARKER}@127.0.0.1:4222");
    let bad_ch = format!("tcp://default:{MARKER}@127.0.0.1:9000");
    for (var, url, field) in [
        ("PRISM_RELAY_NATS_URL", &bad_nats, "nats.url"),
        ("PRISM_RELAY_CLICKHOUSE_URL", &bad_ch, "clickhouse.url"),
    ] {
        for command in ["check", "run", "replay"] {
            let (status, output) =
                command_with_env(&[command, "--config", &path], &[(var, url.as_str())]).await;
            assert!(!status.success(), "{command} {var} succeeded:\n{output}");
            assert_hidden(&format!("{command} {var}"), &output, field);
        }
    }

    // 3. A password in an unreachable ClickHouse URL from the environment: check, schema apply,
    // replay and verify.
    let ch_url = format!("http://default:{MARKER}@127.0.0.1:{closed}");
    let ch_env = [("PRISM_RELAY_CLICKHOUSE_URL", ch_url.as_str())];
    for (args, expected) in [
        (vec!["check", "--config", &path], "clickhouse"),
        (vec!["schema", "apply", "--config", &path], "ClickHouse"),
        (vec!["replay", "--config", &path], "ClickHouse"),
        (vec!["verify", "--config", &path], "ClickHouse"),
    ] {
        let (status, output) = command_with_env(&args, &ch_env).await;
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
        let (status, output) = command_with_env(&args, &ch_env).await;
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
    assert!(output.contains("Wrong password"), "{output}");

    // Every other command, with the secrets in each place outside the file: the environment
    // (passwords, a token), password and token files, and a URL from the environment whose
    // password holds characters ('/', '@') that end a URL pattern early.
    let odd_url = format!("http://default:{MARKER}/x@y@127.0.0.1:{closed}");
    let odd_nats = format!("nats://alice:{MARKER}/x@127.0.0.1:{closed}");
    let odd_invalid = format!("tcp://default:{MARKER}/x@y@127.0.0.1:9000");
    let placements: [Vec<(&str, &str)>; 6] = [
        env_secrets.to_vec(),
        vec![
            ("PRISM_RELAY_NATS_TOKEN", MARKER),
            ("PRISM_RELAY_CLICKHOUSE_PASSWORD_FILE", token_file.as_str()),
        ],
        vec![
            ("PRISM_RELAY_NATS_USER", "alice"),
            ("PRISM_RELAY_NATS_PASSWORD_FILE", token_file.as_str()),
        ],
        vec![("PRISM_RELAY_CLICKHOUSE_URL", odd_url.as_str())],
        vec![("PRISM_RELAY_NATS_URL", odd_nats.as_str())],
        vec![("PRISM_RELAY_CLICKHOUSE_URL", odd_invalid.as_str())],
    ];
    for env in &placements {
        for args in [
            vec!["check", "--config", &path],
            vec!["replay", "--config", &path],
            vec!["schema", "print", "--config", &path],
            vec!["schema", "apply", "--config", &path],
            vec!["wal", "inspect", "--config", &path],
            vec!["verify", "--config", &path, "--idle-timeout-ms", "1000"],
            vec![
                "loadgen",
                "--config",
                &path,
                "--count",
                "1",
                "--no-progress",
            ],
        ] {
            let (_, output) = command_with_env(&args, env).await;
            assert!(!output.is_empty(), "{args:?} {env:?} said nothing");
            assert_hidden(&format!("{args:?} with {env:?}"), &output, "");
        }
    }

    // The running relay, with every secret in the environment: a ClickHouse it cannot reach is
    // retried and logged.
    let log_path = bed.path("secret-run.log");
    let relay = EnvRelay::spawn(
        &path,
        &log_path,
        &[
            ("PRISM_RELAY_CLICKHOUSE_URL", ch_url.as_str()),
            ("PRISM_RELAY_NATS_USER", "alice"),
            ("PRISM_RELAY_NATS_PASSWORD", MARKER),
        ],
    );
    wait_until(
        "the relay logs that ClickHouse is not ready",
        READY_TIMEOUT,
        || async {
            fs::read_to_string(&log_path)
                .unwrap_or_default()
                .contains("ClickHouse not ready")
        },
    )
    .await;
    drop(relay);
    let log = fs::read_to_string(&log_path).unwrap_or_default();
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
    // Nor a URL flag carrying credentials: refused by name before anything connects.
    let flag_nats = format!("nats://alice:{MARKER}@127.0.0.1:{closed}");
    let flag_ch = format!("http://default:{MARKER}@127.0.0.1:{closed}");
    for (args, flag) in [
        (vec!["verify", "--nats-url", &flag_nats], "--nats-url"),
        (
            vec!["verify", "--clickhouse-url", &flag_ch],
            "--clickhouse-url",
        ),
        (
            vec!["loadgen", "--nats-url", &flag_nats, "--count", "1"],
            "--nats-url",
        ),
    ] {
        let (status, output) = command_with_env(&args, &[]).await;
        assert!(!status.success(), "{flag} was accepted:\n{output}");
        assert_hidden(&format!("{args:?}"), &output, flag);
        assert_hidden(&format!("{args:?}"), &output, "--config");
    }

    // 6. A secret in the configuration file, in any place one could be written: every command
    // refuses the file, naming the field and the fix, and never shows the secret.
    let secret_files = [
        (
            "nats.password",
            format!("[nats]\nuser = \"alice\"\npassword = \"{MARKER}\"\n"),
        ),
        ("nats.token", format!("[nats]\ntoken = \"{MARKER}\"\n")),
        (
            "nats.url",
            format!("[nats]\nurl = \"nats://alice:{MARKER}@127.0.0.1:{closed}\"\n"),
        ),
        (
            "nats.url",
            format!("[nats]\nurl = \"nats://{MARKER}@127.0.0.1:{closed}\"\n"),
        ),
        (
            "clickhouse.password",
            format!("[clickhouse]\npassword = \"{MARKER}\"\n"),
        ),
        (
            "clickhouse.url",
            format!("[clickhouse]\nurl = \"http://default:{MARKER}@127.0.0.1:{closed}\"\n"),
        ),
    ];
    for (i, (field, text)) in secret_files.iter().enumerate() {
        let path = dir.join(format!("secret-in-file-{i}.toml"));
        fs::write(&path, text).expect("write config");
        let path = path.display().to_string();
        for args in [
            vec!["check", "--config", &path],
            vec!["run", "--config", &path],
            vec!["replay", "--config", &path],
            vec!["schema", "print", "--config", &path],
            vec!["schema", "apply", "--config", &path],
            vec!["wal", "inspect", "--config", &path],
            vec!["verify", "--config", &path],
            vec!["loadgen", "--config", &path, "--count", "1"],
        ] {
            let (status, output) = command_with_env(&args, &[]).await;
            assert!(!status.success(), "{args:?} accepted {field}:\n{output}");
            assert_hidden(&format!("{args:?} {field}"), &output, field);
            assert_hidden(&format!("{args:?} {field}"), &output, "_file");
        }
    }
}

/// `prism-relay run` with extra environment, logging to a file; killed on drop.
struct EnvRelay {
    child: std::process::Child,
}

impl EnvRelay {
    fn spawn(config: &str, log_path: &std::path::Path, env: &[(&str, &str)]) -> EnvRelay {
        let log = fs::File::create(log_path).expect("create relay log");
        let err = log.try_clone().expect("clone log handle");
        let mut command = std::process::Command::new(relay_bin());
        command
            .args(["run", "--config", config])
            .env("RUST_LOG", "info")
            .env_remove("PRISM_RELAY_CONFIG")
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err);
        for (k, v) in env {
            command.env(k, v);
        }
        EnvRelay {
            child: command.spawn().expect("spawn prism-relay"),
        }
    }
}

impl Drop for EnvRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
