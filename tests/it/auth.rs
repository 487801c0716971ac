//! Errors no retry can fix, against real servers: a ClickHouse user whose password no longer
//! matches is reported as refused (once per reminder period, not per retry), `/ready` answers 503
//! while it lasts, the relay keeps ingesting and retrying slowly, and data arrives once the user
//! is fixed on the server; a NATS server that refuses the relay at start-up is waited for, not
//! exited on.

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;

use prism_relay::sink::{Sink, SinkOptions};
use prism_testbed::{ClickHouse, Nats};

use crate::harness::ChServer;
use crate::harness::{http_get, wait_until, Bed, Load, RelayProc, DRAIN_TIMEOUT};

const INSERT_ERRORS: &str = "marketprism_storage_clickhouse_insert_errors_total";
const RECEIVED: &str = "marketprism_storage_messages_received_total";

/// The relay's password, as its password file holds it.
const PASSWORD: &str = "relay-secret-1";

/// Failed insert attempts that show the lanes went on retrying (many per lane at the test's
/// 500 ms retry pace) while the log stayed quiet.
const RETRIES_MIN: f64 = 30.0;

/// Most lines the refusal may log over the test: one start line per lane (nine lanes) and a
/// few reminders; a line per retry would be many more than `RETRIES_MIN`.
const REFUSED_LINES_MAX: usize = 20;

/// The test server's users file. ClickHouse 18.16 reloads it when its modification time, in
/// whole seconds, differs from the one it last loaded (checked every 2 s), so two versions
/// written within the same second look unchanged and the second is never loaded: each version
/// is dated a whole second past the one before.
struct UsersFile {
    path: PathBuf,
    /// The modification time of the last version written, in seconds since the epoch.
    dated_s: u64,
}

impl UsersFile {
    fn new(path: PathBuf) -> UsersFile {
        UsersFile { path, dated_s: 0 }
    }

    /// Writes a version with users `default`, without a password (the test bed's queries), and
    /// `relay` with `relay_password`.
    fn write(&mut self, relay_password: &str) {
        let user = |name: &str, password: &str| {
            format!(
                "<{name}><password>{password}</password><networks><ip>::/0</ip></networks>\
                 <profile>default</profile><quota>default</quota></{name}>"
            )
        };
        let xml = format!(
            "<?xml version=\"1.0\"?>\n<yandex><profiles><default></default></profiles>\
             <users>{}{}</users><quotas><default><interval><duration>3600</duration>\
             <queries>0</queries><errors>0</errors><result_rows>0</result_rows>\
             <read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>\
             </yandex>\n",
            user("default", ""),
            user("relay", relay_password)
        );
        // Written next to the file and renamed, so the server never reads half a file.
        let tmp = self.path.with_extension("tmp");
        fs::write(&tmp, xml).expect("write users.xml");
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("a clock past the epoch")
            .as_secs();
        self.dated_s = now_s.max(self.dated_s + 1);
        let dated = std::time::UNIX_EPOCH + std::time::Duration::from_secs(self.dated_s);
        fs::File::options()
            .write(true)
            .open(&tmp)
            .and_then(|f| f.set_modified(dated))
            .expect("set the modification time");
        fs::rename(&tmp, &self.path).expect("replace users.xml");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_clickhouse_no_longer_accepts_is_reported_as_refused_at_a_slow_rate_with_ready_503_and_data_arrives_once_the_user_is_fixed(
) {
    let dir = tempfile::Builder::new()
        .prefix("prism-auth-")
        .tempdir()
        .expect("temporary directory");
    let mut users = UsersFile::new(dir.path().join("users.xml"));
    // At first the server knows the relay's user under another password.
    users.write("not-the-relays");
    let bed = Bed {
        nats: Nats::start().expect("start nats-server"),
        ch: ChServer::Legacy(
            ClickHouse::start_with_users_config(&users.path).expect("start clickhouse-server"),
        ),
        dir,
    };
    let password_file = bed.path("relay-password");
    fs::write(&password_file, PASSWORD).expect("write password file");
    let mut config = bed.config();
    config.clickhouse_extra = format!(
        "user = \"relay\"\npassword_file = \"{}\"\n",
        password_file.display()
    );
    // Start-up: refused, reported as such, not as a server that is not ready yet; the relay
    // waits and answers 503 on /ready.
    let mut relay = RelayProc::spawn(&bed, "relay", &config);
    wait_until(
        "the start-up refusal is reported",
        DRAIN_TIMEOUT,
        || async { relay.log().contains("ClickHouse refuses the relay") },
    )
    .await;
    assert!(
        matches!(
            http_get(config.metrics_addr(), "/ready").await,
            Ok((503, _))
        ),
        "{}",
        relay.log()
    );
    assert!(
        !relay.log().contains("ClickHouse not ready"),
        "a refusal is not reported as a server still starting:\n{}",
        relay.log()
    );
    // The operator fixes the password on the server, which reloads its users file.
    users.write(PASSWORD);
    let probe = Sink::new(SinkOptions {
        url: bed.ch.http_url(),
        user: "relay".into(),
        password: PASSWORD.into(),
        database: "system".into(),
        modern: false,
        ..SinkOptions::default()
    })
    .expect("valid sink options");
    wait_until(
        "ClickHouse accepts the relay's password",
        DRAIN_TIMEOUT,
        || async { probe.server_version().await.is_ok() },
    )
    .await;
    relay.wait_ready().await;
    assert!(
        relay.log().contains("ClickHouse accepts the relay again"),
        "{}",
        relay.log()
    );
    bed.publish(Load::new("auth1", 400)).await;
    bed.wait_accounted(DRAIN_TIMEOUT).await;

    // The server's user changes its password: every insert is refused from now on (the server
    // reloads its users file within seconds).
    users.write("another-password");
    wait_until(
        "ClickHouse refuses the relay's password",
        DRAIN_TIMEOUT,
        || async { probe.server_version().await.is_err() },
    )
    .await;
    let received = relay.metric_sum(RECEIVED, &[]).await;
    let errors = relay.metric_sum(INSERT_ERRORS, &[]).await;
    bed.publish(Load::new("auth2", 400)).await;
    wait_until(
        "/ready answers 503 while ClickHouse refuses the relay",
        DRAIN_TIMEOUT,
        || async {
            matches!(
                http_get(config.metrics_addr(), "/ready").await,
                Ok((503, _))
            )
        },
    )
    .await;
    wait_until(
        "the lanes retried many times and ingest went on",
        DRAIN_TIMEOUT,
        || async {
            relay.metric_sum(INSERT_ERRORS, &[]).await >= errors + RETRIES_MIN
                && relay.metric_sum(RECEIVED, &[]).await >= received + 400.0
        },
    )
    .await;
    let log = relay.log();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ClickHouse refuses the relay"))
        .collect();
    assert!(
        !refused.is_empty(),
        "the refusal is reported as such:\n{log}"
    );
    assert!(
        refused.len() <= REFUSED_LINES_MAX,
        "{} refusal lines, not one per retry:\n{log}",
        refused.len()
    );
    for line in &refused {
        assert!(
            line.contains("ERROR") && line.contains("class=auth") && line.contains("Code: 193"),
            "names the class and the server's reason: {line}"
        );
        assert!(!line.contains(PASSWORD), "no secret in the log: {line}");
    }
    assert!(
        !log.lines()
            .any(|l| l.contains("insert failed; retrying") && l.contains("Code: 193")),
        "a refusal is not reported as a transient failure:\n{log}"
    );

    // The operator fixes the user on the server: the backlog arrives and /ready is 200 again.
    users.write(PASSWORD);
    bed.wait_accounted(DRAIN_TIMEOUT).await;
    wait_until("/ready answers 200 again", DRAIN_TIMEOUT, || async {
        matches!(
            http_get(config.metrics_addr(), "/ready").await,
            Ok((200, _))
        )
    })
    .await;
    assert!(
        relay
            .log()
            .contains("ClickHouse accepts the relay's inserts again"),
        "{}",
        relay.log()
    );
}

/// nats-server authorization: the test's own clients connect without credentials (as `tester`);
/// the relay must log in as `relay` with `relay_password`.
fn nats_users(relay_password: &str) -> String {
    format!(
        "authorization {{\n  users = [\n    {{user: tester, password: \"tester-pw\"}}\n    \
         {{user: relay, password: \"{relay_password}\"}}\n  ]\n}}\nno_auth_user: tester\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_nats_refuses_at_start_up_waits_reporting_it_at_a_slow_rate_and_runs_once_the_server_accepts_it(
) {
    let bed = Bed::start_with_nats_config(&nats_users("not-the-relays"));
    let password_file = bed.path("nats-password");
    fs::write(&password_file, PASSWORD).expect("write password file");
    let mut config = bed.config();
    config.nats_extra = format!(
        "user = \"relay\"\npassword_file = \"{}\"\n",
        password_file.display()
    );
    let mut relay = RelayProc::spawn(&bed, "relay", &config);
    wait_until("the relay reported the refusal", DRAIN_TIMEOUT, || async {
        relay.log().contains("NATS refuses the relay")
    })
    .await;
    assert_eq!(relay.try_wait(), None, "the relay exited:\n{}", relay.log());
    let log = relay.log();
    for line in log.lines().filter(|l| l.contains("NATS refuses the relay")) {
        assert!(
            line.contains("ERROR") && line.contains("authorization violation"),
            "names the server's reason: {line}"
        );
        assert!(!line.contains(PASSWORD), "no secret in the log: {line}");
    }

    // The operator gives the relay's user the relay's password and reloads the server.
    let conf = bed
        .nats
        .data_dir()
        .parent()
        .expect("the store lies in the server's directory")
        .join("nats-server.conf");
    // A reload must not change the server name the test bed gives by flag: the file names it.
    let varz = SocketAddr::from(([127, 0, 0, 1], bed.nats.monitor_port()));
    let (_, body) = http_get(varz, "/varz").await.expect("GET /varz");
    let name = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["server_name"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no server_name in /varz: {body}"));
    let text = fs::read_to_string(&conf).expect("read nats-server.conf");
    let fixed = format!(
        "{}\nserver_name: \"{name}\"\n",
        text.replace("not-the-relays", PASSWORD)
    );
    fs::write(&conf, fixed).expect("write nats-server.conf");
    let pid = bed.nats.pid().expect("nats-server runs");
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -HUP {pid}");
    relay.wait_ready().await;
    bed.publish(Load::new("natsauth", 200)).await;
    bed.wait_accounted(DRAIN_TIMEOUT).await;
    let refusals = relay.log().matches("NATS refuses the relay").count();
    assert!(
        refusals <= REFUSED_LINES_MAX,
        "{refusals} refusal lines, not one per attempt:\n{}",
        relay.log()
    );
    assert!(relay.terminate().await.success(), "{}", relay.log());
}
