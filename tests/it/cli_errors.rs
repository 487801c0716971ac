//! What an operator sees when something is wrong: the real binary run on bad inputs (a missing,
//! malformed or invalid configuration, servers that do not answer or refuse, a WAL directory that
//! cannot be used). Each message must say its key fact exactly once (no cause repeated by the
//! error chain), name the file, field or flag involved, say what to do, and end with the exit
//! status that the top-level `--help` documents for its kind of failure.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use prism_testbed::{free_ports, ClickHouse};

/// How long one command may run: every case here fails fast (nothing retries), so a command
/// still running at the deadline is itself a failure.
const COMMAND_DEADLINE_S: u64 = 30;

/// How often a running command is polled for its exit.
const POLL_INTERVAL_MS: u64 = 20;

/// What a command printed (stdout and stderr, in that order) and its exit status.
struct Outcome {
    code: Option<i32>,
    output: String,
}

/// Runs `prism-relay args...` with `env` added and no PRISM_RELAY_* from the test's own
/// environment, to completion within [`COMMAND_DEADLINE_S`].
fn relay(args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut command = Command::new(env!("CARGO_BIN_EXE_prism-relay"));
    command
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).expect("stdout file"))
        .stderr(fs::File::create(&err_path).expect("stderr file"));
    for (name, _) in std::env::vars() {
        if name.starts_with("PRISM_RELAY_") {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    let mut child = command.spawn().expect("spawn prism-relay");
    let deadline = Instant::now() + Duration::from_secs(COMMAND_DEADLINE_S);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("prism-relay {args:?} still runs after {COMMAND_DEADLINE_S} s");
        }
        std::thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
    };
    let output = fs::read_to_string(&out_path).unwrap_or_default()
        + &fs::read_to_string(&err_path).unwrap_or_default();
    Outcome {
        code: status.code(),
        output,
    }
}

/// The exit status `prism-relay --help` documents for the failure whose line starts with `kind`.
fn documented_exit(kind: &str) -> i32 {
    let help = relay(&["--help"], &[]).output;
    let section = help
        .split("Exit status:")
        .nth(1)
        .unwrap_or_else(|| panic!("--help documents no exit status:\n{help}"));
    section
        .lines()
        .map(str::trim)
        .find_map(|line| {
            let (code, meaning) = line.split_once("  ")?;
            meaning.starts_with(kind).then(|| code.parse().ok())?
        })
        .unwrap_or_else(|| panic!("--help has no exit status for {kind:?}:\n{section}"))
}

fn occurrences(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

/// Asserts the outcome: exit status, each of `once` exactly once, each of `present` at least once.
fn assert_outcome(outcome: &Outcome, exit: i32, once: &[&str], present: &[&str]) {
    let output = &outcome.output;
    assert_eq!(outcome.code, Some(exit), "exit status; output:\n{output}");
    for needle in once {
        assert_eq!(
            occurrences(output, needle),
            1,
            "{needle:?} must appear exactly once in:\n{output}"
        );
    }
    for needle in present {
        assert!(
            output.contains(needle),
            "{needle:?} missing from:\n{output}"
        );
    }
}

/// A configuration file in `dir` with a WAL in `wal_dir`, servers on ports nobody listens on
/// (unless given), the metrics endpoint on a free port, and `extra` appended.
fn config_file(dir: &Path, wal_dir: &Path, clickhouse_url: Option<&str>, extra: &str) -> PathBuf {
    let [nats_port, clickhouse_port, metrics_port] = free_ports::<3>().expect("free ports");
    let clickhouse_url = clickhouse_url.map_or_else(
        || format!("http://127.0.0.1:{clickhouse_port}"),
        String::from,
    );
    let path = dir.join("relay.toml");
    fs::write(
        &path,
        format!(
            "[nats]\nurl = \"nats://127.0.0.1:{nats_port}\"\nconnect_timeout_ms = 1000\n\n\
             [clickhouse]\nurl = \"{clickhouse_url}\"\nconnect_timeout_ms = 1000\n\n\
             [wal]\ndir = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n{extra}",
            wal_dir.display()
        ),
    )
    .expect("write configuration");
    path
}

#[test]
fn a_missing_configuration_file_is_named_once_with_the_flag_to_fix_and_the_configuration_status() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let missing = dir.path().join("absent.toml");
    let outcome = relay(&["check", "--config", missing.to_str().unwrap()], &[]);
    assert_outcome(
        &outcome,
        documented_exit("invalid configuration"),
        &[
            "cannot read config file",
            "No such file or directory",
            &missing.display().to_string(),
        ],
        &["--config", "PRISM_RELAY_CONFIG"],
    );
}

#[test]
fn a_toml_syntax_error_is_shown_once_with_its_line_and_where_the_fields_are_documented() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("relay.toml");
    fs::write(&path, "[nats\nurl = \"nats://127.0.0.1:4222\"\n").unwrap();
    let outcome = relay(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_outcome(
        &outcome,
        documented_exit("invalid configuration"),
        &[
            "TOML parse error at line 1",
            "[nats",
            "invalid config file",
            &path.display().to_string(),
        ],
        &["relay.example.toml"],
    );
}

#[test]
fn an_unknown_field_is_named_once_with_the_fields_that_exist() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("relay.toml");
    fs::write(&path, "[nats]\nurll = \"nats://127.0.0.1:4222\"\n").unwrap();
    let outcome = relay(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_outcome(
        &outcome,
        documented_exit("invalid configuration"),
        &["unknown field `urll`", &path.display().to_string()],
        &["expected one of `url`"],
    );
}

#[test]
fn an_out_of_range_value_is_named_once_with_its_bounds_and_the_fix() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = config_file(dir.path(), &dir.path().join("wal"), None, "");
    let text = fs::read_to_string(&path)
        .unwrap()
        .replace("[clickhouse]\n", "[clickhouse]\ninsert_timeout_ms = 5\n");
    fs::write(&path, text).unwrap();
    let outcome = relay(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_outcome(
        &outcome,
        documented_exit("invalid configuration"),
        &["invalid configuration", "clickhouse.insert_timeout_ms = 5"],
        &["allowed 1000", "raise insert_timeout_ms"],
    );
}

#[test]
fn check_reports_unreachable_nats_and_clickhouse_each_once_with_the_setting_to_fix() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = config_file(dir.path(), &dir.path().join("wal"), None, "");
    let outcome = relay(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_outcome(
        &outcome,
        documented_exit("the command ran and found problems"),
        &["cannot connect to NATS", "ClickHouse statement"],
        &["nats.url", "clickhouse.url", "check: problems found"],
    );
    for server in ["nats:", "clickhouse:"] {
        let line = outcome
            .output
            .lines()
            .find(|l| l.starts_with(server))
            .unwrap_or_else(|| panic!("no {server} line in:\n{}", outcome.output));
        assert_eq!(occurrences(line, "Connection refused"), 1, "{line}");
    }
}

#[test]
fn run_stops_on_unreachable_nats_with_the_cause_once_and_the_failure_status() {
    // `run` waits for ClickHouse (the WAL absorbs data meanwhile) but needs NATS to bind its
    // consumers, so an unreachable NATS ends it.
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = config_file(dir.path(), &dir.path().join("wal"), None, "");
    let outcome = relay(&["run", "--config", path.to_str().unwrap()], &[]);
    assert_outcome(
        &outcome,
        documented_exit("failure"),
        &["cannot connect to NATS", "Connection refused"],
        &["nats.url"],
    );
}

#[test]
fn a_wrong_clickhouse_password_is_reported_once_with_the_user_and_password_settings() {
    let clickhouse = ClickHouse::start().expect("clickhouse-server");
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = config_file(
        dir.path(),
        &dir.path().join("wal"),
        Some(&clickhouse.http_url()),
        "",
    );
    // The test bed's `default` user has no password: any password is the wrong one.
    let outcome = relay(
        &["check", "--config", path.to_str().unwrap()],
        &[("PRISM_RELAY_CLICKHOUSE_PASSWORD", "not-the-password")],
    );
    let line = outcome
        .output
        .lines()
        .find(|l| l.starts_with("clickhouse:"))
        .unwrap_or_else(|| panic!("no clickhouse: line in:\n{}", outcome.output));
    assert_eq!(
        occurrences(line, "Wrong password for user default"),
        1,
        "{line}"
    );
    assert!(
        !outcome.output.contains("not-the-password"),
        "{}",
        outcome.output
    );
    assert_outcome(
        &outcome,
        documented_exit("the command ran and found problems"),
        &["ClickHouse statement"],
        &["clickhouse.user", "clickhouse.password_file"],
    );
}

#[test]
fn a_wal_directory_that_is_a_file_is_named_once_with_the_setting_and_the_fix() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("wal");
    fs::write(&file, "not a directory").unwrap();
    let path = config_file(dir.path(), &file, None, "");
    let outcome = relay(&["run", "--config", path.to_str().unwrap()], &[]);
    assert_outcome(
        &outcome,
        documented_exit("failure"),
        &["cannot open the WAL", "File exists"],
        &["`wal.dir`", "not a directory", &file.display().to_string()],
    );
    let outcome = relay(&["wal", "inspect", "--dir", file.to_str().unwrap()], &[]);
    assert_outcome(
        &outcome,
        documented_exit("failure"),
        &["cannot read the WAL directory", "Not a directory"],
        &["--dir"],
    );
}

/// Makes a directory immutable (`chattr +i`: not even root may create files in it) for its
/// lifetime, so the test can see a WAL directory the relay cannot write.
struct Immutable(PathBuf);

impl Immutable {
    fn new(dir: &Path) -> Immutable {
        let status = Command::new("chattr")
            .arg("+i")
            .arg(dir)
            .status()
            .expect("run chattr");
        assert!(status.success(), "chattr +i {} failed", dir.display());
        Immutable(dir.to_owned())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[test]
fn an_unwritable_wal_directory_is_named_once_with_what_to_do() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let wal = dir.path().join("wal");
    fs::create_dir(&wal).unwrap();
    let _immutable = Immutable::new(&wal);
    let path = config_file(dir.path(), &wal, None, "");
    let outcome = relay(&["run", "--config", path.to_str().unwrap()], &[]);
    assert_outcome(
        &outcome,
        documented_exit("failure"),
        &["cannot open the WAL", "Operation not permitted"],
        &["`wal.dir`", "write access", &wal.display().to_string()],
    );
}

/// CRC-32 (IEEE, reflected, as the WAL's `crc32fast`), bit by bit: a header's worth of bytes.
fn crc32_ieee(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn a_wal_of_another_format_version_is_refused_once_and_left_untouched() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let wal = dir.path().join("wal");
    fs::create_dir(&wal).unwrap();
    // A whole segment header as another version of the WAL would write it: magic, version,
    // CRC-32 of magic, version and first LSN, first LSN.
    let version = prism_wal::segment::SEGMENT_VERSION + 1;
    let mut header = Vec::new();
    header.extend_from_slice(&prism_wal::segment::SEGMENT_MAGIC);
    header.extend_from_slice(&version.to_le_bytes());
    let crc = crc32_ieee(&[header.as_slice(), &1u64.to_le_bytes()].concat());
    header.extend_from_slice(&crc.to_le_bytes());
    header.extend_from_slice(&1u64.to_le_bytes());
    let segment = wal.join("00000000000000000001.wal");
    fs::write(&segment, &header).unwrap();
    let path = config_file(dir.path(), &wal, None, "");
    let outcome = relay(&["run", "--config", path.to_str().unwrap()], &[]);
    assert_outcome(
        &outcome,
        documented_exit("failure"),
        &[&format!("WAL format version {version}")],
        &[
            &segment.display().to_string(),
            "drain it with the relay version",
        ],
    );
    assert_eq!(
        fs::read(&segment).unwrap(),
        header,
        "the segment was changed"
    );
    // `wal verify` reports it as a sentence an operator can read, not a Rust structure.
    let outcome = relay(&["wal", "verify", "--dir", wal.to_str().unwrap()], &[]);
    assert_outcome(
        &outcome,
        documented_exit("the command ran and found problems"),
        &[&format!(
            "corrupt: segment 00000000000000000001.wal at offset 0: format version {version}, \
             this build reads version"
        )],
        &[],
    );
    assert!(
        !outcome.output.contains("SegmentProblem"),
        "{}",
        outcome.output
    );
}

#[test]
fn config_prints_the_effective_values_with_their_origins_and_no_secret() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("relay.toml");
    fs::write(
        &path,
        "[wal]\nsegment_bytes_max = 1048576\n\n[clickhouse]\nuser = \"relay\"\n",
    )
    .unwrap();
    let outcome = relay(
        &["config", "--config", path.to_str().unwrap()],
        &[
            ("PRISM_RELAY_WAL_DIR", "/var/lib/prism-relay/wal"),
            ("PRISM_RELAY_CLICKHOUSE_PASSWORD", "hunter2-secret"),
        ],
    );
    assert_outcome(
        &outcome,
        0,
        &[
            "segment_bytes_max = 1048576  # file",
            "group_bytes_max = 1048576  # derived from wal.segment_bytes_max",
            "dir = \"/var/lib/prism-relay/wal\"  # env PRISM_RELAY_WAL_DIR",
            "user = \"relay\"  # file",
            "password is set (env PRISM_RELAY_CLICKHOUSE_PASSWORD): <redacted>",
        ],
        &["budget_bytes_max = 4294967296  # default", "[[consumer]]"],
    );
    assert!(!outcome.output.contains("hunter2"), "{}", outcome.output);
}

/// How long a relay on the test bed may take to log its start-up and a first status line.
const STARTUP_DEADLINE_S: u64 = 60;

/// `prism-relay run` on a configuration file, logging to a file; killed on drop.
struct Running {
    child: std::process::Child,
    log: PathBuf,
}

impl Running {
    fn start(config: &Path, log: PathBuf) -> Running {
        Running::start_with_env(config, log, &[])
    }

    fn start_with_env(config: &Path, log: PathBuf, env: &[(&str, &str)]) -> Running {
        let file = fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_prism-relay"))
            .args(["run", "--config", config.to_str().unwrap()])
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .env_remove("PRISM_RELAY_CONFIG")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log handle"))
            .stderr(file)
            .spawn()
            .expect("spawn prism-relay run");
        Running { child, log }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls the log until every one of `needles` is in it; panics with the log at the deadline
    /// or when the relay exits first.
    fn wait_for(&mut self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(STARTUP_DEADLINE_S);
        loop {
            let log = self.log();
            if needles.iter().all(|n| log.contains(n)) {
                return log;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("relay exited with {status}; log:\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "{needles:?} not all logged:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
        }
    }

    /// SIGTERM, then waits for the graceful exit.
    fn terminate(mut self) -> String {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(COMMAND_DEADLINE_S);
        while self.child.try_wait().expect("try_wait").is_none() {
            assert!(
                Instant::now() < deadline,
                "no exit after SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
        }
        self.log()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test bed's relay configuration with `[metrics] status_interval_s` set.
fn status_config(bed: &crate::harness::Bed, name: &str, interval_s: u64) -> PathBuf {
    let text = bed.config().to_toml().replace(
        "[metrics]\n",
        &format!("[metrics]\nstatus_interval_s = {interval_s}\n"),
    );
    assert!(text.contains("status_interval_s"), "{text}");
    let path = bed.path(&format!("{name}.toml"));
    fs::write(&path, text).expect("write configuration");
    path
}

/// The log line of the periodic status (the message, then its fields).
const STATUS_LINE: &str = "run: status in_per_s=";

#[test]
fn start_up_says_what_the_relay_does_and_a_status_line_follows_every_interval() {
    let bed = crate::harness::Bed::start();
    let config = status_config(&bed, "status", 1);
    let mut relay = Running::start(&config, bed.path("status.log"));
    let log = relay.wait_for(&[
        "WAL recovered",
        "budget_bytes=",
        "use_percent=",
        "serving /metrics, /health and /ready",
        "consumer bound",
        "durable=prism-relay-trades",
        "pending=Some(",
        "version=\"18.16",
        "profile=\"legacy\"",
        "a status line follows every metrics.status_interval_s",
        STATUS_LINE,
    ]);
    let status = log
        .lines()
        .find(|l| l.contains(STATUS_LINE))
        .expect("a status line");
    for field in [
        "rows_out_per_s=",
        "backlog_records=",
        "wal_bytes=",
        "wal_use_percent=",
    ] {
        assert!(status.contains(field), "{field} missing: {status}");
    }
    assert!(status.contains(" INFO "), "not at info level: {status}");
}

#[test]
fn a_status_interval_of_zero_logs_no_status_line() {
    let bed = crate::harness::Bed::start();
    let config = status_config(&bed, "quiet", 0);
    let mut relay = Running::start(&config, bed.path("quiet.log"));
    relay.wait_for(&[
        "no status line (metrics.status_interval_s = 0)",
        "ClickHouse schema checked; draining",
    ]);
    let log = relay.terminate();
    assert!(!log.contains(STATUS_LINE), "{log}");
}

#[test]
fn run_with_a_wrong_clickhouse_password_warns_with_the_settings_to_fix_while_it_waits() {
    let bed = crate::harness::Bed::start();
    let config = status_config(&bed, "password", 60);
    let mut relay = Running::start_with_env(
        &config,
        bed.path("password.log"),
        &[("PRISM_RELAY_CLICKHOUSE_PASSWORD", "not-the-password")],
    );
    // A refused password is no passing outage: it is reported as a refusal, with the settings.
    let log = relay.wait_for(&["ClickHouse refuses the relay", "Wrong password"]);
    let warning = log
        .lines()
        .find(|l| l.contains("ClickHouse refuses the relay"))
        .expect("the refusal");
    assert!(
        warning.contains("clickhouse.user") && warning.contains("clickhouse.password_file"),
        "{warning}"
    );
    assert!(!log.contains("not-the-password"), "{log}");
}
