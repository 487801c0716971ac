//! Derived defaults: a field the operator did not set follows the fields it is bounded by, so
//! changing one setting never fails only because the default of another contradicts it.
//!
//! Each rule is a relation validation checks between two fields. When the values break it and
//! the operator set only one of the two (in the file or the environment), the other one, still at
//! its default, moves to the nearest value that keeps the relation, and is marked derived from the
//! one that was set. Two fields the operator set are never changed: if they contradict each other,
//! validation reports them by name. The defaults keep every relation, so a configuration that
//! validated before loads exactly as before.
//!
//! | relation | the smaller follows the larger | the larger follows the smaller |
//! |---|---|---|
//! | `wal.group_bytes_max` <= `wal.segment_bytes_max` | group = segment | segment = group |
//! | `wal.retention_bytes_max` <= `wal.budget_bytes_max` | retention = budget | budget = retention |
//! | 2 x `wal.segment_bytes_max` <= `wal.budget_bytes_max` | segment = budget / 2 | budget = 2 x segment |
//! | `drain.retry_backoff_initial_ms` <= `drain.retry_backoff_max_ms` | initial = max | max = initial |
//! | `metrics.header_read_timeout_ms` <= `metrics.request_timeout_ms` | header = request | request = header |
//! | `consumer[i].fetch_batch` <= `consumer[i].max_ack_pending` | batch = pending | pending = batch |
//! | `consumer[i].fetch_expires_ms` < `consumer[i].ack_wait_ms` | expires = ack wait / 2 | ack wait = 2 x expires |
//! | `stream[i].duplicate_window_s` <= `stream[i].max_age_s` (when limited) | window = max age | max age = window |

use super::limits::WAL_BUDGET_SEGMENTS_MIN;
use super::origin::Origins;
use super::Config;

/// One side of a relation: its field path and value.
struct Side<'a, T> {
    path: String,
    value: &'a mut T,
}

fn side<T>(path: impl Into<String>, value: &mut T) -> Side<'_, T> {
    Side {
        path: path.into(),
        value,
    }
}

/// Keeps `small <= large`: when it does not hold, the side the operator did not set takes the
/// other's value (scaled by `to_large` / `to_small` where the relation has a factor).
fn follow<T: PartialOrd + Copy>(
    origins: &mut Origins,
    small: Side<'_, T>,
    large: Side<'_, T>,
    to_small: impl Fn(T) -> T,
    to_large: impl Fn(T) -> T,
    holds: impl Fn(T, T) -> bool,
) {
    if holds(*small.value, *large.value) {
        return;
    }
    if !origins.is_set(&small.path) {
        *small.value = to_small(*large.value);
        origins.derive(small.path, large.path);
    } else if !origins.is_set(&large.path) {
        *large.value = to_large(*small.value);
        origins.derive(large.path, small.path);
    }
}

/// [`follow`] for the plain relation `small <= large`.
fn follow_le<T: PartialOrd + Copy>(origins: &mut Origins, small: Side<'_, T>, large: Side<'_, T>) {
    follow(origins, small, large, |v| v, |v| v, |s, l| s <= l);
}

impl Config {
    /// Applies the derived defaults to the fields `origins` does not mark as set, and marks each
    /// field it changes as derived.
    pub(crate) fn derive_defaults(&mut self, origins: &mut Origins) {
        let w = &mut self.wal;
        follow_le(
            origins,
            side("wal.group_bytes_max", &mut w.group_bytes_max),
            side("wal.segment_bytes_max", &mut w.segment_bytes_max),
        );
        follow_le(
            origins,
            side("wal.retention_bytes_max", &mut w.retention_bytes_max),
            side("wal.budget_bytes_max", &mut w.budget_bytes_max),
        );
        follow(
            origins,
            side("wal.segment_bytes_max", &mut w.segment_bytes_max),
            side("wal.budget_bytes_max", &mut w.budget_bytes_max),
            |budget| budget / WAL_BUDGET_SEGMENTS_MIN,
            |segment| segment.saturating_mul(WAL_BUDGET_SEGMENTS_MIN),
            |segment, budget| segment.saturating_mul(WAL_BUDGET_SEGMENTS_MIN) <= budget,
        );
        // A budget raised for the segments may leave a derived group size behind: settle it again.
        follow_le(
            origins,
            side("wal.group_bytes_max", &mut w.group_bytes_max),
            side("wal.segment_bytes_max", &mut w.segment_bytes_max),
        );

        let d = &mut self.drain;
        follow_le(
            origins,
            side(
                "drain.retry_backoff_initial_ms",
                &mut d.retry_backoff_initial_ms,
            ),
            side("drain.retry_backoff_max_ms", &mut d.retry_backoff_max_ms),
        );

        let m = &mut self.metrics;
        follow_le(
            origins,
            side(
                "metrics.header_read_timeout_ms",
                &mut m.header_read_timeout_ms,
            ),
            side("metrics.request_timeout_ms", &mut m.request_timeout_ms),
        );

        for (i, c) in self.consumer.iter_mut().enumerate() {
            let mut batch = i64::from(c.fetch_batch);
            follow_le(
                origins,
                side(format!("consumer[{i}].fetch_batch"), &mut batch),
                side(
                    format!("consumer[{i}].max_ack_pending"),
                    &mut c.max_ack_pending,
                ),
            );
            // A pending limit above u32::MAX leaves the batch as it was; validation bounds both.
            c.fetch_batch = u32::try_from(batch).unwrap_or(c.fetch_batch);
            // Half the ack wait leaves the other half to write and ack what a pull returned.
            follow(
                origins,
                side(
                    format!("consumer[{i}].fetch_expires_ms"),
                    &mut c.fetch_expires_ms,
                ),
                side(format!("consumer[{i}].ack_wait_ms"), &mut c.ack_wait_ms),
                |ack_wait| ack_wait / 2,
                |expires| expires.saturating_mul(2),
                |expires, ack_wait| expires < ack_wait,
            );
        }

        for (i, s) in self.stream.iter_mut().enumerate() {
            if s.max_age_s == 0 {
                // Unlimited age bounds no deduplication window.
                continue;
            }
            follow_le(
                origins,
                side(
                    format!("stream[{i}].duplicate_window_s"),
                    &mut s.duplicate_window_s,
                ),
                side(format!("stream[{i}].max_age_s"), &mut s.max_age_s),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Config, ConfigError, Origin, Origins};

    fn load(text: &str) -> Result<(Config, Origins), ConfigError> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, text).expect("write configuration");
        Config::load_with_origins(Some(&path), Vec::new())
    }

    fn invalid_fields(text: &str) -> Vec<String> {
        match load(text) {
            Ok(_) => panic!("{text} loaded, but its values contradict each other"),
            Err(error) => error
                .invalid_values()
                .iter()
                .map(|v| v.field.clone())
                .collect(),
        }
    }

    /// One relation: a file setting only the first field, the field that must follow with the
    /// value it must take, and a file setting both so that they contradict each other.
    struct Case {
        set: &'static str,
        follower: &'static str,
        followed: &'static str,
        value: i128,
        contradiction: &'static str,
        reported: &'static str,
    }

    fn value_at(config: &Config, path: &str) -> i128 {
        let value = toml::Value::try_from(config).expect("serializes");
        let mut at = &value;
        for part in path.split('.') {
            at = match part.split_once('[') {
                Some((name, index)) => {
                    let i: usize = index.trim_end_matches(']').parse().expect("index");
                    &at[name][i]
                }
                None => &at[part],
            };
        }
        i128::from(
            at.as_integer()
                .unwrap_or_else(|| panic!("{path} is {at:?}")),
        )
    }

    const MIB: i128 = 1024 * 1024;
    const GIB: i128 = 1024 * MIB;

    const STREAM: &str = "[[stream]]\nname = \"S\"\nsubjects = [\"s.>\"]\n";

    fn cases() -> Vec<Case> {
        vec![
            Case {
                set: "[wal]\nsegment_bytes_max = 1048576\n",
                follower: "wal.group_bytes_max",
                followed: "wal.segment_bytes_max",
                value: MIB,
                contradiction: "[wal]\nsegment_bytes_max = 1048576\ngroup_bytes_max = 2097152\n",
                reported: "wal.group_bytes_max",
            },
            Case {
                set: "[wal]\ngroup_bytes_max = 134217728\n",
                follower: "wal.segment_bytes_max",
                followed: "wal.group_bytes_max",
                value: 128 * MIB,
                contradiction: "",
                reported: "",
            },
            Case {
                set: "[wal]\nbudget_bytes_max = 536870912\n",
                follower: "wal.retention_bytes_max",
                followed: "wal.budget_bytes_max",
                value: 512 * MIB,
                contradiction:
                    "[wal]\nbudget_bytes_max = 536870912\nretention_bytes_max = 1073741824\n",
                reported: "wal.retention_bytes_max",
            },
            Case {
                set: "[wal]\nretention_bytes_max = 8589934592\n",
                follower: "wal.budget_bytes_max",
                followed: "wal.retention_bytes_max",
                value: 8 * GIB,
                contradiction: "",
                reported: "",
            },
            Case {
                set: "[wal]\nsegment_bytes_max = 4294967296\n",
                follower: "wal.budget_bytes_max",
                followed: "wal.segment_bytes_max",
                value: 8 * GIB,
                contradiction:
                    "[wal]\nsegment_bytes_max = 4294967296\nbudget_bytes_max = 4294967296\n",
                reported: "wal.budget_bytes_max",
            },
            Case {
                set: "[wal]\nbudget_bytes_max = 67108864\n",
                follower: "wal.segment_bytes_max",
                followed: "wal.budget_bytes_max",
                value: 32 * MIB,
                contradiction: "",
                reported: "",
            },
            Case {
                set: "[drain]\nretry_backoff_initial_ms = 60000\n",
                follower: "drain.retry_backoff_max_ms",
                followed: "drain.retry_backoff_initial_ms",
                value: 60_000,
                contradiction:
                    "[drain]\nretry_backoff_initial_ms = 60000\nretry_backoff_max_ms = 30000\n",
                reported: "drain.retry_backoff_max_ms",
            },
            Case {
                set: "[drain]\nretry_backoff_max_ms = 50\n",
                follower: "drain.retry_backoff_initial_ms",
                followed: "drain.retry_backoff_max_ms",
                value: 50,
                contradiction: "",
                reported: "",
            },
            Case {
                set: "[metrics]\nheader_read_timeout_ms = 20000\n",
                follower: "metrics.request_timeout_ms",
                followed: "metrics.header_read_timeout_ms",
                value: 20_000,
                contradiction:
                    "[metrics]\nheader_read_timeout_ms = 20000\nrequest_timeout_ms = 10000\n",
                reported: "metrics.request_timeout_ms",
            },
            Case {
                set: "[metrics]\nrequest_timeout_ms = 2000\n",
                follower: "metrics.header_read_timeout_ms",
                followed: "metrics.request_timeout_ms",
                value: 2_000,
                contradiction: "",
                reported: "",
            },
            Case {
                set: "[[consumer]]\nmax_ack_pending = 500\n",
                follower: "consumer[0].fetch_batch",
                followed: "consumer[0].max_ack_pending",
                value: 500,
                contradiction: "[[consumer]]\nmax_ack_pending = 500\nfetch_batch = 1000\n",
                reported: "consumer[0].fetch_batch",
            },
            // The other direction cannot arise: fetch_batch's bound (10000) is below the default
            // max_ack_pending (20000).
            Case {
                set: "[[consumer]]\nack_wait_ms = 1000\n",
                follower: "consumer[0].fetch_expires_ms",
                followed: "consumer[0].ack_wait_ms",
                value: 500,
                contradiction: "[[consumer]]\nack_wait_ms = 1000\nfetch_expires_ms = 1000\n",
                reported: "consumer[0].fetch_expires_ms",
            },
            Case {
                set: "[[consumer]]\nfetch_expires_ms = 40000\n",
                follower: "consumer[0].ack_wait_ms",
                followed: "consumer[0].fetch_expires_ms",
                value: 80_000,
                contradiction: "",
                reported: "",
            },
            Case {
                set: "max_age_s = 60\n",
                follower: "stream[0].duplicate_window_s",
                followed: "stream[0].max_age_s",
                value: 60,
                contradiction: "max_age_s = 60\nduplicate_window_s = 120\n",
                reported: "stream[0].duplicate_window_s",
            },
            // The other direction cannot arise: duplicate_window_s's bound (one day) is below the
            // default max_age_s (two days).
        ]
    }

    /// Stream fields need their stream's name and subjects around them.
    fn file(text: &str) -> String {
        if text.starts_with('[') {
            text.to_owned()
        } else {
            format!("{STREAM}{text}")
        }
    }

    #[test]
    fn a_field_left_unset_follows_the_field_set_against_its_default_in_either_direction() {
        for case in cases() {
            let text = file(case.set);
            let (config, origins) =
                load(&text).unwrap_or_else(|e| panic!("{text}: {}", prism_wal::ErrorChain(&e)));
            assert_eq!(value_at(&config, case.follower), case.value, "{text}");
            assert_eq!(
                origins.get(case.follower),
                Origin::Derived(case.followed.to_owned()),
                "{text}"
            );
            assert_eq!(origins.get(case.followed), Origin::File, "{text}");
        }
    }

    #[test]
    fn two_fields_set_against_each_other_are_an_error_naming_the_dependent_one() {
        for case in cases().into_iter().filter(|c| !c.contradiction.is_empty()) {
            let fields = invalid_fields(&file(case.contradiction));
            assert!(
                fields.iter().any(|f| f == case.reported),
                "{}: {fields:?}",
                case.contradiction
            );
        }
    }

    #[test]
    fn an_environment_override_is_followed_like_a_file_value_and_recorded_as_such() {
        let (config, origins) = Config::load_with_origins(
            None,
            vec![(
                "PRISM_RELAY_WAL_SEGMENT_BYTES_MAX".to_owned(),
                "1048576".to_owned(),
            )],
        )
        .expect("loads");
        assert_eq!(config.wal.group_bytes_max, 1024 * 1024);
        assert_eq!(
            origins.get("wal.segment_bytes_max"),
            Origin::Env("PRISM_RELAY_WAL_SEGMENT_BYTES_MAX".to_owned())
        );
        assert_eq!(
            origins.get("wal.group_bytes_max"),
            Origin::Derived("wal.segment_bytes_max".to_owned())
        );
    }

    #[test]
    fn defaults_derive_nothing() {
        let (config, origins) = Config::load_with_origins(None, Vec::new()).expect("loads");
        assert_eq!(config, Config::default());
        assert_eq!(origins, Origins::default());
    }
}
