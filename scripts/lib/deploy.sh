# shellcheck shell=bash
# The "deploy checks" step of scripts/test: the deployment files under deploy/ checked with the
# tools that run them in production.
#   promtool check rules / test rules   deploy/prometheus/rules.yml and its unit tests
#   promtool check config               deploy/prometheus/prometheus.yml, deploy/docker/prometheus.yml
#   amtool check-config                 deploy/alertmanager/alertmanager.yml, and where alerts go
#   systemd-analyze verify              deploy/systemd/prism-relay.service (when systemd-analyze
#                                       exists; tests/it/deploy.rs checks the unit's keys either way)
# The manifests without a checker here (Kubernetes, compose, the dashboard) are parsed and checked
# by tests/it/deploy.rs, which also runs every rule and dashboard expression against a real
# Prometheus scraping a real relay.
# Source it after common.sh; prereqs.sh installs promtool and amtool (ensure_prometheus_tools).

DEPLOY_DIR=deploy

deploy_check_prometheus() {
    # check config resolves rule_files relative to the file, so run it from its directory.
    (cd "$DEPLOY_DIR/prometheus" &&
        promtool check rules rules.yml &&
        promtool test rules rules_test.yml &&
        promtool check config prometheus.yml) || return 1
    # The compose file's Prometheus gets rules.yml mounted beside its configuration.
    local dir status=0
    dir=$(mktemp -d)
    cp "$DEPLOY_DIR/docker/prometheus.yml" "$DEPLOY_DIR/prometheus/rules.yml" "$dir/"
    (cd "$dir" && promtool check config prometheus.yml) || status=$?
    rm -rf "$dir"
    return "$status"
}

# deploy_route_test RECEIVERS LABEL=VALUE...: the receivers Alertmanager picks for an alert
# with these labels are exactly RECEIVERS (comma separated, in order).
deploy_route_test() {
    local expected=$1
    shift
    amtool config routes test --config.file="$DEPLOY_DIR/alertmanager/alertmanager.yml" \
        --verify.receivers="$expected" "$@" 2>/dev/null ||
        { printf 'alertmanager: %s should go to %s\n' "$*" "$expected" >&2; return 1; }
}

deploy_check_alertmanager() {
    amtool check-config "$DEPLOY_DIR/alertmanager/alertmanager.yml" || return 1
    deploy_route_test pagerduty,dingtalk alertname=PrismRelayDown severity=critical instance=a &&
        deploy_route_test dingtalk alertname=PrismRelayDrainLagHigh severity=warning table=trades
}

deploy_check_systemd() {
    if ! command -v systemd-analyze >/dev/null; then
        note_step "systemd-analyze not found: the unit's keys are checked by tests/it/deploy.rs only"
        return 0
    fi
    # verify fails when ExecStart names a missing executable, and the relay is not installed on
    # this machine: point it at one that exists. Unknown keys and bad values are only warnings,
    # so any output at all is a failure.
    local dir out status=0
    dir=$(mktemp -d)
    sed "s#/usr/local/bin/prism-relay#$(command -v true)#g" \
        "$DEPLOY_DIR/systemd/prism-relay.service" >"$dir/prism-relay.service"
    out=$(systemd-analyze verify "$dir/prism-relay.service" 2>&1) || status=$?
    rm -rf "$dir"
    if ((status != 0)) || [[ -n $out ]]; then
        printf 'systemd-analyze verify deploy/systemd/prism-relay.service:\n%s\n' "$out" >&2
        return 1
    fi
    info "systemd-analyze verify: deploy/systemd/prism-relay.service clean"
}

deploy_checks() {
    local failed=0
    deploy_check_prometheus || failed=1
    deploy_check_alertmanager || failed=1
    deploy_check_systemd || failed=1
    return "$failed"
}
