#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need from the package
# registries (SoftHSM2, OpenSC, the PKCS#11 header, grpc-go from Debian; moto and grpcio from
# PyPI; cargo-deny and cargo-fuzz from crates.io), then checks formatting, lints and
# dependencies, fuzzes every parser of untrusted input briefly, and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

debs=(softhsm2 opensc libp11-kit-dev golang-go golang-google-grpc-dev golang-google-protobuf-dev
      golang-github-golang-protobuf-1-5-dev protoc-gen-go protoc-gen-go-grpc protobuf-compiler)
missing=()
for p in "${debs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -c 'import moto, grpc, grpc_tools, boto3' 2>/dev/null ||
  { echo "== installing moto[server] grpcio grpcio-tools"; python3 -m pip install -q 'moto[server]' grpcio grpcio-tools; }

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
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
echo "== fuzz smoke: every parser of untrusted input, 25 s each (the rewriter 30 s)"
command -v cargo-fuzz >/dev/null || cargo install -q --locked cargo-fuzz
(cd fuzz && cargo fuzz build -s none)
fuzz_log=$(mktemp)
fuzz() { # TARGET SECONDS [libFuzzer options]
  local target=$1 seconds=$2; shift 2
  mkdir -p "fuzz/corpus/$target"
  if ! (cd fuzz && cargo fuzz run "$target" "corpus/$target" "seeds/$target" -s none -- \
        -max_total_time="$seconds" "$@" >"$fuzz_log" 2>&1); then
    tail -n 80 "$fuzz_log"; echo "fuzzing $target found a crash (reproducer under fuzz/artifacts/$target/)"
    exit 1
  fi
  echo "$target: $(grep -E '^Done [0-9]+ runs' "$fuzz_log" || tail -n 1 "$fuzz_log")"
}
fuzz authority_rewriter 30
fuzz envelope 25
fuzz annotations 25
fuzz config 25 -dict=dicts/config.dict
echo "== cargo test"
cargo test --all-targets --no-fail-fast
