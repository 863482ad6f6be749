"""The node agent (casfs.agent): `casfs mount` asks it for an already-warm daemon; the
mounts it starts are ordinary mounts that outlive it; without a (live) agent, `casfs
mount` forks its daemon itself. Real mounts throughout."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from casfs.testing.ocibuild import file, parent_dirs
from tests.mounthelp import (
    build_and_index,
    clear_leftovers,
    cli,
    process_alive,
    require_fuse,
    start_mount,
    unmount_checked,
    wait_gone,
)

DATA = random.Random(11).randbytes(300_000)


@pytest.fixture(autouse=True)
def _fuse(tmp_path: Path) -> Iterator[None]:
    require_fuse()
    yield
    assert clear_leftovers(tmp_path) == [], "mounts left behind"


@pytest.fixture
def image(tmp_path: Path) -> tuple[str, str]:
    store = f"file://{tmp_path / 'store'}"
    ref = build_and_index(tmp_path / "img", [parent_dirs("app/x") + [file("app/data", DATA)]],
                          store)
    return ref, store


@contextlib.contextmanager
def agent(cache: Path) -> Iterator[int]:
    out = cli("agent", "start", "--cache-dir", str(cache), check=True).stdout
    pid = int(re.search(r"pid (\d+)", out).group(1))  # type: ignore[union-attr]
    try:
        yield pid
    finally:
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)
            wait_gone(pid, 10)


def mnt(tmp_path: Path, name: str) -> str:
    (tmp_path / name).mkdir(exist_ok=True)
    return str(tmp_path / name)


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_agent_starts_daemons_that_outlive_it(image: tuple[str, str], tmp_path: Path) -> None:
    ref, store = image
    cache = tmp_path / "cache"
    with agent(cache) as pid:
        status = cli("agent", "status", "--cache-dir", str(cache))
        assert status.returncode == 0 and f"pid {pid}" in status.stdout
        again = cli("agent", "start", "--cache-dir", str(cache))
        assert again.returncode != 0 and "already serves" in again.stderr

        out = cli("mount", ref, mnt(tmp_path, "m1"), "--store", store, "--cache-dir",
                  str(cache), "--mode", "fuse", check=True).stdout
        assert "by the node agent" in out
        m = start_mount(ref, tmp_path / "m2", store, cache)
        try:
            assert parent_of(m.pid) == pid  # forked by the agent, not by `casfs mount`
            assert os.getsid(m.pid) == m.pid  # in a session of its own
            assert (m.path("app/data")).read_bytes() == DATA
            # a mount that fails reports its own one-line error through the agent
            bad = cli("mount", "blake3:" + "0" * 64, mnt(tmp_path, "m3"), "--store", store,
                      "--cache-dir", str(cache), "--mode", "fuse")
            assert bad.returncode != 0 and "not found" in bad.stderr
            assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
            stop = cli("agent", "stop", "--cache-dir", str(cache), check=True)
            assert "keep serving" in stop.stdout and wait_gone(pid, 10)
            assert not (cache / "agent.sock").exists() and not (cache / "agent.pid").exists()
            assert (m.path("app/data")).read_bytes() == DATA  # the mount outlives the agent
        finally:
            unmount_checked(m)
        cli("umount", str(tmp_path / "m1"), check=True)

    # no agent: `casfs mount` forks the daemon itself
    out = cli("mount", ref, mnt(tmp_path, "m4"), "--store", store, "--cache-dir",
              str(cache), "--mode", "fuse", check=True).stdout
    try:
        assert "by the node agent" not in out
        assert (tmp_path / "m4" / "app" / "data").read_bytes() == DATA
    finally:
        cli("umount", str(tmp_path / "m4"), check=True)


def test_dead_or_stale_agent_falls_back_to_forking(image: tuple[str, str], tmp_path: Path) -> None:
    ref, store = image
    cache = tmp_path / "cache"
    with agent(cache) as pid:
        m = start_mount(ref, tmp_path / "m1", store, cache)
        try:
            os.kill(pid, signal.SIGKILL)  # kill -9: no clean-up, its socket file stays
            assert wait_gone(pid, 10) and (cache / "agent.sock").exists()
            assert (m.path("app/data")).read_bytes() == DATA
            # nobody accepts on the socket now (the daemons do not hold it): mount forks
            out = cli("mount", ref, mnt(tmp_path, "m2"), "--store", store, "--cache-dir",
                      str(cache), "--no-trace", "--mode", "fuse", check=True, timeout=30).stdout
            assert "by the node agent" not in out
            assert (tmp_path / "m2" / "app" / "data").read_bytes() == DATA
            cli("umount", str(tmp_path / "m2"), check=True)
            assert cli("agent", "status", "--cache-dir", str(cache)).returncode != 0
        finally:
            unmount_checked(m)

    # a new agent replaces the stale socket and serves
    with agent(cache) as pid2:
        m = start_mount(ref, tmp_path / "m3", store, cache)
        try:
            assert parent_of(m.pid) == pid2
        finally:
            unmount_checked(m)


def test_agent_refuses_garbage_and_keeps_serving(image: tuple[str, str], tmp_path: Path) -> None:
    ref, store = image
    cache = tmp_path / "cache"
    with agent(cache) as pid:
        for junk in (b"not json\n", b'{"protocol": 99}\n', b'{"protocol": 1, "config": {}}\n'):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(str(cache / "agent.sock"))
                s.sendall(junk)
                s.shutdown(socket.SHUT_WR)
                assert s.recv(4096).startswith(b"refused: "), junk
        # a hold message (what a serving process sends with its /dev/fuse descriptor)
        # must carry a FUSE connection and name a mount of this cache dir
        import array
        import json

        bogus = {"op": "hold", "protocol": 1, "kind": "fuse", "key": "/x", "pid": os.getpid(),
                 "init": "", "config": {}, "fds": 1}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, open(os.devnull) as f:
            s.settimeout(10)
            s.connect(str(cache / "agent.sock"))
            s.sendmsg([json.dumps(bogus).encode() + b"\n"],
                      [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [f.fileno()]))])
            assert s.recv(4096).startswith(b"refused: ")
        assert process_alive(pid)
        m = start_mount(ref, tmp_path / "m", store, cache)
        try:
            assert parent_of(m.pid) == pid and (m.path("app/data")).read_bytes() == DATA
        finally:
            unmount_checked(m)
