#!/usr/bin/env python3
"""Measures the plugin's memory under load, for the static pod's resource requests.

Starts BIN (a release build) on a file root key in a temporary directory, with the smallest
local KEK lifetime (max_encryptions = 1000, so local KEKs are replaced and cached all the
time), runs CONNECTIONS client connections that each make ROUNDS Encrypt + Decrypt calls in
parallel (Python grpcio, stubs generated from proto/), and prints the plugin's RSS
(VmRSS) at rest and after the load, and its peak (VmHWM) from /proc.

usage: python3 tests/deploy/measure_rss.py BIN [CONNECTIONS [ROUNDS]]
"""

import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import kms_client  # noqa: E402  (stubs and the socket target, shared with the interop test)


def memory(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields["VmRSS"], fields["VmHWM"]


def main():
    import grpc

    binary = os.path.abspath(sys.argv[1])
    connections = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2500
    with tempfile.TemporaryDirectory() as d:
        pb, pb_grpc = kms_client.load_stubs(d)
        os.makedirs(os.path.join(d, "run"), mode=0o700)
        socket = os.path.join(d, "run", "kms.sock")
        config = os.path.join(d, "config.toml")
        with open(config, "w") as f:
            f.write(
                f'socket = "{socket}"\nmetrics_listen = "127.0.0.1:0"\n'
                f'[kek]\nactive = "main"\n[keys.main]\nprovider = "file"\n'
                f'path = "{d}/main.key"\n[local_kek]\nmax_encryptions = 1000\n'
            )
        subprocess.run([binary, "keygen", "--config", config, "--key", "main"], check=True,
                       stdout=subprocess.DEVNULL)
        log = open(os.path.join(d, "plugin.log"), "w")
        plugin = subprocess.Popen([binary, "serve", "--config", config], stdout=log, stderr=log)
        try:
            target = kms_client.target_for(socket)
            with grpc.insecure_channel(target) as channel:
                stub = pb_grpc.KeyManagementServiceStub(channel)
                stub.Status(pb.StatusRequest(), timeout=30, wait_for_ready=True)
            time.sleep(0.5)
            print(f"at rest: VmRSS {memory(plugin.pid)[0]}")
            errors = []

            def client():
                options = [("grpc.use_local_subchannel_pool", 1)]
                with grpc.insecure_channel(target, options=options) as channel:
                    stub = pb_grpc.KeyManagementServiceStub(channel)
                    for _ in range(rounds):
                        seed = os.urandom(32)
                        sealed = stub.Encrypt(pb.EncryptRequest(plaintext=seed, uid=str(uuid.uuid4())),
                                              timeout=5)
                        opened = stub.Decrypt(pb.DecryptRequest(
                            ciphertext=sealed.ciphertext, uid=str(uuid.uuid4()),
                            key_id=sealed.key_id, annotations=dict(sealed.annotations)), timeout=5)
                        if opened.plaintext != seed:
                            errors.append("decrypt returned another seed")
                            return

            started = time.monotonic()
            threads = [threading.Thread(target=client) for _ in range(connections)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            took = time.monotonic() - started
            if errors:
                raise SystemExit(errors[0])
            calls = 2 * connections * rounds
            rss, hwm = memory(plugin.pid)
            print(f"{calls} calls over {connections} connections in {took:.1f} s "
                  f"({calls / took:.0f}/s): VmRSS {rss}, peak VmHWM {hwm}")
        finally:
            plugin.terminate()
            plugin.wait(timeout=15)


if __name__ == "__main__":
    main()
