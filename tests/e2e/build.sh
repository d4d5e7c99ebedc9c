#!/usr/bin/env bash
# Builds (or finds in the cache) the kube-apiserver, etcd and etcdctl binaries the end-to-end test
# runs, and prints their paths as shell assignments (KUBE_APISERVER=..., ETCD=..., ETCDCTL=...).
#
# Cache: ${KMS_E2E_CACHE:-$HOME/.cache/kms-plugin-e2e}/<name>-<version>/, outside the repository;
# Go's own module and build caches stay where Go keeps them. A binary is only ever written there
# complete (built into a temp name, then moved), so an interrupted build is redone, never reused.
#
# Versions: KUBE_VERSION (default 1.37.2) and ETCD_VERSION (default 3.6.16), both served by the Go
# module proxy. kube-apiserver is built outside its repository the usual way: a go.mod that
# requires k8s.io/kubernetes and replaces each k8s.io/* staging module (which its own go.mod points
# at ./staging/src/...) with the published v0.<minor>.<patch>.
set -euo pipefail

KUBE_VERSION=${KUBE_VERSION:-1.37.2}
ETCD_VERSION=${ETCD_VERSION:-3.6.16}
cache=${KMS_E2E_CACHE:-$HOME/.cache/kms-plugin-e2e}
# The machine's Go (1.26, /usr/local/go) before Debian's golang-go (1.19, for tests/go), which
# is too old for these go.mod files.
[ -x /usr/local/go/bin/go ] && export PATH=/usr/local/go/bin:$PATH
export GOFLAGS="${GOFLAGS:-} -trimpath"
# Two shared cores: builds yield to everything else; -s -w drops symbol tables (smaller, faster link).
ldflags='-s -w'

log() { echo "[build] $*" >&2; }

# go_build DIR OUT PKG: builds PKG inside the module DIR into OUT atomically.
go_build() {
  local dir=$1 out=$2 pkg=$3 start=$SECONDS
  log "building $pkg -> $out (cold: several minutes on 2 cores)"
  (cd "$dir" && nice -n 10 go build -ldflags="$ldflags" -o "$out.tmp" "$pkg")
  mv -f "$out.tmp" "$out"
  log "built $(basename "$out") in $((SECONDS - start)) s"
}

kube_dir=$cache/kube-apiserver-$KUBE_VERSION
kube=$kube_dir/kube-apiserver
if [ ! -x "$kube" ]; then
  mkdir -p "$kube_dir/mod"
  # The staging modules kubernetes replaces with local paths, read from its own go.mod.
  gomod=$(go mod download -json "k8s.io/kubernetes@v$KUBE_VERSION" |
          python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  staging_version=v0.${KUBE_VERSION#1.}
  {
    echo "module kms-plugin-e2e/kube-apiserver"
    echo
    grep -E '^go [0-9.]+$' "$gomod"
    echo
    echo "require k8s.io/kubernetes v$KUBE_VERSION"
    echo
    echo "replace ("
    sed -nE 's#^[[:space:]]*(k8s\.io/[^[:space:]]+) => \./staging/src/.*#\t\1 => \1 '"$staging_version"'#p' "$gomod"
    echo ")"
  } >"$kube_dir/mod/go.mod"
  grep -q "k8s.io/api => k8s.io/api $staging_version" "$kube_dir/mod/go.mod" ||
    { log "no staging replaces found in $gomod"; exit 1; }
  (cd "$kube_dir/mod" && go get "k8s.io/kubernetes/cmd/kube-apiserver@v$KUBE_VERSION" >&2)
  # The version the binary reports (/version, --version); without it: v0.0.0-master.
  minor=${KUBE_VERSION#1.}; minor=${minor%%.*}
  ldflags="$ldflags -X k8s.io/component-base/version.gitVersion=v$KUBE_VERSION"
  ldflags="$ldflags -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  ldflags="$ldflags -X k8s.io/component-base/version.gitTreeState=clean"
  go_build "$kube_dir/mod" "$kube" k8s.io/kubernetes/cmd/kube-apiserver
  ldflags='-s -w'
fi

etcd_dir=$cache/etcd-$ETCD_VERSION
etcd=$etcd_dir/etcd etcdctl=$etcd_dir/etcdctl
if [ ! -x "$etcd" ] || [ ! -x "$etcdctl" ]; then
  for m in server etcdctl; do
    mkdir -p "$etcd_dir/mod-$m"
    if [ ! -f "$etcd_dir/mod-$m/go.mod" ]; then
      (cd "$etcd_dir/mod-$m" && printf 'module kms-plugin-e2e/%s\n\ngo 1.26\n' "$m" >go.mod &&
       go get "go.etcd.io/etcd/$m/v3@v$ETCD_VERSION" >&2)
    fi
  done
  [ -x "$etcd" ] || go_build "$etcd_dir/mod-server" "$etcd" go.etcd.io/etcd/server/v3
  [ -x "$etcdctl" ] || go_build "$etcd_dir/mod-etcdctl" "$etcdctl" go.etcd.io/etcd/etcdctl/v3
fi

echo "KUBE_APISERVER=$kube"
echo "ETCD=$etcd"
echo "ETCDCTL=$etcdctl"
