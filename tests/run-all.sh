#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need from the package
# registries (SoftHSM2, OpenSC, the PKCS#11 header, grpc-go from Debian; moto and grpcio from PyPI), then
# checks formatting and lints, and runs every test.
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
echo "== fuzz smoke: the :authority rewriter parses untrusted bytes (30 s)"
command -v cargo-fuzz >/dev/null || cargo install -q --locked cargo-fuzz
mkdir -p fuzz/corpus/authority_rewriter
fuzz_log=$(mktemp)
if ! (cd fuzz && cargo fuzz run authority_rewriter corpus/authority_rewriter seeds/authority_rewriter \
      -s none -- -max_total_time=30 >"$fuzz_log" 2>&1); then
  tail -n 80 "$fuzz_log"; echo "fuzzing found a crash (reproducer under fuzz/artifacts/)"; exit 1
fi
grep -E '^Done [0-9]+ runs' "$fuzz_log" || tail -n 3 "$fuzz_log"
echo "== cargo test"
cargo test --all-targets
