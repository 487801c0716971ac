//! A standalone ZooKeeper (Debian's `zookeeper` package) on a free port in a temporary
//! directory: the coordinator of ClickHouse's replicated tables in the cluster test bed.
//!
//! The package ships the server as jars in `/usr/share/java` and a `zkServer.sh` that daemonises
//! it; the test bed runs the JVM directly (`QuorumPeerMain` with a `zoo.cfg` written here) so the
//! process is its child, dies with it, and can be killed with SIGKILL like the other servers.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::process::{
    open_append, wait_ready, BinarySpec, LogFile, Probe, ServerProcess, StartFailure,
};
use crate::server::{Launch, Server, ServerSpec};
use crate::{TestbedError, PROBE_TIMEOUT_MS, ZOOKEEPER_READY_TIMEOUT_MS};

const SERVER: &str = "java";

const INSTALL_HINT: &str =
    "run scripts/test, which installs Debian's zookeeper package (and Java) with apt-get";

const SPEC: ServerSpec = ServerSpec {
    binary: BinarySpec {
        name: SERVER,
        override_var: "PRISM_JAVA",
        fallback_dirs: &["/usr/bin"],
        install_hint: INSTALL_HINT,
    },
    label: "ZooKeeper",
    dir_prefix: "prism-zookeeper-",
    name_prefix: "prism-testbed-zookeeper",
};

/// Where Debian's `zookeeper` package and its dependencies put their jars.
const JAR_DIR: &str = "/usr/share/java";

/// The jars the standalone server needs from [`JAR_DIR`] (the package's `zkServer.sh` puts only
/// `zookeeper.jar` on its class path and relies on the manifest; these are what the server loads:
/// its wire format, logging through slf4j to stderr, netty, metrics, command-line parsing).
const JARS: [&str; 15] = [
    "zookeeper.jar",
    "zookeeper-jute.jar",
    "slf4j-api.jar",
    "slf4j-simple.jar",
    "netty-handler.jar",
    "netty-common.jar",
    "netty-buffer.jar",
    "netty-transport.jar",
    "netty-codec.jar",
    "netty-resolver.jar",
    "netty-transport-native-epoll.jar",
    "netty-transport-native-unix-common.jar",
    "metrics-core.jar",
    "commons-cli.jar",
    "snappy-java.jar",
];

/// The server's main class (standalone when the configuration names no quorum).
const MAIN_CLASS: &str = "org.apache.zookeeper.server.quorum.QuorumPeerMain";

/// ZooKeeper's time unit, in milliseconds. Sessions time out after 2 to 20 ticks; a short tick
/// lets a killed ClickHouse replica's session (and its `is_active` node) expire within seconds,
/// so its restart is not refused for long.
pub const ZOOKEEPER_TICK_MS: u32 = 500;

/// The JVM's heap, in MiB: a test's few thousand nodes need little, and the machine is shared.
const HEAP_MIB: u32 = 256;

/// Files in the server's directory.
const CONFIG_FILE: &str = "zoo.cfg";
const LOG_FILE: &str = "zookeeper.log";
const DATA_DIR: &str = "data";

/// A running (or killed, awaiting restart) standalone ZooKeeper.
///
/// Dropping it kills the server with SIGKILL and removes its directory.
#[derive(Debug)]
pub struct ZooKeeper {
    /// Ports `[client]`.
    server: Server<1>,
}

impl ZooKeeper {
    /// Starts a server on a free port and returns once it serves requests.
    pub fn start() -> Result<ZooKeeper, TestbedError> {
        let class_path = class_path()?;
        let server = Server::start(&SPEC, |run| {
            write_config(run.dir, run.ports[0])?;
            launch(run, &class_path)
        })?;
        Ok(ZooKeeper { server })
    }

    /// Client port.
    pub fn port(&self) -> u16 {
        self.server.ports()[0]
    }

    /// Connect string, `127.0.0.1:PORT`.
    pub fn connect_string(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    /// The snapshot and transaction log directory; it survives `kill9` and `restart`.
    pub fn data_dir(&self) -> PathBuf {
        self.server.dir().join(DATA_DIR)
    }

    /// The server's log (stdout and stderr of every run, appended).
    pub fn log_path(&self) -> PathBuf {
        self.server.dir().join(LOG_FILE)
    }

    /// Process id of the running server, `None` after `kill9`.
    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// Kills the server with SIGKILL and reaps it; the data directory stays.
    /// Does nothing when it is not running.
    pub fn kill9(&mut self) -> Result<(), TestbedError> {
        self.server.kill9()
    }

    /// Stops the server with SIGTERM (SIGKILL after [`crate::TERMINATE_TIMEOUT_MS`]);
    /// returns its exit status if it exited by itself.
    pub fn terminate(&mut self) -> Result<Option<ExitStatus>, TestbedError> {
        self.server.terminate()
    }

    /// Starts the server again on the same port and data directory and waits until it
    /// serves requests; a running server is killed with SIGKILL first.
    pub fn restart(&mut self) -> Result<(), TestbedError> {
        let class_path = class_path()?;
        self.server.restart(|run| launch(run, &class_path))
    }
}

/// The class path of the server, or an error naming the package when a jar is missing.
fn class_path() -> Result<String, TestbedError> {
    let mut paths = Vec::with_capacity(JARS.len());
    for jar in JARS {
        let path = Path::new(JAR_DIR).join(jar);
        if !path.is_file() {
            return Err(TestbedError::BinaryNotFound {
                binary: "zookeeper.jar (Debian's zookeeper package)",
                hint: INSTALL_HINT,
            });
        }
        paths.push(path.display().to_string());
    }
    Ok(paths.join(":"))
}

/// Writes `zoo.cfg`: standalone, the client port on 127.0.0.1, data in `dir`, no admin HTTP
/// server (it would take port 8080), and the four-letter commands the probe uses.
fn write_config(dir: &Path, port: u16) -> Result<(), TestbedError> {
    let config = format!(
        "tickTime={ZOOKEEPER_TICK_MS}\n\
         dataDir={data}\n\
         clientPort={port}\n\
         clientPortAddress=127.0.0.1\n\
         admin.enableServer=false\n\
         4lw.commands.whitelist=conf,ruok,srvr,mntr\n",
        data = dir.join(DATA_DIR).display(),
    );
    let path = dir.join(CONFIG_FILE);
    std::fs::write(&path, config)
        .map_err(|e| TestbedError::io(format!("writing {}", path.display()), e))
}

/// Spawns one server and waits until it serves requests and is known to be ours.
fn launch(run: &Launch<1>, class_path: &str) -> Result<ServerProcess, StartFailure> {
    let Launch {
        binary,
        dir,
        name: _,
        ports: [port],
    } = *run;
    let log_path = dir.join(LOG_FILE);
    let log = LogFile::from_end(log_path.clone());
    let stdout = open_append(&log_path)?;
    let stderr = stdout
        .try_clone()
        .map_err(|e| TestbedError::io("duplicating the ZooKeeper log handle", e))?;
    let mut command = Command::new(binary);
    command
        .arg(format!("-Xmx{HEAP_MIB}m"))
        .arg("-cp")
        .arg(class_path)
        .arg(MAIN_CLASS)
        .arg(dir.join(CONFIG_FILE))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    let mut process = ServerProcess::spawn(SERVER, command)?;
    let data_dir = dir.join(DATA_DIR);
    wait_ready(
        &mut process,
        &[log],
        Duration::from_millis(ZOOKEEPER_READY_TIMEOUT_MS),
        || probe(port, &data_dir),
    )?;
    Ok(process)
}

/// Ready when the `conf` command answers with our data directory (a stranger on the port
/// answers with another one, or not at all).
fn probe(port: u16, data_dir: &Path) -> Probe {
    match four_letter_word(port, "conf") {
        Ok(answer) if answer.contains(&format!("dataDir={}", data_dir.display())) => Probe::Ready,
        Ok(answer) if answer.contains("dataDir=") => Probe::Stranger,
        _ => Probe::NotYet,
    }
}

/// Sends one of ZooKeeper's four-letter commands and returns the answer, read to its end.
fn four_letter_word(port: u16, command: &str) -> std::io::Result<String> {
    let timeout = Duration::from_millis(PROBE_TIMEOUT_MS);
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&address, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(command.as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}
