#!/usr/bin/env bash
# End to end with a real kube-apiserver and etcd (issue 14): the plugin's one real user.
#
#   bash tests/e2e/kube-apiserver.sh
#
# Builds or reuses kube-apiserver, etcd and etcdctl (tests/e2e/build.sh; cached outside the
# repository under ${KMS_E2E_CACHE:-~/.cache/kms-plugin-e2e}), then in a temp directory, on loopback
# ports and Unix sockets only, runs etcd, kms-plugin and kube-apiserver (KMS v2 provider,
# automatic config reload, token auth, AlwaysAllow) and checks, first with a file root key:
#   1. Secrets are stored in etcd as k8s:enc:kms:v2:kms-plugin:<EncryptedObject> under the
#      plugin's key_id, no plaintext anywhere in etcd's files, and they read back exactly;
#   2. kill -9 of the plugin, of the apiserver, of both, with restarts: everything reads back,
#      and /readyz and /healthz show the kms-providers check failing while the plugin is down;
#   3. rotation the way the README's runbook does it (`kms-plugin rotate`), storage migration by
#      replacing every Secret, retiring the old root, full restart;
#   5. two apiservers on one etcd, each with its own plugin and the same root, rotated one
#      instance at a time;
#   6. load: Secrets/s and create latency with the kms, aesgcm and identity providers;
# plus a server-side dry run of every manifest under deploy/ and an apiserver started with
# deploy/encryption-config.yaml; then with an AWS KMS root on moto: checks 1, 2 and
#   4. root outage (moto SIGSTOPped): reads and writes keep working, health as the README says.
#
# Every check prints PASS or FAIL with what it expected and found; the script exits non-zero on
# the first FAIL and always stops what it started. KMS_E2E_KEEP=1 keeps the temp directory.
# KMS_E2E_LOAD (default 3000) sets the number of Secrets of the load check. KMS_E2E_CHECKS=core
# runs only checks 1-3 with the file root (for other apiserver versions: KUBE_VERSION=1.29.15).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD

eval "$(bash tests/e2e/build.sh)"
PLUGIN=${KMS_PLUGIN:-$repo/target/debug/kms-plugin}
[ -x "$PLUGIN" ] || cargo build --bin kms-plugin
LOAD=${KMS_E2E_LOAD:-3000}
CHECKS=${KMS_E2E_CHECKS:-all}
case $CHECKS in all | core) ;; *) echo "KMS_E2E_CHECKS must be all or core, not $CHECKS"; exit 2 ;; esac

work=$(mktemp -d /tmp/kms-e2e.XXXXXX)
declare -A PID=() # name -> pid of everything this script started
TOKEN=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
MARKER=e2e-plaintext-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
started=$SECONDS

cleanup() {
  local rc=$?
  [ -n "${PID[moto]:-}" ] && kill -CONT "${PID[moto]}" 2>/dev/null || true
  for name in "${!PID[@]}"; do kill -9 "${PID[$name]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$rc" -ne 0 ]; then
    echo "== FAILED (exit $rc) after $((SECONDS - started)) s; last lines of each log:"
    for f in "$work"/*/*.log "$work"/*.log; do
      [ -f "$f" ] && { echo "--- $f"; tail -n 15 "$f"; }
    done
    echo "== logs kept in $work"
  elif [ -z "${KMS_E2E_KEEP:-}" ]; then
    rm -rf "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; exit 1; }
# expect WHAT EXPECTED FOUND
expect() { if [ "$2" = "$3" ]; then pass "$1: $3"; else fail "$1: expected $2, found $3"; fi; }
step() { echo "== $* ($((SECONDS - started)) s)"; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# kill_proc NAME [SIGNAL]: signals one process this script started and reaps it.
kill_proc() {
  local pid=${PID[$1]}
  kill "-${2:-TERM}" "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  unset "PID[$1]"
}

# --- etcd ---------------------------------------------------------------------------------------
# start_etcd NAME: a one-member etcd on two free loopback ports; sets ETCD_URL[NAME].
declare -A ETCD_URL=()
start_etcd() {
  local name=$1 cport pport dir=$work/$1
  cport=$(free_port) pport=$(free_port)
  mkdir -p "$dir"
  "$ETCD" --name "$name" --data-dir "$dir/data" --log-level warn \
    --listen-client-urls "http://127.0.0.1:$cport" --advertise-client-urls "http://127.0.0.1:$cport" \
    --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
    --initial-cluster "$name=http://127.0.0.1:$pport" >"$dir/etcd.log" 2>&1 &
  PID[$name]=$!
  ETCD_URL[$name]=http://127.0.0.1:$cport
  for _ in $(seq 100); do
    "$ETCDCTL" --endpoints="http://127.0.0.1:$cport" endpoint health >/dev/null 2>&1 && return
    sleep 0.2
  done
  fail "etcd $name healthy within 20 s"
}
etcd_url() { echo "${ETCD_URL[$1]}"; }

# --- kms-plugin ---------------------------------------------------------------------------------
# plugin_config NAME ACTIVE [RETIRED...]: writes $work/NAME/config.toml (atomically) with file
# roots from $work/keys/<key>.key, or the AWS root "aws" when KEY is aws.
plugin_config() {
  local name=$1 active=$2 dir=$work/$1 k
  shift 2
  mkdir -p "$dir"
  {
    echo "socket = \"$dir/kms.sock\""
    [ -n "${METRICS_PORT[$name]:-}" ] && echo "metrics_listen = \"127.0.0.1:${METRICS_PORT[$name]}\""
    echo
    echo "[kek]"
    echo "active = \"$active\""
    if [ $# -gt 0 ]; then
      printf 'retired = [%s]\n' "$(printf '"%s",' "$@" | sed 's/,$//')"
    fi
    echo
    for k in "$active" "$@"; do
      echo "[keys.$k]"
      if [ "$k" = aws ]; then
        echo "provider = \"aws-kms\""
        echo "key_id = \"$AWS_ARN\""
        echo "region = \"us-east-1\""
        echo "endpoint = \"$MOTO_URL\""
        echo "allow_http = true"
      else
        echo "provider = \"file\""
        echo "path = \"$work/keys/$k.key\""
      fi
      echo
    done
    echo "[health]"
    echo "root_check_interval_seconds = 5 # notice a root outage within seconds (check 4)"
    echo "retry_interval_seconds = 2"
  } >"$dir/config.toml.new"
  mv "$dir/config.toml.new" "$dir/config.toml"
}
declare -A METRICS_PORT=()

keygen() { # keygen PLUGIN_NAME KEY
  mkdir -p -m 700 "$work/keys"
  "$PLUGIN" keygen --config "$work/$1/config.toml" --key "$2" >>"$work/$1/plugin.log" 2>&1 ||
    fail "kms-plugin keygen --key $2 (see $work/$1/plugin.log)"
}

aws_env=(AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1
         AWS_CONFIG_FILE=/nonexistent AWS_SHARED_CREDENTIALS_FILE=/nonexistent AWS_EC2_METADATA_DISABLED=true)

start_plugin() { # start_plugin NAME: serves $work/NAME/config.toml; waits until Status is ok
  local name=$1 dir=$work/$1
  # Debug for the plugin's own modules: the :authority rewriter logs there (check 1).
  env "${aws_env[@]}" KMS_PLUGIN_LOG=info,kms_plugin=debug "$PLUGIN" serve --config "$dir/config.toml" >>"$dir/plugin.log" 2>&1 &
  PID[$name]=$!
  for _ in $(seq 150); do
    "$PLUGIN" status --socket "$dir/kms.sock" >/dev/null 2>&1 && return
    kill -0 "${PID[$name]}" 2>/dev/null || fail "plugin $name exited at start-up (see $dir/plugin.log)"
    sleep 0.2
  done
  fail "plugin $name healthy within 30 s"
}
key_id() { "$PLUGIN" status --socket "$work/$1/kms.sock" | awk '$1 == "key_id:" {print $2}'; }

# --- kube-apiserver -----------------------------------------------------------------------------
openssl genrsa -out "$work/sa.key" 2048 2>/dev/null
openssl rsa -in "$work/sa.key" -pubout -out "$work/sa.pub" 2>/dev/null
echo "$TOKEN,e2e-admin,e2e-admin,system:masters" >"$work/tokens.csv"

# encryption_config FILE PROVIDER [PLUGIN_NAME]: kms (KMS v2 on the plugin's socket, then
# identity for data written before), aesgcm or identity.
encryption_config() {
  local file=$1 provider=$2
  {
    echo "apiVersion: apiserver.config.k8s.io/v1"
    echo "kind: EncryptionConfiguration"
    echo "resources:"
    echo "  - resources: [secrets]"
    echo "    providers:"
    case $provider in
      kms) echo "      - kms:"
           echo "          apiVersion: v2"
           echo "          name: kms-plugin"
           echo "          endpoint: unix://$work/$3/kms.sock"
           echo "          timeout: 3s" ;;
      aesgcm) echo "      - aesgcm:"
              echo "          keys:"
              echo "            - name: key1"
              echo "              secret: $(head -c 32 /dev/urandom | base64)" ;;
    esac
    echo "      - identity: {}"
  } >"$file"
}

declare -A API_URL=()
# start_apiserver NAME ETCD_NAME ENCRYPTION_CONFIG: waits until /readyz is 200.
start_apiserver() {
  local name=$1 dir=$work/$1 port
  port=$(free_port)
  mkdir -p "$dir/certs"
  "$KUBE_APISERVER" \
    --etcd-servers="$(etcd_url "$2")" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$port" \
    --cert-dir="$dir/certs" --token-auth-file="$work/tokens.csv" --authorization-mode=AlwaysAllow \
    --service-account-key-file="$work/sa.pub" --service-account-signing-key-file="$work/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range=10.96.0.0/24 --endpoint-reconciler-type=none \
    --encryption-provider-config="$3" --encryption-provider-config-automatic-reload=true \
    --profiling=false >>"$dir/apiserver.log" 2>&1 &
  PID[$name]=$!
  API_URL[$name]=https://127.0.0.1:$port
  kube "$name" wait-ready --timeout 120
}
kube() { local name=$1; shift; python3 "$repo/tests/e2e/kube.py" --server "${API_URL[$name]}" --token "$TOKEN" "$@"; }
etcd_check() { local e=$1; shift; python3 "$repo/tests/e2e/kube.py" etcd --etcdctl "$ETCDCTL" --etcd "$(etcd_url "$e")" "$@"; }
keyid_of() { python3 "$repo/tests/e2e/kube.py" keyid-of --etcdctl "$ETCDCTL" --etcd "$(etcd_url "$1")" --prefix "$KMS_PREFIX" --key "$2"; }
KMS_PREFIX=k8s:enc:kms:v2:kms-plugin:

# wait_writes_under API ETCD KEY_ID WHAT: writes a probe Secret every 2 s (polling /readyz, whose
# KMS check re-reads Status once its 20 s cache is stale) until one is stored under KEY_ID.
wait_writes_under() {
  local api=$1 etcd=$2 want=$3 i found=""
  for i in $(seq 60); do
    kube "$api" health readyz >/dev/null
    kube "$api" create --prefix "probe-$api-$i-$RANDOM" --marker "$MARKER" >/dev/null
    found=$(python3 - "$(etcd_url "$etcd")" <<'EOF'
import json, subprocess, sys, base64, os
sys.path.insert(0, os.path.join(os.environ["REPO"], "tests/e2e"))
import kube
out = subprocess.run([os.environ["ETCDCTL"], f"--endpoints={sys.argv[1]}", "get", "--prefix",
                      "/registry/secrets/e2e/probe-", "-w", "json", "--sort-by=MODIFY", "--order=DESCEND",
                      "--limit=1"], check=True, capture_output=True).stdout
kv = json.loads(out)["kvs"][0]
v = base64.b64decode(kv["value"])
print(kube.decode_encrypted_object(v[len(os.environ["KMS_PREFIX"]):]).get("keyID", ""))
EOF
)
    if [ "$found" = "$want" ]; then
      pass "$4: new writes through $api are stored under $want (after $((i * 2)) s)"
      return
    fi
    sleep 2
  done
  fail "$4: new writes through $api stored under $want within 120 s; last write under $found"
}
export REPO=$repo ETCDCTL KMS_PREFIX PYTHONDONTWRITEBYTECODE=1 # no __pycache__ in the repository


step "versions: $("$KUBE_APISERVER" --version), etcd $("$ETCD" --version | head -1 | awk '{print $3}'), $("$PLUGIN" --version)"

# =============================================================================================
step "file root: etcd, kms-plugin, kube-apiserver"
start_etcd etcd1
plugin_config p1 main
keygen p1 main
start_plugin p1
KEY1=$(key_id p1)
encryption_config "$work/enc-p1.yaml" kms p1
start_apiserver a1 etcd1 "$work/enc-p1.yaml"
pass "kube-apiserver $("$KUBE_APISERVER" --version | awk '{print $2}') ready with the KMS v2 provider on $work/p1/kms.sock"

step "check 1: encryption at rest"
kube a1 create --prefix c1 --count 20 --marker "$MARKER"
etcd_check etcd1 --prefix "$KMS_PREFIX" --keyid "$KEY1" --min 20 --what "check 1"
python3 tests/e2e/kube.py no-plaintext --etcdctl "$ETCDCTL" --etcd "$(etcd_url etcd1)" \
  --marker "$MARKER" --data-dir "$work/etcd1/data"
kube a1 verify --marker "$MARKER" --min 20 --what "check 1"
# kube-apiserver 1.27-1.31 send the socket path as :authority (the plugin rewrites it), 1.32+
# send "localhost" (nothing to rewrite).
minor=$("$KUBE_APISERVER" --version | sed -E 's/.*v1\.([0-9]+)\..*/\1/')
rewrote=no
grep -q "rewrote an unparsable :authority" "$work/p1/plugin.log" && rewrote=yes
expect "check 1: the plugin rewrote kube-apiserver 1.$minor's :authority" \
  "$([ "$minor" -lt 32 ] && echo yes || echo no)" "$rewrote"

step "check 2: kill -9 of the plugin, then the apiserver, then both"
kill_proc p1 KILL
kube a1 expect-health failing --timeout 40 --what "check 2, plugin killed"
kube a1 verify --marker "$MARKER" --min 20 --what "check 2, plugin down (DEKs cached by the apiserver)"
start_plugin p1
kube a1 expect-health ok --timeout 40 --what "check 2, plugin restarted"
expect "check 2: key_id after the plugin's restart" "$KEY1" "$(key_id p1)"
kube a1 create --prefix c2a --count 5 --marker "$MARKER"
kill_proc a1 KILL
start_apiserver a1 etcd1 "$work/enc-p1.yaml"
kube a1 verify --marker "$MARKER" --min 25 --what "check 2, apiserver killed and restarted"
kube a1 create --prefix c2b --count 5 --marker "$MARKER"
kill_proc a1 KILL
kill_proc p1 KILL
start_plugin p1
start_apiserver a1 etcd1 "$work/enc-p1.yaml"
kube a1 verify --marker "$MARKER" --min 30 --what "check 2, both killed and restarted"
etcd_check etcd1 --prefix "$KMS_PREFIX" --keyid "$KEY1" --min 30 --what "check 2"

step "deploy manifests: server-side dry run, and deploy/encryption-config.yaml loaded by an apiserver"
shopt -s nullglob
manifests=(deploy/*.yaml deploy/*.yml)
shopt -u nullglob
if [ "$CHECKS" = core ]; then
  echo "(skipped: KMS_E2E_CHECKS=core)"
elif [ ${#manifests[@]} -eq 0 ]; then
  pass "deploy manifests: no manifests under deploy/"
else
  kube a1 dry-run "${manifests[@]}"
  if [ -f deploy/encryption-config.yaml ]; then
    # Its endpoint(s) pointed at this run's plugin socket; everything else as shipped.
    sed -E "s#unix://[^ \"']+#unix://$work/p1/kms.sock#g" deploy/encryption-config.yaml >"$work/enc-deploy.yaml"
    start_apiserver a-deploy etcd1 "$work/enc-deploy.yaml"
    kube a-deploy create --prefix deploy --marker "$MARKER"
    kube a-deploy verify --marker "$MARKER" --min 31 --what "apiserver with deploy/encryption-config.yaml"
    kill_proc a-deploy TERM
  fi
fi

step "check 3: KEK rotation (kms-plugin rotate), storage migration, old root retired"
cat >>"$work/p1/config.toml" <<EOF

[keys.next]
provider = "file"
path = "$work/keys/next.key"
EOF
keygen p1 next
"$PLUGIN" rotate --config "$work/p1/config.toml" --to next >"$work/rotate-p1.out" 2>&1 ||
  { cat "$work/rotate-p1.out"; fail "check 3: kms-plugin rotate --to next"; }
KEY2=$(key_id p1)
[ "$KEY2" != "$KEY1" ] || fail "check 3: Status key_id changed after rotate: still $KEY1"
pass "check 3: kms-plugin rotate: Status key_id $KEY1 -> $KEY2"
grep -q "retired" "$work/p1/config.toml" || fail "check 3: rotate retired the old key in the config"
wait_writes_under a1 etcd1 "$KEY2" "check 3"
kube a1 verify --marker "$MARKER" --min 31 --what "check 3, old and new key_id side by side"
etcd_check etcd1 --prefix "$KMS_PREFIX" --only /registry/secrets/e2e/c1- --keyid "$KEY1" --min 20 \
  --what "check 3, before migration, old Secrets"
kube a1 replace-all
etcd_check etcd1 --prefix "$KMS_PREFIX" --keyid "$KEY2" --min 31 --what "check 3, after migration"
# Runbook step 5 (restart the apiserver once after the rewrite), then step 6: drop the old root.
kill_proc a1 TERM
start_apiserver a1 etcd1 "$work/enc-p1.yaml"
kube a1 verify --marker "$MARKER" --min 31 --what "check 3, apiserver restarted after the rewrite"
plugin_config p1 next
"$PLUGIN" reload --socket "$work/p1/kms.sock" --force >"$work/reload-p1.out" 2>&1 ||
  { cat "$work/reload-p1.out"; fail "check 3: kms-plugin reload --force without the old root"; }
pass "check 3: old root retired: $(cat "$work/reload-p1.out")"
rm "$work/keys/main.key"
kill_proc a1 KILL
kill_proc p1 KILL
start_plugin p1
start_apiserver a1 etcd1 "$work/enc-p1.yaml"
expect "check 3: key_id after the full restart" "$KEY2" "$(key_id p1)"
kube a1 verify --marker "$MARKER" --min 31 --what "check 3, old root gone, full restart"

if [ "$CHECKS" = core ]; then
  step "core checks (1, 2, 3 with the file root) passed on $("$KUBE_APISERVER" --version)"
  exit 0
fi

step "check 5: two apiservers on one etcd, one plugin each, same root; rolling rotation"
plugin_config p2 next
start_plugin p2
expect "check 5: both plugins report the same key_id" "$KEY2" "$(key_id p2)"
encryption_config "$work/enc-p2.yaml" kms p2
start_apiserver a2 etcd1 "$work/enc-p2.yaml"
kube a1 create --prefix ha1 --count 5 --marker "$MARKER"
kube a2 create --prefix ha2 --count 5 --marker "$MARKER"
kube a1 verify --marker "$MARKER" --min 41 --what "check 5, through apiserver 1"
kube a2 verify --marker "$MARKER" --min 41 --what "check 5, through apiserver 2"
# Roll out the new root to every instance first (decrypt-only), then make it active one at a time:
# the order the README's runbook gives for several apiservers.
plugin_config p1 next third
keygen p1 third
plugin_config p2 next third
for p in p1 p2; do
  "$PLUGIN" reload --socket "$work/$p/kms.sock" >"$work/reload-$p.out" 2>&1 ||
    { cat "$work/reload-$p.out"; fail "check 5: reload $p with the new root known"; }
done
pass "check 5: both plugins know the new root (retired role, decrypt only)"
"$PLUGIN" rotate --config "$work/p1/config.toml" --to third >"$work/rotate-p1b.out" 2>&1 ||
  { cat "$work/rotate-p1b.out"; fail "check 5: kms-plugin rotate --to third on instance 1"; }
KEY3=$(key_id p1)
[ "$KEY3" != "$KEY2" ] || fail "check 5: instance 1 key_id changed"
wait_writes_under a1 etcd1 "$KEY3" "check 5, instance 1 rotated"
kube a1 create --prefix ha3 --count 5 --marker "$MARKER"
kube a2 verify --marker "$MARKER" --min 46 --what "check 5, half rotated, through apiserver 2"
kube a1 verify --marker "$MARKER" --min 46 --what "check 5, half rotated, through apiserver 1"
"$PLUGIN" rotate --config "$work/p2/config.toml" --to third >"$work/rotate-p2.out" 2>&1 ||
  { cat "$work/rotate-p2.out"; fail "check 5: kms-plugin rotate --to third on instance 2"; }
expect "check 5: both plugins report the same key_id after the rollout" "$KEY3" "$(key_id p2)"
wait_writes_under a2 etcd1 "$KEY3" "check 5, instance 2 rotated"
kube a2 replace-all
etcd_check etcd1 --prefix "$KMS_PREFIX" --keyid "$KEY3" --min 46 --what "check 5, after migration"
kube a1 verify --marker "$MARKER" --min 46 --what "check 5, rolled out, through apiserver 1"
kube a2 verify --marker "$MARKER" --min 46 --what "check 5, rolled out, through apiserver 2"
for n in a2 p2 a1 p1 etcd1; do kill_proc "$n" TERM; done

# =============================================================================================
step "check 6: load, $LOAD Secrets from 16 clients, per provider (fresh etcd each)"
: >"$work/load.jsonl"
for provider in kms aesgcm identity; do
  start_etcd "etcd-$provider"
  if [ "$provider" = kms ]; then
    plugin_config p-load next
    start_plugin p-load
  fi
  encryption_config "$work/enc-load-$provider.yaml" "$provider" p-load
  start_apiserver "a-$provider" "etcd-$provider" "$work/enc-load-$provider.yaml"
  kube "a-$provider" load --ns load --count "$LOAD" --threads 16 --provider "$provider" \
    --marker "$MARKER" | tee -a "$work/load.jsonl"
  kube "a-$provider" verify --ns load --marker "$MARKER" --min "$LOAD" --what "check 6, $provider"
  if [ "$provider" = kms ]; then
    etcd_check "etcd-$provider" --prefix "$KMS_PREFIX" --min "$LOAD" --what "check 6"
  fi
  for n in "a-$provider" p-load "etcd-$provider"; do [ -n "${PID[$n]:-}" ] && kill_proc "$n" TERM; done
done
echo "check 6 results (kube-apiserver $("$KUBE_APISERVER" --version | awk '{print $2}'), $(nproc) cores, $LOAD Secrets, 16 clients):"
python3 - "$work/load.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print("| provider | Secrets/s | p50 create (ms) | p99 create (ms) |")
print("|---|---|---|---|")
for r in rows:
    print(f"| {r['provider']} | {r['per_second']} | {r['p50_ms']} | {r['p99_ms']} |")
EOF

# =============================================================================================
step "AWS KMS root on moto: checks 1, 2 and 4"
MOTO_PORT=$(free_port)
moto_server -H 127.0.0.1 -p "$MOTO_PORT" >"$work/moto.log" 2>&1 &
PID[moto]=$!
MOTO_URL=http://127.0.0.1:$MOTO_PORT
for _ in $(seq 150); do python3 -c "import urllib.request; urllib.request.urlopen('$MOTO_URL/moto-api/')" 2>/dev/null && break; sleep 0.2; done
AWS_ARN=$(MOTO_URL=$MOTO_URL python3 -c '
import os, boto3
c = boto3.client("kms", endpoint_url=os.environ["MOTO_URL"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing")
print(c.create_key()["KeyMetadata"]["Arn"])')
pass "moto KMS key $AWS_ARN"
start_etcd etcd2
METRICS_PORT[pa]=$(free_port)
plugin_config pa aws
start_plugin pa
KEYA=$(key_id pa)
encryption_config "$work/enc-pa.yaml" kms pa
start_apiserver aa etcd2 "$work/enc-pa.yaml"
MARKER_AWS=$MARKER-aws
kube aa create --prefix aws1 --count 20 --marker "$MARKER_AWS"
etcd_check etcd2 --prefix "$KMS_PREFIX" --keyid "$KEYA" --min 20 --what "check 1 (aws)"
python3 tests/e2e/kube.py no-plaintext --etcdctl "$ETCDCTL" --etcd "$(etcd_url etcd2)" \
  --marker "$MARKER_AWS" --data-dir "$work/etcd2/data"
kube aa verify --marker "$MARKER_AWS" --min 20 --what "check 1 (aws)"

kill_proc pa KILL
kube aa expect-health failing --timeout 40 --what "check 2 (aws), plugin killed"
kube aa verify --marker "$MARKER_AWS" --min 20 --what "check 2 (aws), plugin down"
start_plugin pa
kube aa expect-health ok --timeout 40 --what "check 2 (aws), plugin restarted"
kube aa create --prefix aws2 --count 5 --marker "$MARKER_AWS"
kill_proc aa KILL
start_apiserver aa etcd2 "$work/enc-pa.yaml"
kube aa verify --marker "$MARKER_AWS" --min 25 --what "check 2 (aws), apiserver killed and restarted"
kill_proc aa KILL
kill_proc pa KILL
start_plugin pa
start_apiserver aa etcd2 "$work/enc-pa.yaml"
kube aa verify --marker "$MARKER_AWS" --min 25 --what "check 2 (aws), both killed and restarted"
expect "check 2 (aws): key_id after restarts" "$KEYA" "$(key_id pa)"

step "check 4 (aws): root outage, moto SIGSTOPped"
kill -STOP "${PID[moto]}"
state=""
for _ in $(seq 30); do
  state=$("$PLUGIN" status --socket "$work/pa/kms.sock" | grep -E '^root aws ' || true)
  case $state in *degraded*) break ;; esac
  sleep 1
done
case $state in
  *degraded*) pass "check 4: kms-plugin status shows the root degraded: $state" ;;
  *) fail "check 4: kms-plugin status shows the root degraded within 30 s; found: $state" ;;
esac
expect "check 4: kms-plugin status healthz while degraded (README: degraded is not a failed healthz)" \
  "healthz: ok" "$("$PLUGIN" status --socket "$work/pa/kms.sock" | grep '^healthz:' | tr -s ' ')"
expect "check 4: plugin's own /readyz while degraded (README: 200 while an Encrypt would succeed)" \
  200 "$(python3 -c 'import sys, urllib.request as u
try: print(u.urlopen(sys.argv[1], timeout=5).status)
except Exception as e: print(getattr(e, "code", e))' "http://127.0.0.1:${METRICS_PORT[pa]}/readyz")"
kube aa create --prefix aws4 --count 5 --marker "$MARKER_AWS"
kube aa verify --marker "$MARKER_AWS" --min 30 --what "check 4, root stopped: reads and writes"
sleep 25 # past the apiserver's 20 s cache of a good KMS check: the next /readyz asks Status again
kube aa expect-health ok --timeout 5 --what "check 4, root stopped, local KEK valid"
kill -CONT "${PID[moto]}"
for _ in $(seq 30); do
  state=$("$PLUGIN" status --socket "$work/pa/kms.sock" | grep -E '^root aws ' || true)
  case $state in *"state ok"*) break ;; esac
  sleep 1
done
case $state in
  *"state ok"*) pass "check 4: root ok again after SIGCONT: $state" ;;
  *) fail "check 4: root ok again within 30 s of SIGCONT; found: $state" ;;
esac
kube aa verify --marker "$MARKER_AWS" --min 30 --what "check 4, root back"

step "all checks passed in $((SECONDS - started)) s"
