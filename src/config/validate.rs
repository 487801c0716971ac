//! Validation: every bound and every relation between fields, collected by [`Validator`] so that
//! all problems are reported at once, each with its field path, value, allowed range and fix.
//!
//! It is separate because it only reads the model and the bounds of [`super::limits`], and is the
//! longest part: one method per section.

use std::collections::BTreeSet;
use std::fmt;

use super::limits::*;
use super::{
    ClickHouseProfile, Config, ConfigError, DeliverPolicyKind, InvalidValue, RESERVED_STREAM_NAME,
    TYPED_DATA_TYPES, TYPED_TABLES,
};
use crate::drain::UNROUTED_LANE;
use crate::redact::redact;

impl Config {
    /// Checks every bound and relation; returns all violations at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut v = Validator::default();
        self.validate_nats(&mut v);
        self.validate_streams(&mut v);
        self.validate_consumers(&mut v);
        self.validate_wal(&mut v);
        self.validate_clickhouse(&mut v);
        self.validate_drain(&mut v);
        self.validate_metrics(&mut v);
        self.validate_audit(&mut v);
        v.range(
            "shutdown.timeout_ms",
            self.shutdown.timeout_ms,
            SHUTDOWN_TIMEOUT_MS_MIN,
            SHUTDOWN_TIMEOUT_MS_MAX,
            "ms",
        );
        if v.errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(v.errors))
        }
    }

    fn validate_nats(&self, v: &mut Validator) {
        let n = &self.nats;
        for server in n.url.split(',') {
            if let Err(why) = check_nats_url(server.trim()) {
                v.push(
                    "nats.url",
                    &n.url,
                    "comma-separated nats://, tls://, ws:// or wss:// URLs (or host:port)",
                    why,
                );
            }
        }
        v.range(
            "nats.connect_timeout_ms",
            n.connect_timeout_ms,
            NATS_CONNECT_TIMEOUT_MS_MIN,
            NATS_CONNECT_TIMEOUT_MS_MAX,
            "ms",
        );
        v.range(
            "nats.request_timeout_ms",
            n.request_timeout_ms,
            NATS_REQUEST_TIMEOUT_MS_MIN,
            NATS_REQUEST_TIMEOUT_MS_MAX,
            "ms",
        );
        let has_password = n.password.is_some() || n.password_file.is_some();
        let methods = [
            n.user.is_some() || has_password,
            n.token.is_some() || n.token_file.is_some(),
            n.creds_file.is_some(),
            n.nkey_file.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            v.push(
                "nats",
                "several of user/password, token, creds_file, nkey_file",
                "one authentication method",
                "keep exactly one of user+password, token, creds_file or nkey_file".to_owned(),
            );
        }
        for (field, path) in [
            ("nats.creds_file", &n.creds_file),
            ("nats.nkey_file", &n.nkey_file),
        ] {
            if let Some(path) = path {
                v.readable_file(field, path);
            }
        }
        v.tls_files("nats", &n.tls_ca_file, &n.tls_cert_file, &n.tls_key_file);
        if n.tls_wanted() {
            for server in n.url.split(',').map(str::trim) {
                if server.starts_with("ws://") {
                    v.push(
                        "nats.url",
                        server,
                        "tls://, nats:// or wss:// URLs when TLS is wanted",
                        "use wss:// (or tls://), or remove nats.tls_required and the nats.tls_* files"
                            .to_owned(),
                    );
                }
            }
        }
        if n.password.is_some() && n.password_file.is_some() {
            v.push(
                "nats.password_file",
                "set together with nats.password",
                "one source of the password",
                "keep nats.password_file and remove nats.password".to_owned(),
            );
        }
        if n.token.is_some() && n.token_file.is_some() {
            v.push(
                "nats.token_file",
                "set together with nats.token",
                "one source of the token",
                "keep nats.token_file and remove nats.token".to_owned(),
            );
        }
        if n.user.is_some() != has_password {
            v.push(
                if n.user.is_some() {
                    "nats.password"
                } else {
                    "nats.user"
                },
                "<unset>",
                "user and password together",
                "set both nats.user and nats.password (or nats.password_file), or neither"
                    .to_owned(),
            );
        }
    }

    fn validate_streams(&self, v: &mut Validator) {
        let mut names = BTreeSet::new();
        for (i, s) in self.stream.iter().enumerate() {
            let p = |f: &str| format!("stream[{i}].{f}");
            v.name(&p("name"), &s.name);
            if s.name == RESERVED_STREAM_NAME {
                v.push(
                    &p("name"),
                    &s.name,
                    "any name but ORDERBOOK_SNAP",
                    "MarketPrism's init script deletes ORDERBOOK_SNAP; choose another name such as MARKET_BOOKS".to_owned(),
                );
            }
            if !names.insert(s.name.as_str()) {
                v.push(
                    &p("name"),
                    &s.name,
                    "a name not used by another [[stream]]",
                    "remove the duplicate [[stream]] entry".to_owned(),
                );
            }
            if s.subjects.is_empty() {
                v.push(
                    &p("subjects"),
                    "[]",
                    "one or more subjects",
                    "list the subjects the stream captures, e.g. [\"trade.>\"]".to_owned(),
                );
            }
            for (j, subject) in s.subjects.iter().enumerate() {
                v.subject(&format!("stream[{i}].subjects[{j}]"), subject);
            }
            if s.max_age_s != 0 {
                v.range(
                    &p("max_age_s"),
                    s.max_age_s,
                    STREAM_MAX_AGE_S_MIN,
                    STREAM_MAX_AGE_S_MAX,
                    "s (or 0 = unlimited)",
                );
            }
            if s.max_bytes != -1 {
                v.range(
                    &p("max_bytes"),
                    s.max_bytes,
                    STREAM_MAX_BYTES_MIN,
                    STREAM_MAX_BYTES_MAX,
                    "bytes (or -1 = unlimited)",
                );
            }
            if s.max_msgs != -1 {
                v.range(
                    &p("max_msgs"),
                    s.max_msgs,
                    STREAM_MAX_MSGS_MIN,
                    STREAM_MAX_MSGS_MAX,
                    "messages (or -1 = unlimited)",
                );
            }
            v.range(
                &p("duplicate_window_s"),
                s.duplicate_window_s,
                STREAM_DUPLICATE_WINDOW_S_MIN,
                STREAM_DUPLICATE_WINDOW_S_MAX,
                "s",
            );
            if s.max_age_s != 0 && s.duplicate_window_s > s.max_age_s {
                v.push(
                    &p("duplicate_window_s"),
                    &s.duplicate_window_s.to_string(),
                    &format!("at most max_age_s ({} s)", s.max_age_s),
                    "JetStream rejects a deduplication window longer than the stream's max age; lower it".to_owned(),
                );
            }
            v.range(
                &p("replicas"),
                s.replicas,
                STREAM_REPLICAS_MIN,
                STREAM_REPLICAS_MAX,
                "replicas",
            );
        }
    }

    fn validate_consumers(&self, v: &mut Validator) {
        let mut durables = BTreeSet::new();
        for (i, c) in self.consumer.iter().enumerate() {
            let p = |f: &str| format!("consumer[{i}].{f}");
            v.name(&p("stream"), &c.stream);
            v.name(&p("durable"), &c.durable);
            if !durables.insert((c.stream.as_str(), c.durable.as_str())) {
                v.push(
                    &p("durable"),
                    &c.durable,
                    "a durable not used by another [[consumer]] of the same stream",
                    "remove the duplicate or give it another durable name".to_owned(),
                );
            }
            let mut filters = BTreeSet::new();
            for (j, subject) in c.filter_subjects.iter().enumerate() {
                let field = format!("consumer[{i}].filter_subjects[{j}]");
                v.subject(&field, subject);
                if !filters.insert(subject.as_str()) {
                    v.push(
                        &field,
                        subject,
                        "each filter subject once",
                        "remove the duplicate filter subject".to_owned(),
                    );
                }
            }
            match (c.deliver_policy, c.start_sequence) {
                (DeliverPolicyKind::ByStartSequence, None | Some(0)) => v.push(
                    &p("start_sequence"),
                    &format!("{:?}", c.start_sequence),
                    "1 ..= 18446744073709551615 (stream sequence)",
                    "set start_sequence with deliver_policy = \"by_start_sequence\"".to_owned(),
                ),
                (DeliverPolicyKind::ByStartSequence, Some(_)) | (_, None) => {}
                (_, Some(seq)) => v.push(
                    &p("start_sequence"),
                    &seq.to_string(),
                    "only with deliver_policy = \"by_start_sequence\"",
                    "remove start_sequence or set deliver_policy = \"by_start_sequence\""
                        .to_owned(),
                ),
            }
            v.range(
                &p("ack_wait_ms"),
                c.ack_wait_ms,
                CONSUMER_ACK_WAIT_MS_MIN,
                CONSUMER_ACK_WAIT_MS_MAX,
                "ms",
            );
            v.range(
                &p("max_ack_pending"),
                c.max_ack_pending,
                CONSUMER_MAX_ACK_PENDING_MIN,
                CONSUMER_MAX_ACK_PENDING_MAX,
                "messages",
            );
            if c.max_deliver != -1
                && !(CONSUMER_MAX_DELIVER_MIN..=CONSUMER_MAX_DELIVER_MAX).contains(&c.max_deliver)
            {
                v.push(
                    &p("max_deliver"),
                    &c.max_deliver.to_string(),
                    &format!(
                        "-1 (unlimited) or {CONSUMER_MAX_DELIVER_MIN} ..= {CONSUMER_MAX_DELIVER_MAX} deliveries"
                    ),
                    "use -1: a small max_deliver drops messages for good after a short outage".to_owned(),
                );
            }
            v.range(
                &p("fetch_batch"),
                c.fetch_batch,
                CONSUMER_FETCH_BATCH_MIN,
                CONSUMER_FETCH_BATCH_MAX,
                "messages",
            );
            if i64::from(c.fetch_batch) > c.max_ack_pending && c.max_ack_pending >= 1 {
                v.push(
                    &p("fetch_batch"),
                    &c.fetch_batch.to_string(),
                    &format!("at most max_ack_pending ({} messages)", c.max_ack_pending),
                    "lower fetch_batch or raise max_ack_pending, or pulls stall at max_ack_pending"
                        .to_owned(),
                );
            }
            v.range(
                &p("fetch_bytes_max"),
                c.fetch_bytes_max,
                CONSUMER_FETCH_BYTES_MAX_MIN,
                CONSUMER_FETCH_BYTES_MAX_MAX,
                "bytes",
            );
            v.range(
                &p("fetch_expires_ms"),
                c.fetch_expires_ms,
                CONSUMER_FETCH_EXPIRES_MS_MIN,
                CONSUMER_FETCH_EXPIRES_MS_MAX,
                "ms",
            );
            v.range(
                &p("fetch_linger_ms"),
                c.fetch_linger_ms,
                0,
                CONSUMER_FETCH_LINGER_MS_MAX,
                "ms",
            );
            if c.fetch_expires_ms >= c.ack_wait_ms {
                v.push(
                    &p("fetch_expires_ms"),
                    &c.fetch_expires_ms.to_string(),
                    &format!("less than ack_wait_ms ({} ms)", c.ack_wait_ms),
                    "lower fetch_expires_ms: messages of a long pull would be redelivered before they are written".to_owned(),
                );
            }
        }
    }

    fn validate_wal(&self, v: &mut Validator) {
        let w = &self.wal;
        if w.dir.as_os_str().is_empty() {
            v.push(
                "wal.dir",
                "\"\"",
                "a directory path",
                "set wal.dir, e.g. \"./data/wal\"".to_owned(),
            );
        }
        v.range(
            "wal.segment_bytes_max",
            w.segment_bytes_max,
            WAL_SEGMENT_BYTES_MAX_MIN,
            WAL_SEGMENT_BYTES_MAX_MAX,
            "bytes",
        );
        v.range(
            "wal.group_bytes_max",
            w.group_bytes_max,
            WAL_GROUP_BYTES_MAX_MIN,
            WAL_GROUP_BYTES_MAX_MAX.min(w.segment_bytes_max.max(WAL_GROUP_BYTES_MAX_MIN)),
            "bytes (at most segment_bytes_max)",
        );
        let budget_min = WAL_BUDGET_BYTES_MAX_MIN
            .max(w.segment_bytes_max.saturating_mul(WAL_BUDGET_SEGMENTS_MIN));
        v.range(
            "wal.budget_bytes_max",
            w.budget_bytes_max,
            budget_min,
            WAL_BUDGET_BYTES_MAX_MAX,
            "bytes (at least 2 x segment_bytes_max)",
        );
        v.range(
            "wal.retention_bytes_max",
            w.retention_bytes_max,
            0,
            WAL_RETENTION_BYTES_MAX_MAX.min(w.budget_bytes_max),
            "bytes (at most budget_bytes_max)",
        );
        v.range(
            "wal.retention_segments_max",
            w.retention_segments_max,
            0,
            WAL_RETENTION_SEGMENTS_MAX_MAX,
            "segments",
        );
        v.range(
            "wal.retention_age_s",
            w.retention_age_s,
            0,
            WAL_RETENTION_AGE_S_MAX,
            "s",
        );
    }

    fn validate_clickhouse(&self, v: &mut Validator) {
        let c = &self.clickhouse;
        v.tls_files(
            "clickhouse",
            &c.tls_ca_file,
            &c.tls_cert_file,
            &c.tls_key_file,
        );
        let tls_files =
            c.tls_ca_file.is_some() || c.tls_cert_file.is_some() || c.tls_key_file.is_some();
        if tls_files && c.url.starts_with("http://") {
            v.push(
                "clickhouse.url",
                &c.url,
                "an https:// URL when clickhouse.tls_* files are set",
                "use the server's https:// URL (its https_port), or remove the clickhouse.tls_* files"
                    .to_owned(),
            );
        }
        if !(c.url.starts_with("http://") || c.url.starts_with("https://"))
            || c.url.len() <= "https://".len()
            || c.url.contains(char::is_whitespace)
        {
            v.push(
                "clickhouse.url",
                &c.url,
                "an http:// or https:// URL",
                "use the HTTP interface, e.g. \"http://127.0.0.1:8123\" (not the native TCP port 9000)".to_owned(),
            );
        }
        if !c.password.is_empty() && c.password_file.is_some() {
            v.push(
                "clickhouse.password_file",
                "set together with clickhouse.password",
                "one source of the password",
                "keep clickhouse.password_file and remove clickhouse.password".to_owned(),
            );
        }
        v.identifier("clickhouse.database", &c.database);
        self.validate_clickhouse_cluster(v);
        v.range(
            "clickhouse.insert_timeout_ms",
            c.insert_timeout_ms,
            CLICKHOUSE_INSERT_TIMEOUT_MS_MIN,
            CLICKHOUSE_INSERT_TIMEOUT_MS_MAX,
            "ms",
        );
        v.range(
            "clickhouse.connect_timeout_ms",
            c.connect_timeout_ms,
            CLICKHOUSE_CONNECT_TIMEOUT_MS_MIN,
            CLICKHOUSE_CONNECT_TIMEOUT_MS_MAX,
            "ms",
        );
        if let Some(days) = c.ttl_days {
            v.range(
                "clickhouse.ttl_days",
                days,
                CLICKHOUSE_TTL_DAYS_MIN,
                CLICKHOUSE_TTL_DAYS_MAX,
                "days",
            );
            if c.profile == ClickHouseProfile::Legacy {
                v.push(
                    "clickhouse.ttl_days",
                    &days.to_string(),
                    "unset with profile = \"legacy\"",
                    "remove ttl_days: the legacy profile creates tables without TTL".to_owned(),
                );
            }
        }
        if c.async_insert && c.profile == ClickHouseProfile::Legacy {
            v.push(
                "clickhouse.async_insert",
                "true",
                "false with profile = \"legacy\"",
                "set async_insert = false, or profile = \"modern\" for a server that has \
                 asynchronous inserts (ClickHouse 22.2 and newer); 18.16 has none"
                    .to_owned(),
            );
        }
    }

    fn validate_audit(&self, v: &mut Validator) {
        let a = &self.audit;
        v.range(
            "audit.sample_every_records",
            a.sample_every_records,
            AUDIT_SAMPLE_EVERY_RECORDS_MIN,
            AUDIT_SAMPLE_EVERY_RECORDS_MAX,
            "records",
        );
        v.range(
            "audit.interval_ms",
            a.interval_ms,
            AUDIT_INTERVAL_MS_MIN,
            AUDIT_INTERVAL_MS_MAX,
            "ms",
        );
        v.range(
            "audit.pending_max",
            a.pending_max,
            AUDIT_PENDING_MAX_MIN,
            AUDIT_PENDING_MAX_MAX,
            "samples",
        );
    }

    /// `cluster`, `zookeeper_path` and `replica_urls`: the cluster layout's fields.
    fn validate_clickhouse_cluster(&self, v: &mut Validator) {
        let c = &self.clickhouse;
        if let Some(cluster) = &c.cluster {
            let ok = !cluster.is_empty()
                && cluster.len() <= CLICKHOUSE_CLUSTER_NAME_CHARS_MAX
                && cluster
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-');
            if !ok {
                v.push(
                    "clickhouse.cluster",
                    cluster,
                    "1 ..= 128 characters of [A-Za-z0-9_-]",
                    "use the cluster's name as <remote_servers> in the servers' configuration spells it, or remove cluster for one server".to_owned(),
                );
            }
        }
        let path = &c.zookeeper_path;
        if !path.starts_with('/')
            || !path.contains("{table}")
            || path.contains(['\'', '\\'])
            || path.contains(char::is_whitespace)
        {
            v.push(
                "clickhouse.zookeeper_path",
                path,
                "an absolute ZooKeeper path containing {table}, without quotes, backslashes or spaces",
                format!(
                    "use the default \"{}\": each table needs a path of its own, and the replicas of a shard share it through {{shard}}",
                    crate::schema::ZOOKEEPER_PATH_DEFAULT
                ),
            );
        }
        for url in &c.replica_urls {
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || url.len() <= "https://".len()
                || url.contains(char::is_whitespace)
            {
                v.push(
                    "clickhouse.replica_urls",
                    url,
                    "http:// or https:// URLs",
                    "list each other replica's HTTP interface, e.g. \"http://ch-2:8123\""
                        .to_owned(),
                );
            }
        }
        if c.cluster.is_none() && !c.replica_urls.is_empty() {
            v.push(
                "clickhouse.replica_urls",
                "set without clickhouse.cluster",
                "only with clickhouse.cluster",
                "set clickhouse.cluster to the cluster's name, or remove replica_urls".to_owned(),
            );
        }
    }

    fn validate_metrics(&self, v: &mut Validator) {
        let m = &self.metrics;
        v.range(
            "metrics.connections_max",
            m.connections_max,
            METRICS_CONNECTIONS_MAX_MIN,
            METRICS_CONNECTIONS_MAX_MAX,
            "connections",
        );
        v.range(
            "metrics.header_read_timeout_ms",
            m.header_read_timeout_ms,
            METRICS_HEADER_READ_TIMEOUT_MS_MIN,
            METRICS_HEADER_READ_TIMEOUT_MS_MAX,
            "ms",
        );
        v.range(
            "metrics.request_timeout_ms",
            m.request_timeout_ms,
            METRICS_REQUEST_TIMEOUT_MS_MIN.max(m.header_read_timeout_ms),
            METRICS_REQUEST_TIMEOUT_MS_MAX,
            "ms (at least header_read_timeout_ms)",
        );
        v.range(
            "metrics.ready_insert_failing_s",
            m.ready_insert_failing_s,
            METRICS_READY_INSERT_FAILING_S_MIN,
            METRICS_READY_INSERT_FAILING_S_MAX,
            "s",
        );
        v.range(
            "metrics.backlog_poll_interval_s",
            m.backlog_poll_interval_s,
            METRICS_BACKLOG_POLL_INTERVAL_S_MIN,
            METRICS_BACKLOG_POLL_INTERVAL_S_MAX,
            "s",
        );
        v.range(
            "metrics.status_interval_s",
            m.status_interval_s,
            0,
            METRICS_STATUS_INTERVAL_S_MAX,
            "s (0 = no status line)",
        );
    }

    fn validate_drain(&self, v: &mut Validator) {
        let d = &self.drain;
        v.range(
            "drain.flush_interval_ms",
            d.flush_interval_ms,
            DRAIN_FLUSH_INTERVAL_MS_MIN,
            DRAIN_FLUSH_INTERVAL_MS_MAX,
            "ms",
        );
        v.range(
            "drain.retry_backoff_initial_ms",
            d.retry_backoff_initial_ms,
            DRAIN_RETRY_BACKOFF_MS_MIN,
            DRAIN_RETRY_BACKOFF_MS_MAX,
            "ms",
        );
        v.range(
            "drain.retry_backoff_max_ms",
            d.retry_backoff_max_ms,
            d.retry_backoff_initial_ms.max(DRAIN_RETRY_BACKOFF_MS_MIN),
            DRAIN_RETRY_BACKOFF_MS_MAX,
            "ms (at least retry_backoff_initial_ms)",
        );
        v.range(
            "drain.timestamp_min_ms",
            d.timestamp_min_ms,
            0,
            DRAIN_TIMESTAMP_MIN_MS_MAX,
            "ms since the epoch (0 accepts any time; at most 2100-01-01)",
        );
        v.range(
            "drain.timestamp_future_max_ms",
            d.timestamp_future_max_ms,
            DRAIN_TIMESTAMP_FUTURE_MAX_MS_MIN,
            DRAIN_TIMESTAMP_FUTURE_MAX_MS_MAX,
            "ms",
        );
        v.identifier("drain.dead_letter_table", &d.dead_letter_table);
        if TYPED_TABLES.contains(&d.dead_letter_table.as_str())
            || d.dead_letter_table == UNROUTED_LANE
        {
            v.push(
                "drain.dead_letter_table",
                &d.dead_letter_table,
                "a table of its own (not a data table, not the internal lane _unrouted)",
                "use a name such as dead_letters".to_owned(),
            );
        }

        let mut data_types = BTreeSet::new();
        for (i, route) in d.passthrough.iter().enumerate() {
            let p = |f: &str| format!("drain.passthrough[{i}].{f}");
            let token_ok = !route.data_type.is_empty()
                && !route
                    .data_type
                    .contains(|c: char| c == '.' || c == '*' || c == '>' || c.is_whitespace());
            if !token_ok {
                v.push(
                    &p("data_type"),
                    &route.data_type,
                    "one subject token (no '.', '*', '>' or spaces)",
                    "use the first token of the subjects, e.g. \"ticker\"".to_owned(),
                );
            }
            if TYPED_DATA_TYPES.contains(&route.data_type.as_str()) {
                v.push(
                    &p("data_type"),
                    &route.data_type,
                    "a data type without a typed codec",
                    "remove the route: this data type has a typed table".to_owned(),
                );
            }
            if !data_types.insert(route.data_type.as_str()) {
                v.push(
                    &p("data_type"),
                    &route.data_type,
                    "each data type once",
                    "remove the duplicate route".to_owned(),
                );
            }
            v.identifier(&p("table"), &route.table);
            // `_unrouted` names the drain's internal lane (and its ledger cursor): a passthrough
            // table of that name would share the lane with unroutable records.
            if TYPED_TABLES.contains(&route.table.as_str())
                || route.table == d.dead_letter_table
                || route.table == UNROUTED_LANE
            {
                v.push(
                    &p("table"),
                    &route.table,
                    "a table of its own (not a data table, the dead-letter table or the internal lane _unrouted)",
                    "route to a table of its own".to_owned(),
                );
            }
        }

        for (table, batch) in &d.tables {
            let known = TYPED_TABLES.contains(&table.as_str())
                || d.passthrough.iter().any(|r| &r.table == table);
            let p = |f: &str| format!("drain.tables.{table}.{f}");
            if !known {
                v.push(
                    &format!("drain.tables.{table}"),
                    table,
                    &format!("one of {} or a passthrough table", TYPED_TABLES.join(", ")),
                    "fix the table name or add a [[drain.passthrough]] route to it".to_owned(),
                );
            }
            v.range(
                &p("rows_max"),
                batch.rows_max,
                DRAIN_TABLE_ROWS_MAX_MIN,
                DRAIN_TABLE_ROWS_MAX_MAX,
                "rows",
            );
            v.range(
                &p("bytes_max"),
                batch.bytes_max,
                DRAIN_TABLE_BYTES_MAX_MIN,
                DRAIN_TABLE_BYTES_MAX_MAX,
                "bytes",
            );
            v.range(
                &p("flush_interval_ms"),
                batch.flush_interval_ms,
                DRAIN_FLUSH_INTERVAL_MS_MIN,
                DRAIN_FLUSH_INTERVAL_MS_MAX,
                "ms",
            );
        }
    }
}

fn check_nats_url(server: &str) -> Result<(), String> {
    if server.is_empty() || server.contains(char::is_whitespace) {
        return Err("give a server URL such as \"nats://127.0.0.1:4222\"".to_owned());
    }
    let rest = match server.split_once("://") {
        Some((scheme, rest)) => {
            if !matches!(scheme, "nats" | "tls" | "ws" | "wss") {
                return Err(format!(
                    "scheme {scheme}:// is not a NATS scheme; use nats://, tls://, ws:// or wss://"
                ));
            }
            rest
        }
        None => server,
    };
    let host_port = rest.rsplit('@').next().unwrap_or(rest);
    if host_port.is_empty() || host_port.starts_with(':') {
        return Err("the URL has no host; e.g. \"nats://127.0.0.1:4222\"".to_owned());
    }
    Ok(())
}

/// Collects invalid values.
#[derive(Default)]
struct Validator {
    errors: Vec<InvalidValue>,
}

impl Validator {
    fn push(&mut self, field: &str, value: &str, allowed: &str, fix: String) {
        self.errors.push(InvalidValue {
            field: field.to_owned(),
            // A URL value may carry a password in its user info.
            value: redact(value).into_owned(),
            allowed: allowed.to_owned(),
            fix,
        });
    }

    fn range<T>(&mut self, field: &str, value: T, min: T, max: T, unit: &str)
    where
        T: PartialOrd + fmt::Display + Copy,
    {
        if value < min || value > max {
            let short = field.rsplit('.').next().unwrap_or(field);
            let fix = if value < min {
                format!("raise {short} to at least {min}")
            } else {
                format!("lower {short} to at most {max}")
            };
            self.push(
                field,
                &value.to_string(),
                &format!("{min} ..= {max} {unit}"),
                fix,
            );
        }
    }

    /// A file the relay must read at start-up: it exists and this user can open it.
    fn readable_file(&mut self, field: &str, path: &std::path::Path) {
        let shown = path.display().to_string();
        match std::fs::File::open(path) {
            Ok(file) => {
                if file.metadata().is_ok_and(|m| m.is_dir()) {
                    self.push(
                        field,
                        &shown,
                        "a readable file",
                        "name the file, not its directory".to_owned(),
                    );
                }
            }
            Err(error) => self.push(
                field,
                &shown,
                "a readable file",
                format!("cannot open it ({error}): fix the path or make it readable by the relay's user"),
            ),
        }
    }

    /// The TLS files of `section`: each readable, and a client certificate with its key.
    fn tls_files(
        &mut self,
        section: &str,
        ca: &Option<std::path::PathBuf>,
        cert: &Option<std::path::PathBuf>,
        key: &Option<std::path::PathBuf>,
    ) {
        for (name, path) in [
            ("tls_ca_file", ca),
            ("tls_cert_file", cert),
            ("tls_key_file", key),
        ] {
            if let Some(path) = path {
                self.readable_file(&format!("{section}.{name}"), path);
            }
        }
        match (cert, key) {
            (Some(_), None) => self.push(
                &format!("{section}.tls_key_file"),
                "<unset>",
                "set together with tls_cert_file",
                format!("set {section}.tls_key_file to the client certificate's private key, or remove {section}.tls_cert_file"),
            ),
            (None, Some(_)) => self.push(
                &format!("{section}.tls_cert_file"),
                "<unset>",
                "set together with tls_key_file",
                format!("set {section}.tls_cert_file to the client certificate, or remove {section}.tls_key_file"),
            ),
            _ => {}
        }
    }

    /// A JetStream stream or consumer name: the server forbids these characters because names
    /// become subject tokens and file names.
    fn name(&mut self, field: &str, value: &str) {
        const NAME_LEN_MAX: usize = 255;
        let bad = value.is_empty()
            || value.len() > NAME_LEN_MAX
            || value.contains(|c: char| {
                matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_whitespace() || c.is_control()
            });
        if bad {
            self.push(
                field,
                value,
                "1 ..= 255 characters without '.', '*', '>', '/', '\\' or whitespace",
                "use a plain name such as MARKET_TRADES or prism-relay".to_owned(),
            );
        }
    }

    /// A NATS subject, wildcards allowed: non-empty tokens, `>` only as the last token.
    fn subject(&mut self, field: &str, value: &str) {
        let tokens: Vec<&str> = value.split('.').collect();
        let last = tokens.len() - 1;
        let bad = value.is_empty()
            || value.contains(char::is_whitespace)
            || tokens.iter().enumerate().any(|(i, t)| {
                t.is_empty()
                    || (t.contains('>') && (*t != ">" || i != last))
                    || (t.contains('*') && *t != "*")
            });
        if bad {
            self.push(
                field,
                value,
                "a NATS subject: dot-separated non-empty tokens, '*' as a whole token, '>' only last",
                "write it like \"trade.>\" or \"funding_rate.*.perpetual.>\"".to_owned(),
            );
        }
    }

    /// A ClickHouse identifier the relay writes unquoted in DDL.
    fn identifier(&mut self, field: &str, value: &str) {
        let mut chars = value.chars();
        let ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            && value.len() <= 128;
        if !ok {
            self.push(
                field,
                value,
                "1 ..= 128 characters of [A-Za-z0-9_], not starting with a digit",
                "use a plain identifier such as marketprism_hot".to_owned(),
            );
        }
    }
}
