#!/usr/bin/env python3
"""Checks Containerfile: builds the image with buildah when buildah can pull the base
images; otherwise (no container registry reachable, as on the project's CI machine) runs
the builder stage's commands on the build context and checks what the runtime stage takes
from it. Run from the repository root: python3 tests/container/build_stages.py"""

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile

# What gcr.io/distroless/cc-debian12 provides: glibc and libgcc, nothing else.
RUNTIME_LIBS = {
    "linux-vdso.so.1", "libc.so.6", "libm.so.6", "libgcc_s.so.1", "libdl.so.2",
    "libpthread.so.0", "librt.so.1", "ld-linux-x86-64.so.2",
}


def fail(message):
    print(f"Containerfile: {message}")
    sys.exit(1)


def instructions(path):
    """(INSTRUCTION, argument text) pairs, continuation lines joined, comments dropped."""
    joined, current = [], ""
    with open(path) as f:
        for line in f:
            stripped = line.strip()
            if not current and (not stripped or stripped.startswith("#")):
                continue
            if stripped.endswith("\\"):
                current += stripped[:-1] + " "
                continue
            current += stripped
            word, _, rest = current.partition(" ")
            joined.append((word.upper(), rest.strip()))
            current = ""
    return joined


def stages(steps):
    """[(name, base image, [(instruction, args)])], ARGs before the first FROM substituted."""
    args, result = {}, []
    for word, rest in steps:
        if word == "ARG" and not result:
            name, _, value = rest.partition("=")
            args[name] = value
        elif word == "FROM":
            for name, value in args.items():
                rest = rest.replace("${" + name + "}", value)
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else str(len(result))
            result.append((name, parts[0], []))
        elif result:
            result[-1][2].append((word, rest))
        else:
            fail(f"{word} before the first FROM")
    return result


def ignored(rel, patterns):
    return any(fnmatch.fnmatch(rel, p) or rel.startswith(p + "/") for p in patterns)


def copy_context(dest):
    """The build context as a builder sends it: the repository less .containerignore."""
    patterns = []
    if os.path.exists(".containerignore"):
        with open(".containerignore") as f:
            patterns = [l.strip().rstrip("/") for l in f if l.strip() and not l.startswith("#")]
    for root, dirs, files in os.walk("."):
        rel_root = os.path.relpath(root, ".")
        dirs[:] = [d for d in dirs if not ignored(os.path.normpath(os.path.join(rel_root, d)), patterns)]
        for name in files:
            rel = os.path.normpath(os.path.join(rel_root, name))
            if not ignored(rel, patterns):
                os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
                shutil.copy2(rel, os.path.join(dest, rel))
    return patterns


def buildah_can_pull(images):
    if shutil.which("buildah") is None:
        return "buildah is not installed (Debian package buildah)"
    for image in images:
        pulled = subprocess.run(["buildah", "pull", "-q", image], capture_output=True, text=True, timeout=300)
        if pulled.returncode != 0:
            return f"buildah cannot pull {image}: {pulled.stderr.strip().splitlines()[-1:]}"
    return None


def main():
    all_stages = stages(instructions("Containerfile"))
    if len(all_stages) < 2:
        fail("expected a builder stage and a runtime stage")
    build_name, _, build_steps = all_stages[0]
    _, runtime_base, runtime_steps = all_stages[-1]
    words = [w for w, _ in runtime_steps]
    if "RUN" in words:
        fail("the runtime stage runs commands; it must need no shell")
    entrypoint = [json.loads(r) for w, r in runtime_steps if w == "ENTRYPOINT"]
    if entrypoint != [["/kms-plugin", "serve"]]:
        fail(f'ENTRYPOINT must be ["/kms-plugin", "serve"], is {entrypoint}')
    users = [r for w, r in runtime_steps if w == "USER"]
    uid = users[-1].split(":")[0] if users else "0"
    if not uid.isdigit() or int(uid) == 0:
        fail(f"the runtime stage must run as a numeric non-root uid (USER), not {uid!r}")
    if not any("--locked" in r and "--release" in r for w, r in build_steps if w == "RUN"):
        fail("the builder must run cargo build --locked --release")

    why_not = buildah_can_pull([base for _, base, _ in all_stages])
    if why_not is None:
        subprocess.run(["buildah", "build", "-f", "Containerfile", "-t", "kms-plugin:test", "."], check=True)
        print("Containerfile: image built with buildah")
        return
    print(f"Containerfile: no image build here ({why_not}); running the builder stage's commands instead")
    repo = os.getcwd()
    with tempfile.TemporaryDirectory() as ctx:
        copy_context(ctx)
        # The repository's target directory, so that dependencies already built are reused.
        os.symlink(os.path.join(repo, "target"), os.path.join(ctx, "target"))
        workdir = "/"
        for word, rest in build_steps:
            if word == "WORKDIR":
                workdir = rest
            elif word == "COPY" and rest.split() != [".", "."]:
                fail(f"builder COPY {rest}: only `COPY . .` is emulated")
            elif word == "RUN":
                print(f"builder RUN {rest}")
                subprocess.run(["bash", "-euo", "pipefail", "-c", rest], cwd=ctx, check=True)
        for word, rest in runtime_steps:
            parts = rest.split()
            if word != "COPY":
                continue
            if parts[0] != f"--from={build_name}":
                fail(f"runtime COPY {rest}: only files from the builder stage are expected")
            source = os.path.relpath(parts[1], workdir)
            path = os.path.join(ctx, source)
            if not os.path.isfile(path):
                fail(f"runtime COPY: the builder stage made no {parts[1]}")
            libs = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
            needed = {line.split()[0].split("/")[-1] for line in libs.splitlines() if line.strip()}
            extra = needed - RUNTIME_LIBS
            if extra:
                fail(f"{parts[1]} needs {sorted(extra)}, which {runtime_base} does not have")
            version = subprocess.run([path, "--version"], capture_output=True, text=True, check=True)
            print(f"runtime COPY {parts[1]} -> {parts[2]}: {version.stdout.strip()}, needs only {sorted(needed)}")


if __name__ == "__main__":
    main()
