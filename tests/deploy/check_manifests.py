#!/usr/bin/env python3
"""Checks deploy/*.yaml against the plugin's configuration. Called by tests/operations/deploy.rs with
one JSON argument: what the plugin itself read from deploy/kms-plugin.toml (socket, metrics
address, key files) and the Containerfile's user. Prints every problem; exits 1 if any."""

import glob
import json
import os
import sys

try:
    import yaml
except ImportError:
    print("PyYAML is missing: python3 -m pip install pyyaml (tests/run-all.sh does)")
    sys.exit(2)

facts = json.loads(sys.argv[1])
problems = []


def check(ok, message):
    if not ok:
        problems.append(message)


def under(path, directory):
    return os.path.commonpath([path, directory]) == directory


docs = {}
for path in sorted(glob.glob("deploy/*.yaml")):
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            if doc is None:
                continue
            check(isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc,
                  f"{path}: a document without apiVersion and kind")
            docs.setdefault(doc.get("kind"), []).append((path, doc))

pods = docs.get("Pod", [])
check([p for p, _ in pods] == ["deploy/static-pod.yaml"], f"one Pod, in deploy/static-pod.yaml: {pods}")
encs = docs.get("EncryptionConfiguration", [])
check([p for p, _ in encs] == ["deploy/encryption-config.yaml"],
      f"one EncryptionConfiguration, in deploy/encryption-config.yaml: {encs}")

socket = facts["socket"]
socket_dir = os.path.dirname(socket)

for _, enc in encs:
    check(enc["apiVersion"] == "apiserver.config.k8s.io/v1", "EncryptionConfiguration apiVersion")
    kms = [p["kms"] for r in enc["resources"] for p in r["providers"] if "kms" in p]
    check(len(kms) == 1, f"one kms provider: {kms}")
    for provider in kms:
        check(provider.get("apiVersion") == "v2", "kms apiVersion must be v2")
        check(provider.get("endpoint") == "unix://" + socket,
              f"endpoint {provider.get('endpoint')} is not the plugin's socket unix://{socket}")
        check(bool(provider.get("name")), "kms provider without a name")
        check(str(provider.get("timeout", "")).endswith("s"), "kms provider without a timeout")
    secrets = [r for r in enc["resources"] if "secrets" in r["resources"]]
    check(len(secrets) == 1 and "kms" in secrets[0]["providers"][0],
          "Secrets must be written with the kms provider (first)")

for _, pod in pods:
    spec = pod["spec"]
    check(pod["metadata"].get("namespace") == "kube-system", "the static pod belongs in kube-system")
    check(spec.get("hostNetwork") is True, "hostNetwork: true (probes on the node's loopback)")
    psc = spec.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True, "runAsNonRoot: true")
    check(psc.get("runAsUser") == facts["image_uid"],
          f"runAsUser {psc.get('runAsUser')} is not the image's uid {facts['image_uid']}")
    check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "seccompProfile RuntimeDefault")
    volumes = {v["name"]: v for v in spec["volumes"]}
    for v in volumes.values():
        check("hostPath" in v, f"volume {v['name']}: only hostPath volumes are expected")
    containers = spec["containers"]
    check(len(containers) == 1, "one container")
    c = containers[0]
    sc = c.get("securityContext", {})
    check(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation: false")
    check(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem: true")
    check(sc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities: drop ALL")
    check(sc.get("privileged") in (None, False), "not privileged")
    requests = c.get("resources", {}).get("requests", {})
    check("memory" in requests and "cpu" in requests, "resource requests for cpu and memory")
    # Mounts: container path -> (host path, read-only).
    mounts = {}
    for m in c["volumeMounts"]:
        host = volumes[m["name"]]["hostPath"]["path"]
        mounts[m["mountPath"]] = (host, m.get("readOnly", False))

    def host_path(path):
        """The host path the container sees at `path`, and whether it is read-only."""
        best = max((mp for mp in mounts if under(path, mp)), key=len, default=None)
        if best is None:
            return None, None
        host, ro = mounts[best]
        return os.path.normpath(os.path.join(host, os.path.relpath(path, best))), ro

    # The socket's directory: a writable mount of the same host path, which kube-apiserver
    # mounts too (the endpoint names the host path).
    host, ro = host_path(socket)
    check(host == socket and ro is False,
          f"socket {socket} must be on a writable hostPath mount of {socket_dir} at the same path")
    check(socket_dir in mounts and mounts[socket_dir][0] == socket_dir,
          f"mount the socket's directory {socket_dir} itself (the plugin checks and writes it)")
    # The config: the file the container is told to read is deploy/kms-plugin.toml's name
    # in a mounted host directory (the directory, so that an atomic mv is seen).
    args = list(c.get("command", [])) + list(c.get("args", []))
    check("--config" in args, "the container must get --config")
    if "--config" in args:
        config = args[args.index("--config") + 1]
        check(os.path.basename(config) == facts["config_file"],
              f"--config {config} is not {facts['config_file']}")
        host, ro = host_path(config)
        check(host is not None and os.path.dirname(config) in mounts and ro,
              f"--config {config}: mount its directory read-only")
    for key in facts["key_files"]:
        host, _ = host_path(key)
        check(host is not None, f"root key file {key} is on no mount")
    # Probes: /livez and /readyz on the metrics listener, on loopback.
    addr = facts["metrics_listen"]
    check(addr is not None, "deploy/kms-plugin.toml must set metrics_listen for the probes")
    if addr is not None:
        host, port = addr.rsplit(":", 1)
        for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz"),
                            ("startupProbe", "/livez")):
            get = c.get(probe, {}).get("httpGet", {})
            check(get.get("path") == path, f"{probe} path {get.get('path')}, expected {path}")
            check(str(get.get("port")) == port, f"{probe} port {get.get('port')} is not metrics_listen's {port}")
            check(get.get("host") == host, f"{probe} host {get.get('host')} is not metrics_listen's {host}")

for p in problems:
    print(p)
print(f"{len(pods)} pod, {len(encs)} encryption config: {len(problems)} problems")
sys.exit(1 if problems else 0)
