#!/usr/bin/env python3
"""The end-to-end test's client for kube-apiserver and etcd (standard library only).

Talks plain HTTPS with a static bearer token (the apiserver's self-signed serving certificate on
loopback is not verified), reads etcd raw through etcdctl, and decodes the KMS v2
EncryptedObject that kube-apiserver stores after the `k8s:enc:kms:v2:<name>:` prefix.

Every check prints `PASS ...` or `FAIL ...: expected ..., found ...` and the command exits 1 on
any FAIL, so the shell script can stop loudly.

Secret values are derived from a run marker and the Secret's name (`<marker>-<name>`), so any
Secret can be verified without remembering what was written.
"""

import argparse
import base64
import http.client
import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse

FAILED = False


def report(ok, what, expected=None, found=None):
    global FAILED
    if ok:
        print(f"PASS {what}", flush=True)
    else:
        FAILED = True
        print(f"FAIL {what}: expected {expected}, found {found}", flush=True)


class Api:
    """One keep-alive HTTPS connection to one apiserver (not shared between threads)."""

    def __init__(self, server, token, timeout=30):
        u = urllib.parse.urlsplit(server)
        self.host, self.port = u.hostname, u.port
        self.token = token
        self.timeout = timeout
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # self-signed serving cert on loopback
        self.ctx = ctx
        self.conn = None

    def request(self, method, path, body=None, content_type="application/json"):
        """Returns (status, parsed JSON or text). Reconnects once on a dropped connection."""
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
            if not isinstance(body, (bytes, str)):
                body = json.dumps(body)
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPSConnection(
                    self.host, self.port, context=self.ctx, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
                break
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        text = data.decode("utf-8", "replace")
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


def value_of(marker, name):
    return f"{marker}-{name}"


def secret_body(ns, name, marker):
    v = base64.b64encode(value_of(marker, name).encode()).decode()
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": ns, "labels": {"e2e": "1"}},
            "data": {"v": v}}


def create_secret(api, ns, name, marker):
    return api.request("POST", f"/api/v1/namespaces/{ns}/secrets", secret_body(ns, name, marker))


def ensure_namespace(api, ns):
    st, body = api.request("POST", "/api/v1/namespaces",
                           {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    if st not in (201, 409):
        raise SystemExit(f"cannot create namespace {ns}: HTTP {st}: {body}")


def list_secrets(api, ns=None):
    path = f"/api/v1/namespaces/{ns}/secrets" if ns else "/api/v1/secrets"
    st, body = api.request("GET", path + "?labelSelector=e2e%3D1")
    if st != 200:
        raise SystemExit(f"GET {path}: HTTP {st}: {body}")
    return body["items"]


# --- commands ---------------------------------------------------------------------------------


def cmd_wait_ready(a):
    """Waits until /readyz is 200 (all checks, KMS included)."""
    api = Api(a.server, a.token, timeout=5)
    deadline = time.time() + a.timeout
    last = None
    while time.time() < deadline:
        try:
            st, body = api.request("GET", "/readyz")
            if st == 200:
                return
            last = f"HTTP {st}: {body}"
        except OSError as e:
            last = str(e)
            api.conn = None
        time.sleep(0.5)
    print(f"FAIL {a.server} ready within {a.timeout} s: expected /readyz 200, found {last}")
    sys.exit(1)


def cmd_health(a):
    """Prints `<status> <kms check line>` of /readyz?verbose or /healthz?verbose."""
    api = Api(a.server, a.token, timeout=10)
    st, body = api.request("GET", f"/{a.endpoint}?verbose")
    line = next((l for l in str(body).splitlines() if "kms-provider" in l), "(no kms check listed)")
    print(f"{st} {line.strip()}")


def cmd_expect_health(a):
    """Polls /readyz and /healthz until both are in the expected state (ok or failing, with the
    kms check shown accordingly) or the time is up."""
    api = Api(a.server, a.token, timeout=10)
    want_ok = a.state == "ok"
    start = time.time()
    deadline = start + a.timeout
    while True:
        seen = {}
        for ep in ("readyz", "healthz"):
            st, body = api.request("GET", f"/{ep}?verbose")
            line = next((l.strip() for l in str(body).splitlines() if "kms-provider" in l), None)
            seen[ep] = (st, line)
        good = all((st == 200) == want_ok and line is not None and
                   line.startswith("[+]" if want_ok else "[-]") for st, line in seen.values())
        if good or time.time() > deadline:
            break
        time.sleep(1)
    exp = "200 and [+]kms-providers ok" if want_ok else "500 and [-]kms-providers failed"
    for ep, (st, line) in seen.items():
        report(good, f"{a.what}: /{ep} {st} {line!r} (after {time.time() - start:.0f} s)", exp,
               f"{st} {line!r}")
    # The KMS check is left out of /livez on purpose: a plugin outage must not get the
    # apiserver restarted by its liveness probe.
    st, body = api.request("GET", "/livez?verbose")
    kms = [l for l in str(body).splitlines() if "kms-provider" in l]
    report(st == 200 and not kms, f"{a.what}: /livez {st} without a KMS check",
           "200, no kms-providers line", f"{st}, {kms}")
    if FAILED:
        sys.exit(1)


def cmd_create(a):
    api = Api(a.server, a.token)
    ensure_namespace(api, a.ns)
    bad = []
    for i in range(a.count):
        name = f"{a.prefix}-{i}"
        st, body = create_secret(api, a.ns, name, a.marker)
        if st != 201:
            bad.append(f"{name}: HTTP {st} {str(body)[:300]}")
    report(not bad, f"create {a.count} Secrets {a.ns}/{a.prefix}-* through {a.server}",
           "HTTP 201 each", bad[:3])
    sys.exit(1 if FAILED else 0)


def cmd_verify(a):
    """Every labelled Secret (in one namespace or all) reads back with its exact value."""
    api = Api(a.server, a.token)
    items = list_secrets(api, a.ns)
    wrong = []
    for s in items:
        name = s["metadata"]["name"]
        got = base64.b64decode(s.get("data", {}).get("v", "")).decode("utf-8", "replace")
        if got != value_of(a.marker, name):
            wrong.append(f"{name}={got!r}")
    # Single GETs too (the list may be served from the watch cache).
    for s in items[: a.gets]:
        ns, name = s["metadata"]["namespace"], s["metadata"]["name"]
        st, body = api.request("GET", f"/api/v1/namespaces/{ns}/secrets/{name}")
        got = base64.b64decode(body.get("data", {}).get("v", "")).decode() if st == 200 else st
        if got != value_of(a.marker, name):
            wrong.append(f"GET {ns}/{name}: {got!r}")
    report(len(items) >= a.min and not wrong,
           f"{a.what}: {len(items)} Secrets read back exactly through {a.server}",
           f">= {a.min} Secrets, all values exact", f"{len(items)} Secrets, wrong: {wrong[:3]}")
    sys.exit(1 if FAILED else 0)


def cmd_replace_all(a):
    """The documented storage migration, `kubectl get secrets -A -o json | kubectl replace -f -`:
    every Secret is PUT back unchanged (the apiserver rewrites it when its stored form is stale)."""
    api = Api(a.server, a.token)
    st, body = api.request("GET", "/api/v1/secrets")
    if st != 200:
        raise SystemExit(f"GET /api/v1/secrets: HTTP {st}: {body}")
    bad = []
    for s in body["items"]:
        ns, name = s["metadata"]["namespace"], s["metadata"]["name"]
        s.setdefault("apiVersion", "v1")
        s.setdefault("kind", "Secret")
        st, resp = api.request("PUT", f"/api/v1/namespaces/{ns}/secrets/{name}", s)
        if st != 200:
            bad.append(f"{ns}/{name}: HTTP {st} {str(resp)[:200]}")
    report(not bad, f"replace all {len(body['items'])} Secrets through {a.server}", "HTTP 200 each",
           bad[:3])
    sys.exit(1 if FAILED else 0)


def read_varint(b, i):
    shift = result = 0
    while True:
        if i >= len(b):
            raise ValueError("truncated varint")
        c = b[i]
        i += 1
        result |= (c & 0x7F) << shift
        if not c & 0x80:
            return result, i
        shift += 7


def decode_encrypted_object(b):
    """KMS v2 EncryptedObject: 1 encryptedData, 2 keyID, 3 encryptedDEKSource, 4 annotations
    (map<string, bytes>), 5 encryptedDEKSourceType. Returns a dict of the fields present."""
    out = {"annotations": {}}
    i = 0
    while i < len(b):
        key, i = read_varint(b, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = read_varint(b, i)
        elif wire == 2:
            n, i = read_varint(b, i)
            v, i = b[i:i + n], i + n
            if len(v) != n:
                raise ValueError("truncated field")
        else:
            raise ValueError(f"unexpected wire type {wire} for field {field}")
        if field == 1:
            out["encryptedData"] = v
        elif field == 2:
            out["keyID"] = v.decode()
        elif field == 3:
            out["encryptedDEKSource"] = v
        elif field == 4:  # map entry: 1 key, 2 value
            entry, j, k, val = v, 0, None, b""
            while j < len(entry):
                ek, j = read_varint(entry, j)
                n, j = read_varint(entry, j)
                if ek >> 3 == 1:
                    k = entry[j:j + n].decode()
                else:
                    val = entry[j:j + n]
                j += n
            out["annotations"][k] = val
        elif field == 5:
            out["encryptedDEKSourceType"] = v
    return out


def etcd_secrets(a):
    out = subprocess.run([a.etcdctl, f"--endpoints={a.etcd}", "get", "--prefix",
                          "/registry/secrets/", "-w", "json"],
                         check=True, capture_output=True).stdout
    kvs = json.loads(out).get("kvs", [])
    return [(base64.b64decode(kv["key"]).decode(), base64.b64decode(kv["value"])) for kv in kvs]


def cmd_etcd(a):
    """Reads every Secret raw from etcd: each must carry the expected prefix (and, for KMS, keyID)."""
    kvs = [(k, v) for k, v in etcd_secrets(a) if a.only is None or k.startswith(a.only)]
    counts, bad = {}, []
    for k, v in kvs:
        if not v.startswith(a.prefix.encode()):
            bad.append(f"{k}: starts {v[:40]!r}")
            continue
        if a.prefix.startswith("k8s:enc:kms:v2:"):
            try:
                obj = decode_encrypted_object(v[len(a.prefix):])
            except ValueError as e:
                bad.append(f"{k}: EncryptedObject does not decode: {e}")
                continue
            kid = obj.get("keyID", "")
            counts[kid] = counts.get(kid, 0) + 1
            if a.keyid and kid != a.keyid:
                bad.append(f"{k}: keyID {kid}")
            ann = [n for n in obj["annotations"] if n.endswith(".kek.kms-plugin.dev")]
            if not ann or len(obj.get("encryptedDEKSource", b"")) == 0:
                bad.append(f"{k}: no wrapped-KEK annotation or encryptedDEKSource")
    what = f"{a.what}: {len(kvs)} Secrets in etcd stored with prefix {a.prefix!r}"
    if a.keyid:
        what += f" and keyID {a.keyid}"
    report(len(kvs) >= a.min and not bad, what, f">= {a.min} keys, all matching",
           f"{len(kvs)} keys, keyIDs {counts}, mismatches {bad[:3]}")
    if counts:
        print(f"     keyIDs in etcd: {counts}")
    sys.exit(1 if FAILED else 0)


def cmd_keyid_of(a):
    """Prints the keyID that one Secret is stored under."""
    for k, v in etcd_secrets(a):
        if k == a.key:
            if not v.startswith(a.prefix.encode()):
                print(f"(not {a.prefix}: {v[:30]!r})")
            else:
                print(decode_encrypted_object(v[len(a.prefix):]).get("keyID", ""))
            return
    print("(absent)")


def cmd_no_plaintext(a):
    """No Secret value (raw, or base64 as in JSON) appears anywhere in etcd: its data directory
    (bbolt database and write-ahead log, every byte) and a full dump of its keys and values."""
    needles = [a.marker.encode(), base64.b64encode(a.marker.encode())[:-4]]
    hits = []
    for root, _, files in os.walk(a.data_dir):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                data = fh.read()
            hits += [f"{p}: {n!r}" for n in needles if n in data]
    dump = subprocess.run([a.etcdctl, f"--endpoints={a.etcd}", "get", "--prefix", "", "-w",
                           "json"], check=True, capture_output=True).stdout
    for kv in json.loads(dump).get("kvs", []):
        v = base64.b64decode(kv["value"])
        hits += [f"key {base64.b64decode(kv['key'])!r}" for n in needles if n in v]
    report(not hits, f"no Secret plaintext (marker {a.marker}) anywhere in etcd's data",
           "no occurrence", hits[:5])
    sys.exit(1 if FAILED else 0)


def cmd_load(a):
    """Creates `count` Secrets from `threads` concurrent clients, then reads all back; prints one
    JSON line with Secrets/s and create latency percentiles (ms)."""
    ensure_namespace(Api(a.server, a.token), a.ns)
    lat, errors, lock = [], [], threading.Lock()
    next_i = [0]

    def worker():
        api = Api(a.server, a.token)
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= a.count:
                return
            t0 = time.perf_counter()
            st, body = create_secret(api, a.ns, f"load-{i}", a.marker)
            dt = time.perf_counter() - t0
            with lock:
                if st == 201:
                    lat.append(dt)
                else:
                    errors.append(f"load-{i}: HTTP {st} {str(body)[:200]}")

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(a.threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()

    def pct(p):
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1) if lat else None

    report(not errors, f"load ({a.provider}): {a.count} creates from {a.threads} clients",
           "HTTP 201 each", errors[:3])
    print(json.dumps({"provider": a.provider, "secrets": len(lat), "threads": a.threads,
                      "seconds": round(wall, 2), "per_second": round(len(lat) / wall, 1),
                      "p50_ms": pct(0.50), "p99_ms": pct(0.99)}), flush=True)
    sys.exit(1 if FAILED else 0)


def split_docs(text):
    return [d for d in re.split(r"(?m)^---\s*$", text) if d.strip()]


def top_fields(doc):
    """apiVersion, kind and metadata.namespace of a YAML manifest (top-level keys only)."""
    f = {}
    in_meta = False
    for line in doc.splitlines():
        m = re.match(r"^(apiVersion|kind|metadata):\s*(\S*)", line)
        if m:
            in_meta = m.group(1) == "metadata"
            if not in_meta:
                f[m.group(1)] = m.group(2).strip("'\"")
            continue
        if in_meta:
            m = re.match(r"^\s+namespace:\s*(\S+)", line)
            if m:
                f["namespace"] = m.group(1).strip("'\"")
            elif re.match(r"^\S", line):
                in_meta = False
    return f


def cmd_dry_run(a):
    """Server-side dry run (`?dryRun=All`) of every Kubernetes API object in the given manifests.
    Files whose kind the apiserver does not serve (an EncryptionConfiguration, a config file)
    are listed as skipped."""
    api = Api(a.server, a.token)
    for path in a.files:
        with open(path) as fh:
            docs = split_docs(fh.read())
        for doc in docs:
            f = top_fields(doc)
            av, kind = f.get("apiVersion"), f.get("kind")
            if not av or not kind:
                print(f"SKIP {path}: not a Kubernetes object (no apiVersion/kind)")
                continue
            disc = f"/api/{av}" if "/" not in av else f"/apis/{av}"
            st, res = api.request("GET", disc)
            match = [r for r in (res.get("resources", []) if st == 200 else [])
                     if r.get("kind") == kind and "/" not in r.get("name", "")]
            if not match:
                print(f"SKIP {path}: {av} {kind} is not served by kube-apiserver (a config file)")
                continue
            r = match[0]
            ns = f.get("namespace", "default")
            if r.get("namespaced"):
                ensure_namespace(api, ns)
                # No controller-manager runs here: make the default ServiceAccount a Pod needs.
                api.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts",
                            {"apiVersion": "v1", "kind": "ServiceAccount",
                             "metadata": {"name": "default"}})
                url = f"{disc}/namespaces/{ns}/{r['name']}?dryRun=All&fieldValidation=Strict"
            else:
                url = f"{disc}/{r['name']}?dryRun=All&fieldValidation=Strict"
            st, res = api.request("POST", url, doc, content_type="application/yaml")
            report(st in (200, 201), f"server-side dry run of {path} ({kind})", "HTTP 201",
                   f"HTTP {st}: {str(res)[:500]}")
    sys.exit(1 if FAILED else 0)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--server")
    p.add_argument("--token")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("wait-ready")
    s.add_argument("--timeout", type=float, default=120)
    s.set_defaults(f=cmd_wait_ready)

    s = sub.add_parser("health")
    s.add_argument("endpoint", choices=["readyz", "healthz"])
    s.set_defaults(f=cmd_health)

    s = sub.add_parser("expect-health")
    s.add_argument("state", choices=["ok", "failing"])
    s.add_argument("--timeout", type=float, default=60)
    s.add_argument("--what", required=True)
    s.set_defaults(f=cmd_expect_health)

    for name, f in (("create", cmd_create), ("verify", cmd_verify), ("load", cmd_load)):
        s = sub.add_parser(name)
        s.add_argument("--ns", default=None if name == "verify" else "e2e")
        s.add_argument("--marker", required=True)
        s.set_defaults(f=f)
        if name == "create":
            s.add_argument("--prefix", required=True)
            s.add_argument("--count", type=int, default=1)
        if name == "verify":
            s.add_argument("--min", type=int, default=1)
            s.add_argument("--gets", type=int, default=20)
            s.add_argument("--what", default="read back")
        if name == "load":
            s.add_argument("--count", type=int, default=3000)
            s.add_argument("--threads", type=int, default=16)
            s.add_argument("--provider", required=True)

    s = sub.add_parser("replace-all")
    s.set_defaults(f=cmd_replace_all)

    for name, f in (("etcd", cmd_etcd), ("keyid-of", cmd_keyid_of),
                    ("no-plaintext", cmd_no_plaintext)):
        s = sub.add_parser(name)
        s.add_argument("--etcdctl", required=True)
        s.add_argument("--etcd", required=True)
        s.set_defaults(f=f)
        if name in ("etcd", "keyid-of"):
            s.add_argument("--prefix", required=True)
        if name == "etcd":
            s.add_argument("--keyid")
            s.add_argument("--only", help="only keys starting with this")
            s.add_argument("--min", type=int, default=1)
            s.add_argument("--what", default="stored")
        if name == "keyid-of":
            s.add_argument("--key", required=True)
        if name == "no-plaintext":
            s.add_argument("--marker", required=True)
            s.add_argument("--data-dir", required=True)

    s = sub.add_parser("dry-run")
    s.add_argument("files", nargs="+")
    s.set_defaults(f=cmd_dry_run)

    a = p.parse_args()
    a.f(a)
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
