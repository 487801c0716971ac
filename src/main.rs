//! The `prism-relay` binary: parses flags, sets up tracing, and calls the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use prism_relay::config::Config;
use prism_relay::drain::Router;
use prism_relay::redact::{redact, RedactingWriter};
use prism_relay::run::{
    add_missing_columns, apply_schema, check_schema, resolve_profile, schema_statements,
    sink_options,
};
use prism_relay::schema::Profile;
use prism_relay::sink::Sink;
use prism_relay::source::{self, SetupAction};
use prism_relay::tools::{loadgen, verify};
use prism_relay::{replay, run};
use prism_wal::Lsn;

/// Durable relay from NATS JetStream to ClickHouse with a local write-ahead log.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

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
        Config::load(self.config.as_deref()).context("invalid configuration")
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay: JetStream -> WAL -> ClickHouse, until SIGTERM or SIGINT.
    Run(ConfigArg),
    /// Check the configuration, the JetStream streams and consumers (drift), and the ClickHouse
    /// schema, changing nothing.
    Check(ConfigArg),
    /// Print or apply the ClickHouse DDL.
    Schema {
        #[command(subcommand)]
        action: SchemaAction,
    },
    /// Inspect, verify or dump the WAL.
    Wal {
        #[command(subcommand)]
        action: WalAction,
    },
    /// Re-insert a WAL range into ClickHouse (backfill).
    Replay(ReplayArgs),
    /// Publish realistic MarketPrism traffic into JetStream.
    Loadgen(LoadgenArgs),
    /// Account for every published identity of a stream range in ClickHouse.
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
            Some(path) => Config::load(Some(path))
                .map(Some)
                .context("invalid configuration"),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ProfileArg {
    Modern,
    Legacy,
    Auto,
}

#[derive(Subcommand)]
enum SchemaAction {
    /// Print the DDL of a profile.
    Print {
        #[command(flatten)]
        config: ConfigArg,
        /// modern (ClickHouse 22.2+, what MarketPrism runs) or legacy (18.16, for tests here).
        #[arg(long, value_enum, default_value = "modern")]
        profile: ProfileArg,
    },
    /// Create the database and tables that are missing (auto picks the profile by version).
    Apply {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, value_enum, default_value = "auto")]
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
    Inspect(WalDir),
    /// Check every record's checksum; exits 1 on corruption.
    Verify(WalDir),
    /// Print records as JSON lines.
    Dump {
        #[command(flatten)]
        dir: WalDir,
        /// First LSN.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Records at most.
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
    /// Move a corrupt segment into the WAL's quarantine/ folder (only while the relay is stopped).
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
    /// First LSN (default: the oldest on disk).
    #[arg(long, default_value_t = 1)]
    from_lsn: u64,
    /// Last LSN, inclusive (default: the newest on disk).
    #[arg(long)]
    to_lsn: Option<u64>,
    /// Insert into this database instead of `[clickhouse] database` (e.g. marketprism_cold).
    #[arg(long)]
    database: Option<String>,
    /// Only these tables (repeatable).
    #[arg(long = "table")]
    tables: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Every log line passes through the redaction of secrets, whatever module logged it.
        .with_writer(|| RedactingWriter::new(std::io::stderr()))
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("prism-relay: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("prism-relay: {}", redact(&format!("{error:#}")));
            ExitCode::FAILURE
        }
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
        Command::Schema { action } => schema_command(action).await,
        Command::Wal { action } => wal_command(action),
        Command::Replay(args) => replay_command(args).await,
        Command::Loadgen(LoadgenArgs {
            config,
            mut options,
        }) => {
            if let Some(config) = config.load()? {
                options.nats_url = config.nats.url.clone();
                options.nats = Some(config.nats);
            }
            let summary = loadgen::run(&options).await?;
            println!("{summary}");
            Ok(if summary.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Verify(VerifyArgs {
            config,
            mut options,
        }) => {
            if let Some(config) = config.load()? {
                options.nats_url = config.nats.url.clone();
                options.nats = Some(config.nats);
                options.clickhouse_url = config.clickhouse.url;
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
                ExitCode::FAILURE
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

async fn check(config: &Config) -> Result<ExitCode> {
    let mut ok = true;
    println!("config: ok");
    let client = source::connect(&config.nats).await?;
    let js = source::jetstream(client, &config.nats);
    for outcome in source::check_streams(&js, &config.stream).await? {
        ok &= report_setup("stream", &outcome.stream, outcome.action, &outcome.drift);
    }
    for consumer in &config.consumer {
        let outcome = source::check_consumer(&js, consumer).await?;
        let name = format!("{}/{}", outcome.stream, outcome.durable);
        ok &= report_setup("consumer", &name, outcome.action, &outcome.drift);
    }
    match resolve_profile(config).await {
        Err(error) => {
            println!("clickhouse: unreachable: {}", redact(&error.to_string()));
            ok = false;
        }
        Ok((probe, profile)) => {
            println!("clickhouse: profile {}", profile.name());
            let problems = check_schema(config, &probe, profile).await?;
            for problem in &problems {
                println!("schema: {problem}");
            }
            ok &= problems.is_empty();
        }
    }
    Ok(if ok {
        println!("check: ok");
        ExitCode::SUCCESS
    } else {
        println!("check: problems found");
        ExitCode::FAILURE
    })
}

fn report_setup(kind: &str, name: &str, action: SetupAction, drift: &[source::Drift]) -> bool {
    match action {
        SetupAction::Missing => println!("{kind} {name}: missing (run creates it)"),
        _ if drift.is_empty() => println!("{kind} {name}: ok"),
        _ => {
            for d in drift {
                println!("{kind} {name}: drift: {d}");
            }
        }
    }
    // Drift is reported, not fatal: the server's settings stay in force.
    true
}

async fn schema_command(action: SchemaAction) -> Result<ExitCode> {
    match action {
        SchemaAction::Print { config, profile } => {
            let config = config.load()?;
            let profile = match profile {
                ProfileArg::Legacy => Profile::Legacy,
                ProfileArg::Modern => Profile::Modern,
                ProfileArg::Auto => resolve_profile(&config).await?.1,
            };
            for statement in schema_statements(&config, profile) {
                println!("{statement};\n");
            }
            Ok(ExitCode::SUCCESS)
        }
        SchemaAction::Apply { config, profile } => {
            let config = config.load()?;
            let (probe, detected) = resolve_profile(&config).await?;
            let profile = match profile {
                ProfileArg::Legacy => Profile::Legacy,
                ProfileArg::Modern => Profile::Modern,
                ProfileArg::Auto => detected,
            };
            apply_schema(&config, &probe, profile).await?;
            add_missing_columns(&config, &probe, profile).await?;
            let problems = check_schema(&config, &probe, profile).await?;
            for problem in &problems {
                println!("schema: {problem}");
            }
            if !problems.is_empty() {
                bail!("the tables exist but differ from what the relay writes");
            }
            println!(
                "schema: {} profile applied to database {}",
                profile.name(),
                config.clickhouse.database
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn wal_command(action: WalAction) -> Result<ExitCode> {
    match action {
        WalAction::Inspect(dir) => {
            let dir = dir.resolve()?;
            let segments = prism_wal::list_segments(&dir)
                .with_context(|| format!("listing {}", dir.display()))?;
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
                Err(error) => println!("ledger: {error}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        WalAction::Verify(dir) => {
            let dir = dir.resolve()?;
            let report = prism_wal::verify(&dir)?;
            println!(
                "{} segments, {} records, {} bytes",
                report.segments, report.records, report.bytes
            );
            if let Some(torn) = &report.torn_tail {
                println!("torn tail (truncated at the next start): {torn:?}");
            }
            for problem in &report.problems {
                println!("corrupt: {problem:?}");
            }
            Ok(if report.is_ok() {
                println!("verify: ok");
                ExitCode::SUCCESS
            } else {
                println!("verify: corruption found; see `prism-relay wal inspect`");
                ExitCode::FAILURE
            })
        }
        WalAction::Dump { dir, from, limit } => {
            let dir = dir.resolve()?;
            let mut reader = prism_wal::read_dir(&dir, Lsn(from))?;
            let mut printed = 0;
            while printed < limit {
                let Some(record) = reader.next()? else { break };
                let envelope = record.envelope()?;
                let line = serde_json::json!({
                    "lsn": record.lsn.0,
                    "stream": envelope.stream,
                    "stream_seq": envelope.stream_seq.0,
                    "subject": envelope.subject,
                    "published_ns": envelope.published_ns,
                    "headers": envelope.headers,
                    "payload": String::from_utf8_lossy(&envelope.payload),
                });
                println!("{line}");
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

async fn replay_command(args: ReplayArgs) -> Result<ExitCode> {
    let mut config = args.config.load()?;
    if let Some(database) = args.database {
        // The name is written into SQL like the configured one: validate it the same way.
        config.clickhouse.database = database;
        config
            .validate()
            .context("invalid --database (it replaces clickhouse.database)")?;
    }
    let (_, profile) = resolve_profile(&config).await?;
    let sink = Sink::new(sink_options(&config, profile))?;
    let router = Router::new(
        config
            .drain
            .passthrough
            .iter()
            .map(|r| (r.data_type.clone(), r.table.clone())),
    );
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let options = replay::ReplayOptions {
        dir: config.wal.dir.clone(),
        from: Lsn(args.from_lsn),
        to: args.to_lsn.map(Lsn),
        tables: args.tables,
        rows_max: 10_000,
        dead_letter_table: config.drain.dead_letter_table.clone(),
        backoff_initial_ms: config.drain.retry_backoff_initial_ms,
        backoff_max_ms: config.drain.retry_backoff_max_ms,
        token_prefix: format!("replay:{started_ms}:"),
    };
    let bar = indicatif::ProgressBar::new_spinner();
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let summary = replay::replay(&options, &router, &sink, |lsn| {
        bar.set_message(format!("replayed through LSN {}", lsn.0));
        bar.tick();
    })
    .await?;
    bar.finish_and_clear();
    println!(
        "replay: {} records read, {} dead letters",
        summary.records, summary.dead_letters
    );
    for (table, rows) in &summary.rows {
        println!("  {table:<22} {rows:>10} rows");
    }
    Ok(ExitCode::SUCCESS)
}
