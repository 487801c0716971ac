//! Security against real servers: ClickHouse over HTTPS, NATS over TLS with a client
//! certificate, NKey authentication (also in the raw connection that rescues unreadable
//! deliveries), secrets that never show in any output of the binary, and JSON logs.
//!
//! Certificates are made per test with the `openssl` command-line tool (Debian's `openssl`
//! package): a CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and a
//! second CA that signed neither.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use prism_relay::config::{Config, NatsConfig};
use prism_relay::sink::{tls, Sink, SinkOptions};
use prism_relay::tls::TlsFiles;
use prism_relay::tools::loadgen::{self, LoadgenOptions};
use prism_relay::tools::verify::{self, VerifyOptions};
use prism_testbed::{ClickHouse, ClickHouseOptions, HttpsFiles, Nats};
use tempfile::TempDir;

use crate::harness::ChServer;
use crate::harness::{
    free_port, http_get, relay_bin, Bed, Load, DATABASE, DRAIN_TIMEOUT, READY_TIMEOUT,
};
use crate::TestResult;

/// Bound on one run of a relay subcommand (`check`, `verify`, a `run` that fails at start-up).
const COMMAND_TIMEOUT_MS: u64 = 60_000;

/// Bound on waiting for the relay to store what was published, rescued deliveries included
/// (they come back after one `ack_wait`).
const ACCOUNTING_TIMEOUT_MS: u64 = 90_000;

/// Interval between two looks at a condition being waited for.
const POLL_MS: u64 = 200;

/// How long a raw publish may take before the test fails instead of hanging.
const RAW_IO_TIMEOUT_MS: u64 = 10_000;

/// Certificates and keys made with `openssl`, in a temporary directory.
struct Pki {
    _dir: TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    /// A CA that signed none of the above.
    other_ca: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    fn generate() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("prism-pki-")
            .tempdir()
            .expect("temporary directory");
        let d = dir.path();
        const CURVE: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        for ca in ["ca", "other-ca"] {
            let (key, crt, subj) = (
                format!("{ca}.key"),
                format!("{ca}.crt"),
                format!("/CN=prism test {ca}"),
            );
            let mut args = vec!["req", "-x509"];
            args.extend(CURVE);
            args.extend([
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &crt,
                "-days",
                "2",
                "-subj",
                &subj,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
            openssl(d, &args);
        }
        for (name, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
            let (key, csr, crt, ext, subj) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
                format!("{name}.ext"),
                format!("/CN=prism test {name}"),
            );
            let mut args = vec!["req"];
            args.extend(CURVE);
            args.extend(["-nodes", "-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(d, &args);
            std::fs::write(
                d.join(&ext),
                format!("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n"),
            )
            .expect("write extensions file");
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &crt,
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                ],
            );
        }
        Pki {
            ca: d.join("ca.crt"),
            server_cert: d.join("server.crt"),
            server_key: d.join("server.key"),
            client_cert: d.join("client.crt"),
            client_key: d.join("client.key"),
            other_ca: d.join("other-ca.crt"),
            _dir: dir,
        }
    }

    fn https(&self) -> HttpsFiles {
        HttpsFiles {
            cert_file: self.server_cert.clone(),
            key_file: self.server_key.clone(),
        }
    }

    /// nats-server's `tls` block: this server certificate, clients must present one the CA
    /// signed.
    fn nats_tls_config(&self) -> String {
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 5\n}}\n",
            self.server_cert.display().to_string(),
            self.server_key.display().to_string(),
            self.ca.display().to_string(),
        )
    }
}

/// A TOML string of a path.
fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// `toml` with `lines` added at the top of its `[section]`.
fn with_lines(toml: &str, section: &str, lines: &str) -> String {
    let header = format!("[{section}]\n");
    assert!(toml.contains(&header), "no {header} in:\n{toml}");
    toml.replacen(&header, &format!("{header}{lines}\n"), 1)
}

/// A relay subcommand run as a process with its own environment (`RUST_LOG` and every
/// `PRISM_RELAY_*` variable of the test process removed first); stdout and stderr go to files.
/// Killed on drop.
struct Relay {
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
    metrics: Option<SocketAddr>,
}

impl Relay {
    fn spawn(dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Relay {
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        let mut command = Command::new(relay_bin());
        command.args(args).stdin(Stdio::null());
        for (key, _) in std::env::vars() {
            if key.starts_with("PRISM_RELAY_") || key == "RUST_LOG" {
                command.env_remove(key);
            }
        }
        command.env("RUST_LOG", "info");
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn prism-relay");
        Relay {
            child: Some(child),
            stdout,
            stderr,
            metrics: None,
        }
    }

    /// `prism-relay run --config <config>` with `env`, listening for metrics on `metrics`.
    fn run(
        dir: &Path,
        name: &str,
        config: &Path,
        metrics: SocketAddr,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Relay {
        let config = config.display().to_string();
        let mut args = vec!["run", "--config", &config];
        args.extend(extra_args);
        let mut relay = Relay::spawn(dir, name, &args, env);
        relay.metrics = Some(metrics);
        relay
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Everything the process wrote, stdout then stderr.
    fn output(&self) -> String {
        let out = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        format!("{out}{}", self.stderr())
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("try_wait"))
    }

    async fn wait_ready(&mut self) {
        let addr = self.metrics.expect("a run has a metrics address");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.try_wait() {
                panic!(
                    "relay exited with {status} before ready:\n{}",
                    self.output()
                );
            }
            if let Ok((200, _)) = http_get(addr, "/ready").await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "relay not ready after {READY_TIMEOUT:?}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
        }
    }

    /// Waits for the process to exit by itself.
    async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_millis(COMMAND_TIMEOUT_MS);
        loop {
            if let Some(status) = self.try_wait() {
                self.child = None;
                return status;
            }
            if Instant::now() >= deadline {
                if let Some(mut child) = self.child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                panic!(
                    "prism-relay did not exit within {COMMAND_TIMEOUT_MS} ms:\n{}",
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then waits for the exit.
    async fn stop(&mut self) -> ExitStatus {
        let pid = self
            .child
            .as_ref()
            .map(Child::id)
            .expect("relay is running");
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid} failed");
        self.wait_exit().await
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs a subcommand to its end; returns its status and everything it wrote.
async fn command(
    dir: &Path,
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (ExitStatus, String) {
    let mut process = Relay::spawn(dir, name, args, env);
    let status = process.wait_exit().await;
    (status, process.output())
}

/// The `[nats]` section of a configuration file, as the tools take it (secret files read).
fn nats_section(config: &Path, env: &[(&str, &str)]) -> NatsConfig {
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    Config::load_with_env(Some(config), env)
        .unwrap_or_else(|e| panic!("{} loads: {e}", config.display()))
        .nats
}

/// Publishes `load` with loadgen, connecting as `nats` says.
async fn publish_with(bed: &Bed, nats: &NatsConfig, load: Load) {
    let opts = LoadgenOptions {
        nats_url: bed.nats.url(),
        nats: Some(nats.clone()),
        create_streams: false,
        mix: load.mix.parse().expect("mix"),
        count: Some(load.count),
        rate_per_s: load.rate_per_s,
        run_id: Some(load.run_id.clone()),
        exchanges: load.exchanges.clone(),
        seed: load.seed,
        progress: false,
        ..LoadgenOptions::default()
    };
    let summary = loadgen::run(&opts).await.expect("loadgen runs");
    assert!(summary.ok(), "loadgen failed: {summary}");
    assert_eq!(summary.published_total(), load.count, "{summary}");
}

/// Polls verify (connecting to NATS as `nats` says, to ClickHouse over plain HTTP) until every
/// published identity is stored.
async fn wait_stored(bed: &Bed, nats: &NatsConfig, relay: &Relay) {
    let options = VerifyOptions {
        nats: Some(nats.clone()),
        ..bed.verify_options()
    };
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let last = match verify::run(&options).await {
            Ok(report) if report.totals().lost == 0 && report.totals().published > 0 => return,
            Ok(report) => report.to_string(),
            Err(error) => format!("verify failed: {error}"),
        };
        assert!(
            Instant::now() < deadline,
            "not everything stored after {DRAIN_TIMEOUT:?}:\n{last}\nrelay:\n{}",
            relay.output()
        );
        tokio::time::sleep(Duration::from_millis(POLL_MS * 2)).await;
    }
}

/// Creates MarketPrism's streams as the relay would, so `check` finds them.
async fn create_streams(bed: &Bed) {
    let js = bed.js().await;
    for (name, subjects) in crate::harness::STREAMS {
        js.create_stream(async_nats::jetstream::stream::Config {
            name: name.to_owned(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("create stream {name}: {e}"));
    }
}

fn bed_with(nats: Nats, ch: ClickHouse) -> Bed {
    let dir = tempfile::Builder::new()
        .prefix("prism-security-")
        .tempdir()
        .expect("temporary directory");
    Bed {
        nats,
        ch: ChServer::Legacy(ch),
        dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_inserts_into_clickhouse_over_https_and_verify_and_check_reach_it_through_the_same_ca(
) -> TestResult {
    let pki = Pki::generate();
    let ch = ClickHouse::start_with_https(&pki.https())?;
    let bed = bed_with(Nats::start()?, ch);
    let https_url = bed.ch.https_url().expect("started with HTTPS");
    let mut config = bed.config();
    config.clickhouse_url = https_url.clone();
    let toml = with_lines(
        &config.to_toml(),
        "clickhouse",
        &format!("tls_ca_file = {}", toml_path(&pki.ca)),
    );
    let path = bed.path("https.toml");
    std::fs::write(&path, toml)?;

    let mut relay = Relay::run(
        bed.dir.path(),
        "relay",
        &path,
        config.metrics_addr(),
        &[],
        &[],
    );
    relay.wait_ready().await;
    bed.publish(Load::new("https", 400)).await;
    // Accounted through the plain HTTP port the test bed keeps; the relay wrote over HTTPS.
    bed.wait_accounted(DRAIN_TIMEOUT).await;

    let config_arg = path.display().to_string();
    let dir = bed.dir.path();
    let (status, out) = command(dir, "verify", &["verify", "--config", &config_arg], &[]).await;
    assert!(status.success(), "verify over HTTPS:\n{out}");
    assert!(out.contains(&https_url) || out.contains("lost"), "{out}");
    let (_, out) = command(dir, "check", &["check", "--config", &config_arg], &[]).await;
    assert!(
        out.contains("clickhouse: profile legacy"),
        "check over HTTPS:\n{out}"
    );
    assert!(!out.contains("unreachable"), "{out}");
    relay.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clickhouse_certificate_the_configured_ca_does_not_sign_fails_with_a_tls_handshake_error_naming_the_cause(
) -> TestResult {
    let pki = Pki::generate();
    let ch = ClickHouse::start_with_https(&pki.https())?;
    let https_url = ch.https_url().expect("started with HTTPS");
    let sink = |ca: &Path| {
        Sink::new(SinkOptions {
            url: https_url.clone(),
            tls: TlsFiles {
                ca_file: Some(ca.to_owned()),
                ..TlsFiles::default()
            },
            database: "system".into(),
            modern: false,
            insert_timeout_ms: 10_000,
            ..SinkOptions::default()
        })
    };
    let version = sink(&pki.ca)?.server_version().await?;
    assert!(version.starts_with("18.16"), "{version}");

    let error = sink(&pki.other_ca)?
        .server_version()
        .await
        .expect_err("a server certificate the CA did not sign is refused");
    let error = prism_wal::ErrorChain(&error).to_string();
    assert!(
        error.contains("TLS handshake with 127.0.0.1 failed"),
        "{error}"
    );
    assert!(error.contains("UnknownIssuer"), "{error}");
    assert!(error.contains("tls_ca_file"), "{error}");

    // The client error carries the refusal as a typed source, for the sink's classification;
    // a refused TCP connection does not.
    let tls_files = TlsFiles {
        ca_file: Some(pki.other_ca.clone()),
        ..TlsFiles::default()
    };
    let client = prism_relay::sink::http_client(&https_url, &tls_files, 5_000)?;
    let refused = client
        .query("SELECT 1")
        .fetch_one::<u8>()
        .await
        .expect_err("handshake refused");
    assert!(tls::is_handshake_failure(&refused), "{refused}");
    let closed_port = format!("https://127.0.0.1:{}", free_port());
    let client = prism_relay::sink::http_client(&closed_port, &tls_files, 5_000)?;
    let unreachable = client
        .query("SELECT 1")
        .fetch_one::<u8>()
        .await
        .expect_err("nothing listens");
    assert!(!tls::is_handshake_failure(&unreachable), "{unreachable}");

    // The binary says the same in `check` (which looks at ClickHouse once the streams exist).
    let bed = bed_with(Nats::start()?, ch);
    create_streams(&bed).await;
    let mut config = bed.config();
    config.clickhouse_url = https_url;
    let toml = with_lines(
        &config.to_toml(),
        "clickhouse",
        &format!("tls_ca_file = {}", toml_path(&pki.other_ca)),
    );
    let path = bed.path("wrong-ca.toml");
    std::fs::write(&path, toml)?;
    let config_arg = path.display().to_string();
    let (status, out) = command(
        bed.dir.path(),
        "check",
        &["check", "--config", &config_arg],
        &[],
    )
    .await;
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("auth ClickHouse error") && out.contains("UnknownIssuer"),
        "{out}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_delivers_over_nats_tls_with_a_client_certificate_and_a_wrong_ca_fails_naming_the_certificate(
) -> TestResult {
    let pki = Pki::generate();
    let bed = bed_with(
        Nats::start_with_config(&pki.nats_tls_config())?,
        ClickHouse::start()?,
    );
    let config = bed.config();
    let tls = |ca: &Path| {
        format!(
            "tls_ca_file = {}\ntls_cert_file = {}\ntls_key_file = {}",
            toml_path(ca),
            toml_path(&pki.client_cert),
            toml_path(&pki.client_key)
        )
    };
    let path = bed.path("tls.toml");
    std::fs::write(&path, with_lines(&config.to_toml(), "nats", &tls(&pki.ca)))?;
    let nats = nats_section(&path, &[]);

    let mut relay = Relay::run(
        bed.dir.path(),
        "relay",
        &path,
        config.metrics_addr(),
        &[],
        &[],
    );
    relay.wait_ready().await;
    publish_with(&bed, &nats, Load::new("nats-tls", 400)).await;
    wait_stored(&bed, &nats, &relay).await;
    relay.stop().await;

    // Without a client certificate the server refuses the handshake; with another CA the relay
    // refuses the server's certificate. Both stop `check` with a TLS error.
    let wrong_ca = bed.path("wrong-ca.toml");
    std::fs::write(
        &wrong_ca,
        with_lines(&config.to_toml(), "nats", &tls(&pki.other_ca)),
    )?;
    let config_arg = wrong_ca.display().to_string();
    let (status, out) = command(
        bed.dir.path(),
        "check-wrong-ca",
        &["check", "--config", &config_arg],
        &[],
    )
    .await;
    assert!(!status.success(), "{out}");
    assert!(out.contains("cannot connect to NATS"), "{out}");
    assert!(
        out.contains("UnknownIssuer") && out.contains("check nats.tls_ca_file"),
        "a TLS error naming the certificate and the fix:\n{out}"
    );
    Ok(())
}

/// Publishes `payload` on the raw subject bytes `subject` as `user`/`password`, through a plain
/// TCP connection speaking the NATS text protocol (the client library refuses such subjects);
/// returns the stream sequence from JetStream's publish acknowledgement.
fn publish_raw_bytes(
    port: u16,
    user: &str,
    password: &str,
    subject: &[u8],
    payload: &[u8],
) -> std::io::Result<u64> {
    use std::io::{BufRead, BufReader, Read, Write};
    let stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_millis(RAW_IO_TIMEOUT_MS)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    assert!(line.starts_with(b"INFO "), "server greeting: {line:?}");
    let connect = serde_json::json!({
        "verbose": false, "pedantic": false, "headers": true, "user": user, "pass": password,
    });
    let inbox = "_INBOX.raw-publisher";
    let mut out = format!("CONNECT {connect}\r\nSUB {inbox} 1\r\n").into_bytes();
    out.extend_from_slice(b"PUB ");
    out.extend_from_slice(subject);
    out.extend_from_slice(format!(" {inbox} {}\r\n", payload.len()).as_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\nPING\r\n");
    writer.write_all(&out)?;
    loop {
        line.clear();
        reader.read_until(b'\n', &mut line)?;
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        if text == "PING" {
            writer.write_all(b"PONG\r\n")?;
        } else if let Some(args) = text.strip_prefix("MSG ") {
            let len: usize = args
                .rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("MSG line {text:?}"));
            let mut body = vec![0; len + 2];
            reader.read_exact(&mut body)?;
            let ack: serde_json::Value = serde_json::from_slice(&body[..len]).unwrap_or_else(|e| {
                panic!("publish ack {:?}: {e}", String::from_utf8_lossy(&body))
            });
            return Ok(ack["seq"]
                .as_u64()
                .unwrap_or_else(|| panic!("publish not stored: {ack}")));
        } else if text.starts_with("-ERR") {
            panic!("server refused the raw publish: {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_authenticates_with_an_nkey_seed_also_when_rescuing_an_unreadable_delivery_and_a_wrong_seed_is_refused(
) -> TestResult {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed()?;
    let (publisher, publisher_password) = ("publisher", "publisher-pw");
    let server_config = format!(
        "authorization {{\n  users: [\n    {{ nkey: {:?} }}\n    {{ user: {publisher:?}, password: {publisher_password:?} }}\n  ]\n}}\n",
        user.public_key()
    );
    let bed = bed_with(
        Nats::start_with_config(&server_config)?,
        ClickHouse::start()?,
    );
    let seed_file = bed.path("relay.nk");
    std::fs::write(&seed_file, format!("{seed}\n"))?;
    let mut config = bed.config();
    config.streams.truncate(1); // MARKET_TRADES
    config.consumers.truncate(1);
    // A poisoned delivery comes back to the rescue after one ack_wait.
    config.consumers[0].ack_wait_ms = 3_000;
    let path = bed.path("nkey.toml");
    std::fs::write(
        &path,
        with_lines(
            &config.to_toml(),
            "nats",
            &format!("nkey_file = {}", toml_path(&seed_file)),
        ),
    )?;

    let mut relay = Relay::run(
        bed.dir.path(),
        "relay",
        &path,
        config.metrics_addr(),
        &[],
        &[],
    );
    relay.wait_ready().await;
    let as_publisher = NatsConfig {
        user: Some(publisher.into()),
        password: Some(publisher_password.into()),
        ..NatsConfig::default()
    };
    let good = 300;
    publish_with(&bed, &as_publisher, Load::new("nkey", good).mix("trade=1")).await;
    let port = bed.nats.port();
    let bad_seq = tokio::task::spawn_blocking(move || {
        publish_raw_bytes(
            port,
            publisher,
            publisher_password,
            b"trade.\xff.spot.X",
            b"{}",
        )
    })
    .await??;

    // The unreadable delivery drops the client's connection; only a raw connection that
    // authenticates with the seed (signing the server's nonce) can turn it into a dead letter.
    let deadline = Instant::now() + Duration::from_millis(ACCOUNTING_TIMEOUT_MS);
    loop {
        let (trades, dead) = (bed.count_final("trades"), bed.count_dead_letters());
        if trades >= good && dead >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{trades} of {good} trades, {dead} of 1 dead letters (seq {bad_seq}):\n{}",
            relay.output()
        );
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
    let dead = bed.rows(&format!(
        "SELECT nats_seq FROM {DATABASE}.dead_letters FINAL"
    ));
    assert_eq!(dead, vec![vec![bad_seq.to_string()]]);
    relay.stop().await;
    assert!(!relay.output().contains(seed.as_str()));

    // Another user's seed: the server refuses the connection, and the seed stays hidden.
    let wrong = nkeys::KeyPair::new_user().seed()?;
    std::fs::write(&seed_file, &wrong)?;
    let config_arg = path.display().to_string();
    let (status, out) = command(
        bed.dir.path(),
        "check-wrong-seed",
        &["check", "--config", &config_arg],
        &[],
    )
    .await;
    assert!(!status.success(), "{out}");
    assert!(out.contains("cannot connect to NATS"), "{out}");
    assert!(
        out.contains("authorization violation") && out.contains("nats.nkey_file"),
        "{out}"
    );
    assert!(!out.contains(wrong.as_str()), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_shows_in_the_logs_check_verify_or_configuration_errors_of_the_binary(
) -> TestResult {
    // Distinctive values, so a match can only be a leak.
    const CH_PASSWORD: &str = "ChPw7Qx9LeakMarkerA";
    const NATS_PASSWORD: &str = "NatsPw3Vb8LeakMarkerB";
    const NATS_TOKEN: &str = "NatsTok5Kd2LeakMarkerC";
    const WRONG_PASSWORD: &str = "WrongPw6Hs1LeakMarkerD";
    const NOT_A_SEED: &str = "SUNotASeed4Jm7LeakMarkerE";
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed()?;
    let secrets = [
        CH_PASSWORD,
        NATS_PASSWORD,
        NATS_TOKEN,
        WRONG_PASSWORD,
        NOT_A_SEED,
        seed.as_str(),
    ];

    let server_config = format!(
        "authorization {{\n  users: [\n    {{ user: relay, password: {NATS_PASSWORD:?} }}\n    {{ nkey: {:?} }}\n  ]\n}}\n",
        user.public_key()
    );
    let ch = ClickHouse::start_with(&ClickHouseOptions {
        password_user: Some(("prism".into(), CH_PASSWORD.into())),
        ..ClickHouseOptions::default()
    })?;
    let bed = bed_with(Nats::start_with_config(&server_config)?, ch);
    let dir = bed.dir.path();
    let ch_password_file = bed.path("clickhouse-password");
    std::fs::write(&ch_password_file, format!("{CH_PASSWORD}\n"))?;
    let seed_file = bed.path("relay.nk");
    std::fs::write(&seed_file, &seed)?;
    let not_a_seed_file = bed.path("not-a-seed.nk");
    std::fs::write(&not_a_seed_file, NOT_A_SEED)?;

    let config = bed.config();
    let base = with_lines(
        &config.to_toml(),
        "clickhouse",
        &format!(
            "user = \"prism\"\npassword_file = {}",
            toml_path(&ch_password_file)
        ),
    );
    let with_user = bed.path("user.toml");
    std::fs::write(&with_user, with_lines(&base, "nats", "user = \"relay\""))?;
    let with_seed = bed.path("seed.toml");
    std::fs::write(
        &with_seed,
        with_lines(
            &base,
            "nats",
            &format!("nkey_file = {}", toml_path(&seed_file)),
        ),
    )?;
    let with_bad_seed = bed.path("bad-seed.toml");
    std::fs::write(
        &with_bad_seed,
        with_lines(
            &base,
            "nats",
            &format!("nkey_file = {}", toml_path(&not_a_seed_file)),
        ),
    )?;
    let with_inline = bed.path("inline.toml");
    std::fs::write(
        &with_inline,
        with_lines(
            &base,
            "nats",
            &format!("user = \"relay\"\npassword = {NATS_PASSWORD:?}"),
        ),
    )?;
    let arg = |p: &Path| p.display().to_string();
    let password_env = ("PRISM_RELAY_NATS_PASSWORD", NATS_PASSWORD);
    let mut outputs: Vec<(String, String)> = Vec::new();

    // The relay at debug level, until data flows through both secrets.
    let mut relay = Relay::run(
        dir,
        "relay",
        &with_user,
        config.metrics_addr(),
        &[],
        &[("RUST_LOG", "debug"), password_env],
    );
    relay.wait_ready().await;
    let nats = nats_section(&with_user, &[password_env]);
    publish_with(&bed, &nats, Load::new("secrets", 200)).await;
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while bed.count_all_tables() < 200 {
        assert!(
            Instant::now() < deadline,
            "data did not flow:\n{}",
            relay.output()
        );
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
    relay.stop().await;
    outputs.push(("run".into(), relay.output()));

    let user_arg = arg(&with_user);
    let (seed_arg, inline_arg, bad_seed_arg) =
        (arg(&with_seed), arg(&with_inline), arg(&with_bad_seed));
    /// A subcommand run: its name, arguments and environment.
    type Run<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>);
    let runs: Vec<Run> = vec![
        (
            "check",
            vec!["check", "--config", &user_arg],
            vec![password_env],
        ),
        (
            "verify",
            vec!["verify", "--config", &user_arg],
            vec![password_env],
        ),
        ("check-seed", vec!["check", "--config", &seed_arg], vec![]),
        // Refused configurations and connections.
        (
            "inline-password",
            vec!["check", "--config", &inline_arg],
            vec![],
        ),
        ("bad-seed", vec!["check", "--config", &bad_seed_arg], vec![]),
        (
            "token-and-user",
            vec!["check", "--config", &user_arg],
            vec![password_env, ("PRISM_RELAY_NATS_TOKEN", NATS_TOKEN)],
        ),
        (
            "url-with-password",
            vec!["check", "--config", &user_arg],
            vec![
                password_env,
                (
                    "PRISM_RELAY_CLICKHOUSE_URL",
                    "ftp://prism:ChPw7Qx9LeakMarkerA@127.0.0.1:1",
                ),
            ],
        ),
        (
            "wrong-password",
            vec!["check", "--config", &user_arg],
            vec![("PRISM_RELAY_NATS_PASSWORD", WRONG_PASSWORD)],
        ),
    ];
    for (name, args, env) in &runs {
        let (status, out) = command(dir, name, args, env).await;
        outputs.push((format!("{name} ({status})"), out));
    }
    // `run` waits a refusal out (an operator fixes the server or the file meanwhile), so it is
    // stopped once it has said why it waits.
    let mut refused = Relay::spawn(
        dir,
        "wrong-password-run",
        &["run", "--config", &user_arg],
        &[
            ("RUST_LOG", "debug"),
            ("PRISM_RELAY_NATS_PASSWORD", WRONG_PASSWORD),
        ],
    );
    let deadline = Instant::now() + Duration::from_millis(COMMAND_TIMEOUT_MS);
    while !refused.output().contains("NATS refuses the relay") {
        assert!(
            Instant::now() < deadline,
            "run never reported the refusal:\n{}",
            refused.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = refused.stop().await;
    outputs.push((format!("wrong-password-run ({status})"), refused.output()));

    // The runs did what they are for, so their output is worth searching.
    let find = |name: &str| -> &str {
        outputs
            .iter()
            .find(|(n, _)| n.starts_with(name))
            .map(|(_, out)| out.as_str())
            .unwrap_or_default()
    };
    // (run, text its output holds, whether case is ignored: NATS words the refusal in capitals)
    for (run, needle, fold_case) in [
        ("check (", "clickhouse: profile legacy", false),
        ("check-seed", "clickhouse: profile legacy", false),
        ("inline-password", "nats.password", false),
        ("bad-seed", "nats.nkey_file", false),
        ("token-and-user", "one authentication method", false),
        ("url-with-password", "clickhouse.url", false),
        ("wrong-password (", "authorization", true),
    ] {
        let out = find(run);
        let held = if fold_case {
            out.to_lowercase().contains(needle)
        } else {
            out.contains(needle)
        };
        assert!(held, "{run}: {out}");
    }

    for (name, out) in &outputs {
        for secret in secrets {
            assert!(
                !out.contains(secret),
                "{name} shows a secret ({secret}):\n{out}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_log_format_json_every_line_is_a_json_object_and_batch_events_carry_table_and_lsn(
) -> TestResult {
    let bed = Bed::start();
    let config = bed.config();
    let path = config.write(&bed.path("relay.toml"));
    let mut relay = Relay::run(
        bed.dir.path(),
        "relay",
        &path,
        config.metrics_addr(),
        &["--log-format", "json"],
        &[("RUST_LOG", "info,prism_relay::drain=debug")],
    );
    relay.wait_ready().await;
    bed.publish(Load::new("json", 200)).await;
    bed.wait_accounted(DRAIN_TIMEOUT).await;
    relay.stop().await;

    let log = relay.stderr();
    let mut lines = 0;
    let mut batches = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}\nlog:\n{log}"));
        assert!(value.is_object(), "{line}");
        lines += 1;
        if value["fields"]["message"] == "batch inserted" {
            batches.push(value);
        }
    }
    assert!(lines > 0, "no log lines");
    assert!(!batches.is_empty(), "no batch events:\n{log}");
    // Human lines are the default; `[log] format = "json"` in the file asks for JSON too.
    let json_file = bed.path("json.toml");
    std::fs::write(
        &json_file,
        format!("{}\n[log]\nformat = \"json\"\n", config.to_toml()),
    )?;
    let (dir, file_arg) = (bed.dir.path(), json_file.display().to_string());
    let mut check = Relay::spawn(dir, "check-json", &["check", "--config", &file_arg], &[]);
    check.wait_exit().await;
    let mut human = Relay::spawn(
        dir,
        "check-human",
        &["check", "--config", &path.display().to_string()],
        &[],
    );
    human.wait_exit().await;
    let (json_log, human_log) = (check.stderr(), human.stderr());
    assert!(!json_log.trim().is_empty() && !human_log.trim().is_empty());
    for line in json_log.lines().filter(|l| !l.trim().is_empty()) {
        let value: Result<serde_json::Value, _> = serde_json::from_str(line);
        assert!(value.is_ok(), "not JSON: {line}\n{json_log}");
    }
    assert!(
        human_log.lines().all(|l| !l.starts_with('{')),
        "human by default:\n{human_log}"
    );
    for batch in &batches {
        let table = batch["span"]["table"].as_str().unwrap_or_default();
        assert!(
            crate::harness::TABLES.contains(&table),
            "span table: {batch}"
        );
        assert_eq!(batch["fields"]["table"].as_str(), Some(table), "{batch}");
        let (first, last) = (
            batch["fields"]["lsn_first"].as_u64(),
            batch["fields"]["lsn_last"].as_u64(),
        );
        assert!(
            matches!((first, last), (Some(f), Some(l)) if f <= l),
            "lsn fields: {batch}"
        );
    }
    Ok(())
}

/// Publishes `payload` on the raw subject bytes `subject` through a TLS connection (the CA and
/// client certificate of `pki`) speaking the NATS text protocol; returns the stream sequence from
/// JetStream's publish acknowledgement.
async fn publish_raw_bytes_tls(
    port: u16,
    pki: &Pki,
    subject: &[u8],
    payload: &[u8],
) -> std::io::Result<u64> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let socket = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut plain = BufReader::new(socket);
    let mut line = Vec::new();
    plain.read_until(b'\n', &mut line).await?;
    assert!(line.starts_with(b"INFO "), "server greeting: {line:?}");
    let config = prism_relay::tls::client_config(&TlsFiles {
        ca_file: Some(pki.ca.clone()),
        cert_file: Some(pki.client_cert.clone()),
        key_file: Some(pki.client_key.clone()),
    })
    .map_err(std::io::Error::other)?;
    let name =
        rustls::pki_types::ServerName::try_from("127.0.0.1").map_err(std::io::Error::other)?;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, plain.into_inner())
        .await?;
    let (read, mut writer) = tokio::io::split(tls);
    let mut reader = BufReader::new(read);
    let inbox = "_INBOX.raw-publisher";
    let mut out = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\"tls_required\":true}}\r\nSUB {inbox} 1\r\nPUB "
    )
    .into_bytes();
    out.extend_from_slice(subject);
    out.extend_from_slice(format!(" {inbox} {}\r\n", payload.len()).as_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\nPING\r\n");
    writer.write_all(&out).await?;
    writer.flush().await?;
    let deadline = Duration::from_millis(RAW_IO_TIMEOUT_MS);
    loop {
        line.clear();
        tokio::time::timeout(deadline, reader.read_until(b'\n', &mut line))
            .await
            .map_err(std::io::Error::other)??;
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        if text == "PING" {
            writer.write_all(b"PONG\r\n").await?;
            writer.flush().await?;
        } else if let Some(args) = text.strip_prefix("MSG ") {
            let len: usize = args
                .rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("MSG line {text:?}"));
            let mut body = vec![0; len + 2];
            reader.read_exact(&mut body).await?;
            let ack: serde_json::Value = serde_json::from_slice(&body[..len]).unwrap_or_else(|e| {
                panic!("publish ack {:?}: {e}", String::from_utf8_lossy(&body))
            });
            return Ok(ack["seq"]
                .as_u64()
                .unwrap_or_else(|| panic!("publish not stored: {ack}")));
        } else if text.starts_with("-ERR") {
            panic!("server refused the raw publish: {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_nats_tls_with_a_client_certificate_the_rescue_connection_dead_letters_an_unreadable_delivery(
) -> TestResult {
    let pki = Pki::generate();
    let bed = bed_with(
        Nats::start_with_config(&pki.nats_tls_config())?,
        ClickHouse::start()?,
    );
    let mut config = bed.config();
    config.streams.truncate(1); // MARKET_TRADES
    config.consumers.truncate(1);
    // A poisoned delivery comes back to the rescue after one ack_wait.
    config.consumers[0].ack_wait_ms = 3_000;
    let path = bed.path("tls.toml");
    let tls = format!(
        "tls_ca_file = {}\ntls_cert_file = {}\ntls_key_file = {}",
        toml_path(&pki.ca),
        toml_path(&pki.client_cert),
        toml_path(&pki.client_key)
    );
    std::fs::write(&path, with_lines(&config.to_toml(), "nats", &tls))?;
    let nats = nats_section(&path, &[]);

    let mut relay = Relay::run(
        bed.dir.path(),
        "relay",
        &path,
        config.metrics_addr(),
        &[],
        &[],
    );
    relay.wait_ready().await;
    let good = 300;
    publish_with(&bed, &nats, Load::new("tls-rescue", good).mix("trade=1")).await;
    let bad_seq = publish_raw_bytes_tls(bed.nats.port(), &pki, b"trade.\xff.spot.Y", b"{}").await?;

    // The unreadable delivery drops the client's connection; only a raw connection that
    // upgrades to TLS and presents the client certificate can turn it into a dead letter.
    let deadline = Instant::now() + Duration::from_millis(ACCOUNTING_TIMEOUT_MS);
    loop {
        let (trades, dead) = (bed.count_final("trades"), bed.count_dead_letters());
        if trades >= good && dead >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{trades} of {good} trades, {dead} of 1 dead letters (seq {bad_seq}):\n{}",
            relay.output()
        );
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
    let dead = bed.rows(&format!(
        "SELECT nats_seq FROM {DATABASE}.dead_letters FINAL"
    ));
    assert_eq!(dead, vec![vec![bad_seq.to_string()]]);
    assert!(
        relay.output().contains("pulling through a raw connection"),
        "{}",
        relay.output()
    );
    relay.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_https_the_sink_inserts_and_counts_the_bytes_it_sends_as_over_http() -> TestResult {
    let pki = Pki::generate();
    let ch = ClickHouse::start_with_https(&pki.https())?;
    ch.query(
        "CREATE TABLE default.tls_rows (id UInt64, note String) ENGINE = MergeTree ORDER BY id",
    )?;
    let sink = Sink::new(SinkOptions {
        url: ch.https_url().expect("started with HTTPS"),
        tls: TlsFiles {
            ca_file: Some(pki.ca.clone()),
            ..TlsFiles::default()
        },
        database: "default".into(),
        modern: false,
        insert_timeout_ms: 10_000,
        ..SinkOptions::default()
    })?;
    let body: Vec<u8> = (0..2_000)
        .flat_map(|id| format!("{{\"id\":{id},\"note\":\"row {id} over TLS\"}}\n").into_bytes())
        .collect();
    sink.insert_json_each_row("tls_rows", &body, None).await?;
    assert_eq!(
        ch.query("SELECT count(), uniqExact(id) FROM default.tls_rows")?
            .trim(),
        "2000\t2000"
    );
    // The counters sit inside the TLS: they see the request's HTTP bytes, so the body's
    // uncompressed size is counted as over plain HTTP.
    let wire = sink.wire_bytes();
    assert!(
        wire.uncompressed() >= body.len() as u64,
        "uncompressed {} of a {}-byte body",
        wire.uncompressed(),
        body.len()
    );
    assert!(wire.compressed() > 0);
    Ok(())
}
