#!/usr/bin/env bash
# WebSocket conformance: the Autobahn|Testsuite (wstest -m fuzzingclient, every
# case) against conformance/echo_server.py, which is built on triochat's own
# transport. Fails on any FAILED case. Results: docs/reliability.md.
#
#   conformance/run.sh [all|fast|slow]
#
# "fast" is every case but the permessage-deflate groups 12 and 13 (about
# 30-40 s); "slow" is groups 12 and 13 (minutes: 1000 echoes per case, of
# up to 128 KiB, compressed both ways); "all" (the default) is both at once.
# CI runs "slow" niced beside the tests and "fast" after them (.ci/run).
#
# The suite is Python 2.7 only. Its toolchain (a Python 3 venv with
# virtualenv, a Python 2.7 virtualenv with the pinned requirements and
# autobahntestsuite) is built once into
#   ${TRIOCHAT_CACHE:-$HOME/.cache/triochat}/autobahn/<key>
# and reused; <key> changes with the pins, so a stale cache is never used.
#
# Environment:
#   PYTHON          runs the echo server (default: .venv/bin/python; triochat installed)
#   PYTHON27        a Python 2.7 interpreter (default: pyenv's 2.7.18, else python2.7)
#   PYTHON3         builds the tools venv (default: python3)
#   TRIOCHAT_CACHE  cache root (default: $HOME/.cache/triochat)
#   CONFORMANCE_REPORT_DIR  if set, the HTML/JSON report is copied there
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
part=${1:-all}

AUTOBAHN_VERSION=25.10.1
SETUP_TIMEOUT=900  # seconds, for the whole toolchain install
# Seconds for wstest: about 30-40 s without groups 12-13; the compression cases
# (1000 echoes each, of up to 128 KiB, compressed both ways) take far longer.
SUITE_TIMEOUT=3600
START_TIMEOUT=30   # seconds, for the echo server to listen

python=${PYTHON:-$root/.venv/bin/python}
python3=${PYTHON3:-python3}
py27=${PYTHON27:-/root/.pyenv/versions/2.7.18/bin/python2.7}
[ -x "$py27" ] || py27=$(command -v python2.7 || true)
reqs=$root/conformance/requirements-py27.txt

die() { echo "conformance: $*" >&2; exit 1; }
case $part in
    all | fast | slow) ;;
    *) die "usage: conformance/run.sh [all|fast|slow] (got: $part)" ;;
esac
[ -x "$python" ] || die "no Python for the echo server at $python (set PYTHON)"
[ -n "$py27" ] && [ -x "$py27" ] || die "no Python 2.7 found (set PYTHON27)"

cache=${TRIOCHAT_CACHE:-$HOME/.cache/triochat}/autobahn
key=$({ cat "$reqs"; echo "autobahntestsuite==$AUTOBAHN_VERSION $py27"; } | sha256sum | cut -c1-16)
toolchain=$cache/$key
wstest=$toolchain/py27/bin/wstest

install_toolchain() {
    # virtualenv <20.22 is the last that creates Python 2.7 environments; the
    # sdist is fetched by Python 3's pip (Python 2's pip fails on that step).
    rm -rf "$toolchain"
    mkdir -p "$toolchain"
    "$python3" -m venv "$toolchain/tools"
    "$toolchain/tools/bin/pip" install -q "virtualenv<20.22"
    "$toolchain/tools/bin/virtualenv" -q -p "$py27" "$toolchain/py27"
    "$toolchain/py27/bin/pip" install -q -r "$reqs"
    "$toolchain/tools/bin/pip" download -q --no-deps --no-binary :all: \
        "autobahntestsuite==$AUTOBAHN_VERSION" -d "$toolchain/dl"
    "$toolchain/py27/bin/pip" install -q --no-deps \
        "$toolchain/dl/autobahntestsuite-$AUTOBAHN_VERSION.tar.gz"
    "$toolchain/py27/bin/python" -c "import autobahntestsuite"
    touch "$toolchain/.complete"
}

started=$SECONDS
mkdir -p "$cache"
(
    flock -w "$SETUP_TIMEOUT" 9 || die "timed out waiting for the cache lock"
    if [ -f "$toolchain/.complete" ]; then
        echo "conformance: Autobahn toolchain cached in $toolchain"
    else
        echo "conformance: installing the Autobahn toolchain into $toolchain"
        export -f install_toolchain
        export toolchain python3 py27 reqs AUTOBAHN_VERSION
        if ! timeout "$SETUP_TIMEOUT" bash -euo pipefail -c install_toolchain \
            >"$cache/install-$key.log" 2>&1; then
            tail -n 40 "$cache/install-$key.log" >&2
            rm -rf "$toolchain"
            die "toolchain install failed (log: $cache/install-$key.log)"
        fi
    fi
) 9>"$cache/.lock"
echo "conformance: toolchain ready after $((SECONDS - started)) s"

work=$(mktemp -d "${TMPDIR:-/tmp}/triochat-conformance.XXXXXX")
echo_pid=
suite_pid=
cleanup() {
    # Children run in the background and are waited for with `wait`, so a
    # signal to this script stops them at once (bash runs traps only
    # between foreground commands).
    for pid in $suite_pid $echo_pid; do
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The echo server, on a free port it reports once listening.
PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" "$python" conformance/echo_server.py \
    --port 0 --ready-file "$work/port" >"$work/echo.log" 2>&1 &
echo_pid=$!
for _ in $(seq $((START_TIMEOUT * 10))); do
    [ -s "$work/port" ] && break
    kill -0 "$echo_pid" 2>/dev/null || { cat "$work/echo.log" >&2; die "echo server died"; }
    sleep 0.1
done
[ -s "$work/port" ] || { cat "$work/echo.log" >&2; die "echo server did not start"; }
port=$(cat "$work/port")

# Every case, no exclusions (12.* and 13.* are permessage-deflate: the echo
# server runs with compression on, as `--compression on` does), in shards run
# side by side: wstest and the echo take turns, each busy part of the time,
# so one shard leaves a core idle. "fast" is one shard: "*" less 12.* and
# 13.*; "slow" is three: group 13, 12.1-12.3, and 12.4-12.5 (the case groups
# of 12 and 13 are each listed, so no case can fall between the parts).
shard_config() {  # shard name, cases, exclusions
    cat >"$work/$1.json" <<EOF
{
  "outdir": "$work/reports-$1/servers",
  "servers": [{"agent": "triochat-echo", "url": "ws://127.0.0.1:$port"}],
  "cases": [$2],
  "exclude-cases": [$3],
  "exclude-agent-cases": {}
}
EOF
}
shards=()
if [ "$part" != slow ]; then
    shard_config fast '"*"' '"12.*", "13.*"'
    shards+=(fast)
fi
if [ "$part" != fast ]; then
    shard_config slow13 '"13.*"' ''
    shard_config slow12a '"12.1.*", "12.2.*", "12.3.*"' ''
    shard_config slow12b '"12.4.*", "12.5.*"' ''
    shards+=(slow13 slow12a slow12b)
fi

echo "conformance: running wstest -m fuzzingclient ($part: ${shards[*]}) against ws://127.0.0.1:$port"
suite_started=$SECONDS
for shard in "${shards[@]}"; do
    (cd "$work" && exec timeout "$SUITE_TIMEOUT" "$wstest" -m fuzzingclient -s "$shard.json") \
        >"$work/wstest-$shard.log" 2>&1 &
    suite_pid="$suite_pid $!"
done
for pid in $suite_pid; do
    if ! wait "$pid"; then
        tail -n 40 "$work"/wstest-*.log >&2
        die "wstest failed or timed out after $((SECONDS - suite_started)) s"
    fi
done
echo "conformance: $part took $((SECONDS - suite_started)) s"
reports=()
for shard in "${shards[@]}"; do
    reports+=("$work/reports-$shard/servers/index.json")
    if [ -n "${CONFORMANCE_REPORT_DIR:-}" ]; then
        mkdir -p "$CONFORMANCE_REPORT_DIR/$shard"
        cp -r "$work/reports-$shard/servers/." "$CONFORMANCE_REPORT_DIR/$shard/"
    fi
done
[ -z "${CONFORMANCE_REPORT_DIR:-}" ] ||
    echo "conformance: reports copied to $CONFORMANCE_REPORT_DIR/<shard>/index.html"
kill -0 "$echo_pid" 2>/dev/null || { cat "$work/echo.log" >&2; die "echo server died"; }
if grep -q "Traceback\|ERROR" "$work/echo.log"; then
    cat "$work/echo.log" >&2
    die "the echo server logged errors"
fi

"$python" conformance/summarize.py --part "$part" "${reports[@]}"
