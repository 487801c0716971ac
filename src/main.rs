//! The `prism-relay` binary: parses flags, sets up tracing, and calls the library.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use prism_relay::config::{Config, ConfigError, LogFormat};
use prism_relay::drain::Router;
use prism_relay::redact::{redact, RedactingWriter};
use prism_relay::run::{
    add_missing_columns, add_missing_distributed_columns, apply_schema, check_cluster_schema,
    check_schema, resolve_profile, schema_statements, sink_options,
};
use prism_relay::schema::Profile;
use prism_relay::sink::Sink;
use prism_relay::source::{self, SetupAction};
use prism_relay::tools::{loadgen, verify};
use prism_relay::{replay, run};
use prism_wal::{ErrorChain, Lsn};

/// Durable relay from NATS JetStream to ClickHouse with a local write-ahead log.
#[derive(Parser)]
#[command(version = version_text(), long_version = version_text(), about, after_help = HELP_TOP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines: human, json (one object per line, with the consumer, table and LSN fields of
    /// each event) or auto (human on a terminal, else json) [default: `[log] format` of the
    /// configuration, else human].
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormatArg>,
}

/// `--log-format`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Auto,
    Human,
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(arg: LogFormatArg) -> LogFormat {
        match arg {
            LogFormatArg::Auto => LogFormat::Auto,
            LogFormatArg::Human => LogFormat::Human,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

/// What `--version` prints: the relay's version, the WAL format it reads and writes, and the
/// schema profiles with the ClickHouse versions each supports.
fn version_text() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        format!(
            "{}\nWAL format version {}\nschema profiles: {}",
            env!("CARGO_PKG_VERSION"),
            prism_wal::segment::SEGMENT_VERSION,
            prism_relay::schema::SERVER_VERSIONS_SUMMARY
        )
    })
}

/// Exit status: a command ran and found problems (check, verify, wal verify, replay
/// --skip-corrupt).
const EXIT_PROBLEMS: u8 = 1;
/// Exit status: the configuration (file or environment) is invalid; nothing was started.
const EXIT_CONFIG: u8 = 3;
/// Exit status: the command failed (a server unreachable or refusing, the WAL unusable, ...).
const EXIT_FAILURE: u8 = 4;

/// The top-level --help's closing text: the exit statuses (2 is clap's for a usage error), then
/// examples.
const HELP_TOP: &str = "Exit status:
  0  success
  1  the command ran and found problems (check, verify, wal verify, replay --skip-corrupt)
  2  usage error: unknown subcommand or flag, or a flag value that does not parse
  3  invalid configuration (file or PRISM_RELAY_* environment); nothing was started
  4  failure: a server unreachable or refusing, the WAL unusable, an I/O error

Examples:
  prism-relay check --config relay.toml
  prism-relay run --config relay.toml
  prism-relay run --help";

// Examples closing each command's --help. Each line is a command that parses (a unit test
// runs every one through the parser), so they stay real as flags change.
const EXAMPLES_RUN: &str = "Examples:
  prism-relay run --config /etc/prism-relay/relay.toml
  PRISM_RELAY_CLICKHOUSE_URL=http://clickhouse:8123 prism-relay run --config relay.toml
  RUST_LOG=prism_relay=debug prism-relay run --config relay.toml";
const EXAMPLES_CHECK: &str = "Examples:
  prism-relay check --config relay.toml
  PRISM_RELAY_NATS_URL=nats://nats:4222 prism-relay check --config relay.toml";
const EXAMPLES_CONFIG: &str = "Examples:
  prism-relay config --config relay.toml
  PRISM_RELAY_WAL_DIR=/var/lib/prism-relay/wal prism-relay config --config relay.toml
  prism-relay config";
const EXAMPLES_SCHEMA: &str = "Examples:
  prism-relay schema print --profile legacy
  prism-relay schema apply --config relay.toml";
const EXAMPLES_SCHEMA_PRINT: &str = "Examples:
  prism-relay schema print
  prism-relay schema print --profile legacy --config relay.toml";
const EXAMPLES_SCHEMA_APPLY: &str = "Examples:
  prism-relay schema apply --config relay.toml
  prism-relay schema apply --config relay.toml --profile modern";
const EXAMPLES_WAL: &str = "Examples:
  prism-relay wal inspect --config relay.toml
  prism-relay wal verify --dir /var/lib/prism-relay/wal
  prism-relay wal dump --dir /var/lib/prism-relay/wal --from-lsn 1000 --limit 10";
const EXAMPLES_WAL_INSPECT: &str = "Examples:
  prism-relay wal inspect --config relay.toml
  prism-relay wal inspect --dir /var/lib/prism-relay/wal";
const EXAMPLES_WAL_VERIFY: &str = "Examples:
  prism-relay wal verify --config relay.toml
  prism-relay wal verify --dir /var/lib/prism-relay/wal";
const EXAMPLES_WAL_DUMP: &str = "Examples:
  prism-relay wal dump --config relay.toml --limit 5
  prism-relay wal dump --dir /var/lib/prism-relay/wal --from-lsn 1000 --to-lsn 1999 --limit 1000";
const EXAMPLES_WAL_QUARANTINE: &str = "Examples:
  prism-relay wal verify --dir /var/lib/prism-relay/wal
  prism-relay wal quarantine --dir /var/lib/prism-relay/wal --segment 38765";
const EXAMPLES_REPLAY: &str = "Examples:
  prism-relay replay --config relay.toml --from-time 2026-11-30T12:00:00Z --to-time 2026-11-30T13:00:00Z
  prism-relay replay --config relay.toml --database marketprism_cold --table trades
  prism-relay replay --config relay.toml --from-lsn 1000 --to-lsn 2000 --no-progress";
const EXAMPLES_LOADGEN: &str = "Examples:
  prism-relay loadgen --create-streams --rate-per-s 1000 --duration-s 60
  prism-relay loadgen --config relay.toml --count 100000 --no-progress";
const EXAMPLES_VERIFY: &str = "Examples:
  prism-relay verify --config relay.toml
  prism-relay verify --config relay.toml --stream MARKET_TRADES --from-seq 1 --to-seq 100000";

/// The configuration file flag shared by the subcommands that read it.
#[derive(clap::Args, Clone)]
struct ConfigArg {
    /// TOML configuration (see relay.example.toml); defaults apply without one.
    /// Environment variables PRISM_RELAY_<SECTION>_<FIELD> override it.
    #[arg(long, short, env = "PRISM_RELAY_CONFIG")]
    config: Option<PathBuf>,
}

impl ConfigArg {
    fn load(&self) -> Result<Config> {
        // The error names the file or the variable itself; a context would only repeat it.
        Ok(Config::load(self.config.as_deref())?)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay: JetStream -> WAL -> ClickHouse, until SIGTERM or SIGINT.
    #[command(after_help = EXAMPLES_RUN)]
    Run(ConfigArg),
    /// Check the configuration, the WAL directory, the JetStream streams and consumers (drift),
    /// and the ClickHouse schema, changing nothing. Prints one line per finding with the change
    /// to make; exits 1 when there is any.
    #[command(after_help = EXAMPLES_CHECK)]
    Check(ConfigArg),
    /// Print the configuration in effect (file, PRISM_RELAY_* overrides, derived defaults) as
    /// TOML, each value marked with where it came from; secrets redacted.
    #[command(after_help = EXAMPLES_CONFIG)]
    Config(ConfigArg),
    /// Print or apply the ClickHouse DDL.
    #[command(after_help = EXAMPLES_SCHEMA)]
    Schema {
        #[command(subcommand)]
        action: SchemaAction,
    },
    /// Inspect, verify or dump the WAL.
    #[command(after_help = EXAMPLES_WAL)]
    Wal {
        #[command(subcommand)]
        action: WalAction,
    },
    /// Re-insert a WAL range into ClickHouse (backfill).
    #[command(after_help = EXAMPLES_REPLAY)]
    Replay(ReplayArgs),
    /// Publish realistic MarketPrism traffic into JetStream.
    #[command(after_help = EXAMPLES_LOADGEN)]
    Loadgen(LoadgenArgs),
    /// Account for every published identity of a stream range in ClickHouse.
    #[command(after_help = EXAMPLES_VERIFY)]
    Verify(VerifyArgs),
}

/// `loadgen` flags; with `--config`, NATS comes from its `[nats]` section (URL and
/// authentication) instead of `--nats-url`.
#[derive(clap::Args)]
struct LoadgenArgs {
    #[command(flatten)]
    config: ToolConfigArg,
    #[command(flatten)]
    options: loadgen::LoadgenOptions,
}

/// `verify` flags; with `--config`, NATS (URL and authentication) and ClickHouse (URL, user,
/// password, database, dead-letter table) come from the configuration instead of the flags, so no
/// secret goes on a command line.
#[derive(clap::Args)]
struct VerifyArgs {
    #[command(flatten)]
    config: ToolConfigArg,
    #[command(flatten)]
    options: verify::VerifyOptions,
}

/// The configuration flag of the tools: optional, and read only when given on the command line
/// (not from PRISM_RELAY_CONFIG, so an exported relay configuration never silently replaces the
/// flags of a tool run).
#[derive(clap::Args, Clone)]
struct ToolConfigArg {
    /// The relay's TOML configuration: connection settings and secrets come from it (and from
    /// PRISM_RELAY_<SECTION>_<FIELD> variables), replacing the connection flags.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

impl ToolConfigArg {
    fn load(&self) -> Result<Option<Config>> {
        match &self.config {
            None => Ok(None),
            Some(path) => Ok(Some(Config::load(Some(path))?)),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ProfileArg {
    Modern,
    Legacy,
    Auto,
    /// The cluster layout of `[clickhouse] cluster` (required), in the dialect of
    /// `[clickhouse] profile`.
    Cluster,
}

impl ProfileArg {
    /// The dialect to render: a given one, or for `auto` and `cluster` the one `detected`
    /// resolves (`[clickhouse] profile`, asking the server for `auto`). `cluster` fails
    /// without `[clickhouse] cluster`. Whenever the configuration names a cluster, every
    /// profile renders the cluster layout.
    async fn resolve<F>(self, config: &Config, detected: F) -> Result<Profile>
    where
        F: std::future::Future<Output = Result<Profile>>,
    {
        if matches!(self, ProfileArg::Cluster) && config.clickhouse.cluster.is_none() {
            bail!(
                "schema profile cluster needs [clickhouse] cluster: set it to the cluster's name in the servers' <remote_servers> (and zookeeper_path if the default does not fit)"
            );
        }
        Ok(match self {
            ProfileArg::Legacy => Profile::Legacy,
            ProfileArg::Modern => Profile::Modern,
            ProfileArg::Auto | ProfileArg::Cluster => detected.await?,
        })
    }
}

/// The long help of `--profile`: the supported versions come from their one statement.
/// The long help of `--profile`: the profiles and the supported versions, stated once in `schema`.
fn profile_help() -> String {
    format!(
        "modern, legacy, or cluster (the `[clickhouse] cluster` layout of replicated tables in \
         the configured profile). Supported servers: {}",
        prism_relay::schema::SERVER_VERSIONS_SUMMARY
    )
}

#[derive(Subcommand)]
enum SchemaAction {
    /// Print the DDL of a profile.
    #[command(after_help = EXAMPLES_SCHEMA_PRINT)]
    Print {
        #[command(flatten)]
        config: ConfigArg,
        /// modern, legacy, or cluster (the `[clickhouse] cluster` layout of replicated tables in the
        /// configured profile).
        #[arg(long, value_enum, default_value = "modern", long_help = profile_help())]
        profile: ProfileArg,
    },
    /// Create the database and tables that are missing, and add the columns the relay writes to
    /// tables that lack them.
    #[command(after_help = EXAMPLES_SCHEMA_APPLY)]
    Apply {
        #[command(flatten)]
        config: ConfigArg,
        /// The profile to create; auto picks it from the server's version.
        #[arg(long, value_enum, default_value = "auto", long_help = profile_help())]
        profile: ProfileArg,
    },
}

#[derive(clap::Args)]
struct WalDir {
    /// WAL directory; default `[wal] dir` of the configuration.
    #[arg(long)]
    dir: Option<PathBuf>,
    #[command(flatten)]
    config: ConfigArg,
}

impl WalDir {
    fn resolve(&self) -> Result<PathBuf> {
        match &self.dir {
            Some(dir) => Ok(dir.clone()),
            None => Ok(self.config.load()?.wal.dir),
        }
    }
}

#[derive(Subcommand)]
enum WalAction {
    /// List the segments with their LSN ranges and sizes, and the ledger's cursors.
    #[command(after_help = EXAMPLES_WAL_INSPECT)]
    Inspect(WalDir),
    /// Check every record's checksum; exits 1 on corruption.
    #[command(after_help = EXAMPLES_WAL_VERIFY)]
    Verify(WalDir),
    /// Print records as JSON lines: `payload` when it is valid UTF-8, otherwise `payload_base64`
    /// (standard alphabet, padded), so every payload comes out byte-exact.
    #[command(after_help = EXAMPLES_WAL_DUMP)]
    Dump {
        #[command(flatten)]
        dir: WalDir,
        /// First LSN [default: the oldest on disk].
        #[arg(long, alias = "from")]
        from_lsn: Option<u64>,
        /// Last LSN, inclusive [default: the newest on disk].
        #[arg(long)]
        to_lsn: Option<u64>,
        /// Records at most.
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
    /// Move a corrupt segment into the WAL's quarantine/ folder (only while the relay is stopped).
    #[command(after_help = EXAMPLES_WAL_QUARANTINE)]
    Quarantine {
        #[command(flatten)]
        dir: WalDir,
        /// The segment, by its first LSN (its file name), as `wal verify` reports it.
        #[arg(long)]
        segment: u64,
    },
}

#[derive(clap::Args)]
struct ReplayArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// WAL directory; default `[wal] dir` of the configuration.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// First LSN [default: the oldest on disk].
    #[arg(long)]
    from_lsn: Option<u64>,
    /// Last LSN, inclusive [default: the newest on disk when the replay starts].
    #[arg(long)]
    to_lsn: Option<u64>,
    /// Only records published at or after this time: RFC 3339 (2026-11-30T12:00:00Z,
    /// 2026-11-30T13:00:00.250+01:00) or unix epoch milliseconds [default: no bound].
    #[arg(long, value_parser = replay::parse_time_ms)]
    from_time: Option<i64>,
    /// Only records published at or before this time, like --from-time [default: no bound].
    #[arg(long, value_parser = replay::parse_time_ms)]
    to_time: Option<i64>,
    /// Insert into this database instead of `[clickhouse] database` (e.g. marketprism_cold).
    #[arg(long)]
    database: Option<String>,
    /// Only this table (repeatable) [default: every table].
    #[arg(long = "table")]
    tables: Vec<String>,
    /// Go on past a corrupt segment or an undecodable record instead of stopping; every skipped
    /// LSN range is reported, and the exit status is 1.
    #[arg(long)]
    skip_corrupt: bool,
    /// Hide the progress bar (shown only on a terminal; elsewhere a line every 10 s).
    #[arg(long)]
    no_progress: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match cli.log_format {
        Some(flag) => flag.into(),
        None => configured_log_format(&cli.command),
    };
    init_tracing(format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("prism-relay: cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(error) => {
            // Each cause once: the relay's errors leave their cause to `source()`, and the chain
            // skips a cause that another crate's message already quoted.
            let chain = ErrorChain(error.as_ref()).to_string();
            eprintln!("prism-relay: {}", redact(&chain));
            ExitCode::from(exit_status(&error))
        }
    }
}

/// Sets up the log output in `format`. Every line passes through the redaction of secrets,
/// whatever module logged it; the level comes from `RUST_LOG` (default `info`).
fn init_tracing(format: LogFormat) {
    let terminal = std::io::stderr().is_terminal();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| RedactingWriter::new(std::io::stderr()));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => !terminal,
    };
    if json {
        // Span fields (consumer, table) go into each line's `span`/`spans`, the event's own
        // fields (lsn, rows, ...) into `fields`: one object per line, for log shippers.
        builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init();
    } else {
        builder.with_ansi(terminal).init();
    }
}

/// The `[log] format` of the configuration the subcommand reads (file and environment), before
/// the configuration is loaded for real: a file that cannot be read or parsed here is reported
/// by that load, so here it only means the default.
fn configured_log_format(command: &Command) -> LogFormat {
    let path = match command {
        Command::Run(config) | Command::Check(config) => config.config.clone(),
        Command::Replay(args) => args.config.config.clone(),
        Command::Loadgen(LoadgenArgs { config, .. })
        | Command::Verify(VerifyArgs { config, .. }) => config.config.clone(),
        _ => None,
    };
    let mut config = path
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| Config::parse_toml(&text).ok())
        .unwrap_or_default();
    let env = std::env::vars().filter(|(name, _)| name == "PRISM_RELAY_LOG_FORMAT");
    match config.apply_env(env) {
        Ok(()) => config.log.format,
        Err(_) => LogFormat::Human,
    }
}

/// The documented exit status of a failed command (see `HELP_TOP`).
fn exit_status(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<ConfigError>().is_some() {
        EXIT_CONFIG
    } else {
        EXIT_FAILURE
    }
}

async fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run(config) => {
            let config = config.load()?;
            run::run(config, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(config) => check(&config.load()?).await,
        Command::Config(config) => {
            let (effective, origins) =
                Config::load_with_origins(config.config.as_deref(), std::env::vars())?;
            let source = config
                .config
                .as_ref()
                .map_or("no file (defaults)".to_string(), |p| {
                    p.display().to_string()
                });
            println!(
                "# prism-relay configuration in effect: {source}, then PRISM_RELAY_* overrides, \
                 then derived defaults.\n# Each value says where it came from; secrets are redacted."
            );
            print!("{}", effective.render_effective(&origins));
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema { action } => schema_command(action).await,
        Command::Wal { action } => wal_command(action),
        Command::Replay(args) => replay_command(args).await,
        Command::Loadgen(LoadgenArgs {
            config,
            mut options,
        }) => {
            options.refuse_secrets_in_flags()?;
            if let Some(config) = config.load()? {
                options.nats_url = config.nats.url.clone();
                options.nats = Some(config.nats);
            }
            let summary = loadgen::run(&options).await?;
            println!("{summary}");
            Ok(if summary.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_PROBLEMS)
            })
        }
        Command::Verify(VerifyArgs {
            config,
            mut options,
        }) => {
            options.refuse_secrets_in_flags()?;
            if let Some(config) = config.load()? {
                options.nats_url = config.nats.url.clone();
                options.nats = Some(config.nats);
                options.clickhouse_url = config.clickhouse.url;
                options.clickhouse_tls = prism_relay::tls::TlsFiles {
                    ca_file: config.clickhouse.tls_ca_file,
                    cert_file: config.clickhouse.tls_cert_file,
                    key_file: config.clickhouse.tls_key_file,
                };
                options.clickhouse_user = config.clickhouse.user;
                options.clickhouse_password = config.clickhouse.password;
                options.database = config.clickhouse.database;
                options.dead_letter_table = config.drain.dead_letter_table;
            }
            let report = verify::run(&options).await?;
            println!("{report}");
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_PROBLEMS)
            })
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; only SIGINT stops the relay");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `check`: prints one line per finding with the change to make and exits 0 when there is none,
/// [`EXIT_PROBLEMS`] otherwise (a configuration that does not load fails before, with
/// [`EXIT_CONFIG`]). NATS, ClickHouse and the WAL directory are checked independently: one being
/// unreachable does not stop the checks of the others.
async fn check(config: &Config) -> Result<ExitCode> {
    println!("config: ok");
    let mut findings = 0usize;
    let mut finding = |line: String| {
        println!("{}", redact(&line));
        findings += 1;
    };
    // A warning, not a finding: the relay runs, only a poisoned delivery needs the operator.
    if let Some(limitation) = source::rescue_unavailable(&config.nats) {
        println!("nats: warning: {limitation}");
    }

    let wal = run::check_wal_dir(&config.wal);
    if wal.is_empty() {
        println!("wal: ok ({})", config.wal.dir.display());
    }
    for line in wal {
        finding(format!("wal: {line}"));
    }
    // A warning, as at start-up: a shared volume may be set up that way on purpose.
    if let Some(exposure) = run::wal_dir_exposure(&config.wal.dir) {
        println!("wal: warning: {exposure}");
    }

    match source::connect(&config.nats).await {
        Err(error) => finding(format!("nats: {}", ErrorChain(&error))),
        Ok(client) => {
            let js = source::jetstream(client, &config.nats);
            match source::check_streams(&js, &config.stream).await {
                Err(error) => finding(format!("nats: {}", ErrorChain(&error))),
                Ok(outcomes) => {
                    for outcome in outcomes {
                        for line in setup_findings(
                            "stream",
                            &outcome.stream,
                            outcome.action,
                            &outcome.drift,
                        ) {
                            finding(line);
                        }
                    }
                }
            }
            for consumer in &config.consumer {
                match source::check_consumer(&js, consumer).await {
                    Err(error) => finding(format!("nats: {}", ErrorChain(&error))),
                    Ok(outcome) => {
                        let name = format!("{}/{}", outcome.stream, outcome.durable);
                        for line in
                            setup_findings("consumer", &name, outcome.action, &outcome.drift)
                        {
                            finding(line);
                        }
                    }
                }
            }
        }
    }

    match resolve_profile(config).await {
        Err(error) => finding(format!(
            "clickhouse: {}: {}",
            ErrorChain(&error),
            run::clickhouse_fix(&error)
        )),
        Ok((probe, profile)) => {
            println!("clickhouse: profile {}", profile.name());
            match check_schema(config, &probe, profile).await {
                Err(error) => finding(format!("clickhouse: {}", ErrorChain(&error))),
                Ok(problems) => {
                    for problem in problems {
                        finding(format!("schema: {problem}"));
                    }
                }
            }
            match check_cluster_schema(config, &probe, profile).await {
                Err(error) => finding(format!("clickhouse: {}", ErrorChain(&error))),
                Ok(problems) => {
                    for problem in problems {
                        finding(format!("schema: {problem}"));
                    }
                }
            }
        }
    }
    if let Some(cluster) = &config.clickhouse.cluster {
        for line in check_replicas(config, cluster).await {
            finding(line);
        }
    }
    Ok(match findings {
        0 => {
            println!("check: ok");
            ExitCode::SUCCESS
        }
        1 => {
            println!("check: problems found (1 finding)");
            ExitCode::from(EXIT_PROBLEMS)
        }
        n => {
            println!("check: problems found ({n} findings)");
            ExitCode::from(EXIT_PROBLEMS)
        }
    })
}

/// A drift report's server value as TOML: subject sets are reported as `{"a", "b"}`, which the
/// configuration spells as a list.
fn toml_value(server: &str) -> String {
    match server.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
        Some(items) => format!("[{items}]"),
        None => server.to_owned(),
    }
}

/// Prints the state of a stream or consumer and returns its findings: each drift, with the
/// change that ends it. A missing object is not a finding: `run` creates it.
fn setup_findings(
    kind: &str,
    name: &str,
    action: SetupAction,
    drift: &[source::Drift],
) -> Vec<String> {
    match action {
        SetupAction::Missing => {
            println!("{kind} {name}: missing (run creates it)");
            Vec::new()
        }
        _ if drift.is_empty() => {
            println!("{kind} {name}: ok");
            Vec::new()
        }
        // The server's value stays in force (the relay never recreates a durable), so the
        // configuration is what changes, unless the operator edits the server object.
        _ => drift
            .iter()
            .map(|d| {
                format!(
                    "{kind} {name}: drift: {d}: set {} = {} in the configuration to match the server, or change the {kind} on the server (`nats {kind} edit`)",
                    d.field,
                    toml_value(&d.server)
                )
            })
            .collect(),
    }
}

/// Checks the tables on each of `[clickhouse] replica_urls` as on `url`; returns the findings
/// (an unreachable replica, a schema problem on one).
async fn check_replicas(config: &Config, cluster: &str) -> Vec<String> {
    let mut findings = Vec::new();
    for url in &config.clickhouse.replica_urls {
        let mut replica = config.clone();
        replica.clickhouse.url = url.clone();
        let url = redact(url);
        match resolve_profile(&replica).await {
            Err(error) => findings.push(format!(
                "clickhouse replica {url}: {}: {}",
                ErrorChain(&error),
                run::clickhouse_fix(&error)
            )),
            Ok((probe, profile)) => {
                let before = findings.len();
                for problems in [
                    check_schema(&replica, &probe, profile).await,
                    check_cluster_schema(&replica, &probe, profile).await,
                ] {
                    match problems {
                        Err(error) => findings
                            .push(format!("clickhouse replica {url}: {}", ErrorChain(&error))),
                        Ok(problems) => findings.extend(
                            problems
                                .iter()
                                .map(|p| format!("clickhouse replica {url}: schema: {p}")),
                        ),
                    }
                }
                if findings.len() == before {
                    println!("clickhouse replica {url}: ok (cluster {cluster})");
                }
            }
        }
    }
    findings
}

async fn schema_command(action: SchemaAction) -> Result<ExitCode> {
    match action {
        SchemaAction::Print { config, profile } => {
            let config = config.load()?;
            let detected = async { Ok(resolve_profile(&config).await?.1) };
            let profile = profile.resolve(&config, detected).await?;
            for statement in schema_statements(&config, profile) {
                println!("{statement};\n");
            }
            Ok(ExitCode::SUCCESS)
        }
        SchemaAction::Apply { config, profile } => {
            let config = config.load()?;
            // The configuration is checked before ClickHouse is asked anything.
            profile
                .resolve(&config, async { Ok(Profile::Legacy) })
                .await?;
            let (probe, detected) = resolve_profile(&config).await?;
            let profile = profile.resolve(&config, async { Ok(detected) }).await?;
            apply_schema(&config, &probe, profile).await?;
            add_missing_columns(&config, &probe, profile).await?;
            // Each server has its own Distributed tables: those of the replicas `check`
            // verifies get the missing columns too.
            for url in &config.clickhouse.replica_urls {
                let mut replica = config.clone();
                replica.clickhouse.url = url.clone();
                let (replica_probe, _) = resolve_profile(&replica).await?;
                add_missing_distributed_columns(&replica, &replica_probe, profile).await?;
            }
            let mut problems = check_schema(&config, &probe, profile).await?;
            problems.extend(check_cluster_schema(&config, &probe, profile).await?);
            for problem in &problems {
                println!("schema: {problem}");
            }
            if !problems.is_empty() {
                bail!("the tables exist but differ from what the relay writes");
            }
            match &config.clickhouse.cluster {
                None => println!(
                    "schema: {} profile applied to database {}",
                    profile.name(),
                    config.clickhouse.database
                ),
                Some(cluster) => println!(
                    "schema: {} profile applied to database {} on cluster {cluster}",
                    profile.name(),
                    config.clickhouse.database
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn wal_command(action: WalAction) -> Result<ExitCode> {
    match action {
        WalAction::Inspect(dir_arg) => {
            let dir = dir_arg.resolve()?;
            let segments = prism_wal::list_segments(&dir).with_context(|| wal_dir_context(&dir))?;
            println!(
                "{:<24} {:>14} {:>14} {:>12}",
                "segment", "first_lsn", "last_lsn", "bytes"
            );
            for s in &segments {
                let last = s.last_lsn.map_or("-".to_string(), |l| l.0.to_string());
                println!(
                    "{:<24} {:>14} {:>14} {:>12}",
                    s.id, s.first_lsn.0, last, s.bytes
                );
            }
            let total: u64 = segments.iter().map(|s| s.bytes).sum();
            println!("{} segments, {} bytes", segments.len(), total);
            match prism_wal::load_ledger(&dir) {
                Ok(ledger) => {
                    for (lane, cursor) in &ledger.cursors {
                        println!("cursor {lane}: {}", cursor.0);
                    }
                    for (lane, batch) in &ledger.inflight {
                        println!(
                            "in flight {lane}: {}..={} ({} records)",
                            batch.first.0, batch.last.0, batch.rows
                        );
                    }
                }
                Err(error) => println!("ledger: {}", ErrorChain(&error)),
            }
            explain_retention(&dir_arg, &dir)?;
            Ok(ExitCode::SUCCESS)
        }
        WalAction::Verify(args) => {
            let dir = args.resolve()?;
            // The group size tells a torn tail from corruption, as at recovery: take the
            // configured one (defaults without a configuration).
            let options = prism_relay::run::wal_options(&args.config.load()?.wal);
            let report = prism_wal::verify_with_options(&prism_wal::StdFs, &dir, &options)?;
            println!(
                "{} segments, {} records, {} bytes",
                report.segments, report.records, report.bytes
            );
            if let Some(torn) = &report.torn_tail {
                println!(
                    "torn tail (truncated at the next start): segment {} at offset {}, {} bytes: {}",
                    torn.segment, torn.offset, torn.bytes_dropped, torn.reason
                );
            }
            for problem in &report.problems {
                println!(
                    "corrupt: segment {} at offset {}: {}",
                    problem.segment, problem.offset, problem.reason
                );
            }
            Ok(if report.is_ok() {
                println!("verify: ok");
                ExitCode::SUCCESS
            } else {
                println!("verify: corruption found; see `prism-relay wal inspect`");
                ExitCode::from(EXIT_PROBLEMS)
            })
        }
        WalAction::Dump {
            dir,
            from_lsn,
            to_lsn,
            limit,
        } => {
            let dir = dir.resolve()?;
            let from = match from_lsn {
                Some(from) => Lsn(from),
                // The oldest on disk: retention may have deleted the first segments.
                None => prism_wal::list_segments(&dir)
                    .with_context(|| wal_dir_context(&dir))?
                    .first()
                    .map_or(Lsn(1), |s| s.first_lsn),
            };
            let mut reader = prism_wal::read_dir(&dir, from)?;
            let mut printed = 0;
            let mut out = std::io::stdout().lock();
            while printed < limit {
                let Some(record) = reader.next()? else { break };
                if to_lsn.is_some_and(|to| record.lsn.0 > to) {
                    break;
                }
                let envelope = record.envelope()?;
                let mut line = serde_json::json!({
                    "lsn": record.lsn.0,
                    "stream": envelope.stream,
                    "stream_seq": envelope.stream_seq.0,
                    "subject": envelope.subject,
                    "published_ns": envelope.published_ns,
                    "headers": envelope.headers,
                });
                // Valid UTF-8 round-trips exactly through a JSON string; anything else goes
                // as base64 so no byte is replaced.
                match std::str::from_utf8(&envelope.payload) {
                    Ok(text) => line["payload"] = serde_json::Value::from(text),
                    Err(_) => {
                        line["payload_base64"] =
                            serde_json::Value::from(base64_encode(&envelope.payload))
                    }
                }
                writeln!(out, "{line}").context("writing to stdout")?;
                printed += 1;
            }
            Ok(ExitCode::SUCCESS)
        }
        WalAction::Quarantine { dir, segment } => {
            let dir = dir.resolve()?;
            let moved = prism_wal::quarantine_segment(&dir, prism_wal::SegmentId(segment))?;
            println!("moved to {}", moved.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The context of a failure to read a WAL directory, naming where it came from.
fn wal_dir_context(dir: &std::path::Path) -> String {
    format!(
        "cannot read the WAL directory {} (from --dir or `wal.dir`): give the directory the relay \
         writes its WAL to",
        dir.display()
    )
}

/// Prints which segments retention deletes next and why, with the limits of the configuration
/// (its defaults without one).
fn explain_retention(dir_arg: &WalDir, dir: &std::path::Path) -> Result<()> {
    let config = dir_arg.config.load()?;
    let options = run::wal_options(&config.wal);
    let plan = prism_wal::retention_plan(
        dir,
        options.retention,
        options.budget_bytes_max,
        std::time::SystemTime::now(),
    )?;
    match plan.release_point {
        Some(point) => println!("retention: records below lsn {} are released", point.0),
        None => println!("retention: nothing released (no cursor in the ledger)"),
    }
    for (segment, fate) in &plan.segments {
        match fate {
            prism_wal::SegmentFate::DeletedNext { reason } => {
                println!("retention {segment}: deleted next: {reason}")
            }
            prism_wal::SegmentFate::Kept {
                expires_in_s,
                reason,
            } => println!("retention {segment}: kept (age expires in {expires_in_s} s): {reason}"),
            prism_wal::SegmentFate::Held { reason } => {
                println!("retention {segment}: held: {reason}")
            }
        }
    }
    Ok(())
}

/// Standard base64 with padding (RFC 4648), for `wal dump` payloads that are not UTF-8.
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Seconds between two plain progress lines when stderr is not a terminal (logs, CI).
const REPLAY_PROGRESS_LINE_INTERVAL_S: u64 = 10;

async fn replay_command(args: ReplayArgs) -> Result<ExitCode> {
    let mut config = args.config.load()?;
    if let Some(database) = args.database {
        // The name is written into SQL like the configured one: validate it the same way.
        config.clickhouse.database = database;
        config
            .validate()
            .context("invalid --database (it replaces clickhouse.database)")?;
    }
    let router = Router::new(
        config
            .drain
            .passthrough
            .iter()
            .map(|r| (r.data_type.clone(), r.table.clone())),
    );
    replay::check_tables(&router, &args.tables)?;
    let options = replay::ReplayOptions {
        dir: args.dir.unwrap_or_else(|| config.wal.dir.clone()),
        from: args.from_lsn.map(Lsn),
        to: args.to_lsn.map(Lsn),
        from_time_ms: args.from_time,
        to_time_ms: args.to_time,
        tables: args.tables,
        rows_max: replay::REPLAY_BATCH_ROWS_MAX,
        dead_letter_table: config.drain.dead_letter_table.clone(),
        backoff_initial_ms: config.drain.retry_backoff_initial_ms,
        backoff_max_ms: config.drain.retry_backoff_max_ms,
        skip_corrupt: args.skip_corrupt,
        time_window: config.drain.time_window(),
    };
    let range = replay::resolve_range(&options)?;
    let (probe, profile) = resolve_profile(&config).await?;
    // A backfill into a new database (or cluster) creates its tables as `run` would.
    if config.clickhouse.create_schema {
        apply_schema(&config, &probe, profile).await?;
    }
    let problems = check_schema(&config, &probe, profile).await?;
    if let Some(problem) = problems.first() {
        bail!(
            "schema of database {}: {problem}",
            config.clickhouse.database
        );
    }
    let sink = Sink::new(sink_options(&config, profile))?;
    match range.last {
        Some(last) => eprintln!(
            "replay: lsn {}..={} of {} into database {}",
            range.first.0,
            last.0,
            options.dir.display(),
            config.clickhouse.database
        ),
        None => eprintln!("replay: no record on disk in {}", options.dir.display()),
    }
    let terminal = std::io::stderr().is_terminal() && !args.no_progress;
    let bar = indicatif::ProgressBar::new(range.len());
    if terminal {
        // The template is a constant known to parse; a failure would only lose the layout.
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} records  {msg}  ETA {eta}",
        ) {
            bar.set_style(style);
        }
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = std::time::Instant::now();
    let mut last_line = started;
    let summary = replay::replay(&options, &router, &sink, |p| {
        let elapsed_s = started.elapsed().as_secs_f64().max(1e-3);
        let rows_per_s = p.rows as f64 / elapsed_s;
        let done = (p.lsn.0 + 1).saturating_sub(range.first.0);
        if terminal {
            bar.set_position(done.min(range.len()));
            bar.set_message(format!("{} rows, {rows_per_s:.0} rows/s", p.rows));
        } else if !args.no_progress
            && last_line.elapsed().as_secs() >= REPLAY_PROGRESS_LINE_INTERVAL_S
        {
            last_line = std::time::Instant::now();
            let left = range.len().saturating_sub(done);
            let eta_s = left as f64 * elapsed_s / done.max(1) as f64;
            eprintln!(
                "replay: lsn {} ({done}/{} records), {} rows, {rows_per_s:.0} rows/s, ETA {eta_s:.0} s",
                p.lsn.0,
                range.len(),
                p.rows
            );
        }
    })
    .await?;
    bar.finish_and_clear();
    println!(
        "replay: {} records read (lsn {}..={}), {} rows inserted, {} dead letters, {:.1} s",
        summary.records,
        summary.first.map_or(0, |l| l.0),
        summary.last.map_or(0, |l| l.0),
        summary.rows(),
        summary.dead_letters,
        started.elapsed().as_secs_f64()
    );
    println!(
        "  {:<22} {:>10} {:>10} {:>12}",
        "table", "records", "rows", "dead_letters"
    );
    for (table, t) in &summary.tables {
        println!(
            "  {table:<22} {:>10} {:>10} {:>12}",
            t.records, t.rows, t.dead_letters
        );
    }
    for skipped in &summary.skipped {
        println!("skipped: {skipped}");
    }
    Ok(if summary.skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("replay: corrupt records skipped; see `prism-relay wal verify`");
        ExitCode::from(EXIT_PROBLEMS)
    })
}

#[cfg(test)]
mod tests {
    use super::{base64_encode, Cli};
    use clap::{CommandFactory, Parser};

    /// Every command with its path of names (`prism-relay wal dump`), the top one first.
    fn commands() -> Vec<(String, clap::Command)> {
        let mut out = Vec::new();
        let mut stack = vec![("prism-relay".to_string(), Cli::command())];
        while let Some((path, command)) = stack.pop() {
            for sub in command.get_subcommands() {
                stack.push((format!("{path} {}", sub.get_name()), sub.clone()));
            }
            out.push((path, command));
        }
        out
    }

    #[test]
    fn every_command_and_every_flag_has_help_text() {
        let mut missing = Vec::new();
        for (path, command) in commands() {
            if path != "prism-relay" && command.get_about().is_none() {
                missing.push(format!("{path}: no description"));
            }
            for arg in command.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} --{}: no help", arg.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "{missing:#?}");
    }

    #[test]
    fn every_command_help_ends_with_examples_that_parse() {
        for (path, command) in commands() {
            let help = command
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            let examples = help
                .split("Examples:")
                .nth(1)
                .unwrap_or_else(|| panic!("{path}: no Examples: section in --help"));
            let lines: Vec<&str> = examples.lines().filter(|l| !l.trim().is_empty()).collect();
            assert!((2..=3).contains(&lines.len()), "{path}: {lines:?}");
            for line in lines {
                // Leading VAR=value assignments are the shell's, not the command's.
                let words: Vec<&str> = line
                    .split_whitespace()
                    .skip_while(|w| w.contains('=') && !w.starts_with('-'))
                    .collect();
                assert_eq!(words.first(), Some(&"prism-relay"), "{path}: {line}");
                if let Err(error) = Cli::try_parse_from(&words) {
                    // `--help` in an example prints help, which clap reports as an "error".
                    assert_eq!(
                        error.kind(),
                        clap::error::ErrorKind::DisplayHelp,
                        "{path}: {line}: {error}"
                    );
                }
            }
        }
    }

    #[test]
    fn version_names_the_wal_format_and_the_schema_profiles() {
        let version = Cli::command().render_long_version();
        assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
        assert!(
            version.contains(&format!(
                "WAL format version {}",
                prism_wal::segment::SEGMENT_VERSION
            )),
            "{version}"
        );
        assert!(
            version.contains("modern: ClickHouse 22.2")
                && version.contains("legacy: ClickHouse 18.16"),
            "{version}"
        );
    }

    #[test]
    fn progress_is_hidden_with_no_progress_on_every_command_that_shows_one() {
        for command in ["loadgen", "replay"] {
            Cli::try_parse_from(["prism-relay", command, "--no-progress"])
                .unwrap_or_else(|e| panic!("{command}: {e}"));
            assert!(
                Cli::try_parse_from(["prism-relay", command, "--progress", "false"]).is_err(),
                "{command} still takes --progress false"
            );
        }
    }

    #[test]
    fn base64_matches_the_rfc_4648_test_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(input.as_bytes()), expected);
        }
        assert_eq!(base64_encode(&[0xff, 0xfe, 0x00]), "//4A");
    }
}
