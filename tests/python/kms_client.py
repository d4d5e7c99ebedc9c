#!/usr/bin/env python3
"""KMS v2 client on Python grpcio with its DEFAULT channel options (no authority
override, so grpcio sends the percent-encoded socket path as :authority).

Applies kube-apiserver's response validation (KMSV2.md section 2) to every call and
exits non-zero with a message on the first failure. Stubs are generated from
proto/kms_v2.proto into a temporary directory on every run.

usage: kms_client.py --socket /path/kms.sock|@name [-n ROUNDS]
"""

import argparse
import importlib
import os
import re
import sys
import tempfile
import uuid

MAX_LEN = 1024
MAX_ANNOTATION_SIZE = 32 * 1024
TIMEOUT = 3.0
LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
PROTO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")


class Invalid(Exception):
    pass


def fqdn_error(key):
    """The apiserver's annotation key rule; returns why `key` fails, or None."""
    name = key[:-1] if key.endswith(".") else key
    if not name:
        return "empty"
    if len(name) > 253:
        return "longer than 253 characters"
    if "/" in name:
        return "contains '/'"
    labels = name.split(".")
    if len(labels) < 2:
        return "fewer than two labels"
    for label in labels:
        if len(label) > 63:
            return f"label {label!r} longer than 63 characters"
        if not LABEL.match(label):
            return f"label {label!r} is not a lowercase RFC 1123 label"
    return None


def check_key_id(what, key_id):
    if not key_id:
        raise Invalid(f"{what}: key_id is empty")
    if len(key_id.encode()) > MAX_LEN:
        raise Invalid(f"{what}: key_id is {len(key_id.encode())} bytes (> {MAX_LEN})")


def check_status(r):
    if r.healthz != "ok":
        raise Invalid(f'status: healthz = {r.healthz!r}, want "ok"')
    if r.version not in ("v2", "v2beta1"):
        raise Invalid(f'status: version = {r.version!r}, want "v2" or "v2beta1"')
    check_key_id("status", r.key_id)


def check_encrypt(r, status_key_id):
    if not r.ciphertext:
        raise Invalid("encrypt: ciphertext is empty")
    if len(r.ciphertext) > MAX_LEN:
        raise Invalid(f"encrypt: ciphertext is {len(r.ciphertext)} bytes (> {MAX_LEN})")
    check_key_id("encrypt", r.key_id)
    if r.key_id != status_key_id:
        raise Invalid(f"encrypt: key_id {r.key_id!r} != status key_id {status_key_id!r}")
    total = 0
    for key, value in r.annotations.items():
        why = fqdn_error(key)
        if why:
            raise Invalid(f"encrypt: annotation key {key!r} is not a valid FQDN: {why}")
        total += len(key.encode()) + len(value)
    if total > MAX_ANNOTATION_SIZE:
        raise Invalid(f"encrypt: annotations are {total} bytes (> {MAX_ANNOTATION_SIZE})")


def load_stubs(out_dir):
    from grpc_tools import protoc

    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            os.path.join(PROTO_DIR, "kms_v2.proto"),
        ]
    )
    if rc != 0:
        raise SystemExit(f"kms_client (grpcio): protoc failed with {rc}")
    sys.path.insert(0, out_dir)
    return importlib.import_module("kms_v2_pb2"), importlib.import_module("kms_v2_pb2_grpc")


def target_for(socket):
    # grpcio spells a Linux abstract socket "unix-abstract:name" (no leading @).
    if socket.startswith("@"):
        return "unix-abstract:" + socket[1:]
    return "unix://" + os.path.abspath(socket)


def run(socket, rounds, pb, pb_grpc):
    import grpc

    # Default options on purpose: this is the "percent-encoded path as :authority" client.
    with grpc.insecure_channel(target_for(socket)) as channel:
        stub = pb_grpc.KeyManagementServiceStub(channel)
        # One channel, several calls: HPACK dynamic table entries get reused.
        for i in range(rounds):
            try:
                status = stub.Status(pb.StatusRequest(), timeout=TIMEOUT, wait_for_ready=True)
                check_status(status)
                seed = os.urandom(32)
                sealed = stub.Encrypt(
                    pb.EncryptRequest(plaintext=seed, uid=str(uuid.uuid4())),
                    timeout=TIMEOUT,
                    wait_for_ready=True,
                )
                check_encrypt(sealed, status.key_id)
                opened = stub.Decrypt(
                    pb.DecryptRequest(
                        ciphertext=sealed.ciphertext,
                        uid=str(uuid.uuid4()),
                        key_id=sealed.key_id,
                        annotations=dict(sealed.annotations),
                    ),
                    timeout=TIMEOUT,
                    wait_for_ready=True,
                )
                if opened.plaintext != seed:
                    raise Invalid(
                        f"decrypt returned {opened.plaintext.hex()}, want {seed.hex()}"
                    )
            except grpc.RpcError as e:
                raise Invalid(f"round {i}: rpc failed: {e.code()}: {e.details()}") from None
            except Invalid as e:
                raise Invalid(f"round {i}: {e}") from None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="socket path, or @name for an abstract socket")
    parser.add_argument("-n", type=int, default=5, help="Status+Encrypt+Decrypt rounds on one channel")
    args = parser.parse_args()
    try:
        import grpc  # noqa: F401
        import grpc_tools  # noqa: F401
    except ImportError as e:
        print(f"kms_client (grpcio): {e}; install with: pip install grpcio grpcio-tools", file=sys.stderr)
        return 3
    with tempfile.TemporaryDirectory(prefix="kms-stubs-") as stubs:
        pb, pb_grpc = load_stubs(stubs)
        try:
            run(args.socket, args.n, pb, pb_grpc)
        except Invalid as e:
            print(f"kms_client (grpcio {grpc.__version__}): FAIL: {e}", file=sys.stderr)
            return 1
    print(f"kms_client (grpcio {grpc.__version__}): {args.n} rounds ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
