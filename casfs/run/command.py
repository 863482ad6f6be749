"""`casfs run`, `casfs ps` and `casfs rm`: their arguments and handlers.

`casfs run [options] <ref> [-- command args...]` mounts the image (or joins the node's
mount of the same manifest), stacks the container's writable overlay on it, writes the
OCI bundle and runs it with crun or runc, attached: stdio and signals pass through, and
casfs's exit code is the container's. casfs's own failures use codes a container
rarely does, as podman's:

    125  casfs run failed: bad options, image not found, mount or runtime failure
    126  the command was found in the image but cannot be run (not executable)
    127  the command was not found in the image
    128+N  the container's process was killed by signal N (as a shell reports it)

`casfs ps` lists containers (running ones; -a all); `casfs rm` removes exited ones (-f
kills a running one first), each with its writable layer.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from casfs.errors import CasfsError, CreateFailed, RunError
from casfs.run.runtime import (
    Runtime,
    Session,
    find_runtime,
    install_forwarding,
    restore_signals,
)
from casfs.run.spec import CommandError, Options, SpecError, build_spec, parse_volume
from casfs.run.state import Container, State, alive, is_mounted_path, umount_path

EXIT_RUN_FAILED = 125
EXIT_CANNOT_INVOKE = 126
EXIT_NOT_FOUND = 127

class Interrupted(Exception):
    """A signal arrived before the container started: clean up and stop."""

    def __init__(self, sig: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(sig).name}")
        self.sig = sig


def _err(message: str) -> None:
    print(f"casfs: error: {message}", file=sys.stderr)


# -- casfs run ----------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """The container's exit code, or 125/126/127 for casfs's own failures."""
    try:
        return _run(args)
    except CommandError as exc:
        _err(str(exc))
        return exc.code
    except Interrupted as exc:
        _err(str(exc))
        return 128 + exc.sig
    except (CasfsError, SpecError, OSError) as exc:
        _err(str(exc))
        return EXIT_RUN_FAILED


def _entrypoint(text: str | None) -> list[str] | None:
    if text is None:
        return None
    if text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SpecError(f"bad --entrypoint {text!r}: a JSON list of strings or one path")
        return value
    return [text] if text else []


def _options(args: argparse.Namespace, hostname: str) -> Options:
    command = list(args.cmd or [])
    if command and command[0] == "--":
        command = command[1:]
    security = set(args.security_opt or [])
    unknown = security - {"no-new-privileges", "no-new-privileges:true",
                          "no-new-privileges=true"}
    if unknown:
        raise SpecError(f"unsupported --security-opt {sorted(unknown)[0]!r}")
    return Options(
        command=command, entrypoint=_entrypoint(args.entrypoint), env=list(args.env or []),
        workdir=args.workdir, user=args.user,
        volumes=[parse_volume(v) for v in args.volume or []], network=args.network,
        tty=args.tty, interactive=args.interactive, read_only=args.read_only,
        no_new_privileges=bool(security), hostname=hostname)


def _load_image(args: argparse.Namespace) -> tuple[str, str, dict[str, Any]]:
    """(store URL, manifest hex digest, manifest meta) of the image args.ref names."""
    from casfs.locations import resolve_store_url
    from casfs.manifest import Manifest
    from casfs.refs import resolve_ref
    from casfs.store import open_store

    url = resolve_store_url(args.store)
    store = open_store(url)
    digest = resolve_ref(store, args.ref)
    return url, digest, Manifest(store.get_manifest(digest), digest).meta


def _mount_argv(args: argparse.Namespace, store_url: str, digest: str) -> Callable[[Path], list[str]]:
    from casfs.locations import default_cache_dir

    cache_dir = os.path.abspath(args.cache_dir or default_cache_dir())

    def argv(mnt: Path) -> list[str]:
        # --suid --dev: the mount lies under the 0700 state directory, out of every other
        # user's reach, and containers keep their setuid programs and device nodes.
        return [sys.executable, "-m", "casfs.cli", "mount", f"blake3:{digest}", str(mnt),
                "--store", store_url, "--cache-dir", cache_dir, "--cache-size", args.cache_size,
                "--mode", args.mode, "--suid", "--dev"]

    return argv


def mount_overlay(lower: Path, upper: Path, work: Path, target: Path) -> None:
    for p in (lower, upper, work):
        if any(ch in str(p) for ch in ",:\\"):
            raise RunError(f"{p}: paths with ',', ':' or '\\' cannot name overlayfs layers")
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}".encode()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"overlay", os.fsencode(str(target)), b"overlay", 0, opts) != 0:
        err = ctypes.get_errno()
        raise RunError(f"cannot mount the container's overlay on {target}: {os.strerror(err)}")


def _etc_files(cdir: Path, hostname: str, network: str) -> dict[str, str]:
    hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    resolv = ""
    if network == "host":
        with contextlib.suppress(OSError):
            hosts = Path("/etc/hosts").read_text()
        with contextlib.suppress(OSError):
            resolv = Path("/etc/resolv.conf").read_text()
    files = {"/etc/hosts": hosts + f"127.0.1.1\t{hostname}\n", "/etc/hostname": hostname + "\n",
             "/etc/resolv.conf": resolv}
    out = {}
    for dst, text in files.items():
        path = cdir / os.path.basename(dst)
        path.write_text(text)
        os.chmod(path, 0o644)
        out[dst] = str(path)
    return out


def _run(args: argparse.Namespace) -> int:
    state = State(args.state_dir).ensure()
    rt_name, rt_path = find_runtime(args.runtime)
    store_url, digest, meta = _load_image(args)
    with state.locked():
        reconcile(state)
        c = state.new_container(args.name, args.ref, digest, list(args.cmd or []), rt_name,
                                args.rm)
    hostname = c.id[:12]
    runtime = Runtime(rt_name, rt_path, state.root)
    cdir = state.container_dir(c.id)
    bundle = cdir / "bundle"
    rootfs = bundle / "rootfs"
    session: Session | None = None
    created = False
    code = EXIT_RUN_FAILED

    def on_signal(sig: int) -> None:
        if session is not None and session.pid is not None:
            session.forward(sig)
        else:
            raise Interrupted(sig)

    old = install_forwarding(on_signal)
    try:
        opts = _options(args, hostname)
        with state.locked():
            mnt = state.acquire_image(c, _mount_argv(args, store_url, digest))
        st = os.stat(mnt)
        os.chown(cdir / "upper", st.st_uid, st.st_gid)
        os.chmod(cdir / "upper", st.st_mode & 0o7777)  # the image's root, not our umask's
        mount_overlay(mnt, cdir / "upper", cdir / "work", rootfs)
        spec, argv = build_spec(meta, opts, str(rootfs), _etc_files(cdir, hostname, opts.network))
        (bundle / "config.json").write_text(json.dumps(spec, indent=1))
        c.command = argv
        session = Session(runtime, c.id, bundle, opts.tty, opts.interactive)
        try:
            c.pid = session.create()
        except CreateFailed as exc:
            created = True  # a half-created container is deleted below
            raise _create_error(runtime.name, str(exc)) from None
        created = True
        c.status = "running"
        state.save(c)
        session.start()
        code = session.wait()
        return code
    except CommandError as exc:
        code = exc.code
        raise
    finally:
        restore_signals(old)
        c.status, c.exit_code, c.finished, c.pid = "exited", code, time.time(), None
        if created:
            runtime.delete(c.id)
        _teardown(state, c, rootfs)


def _create_error(runtime: str, stderr: str) -> CasfsError:
    text = stderr.strip()
    line = text.splitlines()[-1] if text else "no message"
    low = text.lower()
    if "not found" in low or "no such file" in low:
        return CommandError(f"{runtime}: {line}", EXIT_NOT_FOUND)  # type: ignore[return-value]
    if "permission denied" in low:
        return CommandError(f"{runtime}: {line}", EXIT_CANNOT_INVOKE)  # type: ignore[return-value]
    if "hybrid mode not supported" in low:
        return RunError(f"{runtime} refuses this node's hybrid cgroup layout ({line}): use "
                        "--runtime runc, or mount the controllers of "
                        "/sys/fs/cgroup/unified/cgroup.controllers as cgroup v1 hierarchies")
    return RunError(f"{runtime} could not create the container: {line}")


def _teardown(state: State, c: Container, rootfs: Path) -> None:
    """Unmount the container's root, drop its hold on the image, remove it if --rm."""
    if is_mounted_path(rootfs):
        umount_path(rootfs)
    with state.locked():
        state.release_image(c)
        cdir = state.container_dir(c.id)
        if c.remove and not is_mounted_path(rootfs):
            shutil.rmtree(cdir, ignore_errors=True)
        elif cdir.is_dir():
            state.save(c)


def reconcile(state: State) -> None:
    """Tidy after `casfs run` processes that died (killed, node crash): a container whose
    supervisor is gone and whose process has ended is marked exited and its mounts
    released. Call under the lock."""
    for c in state.containers():
        if c.status == "exited" or alive(c.supervisor_pid, c.supervisor_start):
            continue
        if c.pid and os.path.exists(f"/proc/{c.pid}"):
            continue  # orphaned but running: `casfs rm -f` stops it
        rootfs = state.container_dir(c.id) / "bundle" / "rootfs"
        with contextlib.suppress(RunError):
            name, path = find_runtime(c.runtime)
            Runtime(name, path, state.root).delete(c.id)
        if is_mounted_path(rootfs):
            with contextlib.suppress(RunError):
                umount_path(rootfs)
        c.status, c.pid, c.finished = "exited", None, c.finished or time.time()
        state.release_image(c)
        if c.remove and not is_mounted_path(rootfs):
            shutil.rmtree(state.container_dir(c.id), ignore_errors=True)
        else:
            state.save(c)
    for digest, _users in state.image_mounts().items():
        state._maybe_unmount(digest)


# -- casfs ps -------------------------------------------------------------------------------


def _age(t: float) -> str:
    s = max(0, int(time.time() - t))
    for unit, n in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if s >= n:
            return f"{s // n} {unit} ago"
    return f"{s} seconds ago"


def _status(c: Container) -> str:
    if c.status == "running":
        return "Up" + ("" if alive(c.supervisor_pid, c.supervisor_start) else " (detached)")
    if c.status == "exited":
        code = "?" if c.exit_code is None else str(c.exit_code)
        return f"Exited ({code}) {_age(c.finished or c.created)}"
    return c.status.capitalize()


def cmd_ps(args: argparse.Namespace) -> int:
    try:
        state = State(args.state_dir).ensure()
        with state.locked():
            reconcile(state)
            found = state.containers()
    except CasfsError as exc:
        _err(str(exc))
        return EXIT_RUN_FAILED
    if not args.all:
        found = [c for c in found if c.status == "running"]
    if args.json:
        print(json.dumps([{"id": c.id, "name": c.name, "image": c.image,
                           "manifest": f"blake3:{c.digest}", "command": c.command,
                           "created": c.created, "status": c.status, "exit_code": c.exit_code,
                           "pid": c.pid, "runtime": c.runtime} for c in found], indent=2))
        return 0
    if args.quiet:
        for c in found:
            print(c.id[:12])
        return 0
    rows = [("CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "NAMES")]
    for c in found:
        cmd = " ".join(c.command)
        rows.append((c.id[:12], c.image[:40], cmd if len(cmd) <= 30 else cmd[:27] + "...",
                     _age(c.created), _status(c), c.name))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0


# -- casfs rm -------------------------------------------------------------------------------


def cmd_rm(args: argparse.Namespace) -> int:
    try:
        state = State(args.state_dir).ensure()
    except CasfsError as exc:
        _err(str(exc))
        return EXIT_RUN_FAILED
    failed = False
    for what in args.containers:
        try:
            remove_container(state, what, args.force)
            print(what)
        except CasfsError as exc:
            _err(str(exc))
            failed = True
    return EXIT_RUN_FAILED if failed else 0


def remove_container(state: State, what: str, force: bool, timeout: float = 15.0) -> None:
    with state.locked():
        reconcile(state)
        c = state.find(what)
    if c.status != "exited":
        if not force:
            raise RunError(f"container {c.name} is running: casfs rm -f to kill and remove it")
        with contextlib.suppress(RunError):
            name, path = find_runtime(c.runtime)
            Runtime(name, path, state.root).kill(c.id, "KILL")
        if c.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.pid, signal.SIGKILL)
        # its `casfs run` notices the exit and tidies up; wait for that
        deadline = time.monotonic() + timeout
        while alive(c.supervisor_pid, c.supervisor_start) and time.monotonic() < deadline:
            time.sleep(0.05)
        with state.locked():
            reconcile(state)
    with state.locked():
        current = state.load(c.id)
        if current is None:
            return  # removed by its own --rm
        rootfs = state.container_dir(c.id) / "bundle" / "rootfs"
        if is_mounted_path(rootfs):
            umount_path(rootfs)
        state.release_image(current)
        if is_mounted_path(rootfs):
            raise RunError(f"{rootfs} is still mounted: not removing {c.name}")
        shutil.rmtree(state.container_dir(c.id))
