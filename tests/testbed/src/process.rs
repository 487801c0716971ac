//! Process plumbing shared by the servers: finding a binary, picking free ports,
//! spawning a child that dies with the test process, signalling and reaping it,
//! polling a readiness probe against a deadline, and reading a log's tail.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::{TestbedError, LOG_TAIL_BYTES_MAX, READY_POLL_INTERVAL_MS};

/// Lowest port handed to a server: above the well-known and commonly configured
/// service ports.
const PORT_RANGE_START: u16 = 10_000;

/// Fewest ports below the ephemeral range that make picking there worthwhile;
/// with fewer, random picks would collide too often.
const PORT_RANGE_PORTS_MIN: usize = 1_000;

/// Random picks tried before giving up on finding one free port.
const PORT_PICKS_MAX: u32 = 100;

/// Where to look for an executable, in order.
pub(crate) struct BinarySpec {
    /// Executable name, also used in messages.
    pub(crate) name: &'static str,
    /// Environment variable that, when set, names the executable to use.
    pub(crate) override_var: &'static str,
    /// Directories searched after `PATH`.
    pub(crate) fallback_dirs: &'static [&'static str],
    /// How to install it, for the not-found message.
    pub(crate) install_hint: &'static str,
}

impl BinarySpec {
    /// Finds the executable from the real environment.
    pub(crate) fn locate(&self) -> Result<PathBuf, TestbedError> {
        self.locate_in(
            std::env::var_os(self.override_var),
            std::env::var_os("PATH"),
        )
    }

    /// Finds the executable given the override variable's and `PATH`'s values
    /// (separate from [`BinarySpec::locate`] so tests need not change the process environment).
    pub(crate) fn locate_in(
        &self,
        override_value: Option<OsString>,
        path_value: Option<OsString>,
    ) -> Result<PathBuf, TestbedError> {
        if let Some(value) = override_value.filter(|v| !v.is_empty()) {
            let path = PathBuf::from(&value);
            return if is_executable(&path) {
                Ok(path)
            } else {
                Err(TestbedError::BadOverride {
                    variable: self.override_var,
                    path: path.display().to_string(),
                })
            };
        }
        let path_dirs = path_value
            .as_deref()
            .map(|p| std::env::split_paths(p).collect::<Vec<_>>())
            .unwrap_or_default();
        let fallback_dirs = self.fallback_dirs.iter().map(PathBuf::from);
        path_dirs
            .into_iter()
            .chain(fallback_dirs)
            .map(|dir| dir.join(self.name))
            .find(|candidate| is_executable(candidate))
            .ok_or(TestbedError::BinaryNotFound {
                binary: self.name,
                hint: self.install_hint,
            })
    }
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Picks `N` distinct ports that were free a moment ago.
///
/// Ports come from below the kernel's ephemeral range when it leaves room
/// (`[PORT_RANGE_START, ephemeral start)`): the kernel never hands those out to
/// outgoing connections or to `bind(0)`, so a port stays ours while a killed server
/// is down and `restart` can bind it again. Otherwise they come from `bind(0)`.
/// Each port is checked by binding it, and all are held together so they differ;
/// another process may still take one before the server binds it, and callers retry then.
/// Public so that tests can give other processes (the relay's metrics listener) ports
/// picked the same way.
pub fn free_ports<const N: usize>() -> Result<[u16; N], TestbedError> {
    let mut listeners = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    let below_ephemeral = ephemeral_port_start()
        .filter(|&start| start > PORT_RANGE_START)
        .filter(|&start| usize::from(start - PORT_RANGE_START) >= PORT_RANGE_PORTS_MIN);
    for port in ports.iter_mut() {
        let listener = match below_ephemeral {
            Some(end) => bind_random_port_in(PORT_RANGE_START, end)?,
            None => TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .map_err(|e| TestbedError::io("binding a probe socket to find a free port", e))?,
        };
        *port = listener
            .local_addr()
            .map_err(|e| TestbedError::io("reading a probe socket's port", e))?
            .port();
        listeners.push(listener);
    }
    Ok(ports)
}

/// Binds a random free port in `[start, end)`.
fn bind_random_port_in(start: u16, end: u16) -> Result<TcpListener, TestbedError> {
    let span = u64::from(end - start);
    let mut last_error = None;
    for _ in 0..PORT_PICKS_MAX {
        // The modulo keeps the value below `span`, which fits in u16.
        let port = start + (random_u64() % span) as u16;
        match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            Ok(listener) => return Ok(listener),
            Err(e) => last_error = Some(e),
        }
    }
    Err(TestbedError::io(
        format!("finding a free port in [{start}, {end}) in {PORT_PICKS_MAX} picks"),
        last_error.unwrap_or_else(|| io::Error::other("no pick was made")),
    ))
}

/// First port of the kernel's ephemeral range, if it can be read.
fn ephemeral_port_start() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

/// A random number from std's per-process random hash keys, mixed with a counter
/// and the clock so successive calls differ; good enough to spread port picks.
fn random_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// A name no other server started on this machine at the same time carries:
/// used to tell our server from a stranger that took our port.
pub(crate) fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A request to the spawner thread.
struct SpawnRequest {
    command: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// Spawns `command` so that the child gets SIGKILL when this process dies.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the
/// process. Test threads, tokio's blocking threads (which retire after idling) and
/// any thread a handle is moved away from may end long before the server should, so
/// every fork happens on one spawner thread that lives as long as the process.
fn spawn_tied_to_this_process(mut command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("prism-testbed-spawner".into())
            .spawn(move || {
                for mut request in rx {
                    // The requester may have given up (it never does today); nothing to do then.
                    let _ = request.reply.send(request.command.spawn());
                }
            })
            .ok()
            .map(|_| tx)
    });
    let Some(spawner) = spawner else {
        return Err(io::Error::other("could not start the spawner thread"));
    };

    let parent_pid = std::process::id();
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: it calls prctl and getppid (both plain
    // system calls), does not allocate, and builds its error from a raw errno.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl, which the death
            // signal would then never report.
            if libc::getppid() as u32 != parent_pid {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let (reply, replied) = mpsc::channel();
    spawner
        .send(SpawnRequest { command, reply })
        .map_err(|_| io::Error::other("the spawner thread has stopped"))?;
    replied
        .recv()
        .map_err(|_| io::Error::other("the spawner thread has stopped"))?
}

/// A running server process; killed with SIGKILL and reaped when dropped.
#[derive(Debug)]
pub(crate) struct ServerProcess {
    server: &'static str,
    child: Option<Child>,
}

impl ServerProcess {
    pub(crate) fn spawn(server: &'static str, command: Command) -> Result<Self, TestbedError> {
        let child = spawn_tied_to_this_process(command)
            .map_err(|e| TestbedError::io(format!("spawning {server}"), e))?;
        Ok(ServerProcess {
            server,
            child: Some(child),
        })
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal`. The child is not reaped until `kill9`, so its pid cannot have
    /// been reused by another process.
    pub(crate) fn signal(&self, signal: libc::c_int) -> Result<(), TestbedError> {
        let pid = self.pid().ok_or(TestbedError::NotRunning {
            server: self.server,
        })?;
        let pid = libc::pid_t::try_from(pid)
            .map_err(|_| TestbedError::io("signalling", io::Error::other("pid out of range")))?;
        // SAFETY: kill(2) has no memory-safety preconditions; pid is our unreaped child.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(TestbedError::io(
                format!("sending signal {signal} to {} (pid {pid})", self.server),
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// SIGSTOP, then waits until the kernel reports the process stopped, so the caller
    /// knows the server is frozen when this returns.
    pub(crate) fn pause(&self, timeout: Duration) -> Result<(), TestbedError> {
        self.signal(libc::SIGSTOP)?;
        self.wait_for_state(true, timeout)
    }

    /// SIGCONT, then waits until the process runs again.
    pub(crate) fn resume(&self, timeout: Duration) -> Result<(), TestbedError> {
        self.signal(libc::SIGCONT)?;
        self.wait_for_state(false, timeout)
    }

    fn wait_for_state(&self, stopped: bool, timeout: Duration) -> Result<(), TestbedError> {
        let pid = self.pid().ok_or(TestbedError::NotRunning {
            server: self.server,
        })?;
        let stat_path = format!("/proc/{pid}/stat");
        let deadline = Instant::now() + timeout;
        loop {
            let stat = std::fs::read_to_string(&stat_path)
                .map_err(|e| TestbedError::io(format!("reading {stat_path}"), e))?;
            if is_stopped_state(&stat) == stopped {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(TestbedError::io(
                    format!(
                        "waiting for {} (pid {pid}) to become {}",
                        self.server,
                        if stopped { "stopped" } else { "running" }
                    ),
                    io::Error::new(io::ErrorKind::TimedOut, stat.trim().to_owned()),
                ));
            }
            thread::sleep(Duration::from_millis(READY_POLL_INTERVAL_MS));
        }
    }

    /// SIGKILL and reap; does nothing when not running. SIGKILL also ends a stopped process.
    pub(crate) fn kill9(&mut self) -> Result<(), TestbedError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // kill() fails only if the child already exited; wait() reaps it either way.
        let _ = child.kill();
        child
            .wait()
            .map_err(|e| TestbedError::io(format!("reaping {}", self.server), e))?;
        Ok(())
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit, then falls back to SIGKILL.
    /// Returns the exit status when the server exited by itself.
    pub(crate) fn terminate(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<ExitStatus>, TestbedError> {
        if self.child.is_none() {
            return Ok(None);
        }
        // A stopped process would not act on SIGTERM until continued.
        self.signal(libc::SIGTERM)?;
        self.signal(libc::SIGCONT)?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.try_exit()? {
                return Ok(Some(status));
            }
            thread::sleep(Duration::from_millis(READY_POLL_INTERVAL_MS));
        }
        self.kill9()?;
        Ok(None)
    }

    /// The exit status if the process has exited (it is then reaped and forgotten).
    pub(crate) fn try_exit(&mut self) -> Result<Option<ExitStatus>, TestbedError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let status = child
            .try_wait()
            .map_err(|e| TestbedError::io(format!("polling {}", self.server), e))?;
        if status.is_some() {
            self.child = None;
        }
        Ok(status)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // Nothing useful can be done with a failure here; the death signal and the
        // temporary directory's removal still clean up.
        let _ = self.kill9();
    }
}

/// What one readiness probe found.
pub(crate) enum Probe {
    /// The server answers and it is ours.
    Ready,
    /// Not answering yet (connection refused, not yet healthy).
    NotYet,
    /// Another process answers on our port: ours cannot have bound it.
    Stranger,
}

/// How a start attempt ended when it did not succeed.
pub(crate) enum StartFailure {
    /// A port was taken; a fresh start on other ports may work.
    PortTaken { log_tail: String },
    /// Anything else: retrying would not help.
    Fatal(TestbedError),
}

impl From<TestbedError> for StartFailure {
    fn from(e: TestbedError) -> Self {
        StartFailure::Fatal(e)
    }
}

/// A log file and where the current run's output starts in it: logs are appended
/// across restarts, and only this run's lines may explain this run's failure.
#[derive(Debug, Clone)]
pub(crate) struct LogFile {
    path: PathBuf,
    offset_bytes: u64,
}

impl LogFile {
    /// Marks the current end of `path` (zero if it does not exist yet).
    pub(crate) fn from_end(path: PathBuf) -> LogFile {
        let offset_bytes = path.metadata().map(|m| m.len()).unwrap_or(0);
        LogFile { path, offset_bytes }
    }

    /// The whole of `path`.
    pub(crate) fn from_start(path: PathBuf) -> LogFile {
        LogFile {
            path,
            offset_bytes: 0,
        }
    }
}

/// Polls `probe` until it reports ready, the process exits, or `timeout` passes.
/// On failure the process is killed.
pub(crate) fn wait_ready(
    process: &mut ServerProcess,
    logs: &[LogFile],
    timeout: Duration,
    mut probe: impl FnMut() -> Probe,
) -> Result<(), StartFailure> {
    let started = Instant::now();
    let deadline = started + timeout;
    loop {
        if let Some(status) = process.try_exit()? {
            let log_tail = log_tail(logs);
            return Err(if mentions_port_in_use(&log_tail) {
                StartFailure::PortTaken { log_tail }
            } else {
                StartFailure::Fatal(TestbedError::ExitedEarly {
                    server: process.server,
                    status: status.to_string(),
                    log_tail,
                })
            });
        }
        match probe() {
            Probe::Ready => return Ok(()),
            Probe::Stranger => {
                process.kill9()?;
                return Err(StartFailure::PortTaken {
                    log_tail: log_tail(logs),
                });
            }
            Probe::NotYet => {}
        }
        if Instant::now() >= deadline {
            process.kill9()?;
            return Err(StartFailure::Fatal(TestbedError::NotReady {
                server: process.server,
                waited_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                log_tail: log_tail(logs),
            }));
        }
        thread::sleep(Duration::from_millis(READY_POLL_INTERVAL_MS));
    }
}

/// Whether a `/proc/PID/stat` line shows a stopped process. The state letter follows
/// the command name in parentheses, which may itself contain spaces and parentheses.
fn is_stopped_state(stat: &str) -> bool {
    stat.rfind(')')
        .and_then(|close| stat[close + 1..].trim_start().chars().next())
        .is_some_and(|state| state == 'T' || state == 't')
}

fn mentions_port_in_use(log: &str) -> bool {
    log.to_ascii_lowercase().contains("address already in use")
}

/// Opens `path` for appending, creating it if needed: logs are kept across restarts.
pub(crate) fn open_append(path: &Path) -> Result<File, TestbedError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| TestbedError::io(format!("opening {}", path.display()), e))
}

/// Runs `attempt` until it succeeds, fails for a reason other than a taken port, or
/// `attempts_max` attempts found their ports taken.
pub(crate) fn retry_on_port_taken<T>(
    server: &'static str,
    attempts_max: u32,
    mut attempt: impl FnMut() -> Result<T, StartFailure>,
) -> Result<T, TestbedError> {
    let mut last_tail = String::new();
    for _ in 0..attempts_max {
        match attempt() {
            Ok(value) => return Ok(value),
            Err(StartFailure::Fatal(e)) => return Err(e),
            Err(StartFailure::PortTaken { log_tail }) => last_tail = log_tail,
        }
    }
    Err(TestbedError::PortsUnavailable {
        server,
        attempts: attempts_max,
        log_tail: last_tail,
    })
}

/// The last [`LOG_TAIL_BYTES_MAX`] bytes of this run's part of each log file,
/// headed by the file's path.
pub(crate) fn log_tail(logs: &[LogFile]) -> String {
    let mut out = String::new();
    for log in logs {
        let Ok(tail) = read_tail(&log.path, log.offset_bytes, LOG_TAIL_BYTES_MAX) else {
            continue;
        };
        if tail.trim().is_empty() {
            continue;
        }
        out.push_str(&format!(
            "==> {} <==\n{}\n",
            log.path.display(),
            tail.trim_end()
        ));
    }
    if out.is_empty() {
        out.push_str("(no log output)");
    }
    out
}

fn read_tail(path: &Path, offset_bytes: u64, bytes_max: u64) -> io::Result<String> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(
        len.saturating_sub(bytes_max).max(offset_bytes),
    ))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: BinarySpec = BinarySpec {
        name: "sh",
        override_var: "PRISM_TESTBED_UNUSED",
        fallback_dirs: &["/bin", "/usr/bin"],
        install_hint: "install a shell",
    };

    #[test]
    fn override_wins_over_path_and_fallbacks() {
        let found = SPEC
            .locate_in(Some("/bin/sh".into()), Some("/nonexistent".into()))
            .unwrap();
        assert_eq!(found, PathBuf::from("/bin/sh"));
    }

    #[test]
    fn override_naming_a_missing_file_is_an_error_not_a_fallback() {
        let err = SPEC
            .locate_in(Some("/nonexistent/sh".into()), Some("/bin".into()))
            .unwrap_err();
        assert!(matches!(err, TestbedError::BadOverride { .. }), "{err}");
    }

    #[test]
    fn fallback_directories_are_searched_after_path() {
        let found = SPEC.locate_in(None, Some("/nonexistent".into())).unwrap();
        assert!(found.ends_with("sh"), "{}", found.display());
    }

    #[test]
    fn missing_binary_names_itself_and_how_to_install_it() {
        let spec = BinarySpec {
            name: "surely-not-installed-anywhere",
            fallback_dirs: &[],
            ..SPEC
        };
        let err = spec.locate_in(None, Some("/bin".into())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "surely-not-installed-anywhere not found: install a shell"
        );
    }

    #[test]
    fn stopped_state_is_read_after_the_command_name() {
        assert!(is_stopped_state("42 (clickhouse-serv) T 1 42 42 0"));
        assert!(!is_stopped_state("42 (odd ) T name) S 1 42 42 0"));
        assert!(!is_stopped_state("42 (nats-server) S 1 42"));
    }

    #[test]
    fn free_ports_are_distinct() {
        let [a, b, c] = free_ports::<3>().unwrap();
        assert!(a != b && b != c && a != c);
    }

    #[test]
    fn free_ports_avoid_the_ephemeral_range_when_there_is_room_below_it() {
        let start = ephemeral_port_start().expect("Linux exposes the ephemeral port range");
        let room_below =
            usize::from(start.saturating_sub(PORT_RANGE_START)) >= PORT_RANGE_PORTS_MIN;
        for port in free_ports::<8>().unwrap() {
            if room_below {
                assert!(
                    (PORT_RANGE_START..start).contains(&port),
                    "{port} below {start}"
                );
            } else {
                assert!(port >= start, "{port} is an ephemeral port");
            }
        }
    }

    /// Spawns `sh -c script` with its output in a log file inside `dir`.
    fn spawn_script(dir: &Path, script: &str) -> (ServerProcess, LogFile) {
        let log_path = dir.join("out.log");
        let log = LogFile::from_end(log_path.clone());
        let out = File::create(&log_path).unwrap();
        let mut command = Command::new("sh");
        command
            .args(["-c", script])
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        (ServerProcess::spawn("test-server", command).unwrap(), log)
    }

    #[test]
    fn server_exiting_during_start_up_is_reported_with_its_log_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (mut process, log) = spawn_script(dir.path(), "echo 'bad flag -zz'; exit 3");
        let result = wait_ready(&mut process, &[log], Duration::from_secs(10), || {
            Probe::NotYet
        });
        match result {
            Err(StartFailure::Fatal(TestbedError::ExitedEarly {
                status, log_tail, ..
            })) => {
                assert!(status.contains('3'), "{status}");
                assert!(log_tail.contains("bad flag -zz"), "{log_tail}");
            }
            _ => panic!("expected ExitedEarly"),
        }
    }

    #[test]
    fn server_exiting_on_a_taken_port_is_a_retryable_failure() {
        let dir = tempfile::tempdir().unwrap();
        let (mut process, log) = spawn_script(
            dir.path(),
            "echo 'listen tcp 127.0.0.1:4222: bind: address already in use'; exit 1",
        );
        let result = wait_ready(&mut process, &[log], Duration::from_secs(10), || {
            Probe::NotYet
        });
        assert!(matches!(result, Err(StartFailure::PortTaken { .. })));
    }

    #[test]
    fn server_that_never_gets_ready_is_killed_and_reported_with_its_log_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (mut process, log) = spawn_script(dir.path(), "echo 'still loading'; exec sleep 60");
        let pid = process.pid().unwrap();
        let result = wait_ready(&mut process, &[log], Duration::from_millis(200), || {
            Probe::NotYet
        });
        match result {
            Err(StartFailure::Fatal(TestbedError::NotReady {
                waited_ms,
                log_tail,
                ..
            })) => {
                assert!(waited_ms >= 200, "{waited_ms}");
                assert!(log_tail.contains("still loading"), "{log_tail}");
            }
            _ => panic!("expected NotReady"),
        }
        assert_eq!(process.pid(), None);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} is reaped"
        );
    }

    #[test]
    fn stranger_on_the_port_kills_our_server_and_asks_for_other_ports() {
        let dir = tempfile::tempdir().unwrap();
        let (mut process, log) = spawn_script(dir.path(), "exec sleep 60");
        let result = wait_ready(&mut process, &[log], Duration::from_secs(10), || {
            Probe::Stranger
        });
        assert!(matches!(result, Err(StartFailure::PortTaken { .. })));
        assert_eq!(process.pid(), None);
    }

    #[test]
    fn taken_ports_are_retried_up_to_the_bound_then_reported() {
        let mut attempts = 0;
        let result = retry_on_port_taken("test-server", 3, || {
            attempts += 1;
            if attempts < 3 {
                Err(StartFailure::PortTaken {
                    log_tail: format!("attempt {attempts}"),
                })
            } else {
                Ok(attempts)
            }
        });
        assert_eq!(result.unwrap(), 3);

        let result: Result<(), _> = retry_on_port_taken("test-server", 2, || {
            Err(StartFailure::PortTaken {
                log_tail: "in use".into(),
            })
        });
        match result {
            Err(TestbedError::PortsUnavailable {
                attempts, log_tail, ..
            }) => {
                assert_eq!(attempts, 2);
                assert_eq!(log_tail, "in use");
            }
            other => panic!("expected PortsUnavailable, got {other:?}"),
        }
    }

    #[test]
    fn pause_and_resume_wait_for_the_kernel_to_report_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let (process, _log) = spawn_script(dir.path(), "exec sleep 60");
        let pid = process.pid().unwrap();
        let stat = || std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        process.pause(Duration::from_secs(5)).unwrap();
        assert!(is_stopped_state(&stat()));
        process.resume(Duration::from_secs(5)).unwrap();
        assert!(!is_stopped_state(&stat()));
    }

    #[test]
    fn port_in_use_is_recognised_in_both_servers_wordings() {
        assert!(mentions_port_in_use(
            "<Error> Application: Net Exception: Address already in use: 127.0.0.1:18123"
        ));
        assert!(mentions_port_in_use(
            "[FTL] Error listening on port: 127.0.0.1:4222, \"listen tcp 127.0.0.1:4222: bind: address already in use\""
        ));
    }
}
