//! The deployment files under `deploy/`: every manifest parsed and the fields that matter
//! checked (the Kubernetes objects, the compose stack and its image, the systemd unit, the alert
//! rules and their unit tests, the Alertmanager routing, the dashboard), and a real Prometheus
//! (Debian's package, through `prism_testbed::Prometheus`) scraping a real relay under loadgen
//! traffic that evaluates every alert rule, every dashboard expression and MarketPrism's own
//! storage-service expressions (`deploy/marketprism_expressions.txt`) and requires series from
//! each. `scripts/test` also runs promtool, amtool and systemd-analyze on the same files
//! (`scripts/lib/deploy.sh`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use prism_relay::config::Config;
use prism_testbed::Prometheus;
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

use crate::harness::{metric_sum, wait_until, Bed, Load, RelayProc, DRAIN_TIMEOUT};

// ----- reading the files -------------------------------------------------------------------

/// A file of the repository.
fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_path(relative))
        .unwrap_or_else(|e| panic!("reading {relative}: {e}"))
}

/// Every document of a YAML file, as JSON values (so YAML and JSON manifests are checked alike).
fn yaml_docs(relative: &str) -> Vec<Value> {
    let docs = YamlLoader::load_from_str(&read(relative))
        .unwrap_or_else(|e| panic!("{relative} is not valid YAML: {e}"));
    docs.iter().map(yaml_to_json).collect()
}

/// The single document of a YAML file.
fn yaml_doc(relative: &str) -> Value {
    let mut docs = yaml_docs(relative);
    assert_eq!(docs.len(), 1, "{relative} holds one document");
    docs.remove(0)
}

fn yaml_to_json(yaml: &Yaml) -> Value {
    match yaml {
        Yaml::Real(text) => text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or_else(|| Value::String(text.clone()), Value::Number),
        Yaml::Integer(n) => Value::from(*n),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Array(items) => Value::Array(items.iter().map(yaml_to_json).collect()),
        Yaml::Hash(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(n) => n.to_string(),
                        Yaml::Boolean(b) => b.to_string(),
                        other => panic!("unsupported YAML key {other:?}"),
                    };
                    (key, yaml_to_json(v))
                })
                .collect(),
        ),
        Yaml::Null => Value::Null,
        Yaml::Alias(_) | Yaml::BadValue => panic!("unsupported YAML node {yaml:?}"),
    }
}

/// `value` at a `/`-separated path (array items by index), or a panic naming what is missing.
fn at<'a>(value: &'a Value, path: &str) -> &'a Value {
    value
        .pointer(&format!("/{path}"))
        .unwrap_or_else(|| panic!("missing {path} in {value}"))
}

fn text<'a>(value: &'a Value, path: &str) -> &'a str {
    at(value, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string in {value}"))
}

/// The relay's configuration in `text`, parsed and validated as `prism-relay run` would, and
/// holding no secret (the configuration file may hold none).
fn relay_config(what: &str, text: &str) -> Config {
    let config = Config::parse_toml(text).unwrap_or_else(|e| panic!("{what}: {e}"));
    config
        .validate()
        .unwrap_or_else(|e| panic!("{what} is not valid: {e}"));
    assert!(
        config.secrets_in_file().is_empty(),
        "{what} holds a secret: {:?}",
        config.secrets_in_file()
    );
    config
}

/// The longest the relay may take to stop after SIGTERM under `config` and under the defaults.
fn shutdown_bound(config: &Config) -> Duration {
    Duration::from_millis(
        config
            .shutdown
            .timeout_ms
            .max(Config::default().shutdown.timeout_ms),
    )
}

/// A systemd or compose duration (`30s`, `1min`, `2m`, `90`): seconds when there is no unit.
fn parse_duration(text: &str) -> Duration {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .unwrap_or_else(|_| panic!("duration {text:?}"));
    match unit.trim() {
        "" | "s" | "sec" => Duration::from_secs(n),
        "m" | "min" => Duration::from_secs(n * 60),
        "ms" | "msec" => Duration::from_millis(n),
        other => panic!("unit {other:?} of duration {text:?}"),
    }
}

// ----- Kubernetes ---------------------------------------------------------------------------

/// The objects of deploy/kubernetes by kind (one of each), and the kustomization's resources.
fn kubernetes_objects() -> BTreeMap<String, Value> {
    let kustomization = yaml_doc("deploy/kubernetes/kustomization.yaml");
    let mut objects = BTreeMap::new();
    let mut listed = BTreeSet::new();
    for resource in at(&kustomization, "resources").as_array().expect("list") {
        let file = resource.as_str().expect("resource is a file name");
        listed.insert(file.to_string());
        for doc in yaml_docs(&format!("deploy/kubernetes/{file}")) {
            let kind = text(&doc, "kind").to_string();
            assert!(
                objects.insert(kind.clone(), doc).is_none(),
                "two {kind} objects"
            );
        }
    }
    let on_disk: BTreeSet<String> = std::fs::read_dir(repo_path("deploy/kubernetes"))
        .expect("deploy/kubernetes")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed, on_disk,
        "kustomization.yaml lists every manifest of deploy/kubernetes"
    );
    objects
}

#[test]
fn the_statefulset_keeps_a_wal_volume_per_pod_probes_health_and_ready_runs_non_root_and_outlasts_the_shutdown_bound(
) {
    let objects = kubernetes_objects();
    let sts = &objects["StatefulSet"];
    let config_map = &objects["ConfigMap"];
    let config = relay_config(
        "the ConfigMap's relay.toml",
        text(config_map, "data/relay.toml"),
    );
    let pod = at(sts, "spec/template/spec");
    let containers = at(pod, "containers").as_array().expect("containers");
    assert_eq!(containers.len(), 1, "one relay container per pod");
    let container = &containers[0];

    // One WAL volume per pod, kept when the pod is scaled away or the set deleted.
    let claims = at(sts, "spec/volumeClaimTemplates")
        .as_array()
        .expect("list");
    let wal_claim = claims
        .iter()
        .find(|c| text(c, "metadata/name") == "wal")
        .expect("a volumeClaimTemplate named wal");
    assert_eq!(
        at(wal_claim, "spec/accessModes"),
        &serde_json::json!(["ReadWriteOnce"])
    );
    assert_eq!(
        text(sts, "spec/persistentVolumeClaimRetentionPolicy/whenScaled"),
        "Retain"
    );
    assert_eq!(
        text(sts, "spec/persistentVolumeClaimRetentionPolicy/whenDeleted"),
        "Retain"
    );
    let mounts = at(container, "volumeMounts").as_array().expect("mounts");
    let mount_of = |volume: &str| {
        mounts
            .iter()
            .find(|m| text(m, "name") == volume)
            .map(|m| PathBuf::from(text(m, "mountPath")))
            .unwrap_or_else(|| panic!("the container mounts {volume}"))
    };
    assert!(
        config.wal.dir.starts_with(mount_of("wal")),
        "[wal] dir {} lies on the wal volume",
        config.wal.dir.display()
    );

    // The configuration comes from the ConfigMap, the secrets from the Secret, as files.
    let volumes = at(pod, "volumes").as_array().expect("volumes");
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| text(v, "name") == name)
            .unwrap_or_else(|| panic!("a volume named {name}"))
    };
    assert_eq!(
        text(volume("config"), "configMap/name"),
        text(config_map, "metadata/name")
    );
    let args: Vec<&str> = at(container, "args")
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("arg"))
        .collect();
    let config_arg = args
        .windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| PathBuf::from(w[1]))
        .expect("run --config <file>");
    assert_eq!(args[0], "run");
    assert_eq!(config_arg, mount_of("config").join("relay.toml"));
    assert!(!text(volume("secrets"), "secret/secretName").is_empty());
    let secrets_dir = mount_of("secrets");
    for file in [&config.clickhouse.password_file, &config.nats.password_file]
        .into_iter()
        .flatten()
    {
        assert!(
            file.starts_with(&secrets_dir),
            "{} is read from the Secret's volume",
            file.display()
        );
    }

    // The pod's environment overrides fields the relay knows.
    let pod_env: Vec<(String, String)> = at(container, "env")
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            let value = e
                .get("value")
                .and_then(Value::as_str)
                .unwrap_or("prism-relay-0");
            (text(e, "name").to_string(), value.to_string())
        })
        .collect();
    let mut with_env = config.clone();
    with_env
        .apply_env(pod_env.clone())
        .unwrap_or_else(|e| panic!("the pod's environment {pod_env:?}: {e}"));

    // Probes on the metrics port the relay listens on.
    let port = at(container, "ports/0");
    assert_eq!(text(port, "name"), "metrics");
    assert_eq!(
        at(port, "containerPort").as_u64(),
        Some(u64::from(config.metrics.listen.port()))
    );
    assert!(
        config.metrics.listen.ip().is_unspecified(),
        "the pod's relay listens beyond loopback so Prometheus can scrape it"
    );
    for (probe, path) in [
        ("livenessProbe", "/health"),
        ("startupProbe", "/health"),
        ("readinessProbe", "/ready"),
    ] {
        assert_eq!(
            text(container, &format!("{probe}/httpGet/path")),
            path,
            "{probe}"
        );
        assert_eq!(
            text(container, &format!("{probe}/httpGet/port")),
            "metrics",
            "{probe}"
        );
    }

    // Non-root with a read-only root filesystem and nothing to escalate to.
    assert_eq!(at(pod, "securityContext/runAsNonRoot"), &Value::Bool(true));
    assert!(at(pod, "securityContext/runAsUser").as_u64().expect("uid") > 0);
    assert_eq!(
        at(container, "securityContext/readOnlyRootFilesystem"),
        &Value::Bool(true)
    );
    assert_eq!(
        at(container, "securityContext/allowPrivilegeEscalation"),
        &Value::Bool(false)
    );
    assert_eq!(
        at(container, "securityContext/capabilities/drop"),
        &serde_json::json!(["ALL"])
    );

    // The kubelet's SIGKILL comes after the relay's own shutdown bound.
    let grace = Duration::from_secs(
        at(pod, "terminationGracePeriodSeconds")
            .as_u64()
            .expect("seconds"),
    );
    assert!(
        grace > shutdown_bound(&config),
        "terminationGracePeriodSeconds {grace:?} must exceed the shutdown bound {:?}",
        shutdown_bound(&config)
    );
}

#[test]
fn the_service_pdb_and_keda_scaler_select_the_relay_pods_and_scale_on_the_consumers_jetstream_lag()
{
    let objects = kubernetes_objects();
    let sts = &objects["StatefulSet"];
    let pod_labels = at(sts, "spec/template/metadata/labels")
        .as_object()
        .expect("labels");
    let selects_pods = |selector: &Value| {
        selector
            .as_object()
            .expect("selector")
            .iter()
            .all(|(k, v)| pod_labels.get(k) == Some(v))
    };
    assert!(selects_pods(at(sts, "spec/selector/matchLabels")));

    let service = &objects["Service"];
    assert_eq!(text(service, "spec/clusterIP"), "None", "headless");
    assert_eq!(
        text(sts, "spec/serviceName"),
        text(service, "metadata/name")
    );
    assert_eq!(
        at(service, "spec/publishNotReadyAddresses"),
        &Value::Bool(true)
    );
    assert!(selects_pods(at(service, "spec/selector")));
    assert_eq!(text(service, "spec/ports/0/targetPort"), "metrics");

    let pdb = &objects["PodDisruptionBudget"];
    assert!(selects_pods(at(pdb, "spec/selector/matchLabels")));
    assert_eq!(at(pdb, "spec/maxUnavailable").as_u64(), Some(1));

    let config = relay_config(
        "the ConfigMap's relay.toml",
        text(&objects["ConfigMap"], "data/relay.toml"),
    );
    let scaled = &objects["ScaledObject"];
    assert_eq!(text(scaled, "apiVersion"), "keda.sh/v1alpha1");
    assert_eq!(text(scaled, "spec/scaleTargetRef/kind"), "StatefulSet");
    assert_eq!(
        text(scaled, "spec/scaleTargetRef/name"),
        text(sts, "metadata/name")
    );
    let min = at(scaled, "spec/minReplicaCount").as_u64().expect("min");
    let max = at(scaled, "spec/maxReplicaCount").as_u64().expect("max");
    assert!(min >= 1, "at least one relay always runs");
    assert!(max > min);
    let trigger = at(scaled, "spec/triggers/0");
    assert_eq!(text(trigger, "type"), "nats-jetstream");
    let (stream, consumer) = (
        text(trigger, "metadata/stream"),
        text(trigger, "metadata/consumer"),
    );
    assert!(
        config
            .consumer
            .iter()
            .any(|c| c.stream == stream && c.durable == consumer),
        "the scaler watches a consumer the relay consumes ({stream}/{consumer})"
    );
    let lag: u64 = text(trigger, "metadata/lagThreshold")
        .parse()
        .expect("lagThreshold is a number");
    assert!(lag > 0);
    let endpoint = text(trigger, "metadata/natsServerMonitoringEndpoint");
    assert!(
        endpoint.ends_with(":8222"),
        "NATS monitoring port: {endpoint}"
    );
    assert!(!text(trigger, "metadata/account").is_empty());
}

// ----- Docker, compose, systemd ------------------------------------------------------------

#[test]
fn the_compose_stack_runs_nats_clickhouse_the_relay_and_prometheus_with_the_rules_and_stops_the_relay_gracefully(
) {
    let compose = yaml_doc("deploy/docker/compose.yml");
    let services = at(&compose, "services").as_object().expect("services");
    for name in ["nats", "clickhouse", "relay", "prometheus"] {
        assert!(services.contains_key(name), "compose runs {name}");
    }
    // Every file the stack mounts exists.
    let configs = at(&compose, "configs").as_object().expect("configs");
    for (name, config) in configs {
        let file = text(config, "file");
        assert!(
            repo_path("deploy/docker").join(file).is_file(),
            "config {name}: {file} exists"
        );
    }
    let mounted = |service: &str, target: &str| -> String {
        let entry = at(&services[service], "configs")
            .as_array()
            .expect("configs")
            .iter()
            .find(|c| text(c, "target") == target)
            .unwrap_or_else(|| panic!("{service} mounts {target}"));
        let source = text(entry, "source");
        format!("deploy/docker/{}", text(&configs[source], "file"))
    };
    assert_eq!(
        Path::new(&mounted("prometheus", "/etc/prometheus/rules.yml")),
        Path::new("deploy/docker/../prometheus/rules.yml"),
        "Prometheus evaluates the relay's rules"
    );
    let prometheus_config = yaml_doc(&mounted("prometheus", "/etc/prometheus/prometheus.yml"));
    assert_eq!(
        at(&prometheus_config, "rule_files"),
        &serde_json::json!(["rules.yml"])
    );
    assert_eq!(
        text(&prometheus_config, "scrape_configs/0/job_name"),
        "prism-relay"
    );

    let relay = &services["relay"];
    let config = relay_config(
        "deploy/docker/relay.toml",
        &read(&mounted("relay", "/etc/prism-relay/relay.toml")),
    );
    let target = text(
        &prometheus_config,
        "scrape_configs/0/static_configs/0/targets/0",
    );
    assert_eq!(target, format!("relay:{}", config.metrics.listen.port()));
    let wal_volume = at(relay, "volumes")
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(Value::as_str)
        .find_map(|v| v.split_once(':').map(|(_, path)| PathBuf::from(path)))
        .expect("the relay has a volume");
    assert!(
        config.wal.dir.starts_with(&wal_volume),
        "the WAL is on the volume"
    );
    let secret = text(relay, "secrets/0");
    assert_eq!(
        config.clickhouse.password_file.as_deref(),
        Some(Path::new(&format!("/run/secrets/{secret}"))),
        "the password comes from the compose secret file"
    );
    let grace = parse_duration(text(relay, "stop_grace_period"));
    assert!(
        grace > shutdown_bound(&config),
        "stop_grace_period {grace:?}"
    );
    assert_eq!(text(relay, "stop_signal"), "SIGTERM");
    assert_eq!(at(relay, "read_only"), &Value::Bool(true));
    assert_eq!(text(relay, "build/dockerfile"), "deploy/docker/Dockerfile");

    // The image: multi-stage, Debian slim, non-root, a WAL volume and a health check on /health.
    let dockerfile = read("deploy/docker/Dockerfile");
    let instructions: Vec<&str> = dockerfile
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with(' ') && !l.trim().is_empty())
        .collect();
    let froms: Vec<&&str> = instructions
        .iter()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(froms.len(), 2, "a builder stage and a runtime stage");
    assert!(froms[0].starts_with("FROM rust:") && froms[0].ends_with(" AS builder"));
    assert!(froms[1].starts_with("FROM debian:") && froms[1].contains("-slim"));
    let user = instructions
        .iter()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "USER {user}"
    );
    assert!(instructions.contains(&"VOLUME [\"/var/lib/prism-relay\"]"));
    assert!(dockerfile.contains("HEALTHCHECK") && dockerfile.contains("GET /health"));
    assert!(instructions.contains(&"STOPSIGNAL SIGTERM"));
    assert!(repo_path("deploy/docker/Dockerfile.dockerignore").is_file());
}

/// `[Section] key=value` lines of a unit file; a key given twice keeps every value.
fn unit_keys(unit: &str) -> BTreeMap<(String, String), Vec<String>> {
    let mut keys: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("unit line {line:?} is not key=value"));
        keys.entry((section.clone(), key.trim().to_string()))
            .or_default()
            .push(value.trim().to_string());
    }
    keys
}

#[test]
fn the_systemd_unit_runs_unprivileged_with_its_wal_in_the_state_directory_hardened_and_stops_within_the_shutdown_bound(
) {
    let unit = read("deploy/systemd/prism-relay.service");
    let keys = unit_keys(&unit);
    let one = |key: &str| -> &str {
        let values = keys
            .get(&("Service".to_string(), key.to_string()))
            .unwrap_or_else(|| panic!("[Service] {key}"));
        values.last().expect("a value")
    };
    let user = one("User");
    assert!(!user.is_empty() && user != "root" && user != "0");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("PrivateTmp"), "yes");
    assert_eq!(one("CapabilityBoundingSet"), "");
    let state = one("StateDirectory");
    assert!(one("ReadWritePaths").contains(&format!("%S/{state}")));
    let environment = &keys[&("Service".to_string(), "Environment".to_string())];
    let wal_dir = environment
        .iter()
        .find_map(|e| e.strip_prefix("PRISM_RELAY_WAL_DIR="))
        .expect("the unit sets the WAL directory");
    assert!(
        wal_dir.starts_with(&format!("%S/{state}/")),
        "the WAL ({wal_dir}) lives in the state directory"
    );
    // Every PRISM_RELAY_* variable the unit sets or its env file shows (commented examples
    // included) names a field the relay knows, with a value it accepts.
    let env_file = read("deploy/systemd/prism-relay.env");
    let variables: Vec<(String, String)> = environment
        .iter()
        .map(String::as_str)
        .chain(env_file.lines().map(|l| l.trim_start_matches('#')))
        .filter(|l| l.starts_with("PRISM_RELAY_"))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("NAME=value");
            let v = v
                .replace("%S", "/var/lib")
                .replace("%d", "/run/credentials/prism-relay.service");
            (k.to_string(), v)
        })
        .collect();
    assert!(variables.len() >= 5, "{variables:?}");
    let mut config = Config::default();
    config
        .apply_env(variables.clone())
        .unwrap_or_else(|e| panic!("the unit's variables {variables:?}: {e}"));
    let exec = one("ExecStart");
    assert!(
        exec.contains(" run ") && exec.contains("--config"),
        "{exec}"
    );
    let stop = parse_duration(one("TimeoutStopSec"));
    let bound = shutdown_bound(&Config::default());
    assert!(
        stop > bound,
        "TimeoutStopSec {stop:?} must exceed {bound:?}"
    );
    assert_eq!(
        keys.get(&("Install".to_string(), "WantedBy".to_string())),
        Some(&vec!["multi-user.target".to_string()])
    );

    // systemd's own check where it is installed; unknown keys and bad values are only
    // warnings there, so any output fails.
    if let Ok(analyze) = which("systemd-analyze") {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("prism-relay.service");
        // ExecStart must name an executable that exists here.
        std::fs::write(
            &path,
            unit.replace("/usr/local/bin/prism-relay", "/bin/true"),
        )
        .expect("write unit");
        let out = std::process::Command::new(analyze)
            .arg("verify")
            .arg(&path)
            .output()
            .expect("run systemd-analyze");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.trim().is_empty(),
            "systemd-analyze verify: {text}"
        );
    }
}

/// An executable on `PATH`.
fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

// ----- Alerts, routing, dashboard ----------------------------------------------------------

/// Every rule of rules.yml: (alert name, the whole rule).
fn alert_rules() -> Vec<(String, Value)> {
    let rules = yaml_doc("deploy/prometheus/rules.yml");
    at(&rules, "groups")
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| at(g, "rules").as_array().expect("rules").clone())
        .map(|r| (text(&r, "alert").to_string(), r))
        .collect()
}

/// The anchors GitHub gives the headings of a Markdown file: lower case, punctuation other than
/// `-` and `_` dropped, spaces to `-`.
fn markdown_anchors(markdown: &str) -> BTreeSet<String> {
    let mut in_code = false;
    markdown
        .lines()
        .filter(|line| {
            if line.starts_with("```") {
                in_code = !in_code;
            }
            !in_code && line.starts_with('#')
        })
        .map(|line| {
            line.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[test]
fn every_alert_has_a_severity_a_summary_a_description_and_a_runbook_link_to_a_section_of_the_operations_guide(
) {
    let anchors = markdown_anchors(&read("docs/OPERATIONS.md"));
    let rules = alert_rules();
    for (name, rule) in &rules {
        assert!(
            ["critical", "warning"].contains(&text(rule, "labels/severity")),
            "{name}: severity"
        );
        assert!(!text(rule, "expr").trim().is_empty(), "{name}: expr");
        assert!(!text(rule, "annotations/summary").is_empty(), "{name}");
        assert!(!text(rule, "annotations/description").is_empty(), "{name}");
        let url = text(rule, "annotations/runbook_url");
        let anchor = url
            .strip_prefix("docs/OPERATIONS.md#")
            .unwrap_or_else(|| panic!("{name}: runbook_url {url} points into docs/OPERATIONS.md"));
        assert!(
            anchors.contains(anchor),
            "{name}: docs/OPERATIONS.md has no section #{anchor}"
        );
    }
    // MarketPrism's four and the relay's own.
    let names: BTreeSet<&str> = rules.iter().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "PrismRelayBatchProcessingStopped",
        "PrismRelayPendingMessagesHigh",
        "PrismRelayErrorRateHigh",
        "PrismRelayInsertSlow",
        "PrismRelayWalBudgetHigh",
        "PrismRelayDrainLagHigh",
        "PrismRelayDeadLettersIncreasing",
        "PrismRelayAuditMissing",
        "PrismRelayFsyncSlow",
        "PrismRelayRedeliveriesClimbing",
        "PrismRelayDown",
        "PrismRelayAbsent",
    ] {
        assert!(names.contains(expected), "rules.yml has {expected}");
    }

    // rules_test.yml (run by promtool in scripts/test) covers every alert both ways.
    let tests = yaml_doc("deploy/prometheus/rules_test.yml");
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for case in at(&tests, "tests").as_array().expect("tests") {
        for check in at(case, "alert_rule_test").as_array().expect("checks") {
            let name = text(check, "alertname").to_string();
            if at(check, "exp_alerts").as_array().expect("list").is_empty() {
                quiet.insert(name);
            } else {
                fires.insert(name);
            }
        }
    }
    for name in &names {
        assert!(
            fires.contains(*name),
            "rules_test.yml: no case where {name} fires"
        );
        assert!(
            quiet.contains(*name),
            "rules_test.yml: no case where {name} stays quiet"
        );
    }
}

#[test]
fn alertmanager_pages_critical_alerts_through_pagerduty_with_a_key_file_and_sends_the_rest_to_the_webhook(
) {
    let config = yaml_doc("deploy/alertmanager/alertmanager.yml");
    let receivers = at(&config, "receivers").as_array().expect("receivers");
    let receiver = |name: &str| {
        receivers
            .iter()
            .find(|r| text(r, "name") == name)
            .unwrap_or_else(|| panic!("receiver {name}"))
    };
    let routes = at(&config, "route/routes").as_array().expect("routes");
    let critical = routes
        .iter()
        .find(|r| at(r, "matchers") == &serde_json::json!(["severity=\"critical\""]))
        .expect("a route for severity=critical");
    let pagerduty = at(receiver(text(critical, "receiver")), "pagerduty_configs/0");
    assert!(
        !text(pagerduty, "routing_key_file").is_empty(),
        "the routing key comes from a file"
    );
    assert!(pagerduty.get("routing_key").is_none(), "no key in the file");
    let rest = receiver(text(&config, "route/receiver"));
    assert!(text(rest, "webhook_configs/0/url").starts_with("http"));
    // Critical alerts also reach the chat: the critical route continues to one without matchers.
    assert_eq!(at(critical, "continue"), &Value::Bool(true));
    assert!(routes
        .iter()
        .any(|r| r.get("matchers").is_none()
            && text(r, "receiver") == text(&config, "route/receiver")));
}

/// Every panel of a dashboard, rows' nested panels included.
fn dashboard_panels(dashboard: &Value) -> Vec<Value> {
    fn walk(panels: &Value, out: &mut Vec<Value>) {
        for panel in panels.as_array().into_iter().flatten() {
            out.push(panel.clone());
            if let Some(nested) = panel.get("panels") {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(at(dashboard, "panels"), &mut out);
    out
}

fn dashboard() -> Value {
    serde_json::from_str(&read("deploy/grafana/prism-relay.json"))
        .expect("the dashboard is valid JSON")
}

#[test]
fn the_dashboard_has_datasource_and_instance_variables_and_panels_for_every_stage_of_the_relay() {
    let dashboard = dashboard();
    let variables = at(&dashboard, "templating/list").as_array().expect("list");
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| text(v, "name") == name)
            .unwrap_or_else(|| panic!("variable {name}"))
    };
    assert_eq!(text(variable("datasource"), "type"), "datasource");
    assert_eq!(text(variable("datasource"), "query"), "prometheus");
    assert_eq!(text(variable("instance"), "type"), "query");
    assert_eq!(at(variable("instance"), "includeAll"), &Value::Bool(true));

    let mut exprs = String::new();
    let mut ids = BTreeSet::new();
    for panel in dashboard_panels(&dashboard) {
        assert!(
            ids.insert(at(&panel, "id").clone().to_string()),
            "panel ids are unique"
        );
        if text(&panel, "type") == "row" {
            continue;
        }
        let title = text(&panel, "title");
        assert_eq!(text(&panel, "datasource/uid"), "${datasource}", "{title}");
        let targets = at(&panel, "targets").as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} queries something");
        for target in targets {
            let expr = text(target, "expr");
            assert!(
                expr.contains("instance=~\"$instance\""),
                "{title}: {expr} follows the instance variable"
            );
            exprs.push_str(expr);
            exprs.push('\n');
        }
    }
    // Throughput by stage, backlog, WAL, latency, errors, dead letters, audit.
    for metric in [
        "marketprism_storage_messages_received_total",
        "prism_relay_acks_total",
        "marketprism_storage_messages_processed_total",
        "prism_relay_jetstream_pending",
        "prism_relay_jetstream_ack_pending",
        "prism_relay_jetstream_redelivered",
        "prism_relay_wal_bytes",
        "prism_relay_wal_budget_used_ratio",
        "prism_relay_wal_oldest_undrained_age_seconds",
        "prism_relay_insert_seconds_bucket",
        "prism_relay_wal_fsync_seconds_bucket",
        "prism_relay_insert_errors_total",
        "prism_relay_dead_letters_total",
        "prism_relay_audit_checked_total",
        "prism_relay_audit_missing_total",
    ] {
        assert!(
            metric_names(&exprs).contains(metric),
            "the dashboard shows {metric}"
        );
    }
}

// ----- PromQL helpers ------------------------------------------------------------------------

/// Byte ranges of `expr` at nesting depth 0 (outside (), [], {} and quotes), as a mask.
fn top_level_mask(expr: &str) -> Vec<bool> {
    let bytes = expr.as_bytes();
    let mut mask = vec![false; bytes.len()];
    let mut depth = 0i32;
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) => {
                if b == b'\\' {
                    i += 1;
                } else if b == q {
                    quote = None;
                }
            }
            None => match b {
                b'"' | b'\'' | b'`' => quote = Some(b),
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => depth -= 1,
                _ => mask[i] = depth == 0,
            },
        }
        i += 1;
    }
    mask
}

/// `expr` without parentheses that enclose all of it.
fn strip_outer_parens(expr: &str) -> &str {
    let mut expr = expr.trim();
    while expr.starts_with('(') && expr.ends_with(')') {
        let inner = &expr[1..expr.len() - 1];
        // Only when the first parenthesis closes at the very end.
        let mut depth = 0i32;
        let closes_at_end = inner.bytes().all(|b| {
            match b {
                b'(' => depth += 1,
                b')' => depth -= 1,
                _ => {}
            }
            depth >= 0
        });
        if !closes_at_end {
            break;
        }
        expr = inner.trim();
    }
    expr
}

/// `expr` split at a top-level keyword operator (`and`, `unless`).
fn split_top_level_word<'a>(expr: &'a str, words: &[&str]) -> Vec<&'a str> {
    let mask = top_level_mask(expr);
    let bytes = expr.as_bytes();
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut parts = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let found = words.iter().find(|w| {
            let end = i + w.len();
            end <= bytes.len()
                && mask[i..end].iter().all(|m| *m)
                && &expr[i..end] == **w
                && (i == 0 || !is_word(bytes[i - 1]))
                && (end == bytes.len() || !is_word(bytes[end]))
        });
        match found {
            Some(w) => {
                parts.push(&expr[start..i]);
                i += w.len();
                start = i;
            }
            None => i += 1,
        }
    }
    parts.push(&expr[start..]);
    parts
}

/// The two sides of a top-level comparison (`>`, `<`, `>=`, `<=`, `==`, `!=`, with `bool`).
fn split_top_level_comparison(expr: &str) -> Option<(&str, &str)> {
    let mask = top_level_mask(expr);
    let bytes = expr.as_bytes();
    for i in 0..bytes.len() {
        if !mask[i] {
            continue;
        }
        let len = match (bytes[i], bytes.get(i + 1)) {
            (b'>' | b'<' | b'=' | b'!', Some(b'=')) => 2,
            (b'>' | b'<', _) => 1,
            _ => continue,
        };
        let right = expr[i + len..].trim_start();
        let right = right.strip_prefix("bool ").unwrap_or(right);
        return Some((&expr[..i], right));
    }
    None
}

/// The parts of an alert or panel expression that must each return series for the whole to
/// mean something: the operands of `and`/`unless`, both sides of a comparison (numbers aside),
/// the argument of `absent()`; the expression itself otherwise. An alert's expression returns
/// nothing while it does not fire, which proves nothing; its operands returning series proves
/// the relay exports what it reads, with labels that match.
fn signals(expr: &str) -> Vec<String> {
    let expr = strip_outer_parens(expr);
    let parts = split_top_level_word(expr, &["and", "unless"]);
    if parts.len() > 1 {
        return parts.into_iter().flat_map(signals).collect();
    }
    if let Some((left, right)) = split_top_level_comparison(expr) {
        return [left, right]
            .into_iter()
            .filter(|side| side.trim().parse::<f64>().is_err())
            .flat_map(signals)
            .collect();
    }
    if let Some(inner) = expr
        .strip_prefix("absent(")
        .and_then(|rest| rest.strip_suffix(')'))
    {
        return vec![inner.trim().to_string()];
    }
    vec![expr.to_string()]
}

/// Metric names of the relay's namespaces (`prism_relay_*`, `marketprism_storage_*`) in `expr`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut word = String::new();
    let mut in_braces = false;
    let mut quote = false;
    for c in expr.chars().chain(std::iter::once(' ')) {
        if quote {
            quote = c != '"';
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
            continue;
        }
        if !in_braces
            && (word.starts_with("prism_relay_") || word.starts_with("marketprism_storage_"))
        {
            names.insert(std::mem::take(&mut word));
        }
        word.clear();
        match c {
            '{' => in_braces = true,
            '}' => in_braces = false,
            '"' => quote = true,
            _ => {}
        }
    }
    names
}

/// A Grafana expression with its variables at fixed values: rate windows of 15 s (the test
/// scrapes every second), every other variable at its "All" value.
fn substitute_grafana_variables(expr: &str) -> String {
    let mut out = expr
        .replace("$__rate_interval", "15s")
        .replace("$__interval", "15s")
        .replace("$__range", "5m");
    // Any other $name or ${name}: the regex that matches every value.
    while let Some(start) = out.find('$') {
        let rest = &out[start + 1..];
        let name_len = match rest.strip_prefix('{') {
            Some(braced) => braced.find('}').expect("closing brace") + 2,
            None => rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len()),
        };
        out.replace_range(start..start + 1 + name_len, ".*");
    }
    out
}

#[test]
fn promql_helpers_find_the_operands_that_must_return_series_and_the_metric_names() {
    assert_eq!(
        signals("sum by (i) (increase(a_total[2m])) == 0\nand\nsum by (i) (b{x=\">\"}) > 0"),
        vec![
            "sum by (i) (increase(a_total[2m]))",
            "sum by (i) (b{x=\">\"})"
        ]
    );
    assert_eq!(
        signals("absent(up{job=\"prism-relay\"})"),
        vec!["up{job=\"prism-relay\"}"]
    );
    assert_eq!(
        signals("x / (y + z) > 0.05"),
        vec!["x / (y + z)"],
        "a division stays whole"
    );
    assert_eq!(
        signals("(a) or (b)"),
        vec!["(a) or (b)"],
        "or returns either side"
    );
    assert_eq!(
        signals("rate(band_total[1m]) > bool 1"),
        vec!["rate(band_total[1m])"]
    );
    assert_eq!(
        metric_names(
            "sum(rate(prism_relay_x_total{table=\"prism_relay_y\"}[1m])) / marketprism_storage_z"
        ),
        ["marketprism_storage_z", "prism_relay_x_total"]
            .into_iter()
            .map(String::from)
            .collect::<BTreeSet<_>>()
    );
    assert_eq!(
        substitute_grafana_variables(
            "rate(x{a=~\"$instance\",b=~\"${data_type}\"}[$__rate_interval])"
        ),
        "rate(x{a=~\".*\",b=~\".*\"}[15s])"
    );
}

// ----- a real Prometheus against a real relay -----------------------------------------------

/// An expression to evaluate, and where it comes from (for the failure message).
struct ExprProbe {
    origin: String,
    expr: String,
}

/// How long the test waits for every expression to return series: a rate needs two scrapes
/// after a series first appears, and a loaded 2-core machine delays scrapes and evaluations.
const SERIES_TIMEOUT: Duration = Duration::from_secs(60);

/// Prometheus' scrape and rule evaluation interval in the test: short, so series appear fast.
const SCRAPE_INTERVAL: &str = "1s";

/// The expressions of the dashboard, the rules and MarketPrism's file, each with its signals.
fn expressions_to_evaluate() -> (Vec<ExprProbe>, Vec<ExprProbe>) {
    let mut whole = Vec::new();
    let mut signals_of = Vec::new();
    let mut add = |origin: String, expr: String| {
        for signal in signals(&expr) {
            signals_of.push(ExprProbe {
                origin: origin.clone(),
                expr: signal,
            });
        }
        whole.push(ExprProbe { origin, expr });
    };
    let dashboard = dashboard();
    for panel in dashboard_panels(&dashboard) {
        for target in panel
            .get("targets")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            add(
                format!("dashboard panel {:?}", text(&panel, "title")),
                substitute_grafana_variables(text(target, "expr")),
            );
        }
    }
    for variable in at(&dashboard, "templating/list").as_array().expect("list") {
        if let Some(query) = variable.pointer("/query/query").and_then(Value::as_str) {
            let metric = query
                .strip_prefix("label_values(")
                .and_then(|q| q.split(',').next())
                .expect("label_values(metric, label)");
            add(
                format!("dashboard variable {}", text(variable, "name")),
                metric.trim().to_string(),
            );
        }
    }
    for (name, rule) in alert_rules() {
        add(
            format!("alert {name}"),
            text(&rule, "expr").trim().to_string(),
        );
    }
    for line in read("tests/it/deploy/marketprism_expressions.txt").lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        add(
            "MarketPrism's storage expression".to_string(),
            substitute_grafana_variables(line),
        );
    }
    (whole, signals_of)
}

/// The `data.result` of a successful instant query, or why there is none.
fn query_result(prometheus: &Prometheus, expr: &str) -> Result<Vec<Value>, String> {
    let answer = prometheus
        .query(expr)
        .map_err(|e| format!("query failed: {e}"))?;
    let body: Value = serde_json::from_str(&answer.body)
        .map_err(|e| format!("HTTP {}: not JSON ({e}): {}", answer.status, answer.body))?;
    if answer.status != 200 || body["status"] != "success" {
        return Err(format!("HTTP {}: {}", answer.status, body["error"]));
    }
    match &body["data"]["result"] {
        Value::Array(series) => Ok(series.clone()),
        // A scalar or string result (time() - ...) is one value.
        other => Ok(vec![other.clone()]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scraping_a_relay_under_load_gets_series_from_every_rule_dashboard_and_marketprism_expression(
) {
    let mut bed = Bed::start();
    let mut config = bed.config();
    // Consumer info every second, so the JetStream gauges appear within the test's scrapes.
    config.backlog_poll_interval_s = Some(1);
    let mut relay = RelayProc::spawn_ready(&bed, "relay", &config).await;

    // Prometheus scrapes the relay as job prism-relay (the rules' job) and as hot-storage
    // (MarketPrism's job name for its storage service, which some of its panels select).
    let target = config.metrics_addr().to_string();
    let prometheus_config = format!(
        "global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  evaluation_interval: {SCRAPE_INTERVAL}\n\
         rule_files:\n  - rules.yml\n\
         scrape_configs:\n\
         \x20 - job_name: prism-relay\n    static_configs:\n      - targets: [\"{target}\"]\n\
         \x20 - job_name: hot-storage\n    static_configs:\n      - targets: [\"{target}\"]\n"
    );
    let rules = read("deploy/prometheus/rules.yml");
    let prometheus =
        Prometheus::start(&prometheus_config, &[("rules.yml", &rules)]).expect("start prometheus");

    // Traffic of every type, one undecodable message (a dead letter), and a ClickHouse outage
    // under traffic (insert errors and retries), then everything drained.
    let first = bed.publish(Load::new("deploy-a", 2_000)).await;
    bed.publish_raw("trade.binance.spot.BTC-USDT", b"not json".to_vec())
        .await;
    bed.wait_accounted(DRAIN_TIMEOUT).await;
    bed.ch.kill9().expect("kill clickhouse");
    bed.publish(Load::new("deploy-b", 500).ts_start(first.ts_last_ms + 1_000))
        .await;
    wait_until(
        "inserts fail while ClickHouse is down",
        DRAIN_TIMEOUT,
        || async {
            metric_sum(
                &relay.metrics().await,
                "marketprism_storage_clickhouse_insert_errors_total",
                &[],
            ) > 0.0
        },
    )
    .await;
    tokio::task::block_in_place(|| bed.ch.restart()).expect("restart clickhouse");
    bed.wait_accounted(DRAIN_TIMEOUT).await;

    // Every expression parses; then every signal returns series (polled: gauges polled from
    // consumer info and rates need their samples first).
    let (whole, signals_of) = expressions_to_evaluate();
    for probe in &whole {
        if let Err(error) = query_result(&prometheus, &probe.expr) {
            panic!(
                "{}: {} does not evaluate: {error}",
                probe.origin, probe.expr
            );
        }
    }
    let deadline = Instant::now() + SERIES_TIMEOUT;
    let empty = loop {
        let mut empty = Vec::new();
        for probe in &signals_of {
            match query_result(&prometheus, &probe.expr) {
                Ok(series) if !series.is_empty() => {}
                Ok(_) => empty.push(format!("{}: {}", probe.origin, probe.expr)),
                Err(error) => panic!("{}: {} failed: {error}", probe.origin, probe.expr),
            }
        }
        if empty.is_empty() || Instant::now() >= deadline {
            break empty;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert!(
        empty.is_empty(),
        "{} expressions returned no series after {SERIES_TIMEOUT:?}:\n{}\n/metrics:\n{}",
        empty.len(),
        empty.join("\n"),
        relay.metrics().await
    );

    // Prometheus loaded and evaluated every rule without an error.
    let rules_answer = prometheus.get("/api/v1/rules").expect("GET /api/v1/rules");
    let rules_body: Value = serde_json::from_str(&rules_answer.body).expect("rules JSON");
    let loaded: Vec<&Value> = rules_body["data"]["groups"]
        .as_array()
        .expect("rule groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .collect();
    assert_eq!(loaded.len(), alert_rules().len(), "every rule loaded");
    for rule in loaded {
        assert_eq!(
            rule["health"], "ok",
            "rule {} evaluates: {}",
            rule["name"], rule["lastError"]
        );
    }

    // Every metric name the rules, the dashboard and MarketPrism's expressions read is one the
    // relay exports (scraped from the relay itself, not a list kept here).
    let exported: BTreeSet<String> = relay
        .metrics()
        .await
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect();
    let mut unknown = BTreeSet::new();
    for probe in &whole {
        for name in metric_names(&probe.expr) {
            if !exported.contains(&name) {
                unknown.insert(format!("{name} ({})", probe.origin));
            }
        }
    }
    assert!(unknown.is_empty(), "not exported by the relay: {unknown:?}");

    // The image's health check, run as the container would, passes against a live relay and
    // fails against a port where none listens.
    let port = config.metrics_addr().port();
    assert!(
        run_health_check(port),
        "the Dockerfile's HEALTHCHECK fails against a live relay on port {port}"
    );
    let closed = crate::harness::free_port();
    assert!(
        !run_health_check(closed),
        "the HEALTHCHECK passes with no relay on {closed}"
    );

    relay.terminate().await;
}

/// Runs the Dockerfile's `HEALTHCHECK CMD` (an exec-form JSON array) with the relay's port in
/// place of 9094; true when it exits 0.
fn run_health_check(port: u16) -> bool {
    let dockerfile = read("deploy/docker/Dockerfile").replace("\\\n", " ");
    let line = dockerfile
        .lines()
        .find(|l| l.starts_with("HEALTHCHECK"))
        .expect("a HEALTHCHECK instruction");
    let (_, command) = line.split_once(" CMD ").expect("HEALTHCHECK ... CMD [...]");
    let argv: Vec<String> =
        serde_json::from_str(command.trim()).expect("the CMD is an exec-form JSON array");
    let argv: Vec<String> = argv
        .into_iter()
        .map(|arg| arg.replace("/9094", &format!("/{port}")))
        .collect();
    std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .status()
        .expect("run the health check")
        .success()
}
