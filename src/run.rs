//! `prism-relay run`: start-up, the task set, and graceful shutdown.
//!
//! Start-up order follows what must never be lost: the WAL is recovered first (so acked data is
//! back before anything new arrives), then JetStream consumers are checked or created and ingest
//! starts. ClickHouse is not needed to ingest: the drain waits for it (retrying with backoff while
//! the WAL absorbs data), checks the schema, and only then starts its lanes. A schema mismatch is
//! an operator error and stops the relay with a message naming the table and column.
//!
//! Shutdown (SIGTERM/SIGINT, or the future passed to [`run`]): fetching stops, appends and acks in
//! flight finish, each lane makes one bounded attempt to insert what it has batched, the ledger is
//! committed and the WAL closed, all within `shutdown.timeout_ms`. Whatever is not inserted stays
//! in the WAL for the next start.
//!
//! With `shutdown.drain` (decommissioning: a relay stopped for good), the lanes are told to finish
//! once the ingest tasks are done (the WAL's durable end no longer moves): each keeps reading and
//! inserting until it reaches that end, so ClickHouse holds everything acked. Only when
//! [`DRAIN_STOP_RESERVE_PERCENT`] of the bound is left are they stopped as above; the WAL keeps the
//! rest for the next start on it or a `replay`, and one WARN says how many records that is.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prism_wal::{ErrorChain, Lsn, RecoveryMode, Retention, Wal, WalError, WalOptions};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::audit::{Audit, AuditOptions, AuditSetup};
use crate::config::{ClickHouseProfile, Config, RecoveryModeKind, WalConfig};
use crate::drain::{
    BatchLimits, DrainError, Lane, LaneConfig, LedgerKeeper, Router, RowsKind, Tail,
};
use crate::logcond::Condition;
use crate::metrics::Metrics;
use crate::schema::{self, Profile, SchemaError, SchemaTable};
use crate::sink::{Backoff, Sink, SinkError, SinkOptions};
use crate::source::{self, Fetcher, SourceError};
use crate::{http, ingest};

/// How often the ledger is committed when no batch commits it, so idle lanes release segments.
/// A tick with nothing new writes nothing (a full disk has no block for it); it only applies
/// retention, which deletes files.
const LEDGER_COMMIT_INTERVAL_MS: u64 = 1_000;

/// How often the lanes' registration at start-up retries its ledger write on a full disk.
const REGISTER_RETRY_MS: u64 = 200;

/// Share of `shutdown.timeout_ms` (percent) kept, in a drain before exit that runs out of time
/// (ClickHouse unreachable), for the quick stop after it: one insert attempt per lane and the
/// ledger commit must still fit in the bound, or the drain task is aborted without its commit.
const DRAIN_STOP_RESERVE_PERCENT: u64 = 20;
const _: () = assert!(DRAIN_STOP_RESERVE_PERCENT > 0 && DRAIN_STOP_RESERVE_PERCENT < 100);
/// Pause before opening the WAL again after a full disk (or no free file descriptor) failed
/// the open: space comes back when an operator frees it, so a short poll starts promptly.
const OPEN_RETRY_MS: u64 = 500;

/// Pause between connect attempts while NATS refuses the relay: an operator's fix takes
/// minutes; 5 s picks it up promptly at 12 attempts a minute.
const NATS_REFUSED_RETRY_MS: u64 = 5_000;

/// Why the relay stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The WAL could not be opened or recovered.
    #[error("cannot open the WAL in {dir} (`wal.dir`){}", wal_open_fix(.source))]
    WalOpen {
        /// WAL directory.
        dir: String,
        /// The WAL's error.
        #[source]
        source: WalError,
    },
    /// The WAL failed while running (an fsync error is fatal by design).
    #[error("WAL failure")]
    Wal(#[source] WalError),
    /// NATS set-up failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The metrics endpoint could not bind.
    #[error("cannot listen on {listen} for /metrics: free the port or change `metrics.listen`")]
    Listen {
        /// Address from `[metrics] listen`.
        listen: String,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// ClickHouse's tables do not have the columns the relay writes.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// A ClickHouse statement failed in a way retrying cannot fix.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// An ingest task failed.
    #[error(transparent)]
    Ingest(#[from] ingest::IngestError),
    /// A drain lane failed.
    #[error(transparent)]
    Drain(#[from] DrainError),
}

/// What an operator can do about a WAL that does not open, when the cause says it.
fn wal_open_fix(error: &WalError) -> &'static str {
    use std::io::ErrorKind;
    match error {
        WalError::Io { source, .. } => match source.kind() {
            ErrorKind::AlreadyExists | ErrorKind::NotADirectory => {
                ": it is not a directory; point `wal.dir` at a directory, or remove what is there"
            }
            ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => {
                ": the relay cannot write there; give its user write access, or point `wal.dir` \
                 at a writable directory"
            }
            _ => "",
        },
        WalError::Corrupt { .. } | WalError::TornTail { .. } | WalError::BadSegment { .. } => {
            ": `prism-relay wal verify` shows the damage, `prism-relay wal quarantine` moves a \
             corrupt segment aside"
        }
        _ => "",
    }
}

/// ClickHouse exception codes that mean the server refused the user or its password:
/// UNKNOWN_USER, WRONG_PASSWORD, REQUIRED_PASSWORD (18.16 and later) and AUTHENTICATION_FAILED
/// (which newer servers send for all three).
const CLICKHOUSE_AUTH_CODES: [u32; 4] = [192, 193, 194, 516];

/// What an operator can do when ClickHouse does not answer the relay's first query.
pub fn clickhouse_fix(error: &SinkError) -> &'static str {
    match error {
        SinkError::Query { source, .. }
            if source
                .code
                .is_some_and(|c| CLICKHOUSE_AUTH_CODES.contains(&c)) =>
        {
            "check `clickhouse.user` and its password (`clickhouse.password_file` or \
             PRISM_RELAY_CLICKHOUSE_PASSWORD)"
        }
        SinkError::Query { source, .. } if source.code.is_none() => {
            "check that the server runs and that `clickhouse.url` (or PRISM_RELAY_CLICKHOUSE_URL) \
             names its HTTP port"
        }
        SinkError::Query { .. } => "the server refused the query; its message says why",
        SinkError::InvalidOptions { .. } => "correct the `[clickhouse]` section",
        SinkError::Tls { .. } => {
            "check `clickhouse.tls_ca_file`, `clickhouse.tls_cert_file` and `clickhouse.tls_key_file`"
        }
    }
}

/// Maps `[wal]` to the WAL's options.
pub fn wal_options(config: &WalConfig) -> WalOptions {
    WalOptions {
        segment_bytes_max: config.segment_bytes_max,
        group_bytes_max: usize::try_from(config.group_bytes_max).unwrap_or(usize::MAX),
        budget_bytes_max: config.budget_bytes_max,
        retention: Retention {
            bytes_max: config.retention_bytes_max,
            segments_max: config.retention_segments_max,
            age_max: Duration::from_secs(config.retention_age_s),
        },
        recovery_mode: match config.recovery_mode {
            RecoveryModeKind::TruncateTornTail => RecoveryMode::TruncateTornTail,
            RecoveryModeKind::Strict => RecoveryMode::Strict,
        },
    }
}

/// The audit's options from `[audit]`.
pub fn audit_options(config: &Config) -> AuditOptions {
    let audit = &config.audit;
    AuditOptions {
        enabled: audit.enabled,
        sample_every_records: audit.sample_every_records,
        interval_ms: audit.interval_ms,
        pending_max: usize::try_from(audit.pending_max).unwrap_or(usize::MAX),
    }
}

/// Sink options for `[clickhouse]` with the given profile.
pub fn sink_options(config: &Config, profile: Profile) -> SinkOptions {
    let ch = &config.clickhouse;
    SinkOptions {
        url: ch.url.clone(),
        tls: crate::sink::tls::TlsFiles {
            ca_file: ch.tls_ca_file.clone(),
            cert_file: ch.tls_cert_file.clone(),
            key_file: ch.tls_key_file.clone(),
        },
        user: ch.user.clone(),
        password: ch.password.clone(),
        database: ch.database.clone(),
        insert_timeout_ms: ch.insert_timeout_ms,
        connect_timeout_ms: ch.connect_timeout_ms,
        compress: ch.compression.compresses(&ch.url),
        modern: profile == Profile::Modern,
        // With `auto` resolved to legacy, the start-up check reports the setting unusable.
        async_insert: ch.async_insert && profile == Profile::Modern,
        ..SinkOptions::default()
    }
}

/// Connects to ClickHouse and resolves the schema profile (`auto` asks `SELECT version()`).
pub async fn resolve_profile(config: &Config) -> Result<(Sink, Profile), SinkError> {
    // A client bound to a database fails every request while that database does not exist,
    // and the schema may not be applied yet: the probe uses `system`, which every server has.
    let mut options = sink_options(config, Profile::Legacy);
    options.database = "system".to_string();
    let probe = Sink::new(options)?;
    let profile = match config.clickhouse.profile {
        ClickHouseProfile::Modern => Profile::Modern,
        ClickHouseProfile::Legacy => Profile::Legacy,
        ClickHouseProfile::Auto => Profile::for_server_version(&probe.server_version().await?),
    };
    Ok((probe, profile))
}

/// The passthrough tables of `[[drain.passthrough]]`, each once, in the order configured.
fn passthrough_tables(config: &Config) -> Vec<&str> {
    let mut tables: Vec<&str> = Vec::new();
    for route in &config.drain.passthrough {
        if !tables.contains(&route.table.as_str()) {
            tables.push(&route.table);
        }
    }
    tables
}

/// Every statement that creates the schema of `config`: the database, the typed tables, the dead
/// letters and each passthrough table (what `schema print` shows and `schema apply` runs).
pub fn schema_statements(config: &Config, profile: Profile) -> Vec<String> {
    let ch = &config.clickhouse;
    if let Some(cluster) = cluster(config) {
        let mut statements = schema::all_cluster_ddl(
            profile,
            &ch.database,
            ch.ttl_days,
            &config.drain.dead_letter_table,
            &cluster,
        );
        for table in passthrough_tables(config) {
            statements.extend(schema::cluster_passthrough_ddl(
                profile,
                &ch.database,
                table,
                ch.ttl_days,
                &cluster,
            ));
        }
        return statements;
    }
    let mut statements = schema::all_ddl_with_dead_letters(
        profile,
        &ch.database,
        ch.ttl_days,
        &config.drain.dead_letter_table,
    );
    statements.extend(
        passthrough_tables(config)
            .into_iter()
            .map(|table| schema::passthrough_ddl(profile, &ch.database, table, ch.ttl_days)),
    );
    statements
}

/// The cluster of `[clickhouse] cluster`, if one is set: the schema's cluster layout.
pub fn cluster(config: &Config) -> Option<schema::Cluster> {
    let ch = &config.clickhouse;
    ch.cluster.as_ref().map(|name| schema::Cluster {
        name: name.clone(),
        zookeeper_path: ch.zookeeper_path.clone(),
    })
}

/// The cluster layout's own problems on the server `probe` reaches: each table the relay
/// inserts into must be replicated and have its `Distributed` table `<table>_all` beside it
/// (with the columns the relay writes). Empty without `[clickhouse] cluster`. `check` runs it on
/// every replica it is given, after [`check_schema`].
pub async fn check_cluster_schema(
    config: &Config,
    probe: &Sink,
    profile: Profile,
) -> Result<Vec<SchemaError>, SinkError> {
    if config.clickhouse.cluster.is_none() {
        return Ok(Vec::new());
    }
    let database = &config.clickhouse.database;
    let engines = probe.table_engines(database).await?;
    let columns = probe.table_columns(database).await?;
    let mut problems = Vec::new();
    let typed = SchemaTable::ALL
        .into_iter()
        .map(|table| (table_name(config, table), Some(table)));
    let passthrough = passthrough_tables(config).into_iter().map(|t| (t, None));
    for (name, table) in typed.chain(passthrough) {
        let distributed = schema::distributed_name(name);
        let distributed_engine = engines.get(&distributed).map(String::as_str);
        problems.extend(schema::check_cluster_engines(
            name,
            engines.get(name).map(String::as_str),
            distributed_engine,
        ));
        // A missing `<table>_all` is reported above; its columns are checked when it exists.
        let Some(actual) = distributed_engine.and(columns.get(&distributed)) else {
            continue;
        };
        let columns_ok = match table {
            Some(table) => schema::check_columns(table, actual, profile),
            None => schema::check_passthrough_columns(name, actual, profile),
        };
        problems.extend(
            columns_ok
                .err()
                .map(|problem| problem.on_table(&distributed)),
        );
    }
    Ok(problems)
}

/// Applies the DDL of `profile` (database, tables, dead letters, passthrough tables),
/// idempotently.
pub async fn apply_schema(
    config: &Config,
    probe: &Sink,
    profile: Profile,
) -> Result<(), SinkError> {
    for statement in schema_statements(config, profile) {
        probe.execute(&statement).await?;
    }
    Ok(())
}

/// Adds the columns the relay writes that existing tables lack (a table created by an older
/// relay), never dropping or retyping one: `schema apply` runs it after [`apply_schema`], whose
/// `CREATE TABLE IF NOT EXISTS` leaves existing tables as they are. In the cluster layout the
/// replicated tables are altered `ON CLUSTER` (the change reaches every replica), and this
/// server's `<table>_all` gets the same columns: a `Distributed` table lives on each server
/// apart, and ClickHouse refuses an `ON CLUSTER` alter of one over replicated shards, so each
/// server's is altered through that server ([`add_missing_distributed_columns`]). `run` does not
/// alter: that is the operator's decision, which the start-up check's message asks for.
pub async fn add_missing_columns(
    config: &Config,
    probe: &Sink,
    profile: Profile,
) -> Result<(), SinkError> {
    add_columns(config, probe, profile, Tables::Local).await?;
    add_missing_distributed_columns(config, probe, profile).await
}

/// In the cluster layout, adds to the `<table>_all` tables of the server behind `probe` the
/// columns they lack (see [`add_missing_columns`]); nothing otherwise.
pub async fn add_missing_distributed_columns(
    config: &Config,
    probe: &Sink,
    profile: Profile,
) -> Result<(), SinkError> {
    if config.clickhouse.cluster.is_none() {
        return Ok(());
    }
    add_columns(config, probe, profile, Tables::Distributed).await
}

/// Which tables [`add_columns`] alters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tables {
    /// The tables the relay inserts into (`ON CLUSTER` in the cluster layout).
    Local,
    /// Their `<table>_all`, on the probed server only.
    Distributed,
}

async fn add_columns(
    config: &Config,
    probe: &Sink,
    profile: Profile,
    tables: Tables,
) -> Result<(), SinkError> {
    let ch = &config.clickhouse;
    let cluster = match tables {
        Tables::Local => cluster(config),
        Tables::Distributed => None,
    };
    let columns = probe.table_columns(&ch.database).await?;
    for table in SchemaTable::ALL {
        let name = match tables {
            Tables::Local => table_name(config, table).to_string(),
            Tables::Distributed => schema::distributed_name(table_name(config, table)),
        };
        let actual = columns.get(&name).map(Vec::as_slice).unwrap_or_default();
        if actual.is_empty() {
            continue;
        }
        for statement in schema::add_missing_columns_ddl_named(
            profile,
            &ch.database,
            table,
            &name,
            actual,
            cluster.as_ref(),
        ) {
            probe.execute(&statement).await?;
        }
    }
    Ok(())
}

/// The name `table` has in ClickHouse: the dead-letter table's is configured.
fn table_name(config: &Config, table: SchemaTable) -> &str {
    match table {
        SchemaTable::DeadLetters => config.drain.dead_letter_table.as_str(),
        SchemaTable::Data(t) => t.name(),
    }
}

/// Problems found by the schema check, if any, each naming the table, the column and the fix,
/// after those of the server's version ([`check_server`]).
pub async fn check_schema(
    config: &Config,
    probe: &Sink,
    profile: Profile,
) -> Result<Vec<SchemaError>, SinkError> {
    let mut problems = check_server(config, probe, profile).await?;
    problems.extend(check_tables(config, probe, profile).await?);
    Ok(problems)
}

/// What the server lacks for `profile` and `[clickhouse] async_insert`, judged by its version
/// (see [`schema::SERVER_VERSIONS`]).
pub async fn check_server(
    config: &Config,
    probe: &Sink,
    profile: Profile,
) -> Result<Vec<SchemaError>, SinkError> {
    let version = probe.server_version().await?;
    Ok(schema::check_server_version(
        &version,
        profile,
        config.clickhouse.async_insert,
    ))
}

/// Checks that every table the relay writes has the columns it writes.
async fn check_tables(
    config: &Config,
    probe: &Sink,
    profile: Profile,
) -> Result<Vec<SchemaError>, SinkError> {
    let columns = probe.table_columns(&config.clickhouse.database).await?;
    let mut problems = Vec::new();
    for table in SchemaTable::ALL {
        let name = table_name(config, table);
        let actual = columns.get(name).map(Vec::as_slice).unwrap_or_default();
        if let Err(problem) = schema::check_columns(table, actual, profile) {
            problems.push(problem);
        }
    }
    for table in passthrough_tables(config) {
        let actual = columns.get(table).map(Vec::as_slice).unwrap_or_default();
        if let Err(problem) = schema::check_passthrough_columns(table, actual, profile) {
            problems.push(problem);
        }
    }
    Ok(problems)
}

/// A warning when the WAL directory is writable by its group or by others: whoever can write
/// there can plant segments, a ledger or links that the relay would read or follow. Not an error:
/// a shared volume may be set up that way on purpose, and the relay must not refuse to start on a
/// layout that worked before.
pub fn wal_dir_exposure(dir: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir).ok()?.permissions().mode() & 0o777;
    (mode & 0o022 != 0).then(|| {
        format!(
            "the WAL directory is writable by {} (mode {mode:o}): anyone who can write there can plant \
             files the relay reads; give it to the relay's user alone (chmod 700)",
            match (mode & 0o020 != 0, mode & 0o002 != 0) {
                (true, true) => "its group and by others",
                (true, false) => "its group",
                _ => "others",
            }
        )
    })
}

/// Name of the file `check` creates and removes to prove it can write where the WAL goes.
const WAL_PROBE_FILE: &str = ".prism-relay-check-probe";

/// What `check` finds wrong with the WAL directory of `config`, one line each with the change to
/// make; empty when the relay can run there. It changes nothing: a missing directory is judged
/// by its nearest existing parent (where `run` would create it), and the probe file that proves
/// writing works is removed at once.
pub fn check_wal_dir(config: &WalConfig) -> Vec<String> {
    let dir = config.dir.display();
    let mut findings = Vec::new();
    // The directory, or the nearest parent that exists: `run` creates the rest.
    let mut existing = config.dir.as_path();
    while !existing.exists() {
        match existing.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => existing = parent,
            _ => {
                existing = std::path::Path::new(".");
                break;
            }
        }
    }
    if !existing.is_dir() {
        findings.push(format!(
            "{} is not a directory, so the WAL directory {dir} cannot be created there: point [wal] dir elsewhere or remove the file",
            existing.display()
        ));
        return findings;
    }
    let probe = existing.join(format!("{WAL_PROBE_FILE}-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(file) => {
            drop(file);
            if let Err(error) = std::fs::remove_file(&probe) {
                findings.push(format!(
                    "cannot remove the probe file {}: {error}: remove it by hand and give the relay's user full rights on {}",
                    probe.display(),
                    existing.display()
                ));
            }
        }
        Err(error) => findings.push(format!(
            "cannot write in {} (for the WAL directory {dir}): {error}: make it writable by the relay's user (chown, chmod 700) or mount the volume read-write",
            existing.display()
        )),
    }
    match rustix::fs::statvfs(existing) {
        Ok(stat) => {
            let available = stat.f_bavail.saturating_mul(stat.f_frsize);
            // The segments already there count against the budget and free their space as the
            // drain releases them.
            let held: u64 = prism_wal::list_segments(&config.dir)
                .map(|segments| segments.iter().map(|s| s.bytes).sum())
                .unwrap_or(0);
            let room = available.saturating_add(held);
            let needed = config
                .budget_bytes_max
                .saturating_add(prism_wal::LEDGER_RESERVE_BYTES);
            if room < needed {
                findings.push(format!(
                    "the volume of {dir} has room for {room} bytes ({available} free, {held} in WAL segments) but [wal] budget_bytes_max is {} (plus the {}-byte ledger reserve): give the volume {} more bytes, or set budget_bytes_max = {} or less",
                    config.budget_bytes_max,
                    prism_wal::LEDGER_RESERVE_BYTES,
                    needed - room,
                    room.saturating_sub(prism_wal::LEDGER_RESERVE_BYTES)
                ));
            }
        }
        Err(error) => findings.push(format!(
            "cannot measure the free space of {}: {error}: check that the volume is mounted",
            existing.display()
        )),
    }
    findings
}

/// Runs the relay until `shutdown` resolves or a fatal error occurs.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    tokio::pin!(shutdown);
    // A disk that stays full (or no free file descriptor) fails what open writes (a new
    // segment, a segment header, a gap note); nothing of it is lost, so wait and open again
    // instead of exiting into a crash loop.
    let mut open_blocked = Condition::default();
    let (wal, recovery) = loop {
        match Wal::open(&config.wal.dir, wal_options(&config.wal)) {
            Ok(opened) => break opened,
            Err(error) if error.is_transient() => {
                if let Some(o) = open_blocked.occurred() {
                    tracing::warn!(dir = %config.wal.dir.display(), error = %ErrorChain(&error), failures = o.count(), lasted_s = o.lasted_s(), "cannot open the WAL yet; retrying");
                }
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_millis(OPEN_RETRY_MS)) => {}
                }
            }
            Err(source) => {
                return Err(RunError::WalOpen {
                    dir: config.wal.dir.display().to_string(),
                    source,
                })
            }
        }
    };
    let stats = wal.stats();
    tracing::info!(
        dir = %config.wal.dir.display(),
        segments = recovery.segments,
        bytes = stats.bytes_on_disk,
        budget_bytes = config.wal.budget_bytes_max,
        use_percent = percent(stats.bytes_on_disk, config.wal.budget_bytes_max),
        first_lsn = %recovery.first_lsn,
        next_lsn = %recovery.next_lsn,
        torn_tail = ?recovery.torn_tail,
        "WAL recovered"
    );
    let first_lsn = recovery.first_lsn;
    if let Some(exposure) = wal_dir_exposure(&config.wal.dir) {
        tracing::warn!(dir = %config.wal.dir.display(), "{exposure}");
    }
    // The reserve keeps room for the ledger on a full disk; without it ingest waits (and
    // retries creating it) until there is space, so a disk full at start-up is not fatal.
    match wal.ensure_reserve() {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            dir = %config.wal.dir.display(),
            "disk full at start-up: ingest waits for space"
        ),
        // Out of file descriptors: ingest waits and retries creating it, as on a full disk.
        Err(error) if error.is_transient() => tracing::warn!(
            dir = %config.wal.dir.display(),
            error = %ErrorChain(&error),
            "cannot create the WAL's reserve file at start-up: ingest waits and retries"
        ),
        Err(source) => return Err(RunError::Wal(source)),
    }

    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let registry = Arc::new(registry);
    metrics
        .health
        .set_ready_insert_failing_s(config.metrics.ready_insert_failing_s);
    wal.set_commit_observer(Arc::new(metrics.clone()));
    let listener = http::bind(config.metrics.listen)
        .await
        .map_err(|source| RunError::Listen {
            listen: config.metrics.listen.to_string(),
            source,
        })?;
    tracing::info!(listen = %config.metrics.listen, "serving /metrics, /health and /ready");

    // A server that refuses the relay (credentials, authorization, TLS) is the operator's to
    // fix, on the server at any time: wait for it instead of exiting into a restart loop.
    let mut nats_refused = Condition::default();
    let client = loop {
        match source::connect(&config.nats).await {
            Ok(client) => break client,
            Err(error) if error.is_refused() => {
                if let Some(o) = nats_refused.occurred() {
                    tracing::error!(error = %ErrorChain(&error), attempts = o.count(), lasted_s = o.lasted_s(), retry_ms = NATS_REFUSED_RETRY_MS,
                        "NATS refuses the relay (credentials, authorization or TLS): no retry can fix this; fix the user, its password or permissions on the server, or [nats] user/password/creds/TLS settings; retrying slowly");
                }
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_millis(NATS_REFUSED_RETRY_MS)) => {}
                }
            }
            Err(error) => return Err(error.into()),
        }
    };
    if let Some(ended) = nats_refused.cleared() {
        tracing::info!(
            attempts = ended.count,
            lasted_ms = ended.lasted.as_millis() as u64,
            "NATS accepts the relay"
        );
    }
    let js = source::jetstream(client, &config.nats);
    for outcome in source::ensure_streams(&js, &config.stream).await? {
        tracing::info!(stream = %outcome.stream, action = ?outcome.action, drift = outcome.drift.len(), "stream");
    }
    let mut fetchers = Vec::new();
    for consumer in &config.consumer {
        let outcome = source::ensure_consumer(&js, consumer).await?;
        let mut fetcher = Fetcher::new(&js, consumer).await?.with_rescue(&config.nats);
        // The backlog is for the operator's first look: a failed request loses only that.
        let pending = fetcher.backlog().await.ok();
        tracing::info!(
            stream = %outcome.stream,
            durable = %outcome.durable,
            action = ?outcome.action,
            drift = outcome.drift.len(),
            pending = ?pending.map(|b| b.num_pending),
            ack_pending = ?pending.map(|b| b.num_ack_pending),
            "consumer bound"
        );
        fetchers.push(fetcher);
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let backlog_task = tokio::spawn(poll_backlog(
        fetchers.iter().map(Fetcher::backlog_probe).collect(),
        Duration::from_secs(config.metrics.backlog_poll_interval_s),
        metrics.clone(),
        stop_rx.clone(),
    ));
    let mut ingest_tasks = JoinSet::new();
    for fetcher in fetchers {
        // Every event of the task carries its consumer (a span field in JSON logs).
        let span = tracing::info_span!("ingest", stream = %fetcher.stream(), consumer = %fetcher.durable());
        ingest_tasks.spawn(tracing::Instrument::instrument(
            ingest::run(fetcher, wal.clone(), metrics.clone(), stop_rx.clone()),
            span,
        ));
    }
    let http_task = tokio::spawn(http::serve(
        listener,
        http::HttpLimits::from_config(&config.metrics),
        registry,
        metrics.clone(),
        wal.clone(),
        stop_rx.clone(),
    ));
    let status_task = status_interval(&config).map(|interval| {
        tokio::spawn(status(
            interval,
            config.wal.budget_bytes_max,
            wal.clone(),
            metrics.clone(),
            stop_rx.clone(),
        ))
    });
    match status_interval(&config) {
        Some(interval) => tracing::info!(
            interval_s = interval.as_secs(),
            "a status line follows every metrics.status_interval_s"
        ),
        None => tracing::info!("no status line (metrics.status_interval_s = 0)"),
    }
    // The lanes stop on a signal of their own: with `shutdown.drain` they outlive fetching.
    let (lanes_stop_tx, lanes_stop_rx) = watch::channel(false);
    let (finish_tx, finish_rx) = watch::channel(false);
    let drain_task = tokio::spawn(drain(
        config.clone(),
        wal.clone(),
        metrics.clone(),
        DrainSignals {
            stop: lanes_stop_rx,
            finish: config.shutdown.drain.then_some(finish_rx),
            audit_stop: stop_rx.clone(),
        },
        first_lsn,
    ));

    // Wait for a stop request or the first fatal error.
    let mut drain_task = drain_task;
    let mut failure: Option<RunError> = None;
    let mut drain_done = None;
    tokio::select! {
        _ = &mut shutdown => tracing::info!("shutdown requested"),
        Some(joined) = ingest_tasks.join_next() => {
            failure = task_failure(joined.map(|r| r.map_err(RunError::from)));
        }
        joined = &mut drain_task => {
            failure = task_failure(joined);
            drain_done = Some(());
        }
    }
    if let Some(error) = &failure {
        tracing::error!(error = %ErrorChain(error), "stopping after a fatal error");
        if matches!(error, RunError::Ingest(_) | RunError::Wal(_)) {
            metrics.wal_failed.set(1);
        }
    }
    let _ = stop_tx.send(true);
    // A drain before exit only on a requested stop: after a fatal error the relay stops quickly.
    let drain_first = config.shutdown.drain && failure.is_none();
    if !drain_first {
        let _ = lanes_stop_tx.send(true);
    }

    let bound = Duration::from_millis(config.shutdown.timeout_ms);
    let lanes_stop_at =
        tokio::time::Instant::now() + bound * (100 - DRAIN_STOP_RESERVE_PERCENT as u32) / 100;
    let graceful = tokio::time::timeout(bound, async {
        while let Some(joined) = ingest_tasks.join_next().await {
            if let Some(error) = task_failure(joined.map(|r| r.map_err(RunError::from))) {
                tracing::error!(error = %ErrorChain(&error), "ingest task failed during shutdown");
            }
        }
        if drain_first {
            // Nothing is appended any more: the durable end the lanes drain to is final.
            tracing::info!(
                timeout_ms = config.shutdown.timeout_ms,
                "draining the WAL into ClickHouse before exit (shutdown.drain)"
            );
            let _ = finish_tx.send(true);
        }
        if drain_done.is_none() {
            let joined = tokio::select! {
                joined = &mut drain_task => joined,
                _ = tokio::time::sleep_until(lanes_stop_at) => {
                    let _ = lanes_stop_tx.send(true);
                    (&mut drain_task).await
                }
            };
            if let Some(error) = task_failure(joined) {
                tracing::warn!(error = %ErrorChain(&error), "drain stopped with work left in the WAL");
            }
        }
    })
    .await;
    if graceful.is_err() {
        tracing::warn!(
            timeout_ms = config.shutdown.timeout_ms,
            "shutdown bound reached; the WAL keeps what was not inserted"
        );
        ingest_tasks.abort_all();
        drain_task.abort();
    }
    let _ = http_task.await;
    let _ = backlog_task.await;
    if let Some(task) = status_task {
        let _ = task.await;
    }
    if let Err(error) = wal.close().await {
        tracing::warn!(error = %ErrorChain(&error), "closing the WAL");
    }
    match failure {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Longest wait for one consumer info answer (ms): an answer takes milliseconds; a NATS server
/// that does not answer must not hold the poller past its next round.
const BACKLOG_REQUEST_TIMEOUT_MS: u64 = 5_000;

/// Polls every consumer's info each `interval` into the `prism_relay_jetstream_*` gauges, until
/// shutdown. A failed or slow request leaves the consumer's gauges at their last value and is
/// logged as a condition (NATS being down is logged by ingest already).
async fn poll_backlog(
    probes: Vec<source::BacklogProbe>,
    interval: Duration,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    use crate::metrics::ConsumerLabels;
    let mut failing: Vec<Condition> = probes.iter().map(|_| Condition::default()).collect();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        for (probe, failing) in probes.iter().zip(failing.iter_mut()) {
            let bound = Duration::from_millis(BACKLOG_REQUEST_TIMEOUT_MS).min(interval);
            let labels = ConsumerLabels {
                stream: probe.stream().to_owned(),
                consumer: probe.durable().to_owned(),
            };
            match tokio::time::timeout(bound, probe.backlog()).await {
                Ok(Ok(backlog)) => {
                    failing.cleared();
                    let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                    metrics
                        .jetstream_pending
                        .get_or_create(&labels)
                        .set(gauge(backlog.num_pending));
                    metrics
                        .jetstream_ack_pending
                        .get_or_create(&labels)
                        .set(gauge(backlog.num_ack_pending));
                    metrics
                        .jetstream_redelivered
                        .get_or_create(&labels)
                        .set(gauge(backlog.num_redelivered));
                }
                Ok(Err(error)) => {
                    if let Some(o) = failing.occurred() {
                        tracing::debug!(stream = %labels.stream, durable = %labels.consumer, error = %ErrorChain(&error), failures = o.count(), "consumer info for the backlog gauges failed");
                    }
                }
                Err(_) => {
                    if let Some(o) = failing.occurred() {
                        tracing::debug!(stream = %labels.stream, durable = %labels.consumer, timeout_ms = bound.as_millis() as u64, failures = o.count(), "consumer info for the backlog gauges timed out");
                    }
                }
            }
        }
    }
}

/// The period of the status line, `None` when `[metrics] status_interval_s` turns it off.
pub fn status_interval(config: &Config) -> Option<Duration> {
    (config.metrics.status_interval_s > 0)
        .then(|| Duration::from_secs(config.metrics.status_interval_s))
}

/// `part` as a percentage of `whole`, one decimal.
fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    (part as f64 * 1000.0 / whole as f64).round() / 10.0
}

/// Logs one status line every `interval` until `stop`: messages written to the WAL and rows
/// inserted per second since the previous line, WAL records not yet in ClickHouse (past the
/// slowest lane's cursor in the ledger on disk), and the WAL's bytes against its budget.
async fn status(
    interval: Duration,
    budget_bytes: u64,
    wal: Wal,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick fires at once; the first line comes one interval after start-up.
    tick.tick().await;
    let mut last = (
        tokio::time::Instant::now(),
        metrics.messages_received.get(),
        metrics.batch_size.get(),
    );
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let now = tokio::time::Instant::now();
        let (received, inserted) = (metrics.messages_received.get(), metrics.batch_size.get());
        let elapsed_s = now.duration_since(last.0).as_secs_f64().max(1e-3);
        let stats = wal.stats();
        // The ledger on disk is at most one commit interval old; without one nothing is drained.
        let slowest = prism_wal::load_ledger(wal.dir())
            .ok()
            .and_then(|ledger| ledger.cursors.values().min().copied());
        let backlog = match slowest {
            Some(cursor) => (stats.durable_lsn.0 + 1).saturating_sub(cursor.0),
            None => (stats.durable_lsn.0 + 1).saturating_sub(stats.first_lsn.0),
        };
        tracing::info!(
            in_per_s = ((received - last.1) as f64 / elapsed_s).round(),
            rows_out_per_s = ((inserted - last.2) as f64 / elapsed_s).round(),
            backlog_records = backlog,
            wal_bytes = stats.bytes_on_disk,
            wal_use_percent = percent(stats.bytes_on_disk, budget_bytes),
            ingest_paused = metrics.ingest_paused.get() == 1,
            ready = metrics.ready.get() == 1,
            "status"
        );
        last = (now, received, inserted);
    }
}

/// The error of a finished task, if it failed (a panic is re-raised).
fn task_failure(joined: Result<Result<(), RunError>, tokio::task::JoinError>) -> Option<RunError> {
    match joined {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(error),
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        Err(_) => None,
    }
}

/// The signals that end the drain task.
struct DrainSignals {
    /// Stop now: each lane makes one insert attempt for what it has batched.
    stop: watch::Receiver<bool>,
    /// With `shutdown.drain`: insert everything up to the WAL's durable end, then return.
    finish: Option<watch::Receiver<bool>>,
    /// Stops the audit, which has nothing to do once fetching stopped.
    audit_stop: watch::Receiver<bool>,
}

/// WAL records from the lowest position a lane still needs to the durable end: what a drain
/// before exit has left to insert (records of lanes already past them included, so an upper bound).
async fn records_left(ledger: &LedgerKeeper, wal: &Wal) -> u64 {
    let end = wal.durable_lsn().0.saturating_add(1);
    ledger
        .low_watermark()
        .await
        .map_or(0, |low| end.saturating_sub(low.0))
}

/// Waits for ClickHouse, checks the schema, then runs one lane per table until shutdown.
async fn drain(
    config: Config,
    wal: Wal,
    metrics: Metrics,
    signals: DrainSignals,
    first_lsn: Lsn,
) -> Result<(), RunError> {
    let DrainSignals {
        stop,
        finish,
        audit_stop,
    } = signals;
    let mut stop = stop;
    let mut backoff = Backoff::new(
        config.drain.retry_backoff_initial_ms,
        config.drain.retry_backoff_max_ms,
    );
    let mut not_ready = Condition::default();
    let mut refused = Condition::default();
    let (probe, profile) = loop {
        let attempt = async {
            let (probe, profile) = resolve_profile(&config).await?;
            // A server older than the profile needs is reported before any DDL, which it
            // would refuse with a less helpful message.
            let server = check_server(&config, &probe, profile).await?;
            if !server.is_empty() {
                return Ok((probe, profile, server));
            }
            if config.clickhouse.create_schema {
                apply_schema(&config, &probe, profile).await?;
            }
            let problems = check_tables(&config, &probe, profile).await?;
            Ok::<_, SinkError>((probe, profile, problems))
        };
        match attempt.await {
            Ok((probe, profile, problems)) => {
                if let Some(first) = problems.into_iter().next() {
                    return Err(RunError::Schema(first));
                }
                break (probe, profile);
            }
            Err(error) => {
                let class_name = error
                    .class()
                    .map_or_else(|| "invalid_options".to_owned(), |c| c.to_string());
                metrics
                    .health
                    .drain_waiting(&class_name, &error.to_string());
                let hint = error
                    .class()
                    .and_then(|class| Some((class, class.operator_hint()?)));
                // A class no retry can fix is its own condition, reported as such from the first
                // occurrence (not as a server that is not ready yet), and retried slowly.
                let delay = match hint {
                    Some((class, hint)) => {
                        if let Some(o) = refused.occurred() {
                            tracing::error!(%class, error = %ErrorChain(&error), fix = clickhouse_fix(&error), attempts = o.count(), lasted_s = o.lasted_s(), retry_ms = config.drain.retry_backoff_max_ms, "{hint}");
                        }
                        Duration::from_millis(config.drain.retry_backoff_max_ms)
                    }
                    None => {
                        if let Some(o) = not_ready.occurred() {
                            tracing::warn!(error = %ErrorChain(&error), fix = clickhouse_fix(&error), attempts = o.count(), lasted_s = o.lasted_s(), "ClickHouse not ready; ingesting into the WAL meanwhile");
                        }
                        backoff.next_delay()
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return Ok(()),
                }
            }
        }
    };
    // The version is for the operator's first look; `auto` already asked for it once.
    let version = probe.server_version().await.ok();
    drop(probe);
    if let Some(ended) = refused.cleared() {
        tracing::info!(
            failures = ended.count,
            lasted_ms = ended.lasted.as_millis() as u64,
            "ClickHouse accepts the relay again"
        );
    }
    let waited = not_ready.cleared();
    let options = sink_options(&config, profile);
    tracing::info!(
        version = version.as_deref().unwrap_or("unknown"),
        profile = profile.name(),
        compression = if options.compress { "lz4" } else { "none" },
        failed_attempts = waited.map_or(0, |w| w.count),
        waited_ms = waited.map_or(0, |w| w.lasted.as_millis() as u64),
        "ClickHouse schema checked; draining"
    );
    metrics.health.drain_started();
    metrics.ready.set(1);

    let sink = Sink::new(options)?;
    metrics.count_sent_bytes(sink.wire_bytes());
    let router = Arc::new(Router::new(
        config
            .drain
            .passthrough
            .iter()
            .map(|r| (r.data_type.clone(), r.table.clone())),
    ));
    let ledger = LedgerKeeper::load(wal.clone()).map_err(RunError::Wal)?;
    // Every lane holds back retention before the first one runs: a lane that commits a batch
    // applies retention, which would otherwise free segments a lane not yet started still needs.
    let lane_names = router.lanes();
    // Lanes of removed routes are dropped from the ledger in the same commit, so they stop
    // pinning the WAL.
    // A full disk at start-up waits here like a lane's ledger write does: exiting would make the
    // supervisor restart the relay into the same full disk.
    let mut register_disk_full = Condition::default();
    let stale_lanes = loop {
        match ledger.register_lanes(&lane_names, first_lsn).await {
            Ok(stale) => break stale,
            Err(DrainError::LedgerDiskFull(error)) => {
                if let Some(o) = register_disk_full.occurred() {
                    tracing::warn!(error = %ErrorChain(&error), failures = o.count(), lasted_s = o.lasted_s(), "disk full: the ledger cannot be written at start-up; waiting for space");
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(REGISTER_RETRY_MS)) => {}
                    _ = stop.changed() => return Ok(()),
                }
            }
            Err(error) => return Err(error.into()),
        }
    };
    for stale in stale_lanes {
        tracing::warn!(
            lane = %stale.lane,
            cursor = ?stale.cursor.map(|c| c.0),
            abandoned_inflight = ?stale.inflight.as_ref().map(|b| (b.first.0, b.last.0, b.rows)),
            "lane no longer configured: its cursor is dropped so retention can free the WAL; \
             an abandoned in-flight batch may be missing from its table (its records stay in the \
             WAL until retention frees them; `prism-relay replay` with the route restored sends them again)"
        );
    }
    let mut prepared = Vec::with_capacity(lane_names.len());
    // The lanes read the WAL through one shared tail: each record is read and routed once.
    let tail = Arc::new(Tail::new(wal.clone(), router.clone(), lane_names.clone()));
    for name in lane_names {
        let kind = RowsKind::for_lane(&name);
        let table = config.drain.table_batch(&name);
        // Every event of the lane carries its table (a span field in JSON logs).
        let span = tracing::info_span!("drain", table = %name);
        let lane_config = LaneConfig {
            limits: BatchLimits {
                rows_max: table.rows_max as usize,
                bytes_max: usize::try_from(table.bytes_max).unwrap_or(usize::MAX),
                age_max: Duration::from_millis(table.flush_interval_ms),
            },
            name,
            dead_letter_table: config.drain.dead_letter_table.clone(),
            backoff_initial: Duration::from_millis(config.drain.retry_backoff_initial_ms),
            backoff_max: Duration::from_millis(config.drain.retry_backoff_max_ms),
            time_window: config.drain.time_window(),
        };
        let lane = Lane::new(
            lane_config,
            kind,
            wal.clone(),
            router.clone(),
            tail.clone(),
            sink.clone(),
            ledger.clone(),
            metrics.clone(),
            stop.clone(),
            first_lsn,
        )
        .await;
        let lane = match &finish {
            Some(finish) => lane.finish_on(finish.clone()),
            None => lane,
        };
        prepared.push((lane, span));
    }
    let mut lanes = JoinSet::new();
    for (lane, span) in prepared {
        lanes.spawn(tracing::Instrument::instrument(lane.run(), span));
    }
    // The audit runs beside the lanes and stops with them; it never fails the relay.
    let audit_options = audit_options(&config);
    if audit_options.enabled {
        let audit = Audit::new(
            AuditSetup {
                options: audit_options,
                profile,
                dead_letter_table: config.drain.dead_letter_table.clone(),
                time_window: config.drain.time_window(),
            },
            wal.clone(),
            ledger.clone(),
            router.clone(),
            sink.clone(),
            metrics.clone(),
            audit_stop,
        );
        lanes.spawn(async move {
            audit.run().await;
            Ok(())
        });
    }

    // Idle lanes move their cursors in memory; commit them now and then so segments get released.
    // A commit that finds the disk full is retried at the next tick (the lanes wait for space
    // on their own); any other ledger failure stops every lane, like a lane failure does.
    let mut tick = tokio::time::interval(Duration::from_millis(LEDGER_COMMIT_INTERVAL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut result = Ok(());
    let mut disk_full = Condition::default();
    // The keeper beats at every tick; a commit that hangs (a hung fsync) stops it beating.
    let heartbeat = metrics.health.heartbeat("ledger keeper");
    // What a drain before exit had to insert when it began, for its closing log line.
    let mut finish_watch = finish.clone();
    let mut left_at_finish: Option<u64> = None;
    loop {
        heartbeat.beat();
        tokio::select! {
            _ = wait_finish(&mut finish_watch), if left_at_finish.is_none() => {
                left_at_finish = Some(records_left(&ledger, &wal).await);
            }
            _ = tick.tick() => match ledger.commit().await {
                Ok(()) => {
                    if let Some(ended) = disk_full.cleared() {
                        tracing::info!(failures = ended.count, lasted_ms = ended.lasted.as_millis() as u64, "ledger written again");
                    }
                }
                Err(DrainError::LedgerDiskFull(error)) => {
                    if let Some(o) = disk_full.occurred() {
                        tracing::warn!(error = %ErrorChain(&error), failures = o.count(), lasted_s = o.lasted_s(), "disk full: the ledger cannot be written; retrying");
                    }
                }
                Err(error) => {
                    result = Err(RunError::Drain(error));
                    // Stop the lanes: the relay exits and the next start resumes from the
                    // ledger on disk.
                    lanes.abort_all();
                    break;
                }
            },
            joined = lanes.join_next() => match joined {
                None => break,
                Some(joined) => {
                    if let Some(error) = task_failure(joined.map(|r| r.map_err(RunError::from))) {
                        result = Err(error);
                        // Stop the other lanes: the relay exits and the next start resumes from
                        // the ledger (an interrupted insert is repeated with the same token).
                        lanes.abort_all();
                        break;
                    }
                }
            },
        }
    }
    // On a lane failure, stop the others too: the relay exits and restarts from the ledger.
    while let Some(joined) = lanes.join_next().await {
        if let Some(error) = task_failure(joined.map(|r| r.map_err(RunError::from))) {
            tracing::warn!(error = %ErrorChain(&error), "lane stopped");
        }
    }
    if let Err(error) = ledger.commit().await {
        tracing::warn!(error = %ErrorChain(&error), "final ledger commit");
    }
    if let Some(before) = left_at_finish {
        let left = records_left(&ledger, &wal).await;
        tracing::info!(
            drained = before.saturating_sub(left),
            left,
            "drain before exit ended"
        );
        if left > 0 {
            tracing::warn!(
                left,
                "shutdown.timeout_ms ran out before the WAL was drained (is ClickHouse reachable?): \
                 the WAL keeps these records; the next start on this WAL directory or a \
                 `prism-relay replay` of it delivers them"
            );
        }
    }
    result
}

/// Resolves once the drain before exit began; never without `shutdown.drain`. A dropped sender
/// resolves it too (the guard of its select branch then turns it off).
async fn wait_finish(finish: &mut Option<watch::Receiver<bool>>) {
    match finish {
        Some(finish) => {
            let _ = finish.wait_for(|f| *f).await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::{percent, sink_options, status_interval, wal_dir_exposure};
    use crate::config::{CompressionKind, Config};
    use crate::schema::Profile;

    #[test]
    fn auto_compression_is_off_for_a_server_on_loopback_only_and_the_explicit_kinds_are_obeyed() {
        let compress = |url: &str, kind: CompressionKind| {
            let mut config = Config::default();
            config.clickhouse.url = url.to_owned();
            config.clickhouse.compression = kind;
            sink_options(&config, Profile::Legacy).compress
        };
        assert_eq!(
            Config::default().clickhouse.compression,
            CompressionKind::Auto
        );
        assert!(!compress("http://127.0.0.1:8123", CompressionKind::Auto));
        assert!(!compress("https://localhost:8443", CompressionKind::Auto));
        assert!(compress("http://10.1.2.3:8123", CompressionKind::Auto));
        assert!(compress("http://127.0.0.1:8123", CompressionKind::Lz4));
        assert!(!compress("http://10.1.2.3:8123", CompressionKind::None));
    }

    #[test]
    fn a_status_interval_of_zero_means_no_status_task_and_any_other_its_period() {
        let mut config = Config::default();
        assert_eq!(
            status_interval(&config),
            Some(std::time::Duration::from_secs(60))
        );
        config.metrics.status_interval_s = 0;
        assert_eq!(status_interval(&config), None);
        assert_eq!(percent(512, 2048), 25.0);
        assert_eq!(percent(1, 0), 0.0);
    }

    #[test]
    fn a_wal_directory_writable_by_group_or_others_is_reported_and_a_private_one_is_not() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let set = |mode: u32| {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode))
                .expect("chmod")
        };
        set(0o700);
        assert_eq!(wal_dir_exposure(dir.path()), None);
        set(0o755);
        assert_eq!(wal_dir_exposure(dir.path()), None);
        set(0o775);
        let group = wal_dir_exposure(dir.path()).expect("group-writable is reported");
        assert!(
            group.contains("its group") && group.contains("775") && group.contains("chmod 700"),
            "{group}"
        );
        set(0o777);
        let all = wal_dir_exposure(dir.path()).expect("world-writable is reported");
        assert!(all.contains("its group and by others"), "{all}");
        set(0o700);
    }
}
