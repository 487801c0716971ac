//! Servers must not outlive the test process, even when it dies by SIGKILL and no
//! destructor runs: a copy of this test binary starts a server and is killed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::TestResult;

/// Set in the environment of the copy of this binary that plays the doomed test process.
const HELPER_ENV: &str = "PRISM_TESTBED_LIFETIME_HELPER";

/// Bound on the helper reporting its server and on the server's death being visible.
const HELPER_DEADLINE_MS: u64 = 15_000;

/// Marks the helper's report line; libtest may print the test's name on the same line.
const REPORT_MARKER: &str = "prism-testbed-lifetime-server:";

/// Poll interval while waiting for the server to disappear.
const POLL_INTERVAL_MS: u64 = 10;

/// In the helper copy only: starts a server, reports its pid and directory on stdout,
/// then waits to be killed. In a normal run it has nothing to do.
#[test]
fn helper_that_starts_a_server_and_waits_to_be_killed() -> TestResult {
    if std::env::var_os(HELPER_ENV).is_none() {
        return Ok(());
    }
    let nats = prism_testbed::Nats::start()?;
    let pid = nats.pid().ok_or("a started server has a pid")?;
    println!("{REPORT_MARKER}{pid} {}", nats.data_dir().display());
    // Blocks until the parent kills this process; stdin is a pipe it never writes.
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(())
}

#[test]
fn server_dies_when_the_test_process_is_killed_with_sigkill() -> TestResult {
    let mut helper = Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "process_lifetime::helper_that_starts_a_server_and_waits_to_be_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = helper.stdout.take().ok_or("helper stdout is piped")?;
    // Read on a thread so a helper that never reports cannot hang this test.
    let (report_tx, report_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some((_, report)) = line.split_once(REPORT_MARKER) {
                // The receiver may have given up already; nothing to do then.
                let _ = report_tx.send(report.to_owned());
                return;
            }
        }
    });
    let report = report_rx.recv_timeout(Duration::from_millis(HELPER_DEADLINE_MS));
    let Ok(report) = report else {
        helper.kill()?;
        helper.wait()?;
        return Err("the helper reported no server".into());
    };
    let (pid, store) = report.split_once(' ').ok_or("report is `pid dir`")?;
    let pid: u32 = pid.parse()?;
    let server_dir = Path::new(store)
        .parent()
        .ok_or("the store is inside the server's directory")?
        .to_owned();
    assert!(is_alive(pid), "server {pid} runs while the helper lives");

    helper.kill()?;
    helper.wait()?;

    let deadline = Instant::now() + Duration::from_millis(HELPER_DEADLINE_MS);
    while is_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
    }
    let alive = is_alive(pid);
    // No destructor ran in the helper, so its directory is left for us to remove.
    remove_dir(&server_dir);
    assert!(!alive, "server {pid} died with the process that started it");
    Ok(())
}

/// Alive means present and not a zombie waiting for its new parent to reap it.
fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|close| stat[close + 1..].trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

fn remove_dir(dir: &PathBuf) {
    // Best effort: a leftover directory in /tmp is no reason to fail the test.
    let _ = std::fs::remove_dir_all(dir);
}
