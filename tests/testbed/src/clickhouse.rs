//! A `clickhouse-server` on free ports in a temporary directory, with a minimal
//! config written here and a tiny HTTP query client for setup and assertions.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::http;
use crate::process::{
    open_append, wait_ready, BinarySpec, LogFile, Probe, ServerProcess, StartFailure,
};
use crate::server::{Launch, Server, ServerSpec};
use crate::{
    TestbedError, CLICKHOUSE_READY_TIMEOUT_MS, CLUSTER_CONFIG_TIMEOUT_MS, PROBE_TIMEOUT_MS,
    QUERY_TIMEOUT_MS, READY_POLL_INTERVAL_MS,
};

const SERVER: &str = "clickhouse-server";

const SPEC: ServerSpec = ServerSpec {
    binary: BinarySpec {
        name: SERVER,
        override_var: "PRISM_CLICKHOUSE_SERVER",
        fallback_dirs: &["/usr/sbin", "/usr/bin"],
        install_hint:
            "run scripts/test, which installs clickhouse-server and clickhouse-client with apt-get",
    },
    label: "ClickHouse",
    dir_prefix: "prism-clickhouse-",
    name_prefix: "prism-testbed-clickhouse",
};

/// Users, profiles and quotas come from the Debian package (user `default`, no password).
const USERS_CONFIG: &str = "/etc/clickhouse-server/users.xml";

/// Mark cache size; the packaged 5 GiB would be far beyond what tests touch.
const MARK_CACHE_BYTES: u64 = 256 * 1024 * 1024;

/// Uncompressed block cache size (off by default in queries; kept small all the same).
const UNCOMPRESSED_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Macro whose value names this server, so the readiness probe can tell it from a
/// stranger that took its HTTP port.
const IDENTITY_MACRO: &str = "prism_testbed_id";

/// Files in the server's directory.
const CONFIG_FILE: &str = "config.xml";
const USERS_FILE: &str = "users.xml";
const CONSOLE_LOG_FILE: &str = "console.log";
const SERVER_LOG_FILE: &str = "clickhouse-server.log";
const ERROR_LOG_FILE: &str = "clickhouse-server.err.log";
const DATA_DIR: &str = "data";
/// The cluster definition of [`ClickHouse::set_cluster`], merged into the configuration by the
/// server (which rereads it while running).
const CLUSTER_CONFIG_FILE: &str = "config.d/remote_servers.xml";

/// The share of a replicated table's rows a replica may find on disk in parts ZooKeeper does
/// not know of, and still start (ClickHouse's default is 0.5). A replica killed with SIGKILL
/// right after it wrote or fetched a part leaves that part unregistered; in a production table
/// it is a sliver of the rows, but the test tables hold a few dozen rows, so one such part is
/// most of them and the server would refuse to start the table (`The local set of parts ...
/// doesn't look like the set of parts in ZooKeeper`, seen on a restart in the replica test).
/// The unexpected part is moved aside as the server does below the ratio; production servers
/// keep the default and use the `force_restore_data` flag (docs/OPERATIONS.md).
const WRONG_PARTS_RATIO_MAX: f64 = 1.0;

/// The ZooKeeper session timeout of a replica, in milliseconds: short, so a replica killed with
/// SIGKILL loses its `is_active` node within seconds and its restart can take it again. It must
/// lie within 2 to 20 ZooKeeper ticks ([`crate::ZOOKEEPER_TICK_MS`]).
const ZOOKEEPER_SESSION_TIMEOUT_MS: u32 = 6_000;

/// Where distributed DDL (`ON CLUSTER`) queues its tasks in ZooKeeper; 18.16 runs no DDL
/// worker without it.
const DISTRIBUTED_DDL_PATH: &str = "/clickhouse/task_queue/ddl";

/// Options of [`ClickHouse::start_with`]; the default is what [`ClickHouse::start`] runs.
#[derive(Debug, Clone, Default)]
pub struct ClickHouseOptions {
    /// Also serve HTTPS on [`ClickHouse::https_port`] with this certificate and key.
    pub https: Option<HttpsFiles>,
    /// Also define this user with this password (with the default user's profile and
    /// networks); the default user stays passwordless for the test bed's own queries.
    pub password_user: Option<(String, String)>,
    /// Read users, profiles and quotas from this file instead (the server reloads it when its
    /// modification time changes in whole seconds, so a test can change a user while the server
    /// runs, dating each version past the last); wins over `password_user`.
    pub users_config: Option<PathBuf>,
    /// Make the server a replica of replicated tables coordinated by ZooKeeper.
    pub replication: Option<Replication>,
}

/// How a server takes part in replication: its ZooKeeper and its `{shard}` and `{replica}`
/// macros. The cluster itself (`<remote_servers>`) is set once every member runs and its
/// ports are known: [`ClickHouse::set_cluster`].
#[derive(Debug, Clone)]
pub struct Replication {
    /// The client port of ZooKeeper on 127.0.0.1 ([`crate::ZooKeeper::port`]).
    pub zookeeper_port: u16,
    /// The `{shard}` macro.
    pub shard: String,
    /// The `{replica}` macro: unique among the replicas of a shard.
    pub replica: String,
}

/// The certificate and key of an HTTPS port ([`ClickHouse::start_with_https`]), PEM files.
#[derive(Debug, Clone)]
pub struct HttpsFiles {
    /// The server's certificate (chain).
    pub cert_file: PathBuf,
    /// Its private key.
    pub key_file: PathBuf,
}

/// A running (or killed, awaiting restart) `clickhouse-server`.
///
/// Dropping it kills the server with SIGKILL and removes its directory.
#[derive(Debug)]
pub struct ClickHouse {
    /// Ports `[http, tcp, https, interserver]`; the HTTPS port is reserved, and served only when
    /// the server was started with [`ClickHouse::start_with_https`]; the interserver HTTP port
    /// (replicas fetch parts from each other through it) only with [`Replication`].
    server: Server<4>,
    /// Whether the HTTPS port is served.
    https: bool,
}

impl ClickHouse {
    /// Starts a server on free ports and returns once `/ping` answers `Ok.`.
    pub fn start() -> Result<ClickHouse, TestbedError> {
        Self::start_with(&ClickHouseOptions::default())
    }

    /// Like [`ClickHouse::start`], and also serves HTTPS on [`ClickHouse::https_port`] with the
    /// given certificate and key (the plain HTTP port stays, for the test bed's own probes).
    pub fn start_with_https(files: &HttpsFiles) -> Result<ClickHouse, TestbedError> {
        Self::start_with(&ClickHouseOptions {
            https: Some(files.clone()),
            ..ClickHouseOptions::default()
        })
    }

    /// Like [`ClickHouse::start`], with the users, profiles and quotas of `users_config`.
    pub fn start_with_users_config(users_config: &Path) -> Result<ClickHouse, TestbedError> {
        Self::start_with(&ClickHouseOptions {
            users_config: Some(users_config.to_path_buf()),
            ..ClickHouseOptions::default()
        })
    }

    /// Like [`ClickHouse::start`], with `options`.
    pub fn start_with(options: &ClickHouseOptions) -> Result<ClickHouse, TestbedError> {
        // Fresh ports need a fresh config; a restart keeps the config it has.
        let server = Server::start(&SPEC, |run| {
            write_config(run.dir, run.name, run.ports, options)?;
            launch(run)
        })?;
        Ok(ClickHouse {
            server,
            https: options.https.is_some(),
        })
    }

    /// HTTPS endpoint, `https://127.0.0.1:PORT`, of a server started with
    /// [`ClickHouse::start_with_https`]; `None` otherwise.
    pub fn https_url(&self) -> Option<String> {
        self.https
            .then(|| format!("https://127.0.0.1:{}", self.https_port()))
    }

    /// The port HTTPS is (or would be) served on.
    pub fn https_port(&self) -> u16 {
        self.server.ports()[2]
    }

    /// HTTP endpoint, `http://127.0.0.1:PORT`, for the `clickhouse` crate.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port())
    }

    /// HTTP port.
    pub fn http_port(&self) -> u16 {
        self.server.ports()[0]
    }

    /// Native protocol port, for `clickhouse-client --port`, and the port a cluster
    /// definition names a replica by.
    pub fn tcp_port(&self) -> u16 {
        self.server.ports()[1]
    }

    /// Defines the cluster `name` on this server as one shard whose replicas are the servers on
    /// `replica_tcp_ports` (this one among them), and waits until the server has loaded it.
    /// Call it on every member once all run; the definition survives restarts.
    pub fn set_cluster(&self, name: &str, replica_tcp_ports: &[u16]) -> Result<(), TestbedError> {
        let replicas: String = replica_tcp_ports
            .iter()
            .map(|port| format!("<replica><host>127.0.0.1</host><port>{port}</port></replica>"))
            .collect();
        // internal_replication: a Distributed table writes to one replica of a shard and lets
        // the replicated table copy it, as the relay's direct inserts do.
        let xml = format!(
            r#"<?xml version="1.0"?>
<yandex>
    <remote_servers>
        <{name}>
            <shard><internal_replication>true</internal_replication>{replicas}</shard>
        </{name}>
    </remote_servers>
</yandex>
"#,
            name = xml_escape(name),
        );
        let path = self.server.dir().join(CLUSTER_CONFIG_FILE);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| TestbedError::io(format!("creating {}", parent.display()), e))?;
        }
        std::fs::write(&path, xml)
            .map_err(|e| TestbedError::io(format!("writing {}", path.display()), e))?;
        let sql = format!(
            "SELECT count() FROM system.clusters WHERE cluster = '{}'",
            name.replace('\\', "\\\\").replace('\'', "\\'")
        );
        let deadline = std::time::Instant::now() + Duration::from_millis(CLUSTER_CONFIG_TIMEOUT_MS);
        loop {
            let hosts = self.query(&sql)?;
            if hosts.trim() == replica_tcp_ports.len().to_string() {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(TestbedError::NotReady {
                    server: SERVER,
                    waited_ms: CLUSTER_CONFIG_TIMEOUT_MS,
                    log_tail: format!(
                        "system.clusters lists {} hosts of cluster {name}, not {}",
                        hosts.trim(),
                        replica_tcp_ports.len()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(READY_POLL_INTERVAL_MS * 10));
        }
    }

    /// The server's data path (tables, metadata); it survives `kill9` and `restart`.
    pub fn data_dir(&self) -> PathBuf {
        self.server.dir().join(DATA_DIR)
    }

    /// The server's log at level warning (appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.server.dir().join(SERVER_LOG_FILE)
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

    /// Starts the server again on the same ports and data directory and waits for
    /// `/ping`; a running server is killed with SIGKILL first.
    pub fn restart(&mut self) -> Result<(), TestbedError> {
        self.server.restart(launch)
    }

    /// Freezes the server with SIGSTOP; returns once the kernel reports it stopped.
    /// Connections are still accepted by the kernel, but nothing is answered until
    /// [`ClickHouse::resume`].
    pub fn pause(&self) -> Result<(), TestbedError> {
        self.server.pause()
    }

    /// Continues a paused server with SIGCONT.
    pub fn resume(&self) -> Result<(), TestbedError> {
        self.server.resume()
    }

    /// Runs `sql` over HTTP within [`QUERY_TIMEOUT_MS`] and returns the response body
    /// (tab-separated unless the query says `FORMAT ...`). A rejected query is a
    /// [`TestbedError::Query`] carrying ClickHouse's exception text.
    pub fn query(&self, sql: &str) -> Result<String, TestbedError> {
        self.query_with_timeout(sql, Duration::from_millis(QUERY_TIMEOUT_MS))
    }

    /// [`ClickHouse::query`] with its own bound, connection to last byte; running out
    /// of time is an error whose [`TestbedError::is_timeout`] is true.
    pub fn query_with_timeout(&self, sql: &str, timeout: Duration) -> Result<String, TestbedError> {
        http::query(self.http_port(), sql, timeout)
    }
}

impl ClickHouse {
    /// POSTs `body` to `path_and_query` (e.g. `/?query=...`) and returns the answer whatever
    /// its status, for tests of the HTTP interface itself.
    pub fn post(
        &self,
        path_and_query: &str,
        body: &[u8],
    ) -> Result<crate::HttpAnswer, TestbedError> {
        crate::chdb::post(self.http_port(), path_and_query, body)
    }
}

/// Writes the server config. Only what 18.16 needs to run isolated: ports on
/// 127.0.0.1 (no secure TCP port; HTTPS only with `https`; the interserver HTTP port,
/// ZooKeeper, the distributed DDL queue and the `{shard}`/`{replica}` macros only with
/// `replication`), every path inside `dir`, file logs at level warning, the packaged users,
/// small caches.
fn write_config(
    dir: &Path,
    name: &str,
    [http_port, tcp_port, https_port, interserver_port]: [u16; 4],
    options: &ClickHouseOptions,
) -> Result<(), TestbedError> {
    let users_config = match (&options.users_config, &options.password_user) {
        (Some(file), _) => file.display().to_string(),
        (None, Some((user, password))) => {
            let path = dir.join(USERS_FILE);
            std::fs::write(&path, users_xml(user, password))
                .map_err(|e| TestbedError::io(format!("writing {}", path.display()), e))?;
            path.display().to_string()
        }
        (None, None) => USERS_CONFIG.to_owned(),
    };
    // The server presents the certificate and asks for none from clients.
    let https = match &options.https {
        Some(files) => format!(
            r#"<https_port>{https_port}</https_port>
    <openSSL>
        <server>
            <certificateFile>{cert}</certificateFile>
            <privateKeyFile>{key}</privateKeyFile>
            <verificationMode>none</verificationMode>
            <loadDefaultCAFile>false</loadDefaultCAFile>
            <cacheSessions>true</cacheSessions>
            <disableProtocols>sslv2,sslv3</disableProtocols>
            <preferServerCiphers>true</preferServerCiphers>
        </server>
    </openSSL>"#,
            cert = xml_escape(&files.cert_file.display().to_string()),
            key = xml_escape(&files.key_file.display().to_string()),
        ),
        None => String::new(),
    };
    let replication = match &options.replication {
        Some(r) => format!(
            r#"<interserver_http_port>{interserver_port}</interserver_http_port>
    <interserver_http_host>127.0.0.1</interserver_http_host>
    <zookeeper>
        <node><host>127.0.0.1</host><port>{zookeeper_port}</port></node>
        <session_timeout_ms>{ZOOKEEPER_SESSION_TIMEOUT_MS}</session_timeout_ms>
    </zookeeper>
    <distributed_ddl><path>{DISTRIBUTED_DDL_PATH}</path></distributed_ddl>
    <merge_tree>
        <replicated_max_ratio_of_wrong_parts>{WRONG_PARTS_RATIO_MAX}</replicated_max_ratio_of_wrong_parts>
    </merge_tree>"#,
            zookeeper_port = r.zookeeper_port,
        ),
        None => String::new(),
    };
    let macros = match &options.replication {
        Some(r) => format!(
            "<shard>{}</shard><replica>{}</replica>",
            xml_escape(&r.shard),
            xml_escape(&r.replica)
        ),
        None => String::new(),
    };
    let data = dir.join(DATA_DIR);
    let path = |sub: &str| xml_escape(&format!("{}/", data.join(sub).display()));
    let config = format!(
        r#"<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>{server_log}</log>
        <errorlog>{error_log}</errorlog>
        <size>100M</size>
        <count>1</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{http_port}</http_port>
    <tcp_port>{tcp_port}</tcp_port>
    {https}
    {replication}
    <path>{data_path}/</path>
    <tmp_path>{tmp_path}</tmp_path>
    <user_files_path>{user_files_path}</user_files_path>
    <format_schema_path>{format_schema_path}</format_schema_path>
    <users_config>{users_config}</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>{MARK_CACHE_BYTES}</mark_cache_size>
    <uncompressed_cache_size>{UNCOMPRESSED_CACHE_BYTES}</uncompressed_cache_size>
    <macros>
        <{IDENTITY_MACRO}>{name}</{IDENTITY_MACRO}>{macros}
    </macros>
</yandex>
"#,
        server_log = xml_escape(&dir.join(SERVER_LOG_FILE).display().to_string()),
        error_log = xml_escape(&dir.join(ERROR_LOG_FILE).display().to_string()),
        data_path = xml_escape(&data.display().to_string()),
        tmp_path = path("tmp"),
        user_files_path = path("user_files"),
        format_schema_path = path("format_schemas"),
        users_config = xml_escape(&users_config),
        name = xml_escape(name),
    );
    let config_path = dir.join(CONFIG_FILE);
    std::fs::write(&config_path, config)
        .map_err(|e| TestbedError::io(format!("writing {}", config_path.display()), e))
}

/// The packaged users (default without a password, readonly) plus `user` with `password`.
fn users_xml(user: &str, password: &str) -> String {
    let networks = "<networks><ip>::/0</ip></networks>";
    format!(
        r#"<?xml version="1.0"?>
<yandex>
    <profiles>
        <default>
            <max_memory_usage>10000000000</max_memory_usage>
            <use_uncompressed_cache>0</use_uncompressed_cache>
            <load_balancing>random</load_balancing>
        </default>
        <readonly><readonly>1</readonly></readonly>
    </profiles>
    <users>
        <default><password></password>{networks}<profile>default</profile><quota>default</quota></default>
        <{user}><password>{password}</password>{networks}<profile>default</profile><quota>default</quota></{user}>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
"#,
        user = xml_escape(user),
        password = xml_escape(password),
    )
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Spawns one server and waits until it is ready and known to be ours.
fn launch(run: &Launch<4>) -> Result<ServerProcess, StartFailure> {
    let Launch {
        binary,
        dir,
        name,
        ports: [http_port, _tcp_port, _https_port, _interserver_port],
    } = *run;
    let console_path = dir.join(CONSOLE_LOG_FILE);
    let logs = [
        LogFile::from_end(console_path.clone()),
        LogFile::from_end(dir.join(SERVER_LOG_FILE)),
    ];
    let stdout = open_append(&console_path)?;
    let stderr = stdout
        .try_clone()
        .map_err(|e| TestbedError::io("duplicating the ClickHouse console log handle", e))?;
    let mut command = Command::new(binary);
    command
        .arg(format!("--config-file={}", dir.join(CONFIG_FILE).display()))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    let mut process = ServerProcess::spawn(SERVER, command)?;
    wait_ready(
        &mut process,
        &logs,
        Duration::from_millis(CLICKHOUSE_READY_TIMEOUT_MS),
        || probe(http_port, name),
    )?;
    Ok(process)
}

/// Ready when `/ping` answers `Ok.` and the identity macro holds our name.
fn probe(http_port: u16, name: &str) -> Probe {
    let timeout = Duration::from_millis(PROBE_TIMEOUT_MS);
    match http::request(http_port, "GET", "/ping", b"", timeout) {
        Ok(response) if response.status == 200 && response.body_text().trim() == "Ok." => {}
        _ => return Probe::NotYet,
    }
    let sql = format!("SELECT substitution FROM system.macros WHERE macro = '{IDENTITY_MACRO}'");
    match http::request(http_port, "POST", "/", sql.as_bytes(), timeout) {
        Ok(response) if response.status == 200 => {
            if response.body_text().trim() == name {
                Probe::Ready
            } else {
                Probe::Stranger
            }
        }
        _ => Probe::NotYet,
    }
}
