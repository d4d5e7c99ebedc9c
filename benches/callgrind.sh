#!/usr/bin/env bash
# Instructions per KMS call of the plugin and of the empty baseline handler, from callgrind:
# each server runs under valgrind twice (N1 and N2 sequential calls from one client) and the
# difference of the two totals over N2-N1 is the per-call cost, start-up and shutdown cancel.
# Repeatable to ~0.1 % on a busy machine where wall-clock numbers are not.
#
# Usage: benches/callgrind.sh [encrypt|decrypt] [N1] [N2]
# Needs valgrind and a release build: `cargo bench --bench e2e --no-run` first. The client is
# the bench's grpc-go one (kube-apiserver's headers, which the `:authority` rewriter decodes),
# rebuilt from benches/e2e/go as the bench builds it when `go` is on PATH, so it is never a
# stale copy; without Go, the tonic one. GO_CLIENT=none forces tonic, GO_CLIENT=path another.
set -euo pipefail
op=${1:-encrypt}
n1=${2:-500}
n2=${3:-1500}
root=$(cd "$(dirname "$0")/.." && pwd)
plugin=${PLUGIN:-$root/target/release/kms-plugin}
# The e2e bench binary: its --serve-baseline and --calls modes.
e2e=${E2E:-$(ls -t "$root"/target/release/deps/e2e-* | grep -v '\.d$' | head -1)}
go_client=${GO_CLIENT:-}
if [[ -z $go_client ]] && command -v go >/dev/null; then
    # The flags of benches/e2e/go.rs; Go's build cache makes this a second when nothing changed.
    (cd "$root/benches/e2e/go" && CGO_ENABLED=0 go build -buildvcs=false -trimpath \
        -o "$root/target/e2e/go/" ./client)
    go_client=$root/target/e2e/go/client
fi
[[ -x $go_client ]] || go_client=
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# total instructions of `server` (a command line taking the socket last) after N calls
run() {
    local name=$1 n=$2
    shift 2
    local sock=$work/$name.sock out=$work/$name.$n.out
    rm -f "$sock"
    valgrind --tool=callgrind --callgrind-out-file="$out" "$@" "$sock" >"$work/$name.$n.log" 2>&1 &
    local pid=$!
    if [[ -n $go_client ]]; then
        # It waits for the server, makes a Status and an Encrypt (in both runs, so they
        # cancel out), then the N calls.
        echo "calls $op $n" | "$go_client" -socket "$sock" >/dev/null
    else
        "$e2e" --calls "$sock" "$op" "$n" >/dev/null
    fi
    kill -TERM "$pid"
    wait "$pid" || true
    grep -h '^summary:\|^totals:' "$out" | head -1 | awk '{print $2}'
}

per_call() {
    local name=$1
    shift
    local t1 t2
    t1=$(run "$name" "$n1" "$@")
    t2=$(run "$name" "$n2" "$@")
    echo $(((t2 - t1) / (n2 - n1)))
    # keep both profiles: callgrind_annotate on the larger, or diff the two per function
    cp "$work/$name.$n2.out" "${CALLGRIND_KEEP:-/tmp}/callgrind.$name.$op.out"
    cp "$work/$name.$n1.out" "${CALLGRIND_KEEP:-/tmp}/callgrind.$name.$op.$n1.out"
}

plugin_ir=$(per_call plugin "$plugin" serve --state-dir "$work/state" --socket)
baseline_ir=$(per_call baseline "$e2e" --serve-baseline)
client=${go_client:+grpc-go}
echo "$op (${client:-tonic} client): plugin $plugin_ir instructions/call, baseline $baseline_ir, ratio $(echo "scale=3; $plugin_ir / $baseline_ir" | bc)"
echo "profiles: ${CALLGRIND_KEEP:-/tmp}/callgrind.{plugin,baseline}.$op.out (callgrind_annotate --inclusive=yes)"
