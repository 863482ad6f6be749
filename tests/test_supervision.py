"""Supervision (issue 15): the systemd units pass `systemd-analyze verify`; the agent tells
a service manager it is ready on $NOTIFY_SOCKET (a socket this test listens on; systemd
is not PID 1 here), pings its watchdog, logs to the journal (stderr) with the daemons it
starts when supervised, and a restart's successor reports its MAINPID; SIGHUP reopens
log files and never unmounts; daemon logs are rotated past their size cap; `casfs agent
status` exits as systemctl does; one Prometheus endpoint for the node, every mount's
series labelled by image and mode, restarts counted, mounts made before the agent
adopted."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from casfs.testing.failover import (
    agent_held,
    failover_image,
    read_now,
    running_agent,
    stop_agent_of,
    wait_served,
)
from tests.mounthelp import (
    CASFS,
    clear_leftovers,
    cli,
    is_mounted,
    require_fuse,
    require_mode,
    start_mount,
    unmount_checked,
    wait_gone,
)

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "contrib" / "systemd"


def url(path: Path) -> str:
    return f"file://{path}"


@pytest.fixture
def fuse(tmp_path: Path) -> Iterator[None]:
    require_fuse()
    yield
    assert clear_leftovers(tmp_path) == [], "mounts left behind"


@pytest.fixture
def image(tmp_path: Path) -> tuple[str, dict[str, bytes], Path]:
    store = tmp_path / "store"
    img = failover_image(tmp_path / "img", url(store), n_files=40, n_modules=2, n_spare=0)
    return img.ref, img.files, store


# -- the units --------------------------------------------------------------------------------


@pytest.mark.parametrize("unit,instance", [("casfs-agent.service", None),
                                           ("casfs-agent@.service", "srv-casfs")])
def test_systemd_units_verify(tmp_path: Path, unit: str, instance: str | None) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    casfs = shutil.which("casfs")
    assert casfs, "the casfs entry point is not installed"
    text = (UNITS / unit).read_text()
    assert "Type=notify" in text and "KillMode=process" in text and "NotifyAccess=all" in text
    # verify checks that the executables exist: point them at this machine's casfs
    name = unit if instance is None else unit.replace("@.", f"@{instance}.")
    (tmp_path / name).write_text(text.replace("/usr/local/bin/casfs", casfs))
    out = subprocess.run([analyze, "verify", str(tmp_path / name)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    noise = [line for line in out.stderr.splitlines()
             if "casfs" in line and ("ignoring" in line or "Unknown" in line)]
    assert noise == [], out.stderr


# -- readiness, the journal, the watchdog --------------------------------------------------------


class NotifySocket:
    """What a service manager listens on: a datagram socket named by $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def wait_for(self, what: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.messages:
                if what in message:
                    return message
            with contextlib.suppress(TimeoutError):
                self.messages.append(self.sock.recv(4096).decode())
        raise AssertionError(f"no {what!r} on the notify socket: {self.messages}")

    def close(self) -> None:
        self.sock.close()


def test_agent_under_a_service_manager(fuse: None, tmp_path: Path,
                                       image: tuple[str, dict[str, bytes], Path]) -> None:
    ref, files, store = image
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    notify = NotifySocket(tmp_path / "notify")
    journal_r, journal_w = os.pipe()
    st = os.fstat(journal_w)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "300000",
           "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    env.pop("CASFS_STORE", None)
    agent = subprocess.Popen([*CASFS, "agent", "start", "--foreground", "--cache-dir",
                              str(cache)], stdout=subprocess.DEVNULL, stderr=journal_w,
                             env=env)
    journal = b""
    try:
        ready = notify.wait_for("READY=1")
        assert f"MAINPID={agent.pid}" in ready
        notify.wait_for("WATCHDOG=1")
        m = start_mount(ref, mnt, url(store), cache, "--no-prefetch")
        try:
            rel = sorted(files)[0]
            assert (mnt / rel).read_bytes() == files[rel]
            # the daemon logs where the agent does: the journal, not a file
            assert not m.log_path.exists()
            # a restart (ExecReload: the same journal, the same notify socket): its
            # successor becomes the service's main process
            out = subprocess.run([*CASFS, "agent", "restart", "--cache-dir", str(cache)],
                                 stdout=subprocess.PIPE, stderr=journal_w, env=env, text=True,
                                 check=True, timeout=120).stdout
            os.close(journal_w)
            journal_w = -1
            new_pid = int(re.search(r"agent restarted \(pid (\d+)\)", out).group(1))  # type: ignore[union-attr]
            notify.wait_for(f"MAINPID={new_pid}")
            assert agent.wait(timeout=10) == 0  # the old agent handed over and left
            held = wait_served(cache, str(mnt))
            assert held["restarts"] == {"handover": 1}
            m.pid = held["pid"]
        finally:
            unmount_checked(m)
        os.kill(new_pid, signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert wait_gone(new_pid, 10)
    finally:
        if agent.poll() is None:
            agent.kill()
        stop_agent_of(cache)
        notify.close()
        if journal_w >= 0:
            os.close(journal_w)
        os.set_blocking(journal_r, False)
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(journal_r, 1 << 16):
                journal += chunk
        os.close(journal_r)
    text = journal.decode(errors="replace")
    assert f"casfs[{agent.pid}] INFO casfs.agent: agent {agent.pid} serving" in text, text
    assert "casfs.daemon: mounted" in text and "casfs.daemon: took over" in text, text


# -- SIGHUP, rotation -----------------------------------------------------------------------------


def test_sighup_reopens_the_log_and_never_unmounts(fuse: None, tmp_path: Path,
                                                   image: tuple[str, dict[str, bytes], Path]
                                                   ) -> None:
    ref, files, store = image
    cache = tmp_path / "cache"
    names = sorted(files)
    m = start_mount(ref, tmp_path / "mnt", url(store), cache, "--no-prefetch")
    try:
        moved = m.log_path.with_name(m.log_path.name + ".old")
        os.rename(m.log_path, moved)  # what logrotate does before it signals
        os.kill(m.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not (m.log_path.exists() and "log file reopened" in m.log()):
            assert time.monotonic() < deadline, "the log was not reopened"
            time.sleep(0.05)
        assert is_mounted(m.mountpoint) and m.path(names[0]).read_bytes() == files[names[0]]
        assert "unmounting" not in m.log() + moved.read_text()
        assert "log file reopened" not in moved.read_text()
    finally:
        unmount_checked(m)


def test_sighup_to_the_node_view_and_the_agent(fuse: None, tmp_path: Path,
                                              image: tuple[str, dict[str, bytes], Path]) -> None:
    require_mode("kernel")
    ref, files, store = image
    cache = tmp_path / "cache"
    with running_agent(cache) as agent:
        m = start_mount(ref, tmp_path / "mnt", url(store), cache, "--no-prefetch",
                        mode="kernel")
        try:
            for pid, log in ((m.pid, m.log_path), (agent, cache / "logs" / "agent.log")):
                os.rename(log, log.with_name(log.name + ".old"))
                os.kill(pid, signal.SIGHUP)
                deadline = time.monotonic() + 10
                while not (log.exists() and "log file reopened" in log.read_text()):
                    assert time.monotonic() < deadline, f"{log} was not reopened"
                    time.sleep(0.05)
            rel = sorted(files)[1]
            assert is_mounted(m.mountpoint) and m.path(rel).read_bytes() == files[rel]
            assert agent_held(cache, "view")["pid"] == m.pid  # type: ignore[index]
        finally:
            unmount_checked(m)


def test_daemon_logs_are_rotated_past_their_cap(fuse: None, tmp_path: Path,
                                               image: tuple[str, dict[str, bytes], Path]) -> None:
    ref, files, store = image
    env = {"CASFS_LOG_MAX_BYTES": "4000", "CASFS_LOG_KEEP": "2",
           "CASFS_LOG_CHECK_SECONDS": "0.1"}
    m = start_mount(ref, tmp_path / "mnt", url(store), tmp_path / "cache", "--no-prefetch",
                    env=env)
    try:
        log = m.log_path
        deadline = time.monotonic() + 30
        while not log.with_name(log.name + ".2").exists():
            assert time.monotonic() < deadline, sorted(p.name for p in log.parent.iterdir())
            os.kill(m.pid, signal.SIGHUP)  # each one logs a line
            time.sleep(0.01)
        time.sleep(0.3)
        kept = sorted(p.name for p in log.parent.iterdir() if p.name.startswith(log.name))
        assert kept == [log.name, log.name + ".1", log.name + ".2"], kept  # never a .3
        for name in kept[1:]:
            size = (log.parent / name).stat().st_size
            assert 4000 < size < 4000 + 64 * 1024, (name, size)  # one check period over
        assert "log rotated" in log.read_text() + (log.parent / kept[1]).read_text()
        assert m.path(sorted(files)[2]).read_bytes() == files[sorted(files)[2]]
    finally:
        unmount_checked(m)


# -- status --------------------------------------------------------------------------------------


def test_agent_status_exit_codes_are_systemctls(fuse: None, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert cli("agent", "status", "--cache-dir", str(cache)).returncode == 3
    with running_agent(cache) as pid:
        out = cli("agent", "status", "--cache-dir", str(cache))
        assert out.returncode == 0 and f"pid {pid}" in out.stdout
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid, 10)
        dead = cli("agent", "status", "--cache-dir", str(cache))
        assert dead.returncode == 1 and "pid file" in dead.stdout, dead.stdout


# -- node metrics --------------------------------------------------------------------------------


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return str(resp.read().decode())


def series(text: str, name: str, **labels: str) -> list[float]:
    out = []
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            out.append(float(line.rsplit(" ", 1)[1]))
    return out


def test_one_metrics_endpoint_for_the_node(fuse: None, tmp_path: Path,
                                          image: tuple[str, dict[str, bytes], Path]) -> None:
    from casfs.testing.seaweed import free_ports

    ref, files, store = image
    cache = tmp_path / "cache"
    names = sorted(files)
    port = free_ports(1)[0]
    early = start_mount(ref, tmp_path / "early", url(store), cache, "--no-prefetch")
    mounts = [early]
    try:
        with running_agent(cache, "--metrics-port", str(port)):
            # a mount made before the agent links to it by itself
            wait_served(cache, str(early.mountpoint), timeout=15)
            fuse_m = start_mount(ref, tmp_path / "f", url(store), cache, "--no-prefetch")
            mounts.append(fuse_m)
            kinds = ["fuse", "fuse"]
            if _kernel_mode():
                mounts.append(start_mount(ref, tmp_path / "k", url(store), cache,
                                          "--no-prefetch", mode="kernel"))
                kinds.append("kernel")
            for m in mounts:
                for rel in names[:5]:
                    assert m.path(rel).read_bytes() == files[rel]
            os.kill(fuse_m.pid, signal.SIGKILL)
            assert read_now(fuse_m.path(names[6]), files[names[6]])["ok"]
            fuse_m.pid = int(wait_served(cache, str(fuse_m.mountpoint), not_pid=fuse_m.pid)["pid"])
            text = scrape(port)
            for m, mode in zip(mounts, kinds, strict=True):
                labels = {"image": ref, "mode": mode, "mountpoint": str(m.mountpoint)}
                assert series(text, "casfs_mount_info", **labels) == [1.0], (labels, text[:3000])
                assert series(text, "casfs_mount_up", **labels) == [1.0]
                assert series(text, "casfs_cache_hit_ratio", **labels)
                assert series(text, "casfs_reads_total", **labels)
                assert series(text, "casfs_fetched_bytes_total", **labels)
                if mode == "fuse":
                    assert series(text, "casfs_fuse_request_duration_seconds_count",
                                  op="read", **labels)[0] >= 1
                else:  # the FUSE mounts brought the content: the kernel read it
                    assert series(text, "casfs_kernel_native_opens_total", **labels)[0] >= 1
            assert series(text, "casfs_daemon_restarts_total", mountpoint=str(fuse_m.mountpoint),
                          reason="crash") == [1.0]
            assert series(text, "casfs_failover_stall_seconds_count",
                          mountpoint=str(fuse_m.mountpoint)) == [1.0]
            assert series(text, "casfs_fuse_request_duration_seconds_bucket", op="lookup",
                          mode="fuse", le="+Inf")
            assert "casfs_agent_info{" in text and "casfs_cache_bytes " in text
            held = 2 + (1 if "kernel" in kinds else 0)  # two daemons, the view
            assert f"casfs_held_connections {float(held)}" in text
            # `casfs stats` keeps working, and shows the per-operation latencies
            js = cli("stats", str(early.mountpoint), "--json", check=True).stdout
            assert '"fuse_ops"' in js and '"lookup"' in js
            not_found = urllib.request.Request(f"http://127.0.0.1:{port}/nothing")
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(not_found, timeout=10)
            for m in mounts:
                if m.mode == "kernel":
                    m.pid = int(wait_served(cache, "view")["pid"])
                unmount_checked(m)
            mounts = []
    finally:
        for m in mounts:
            unmount_checked(m)


def _kernel_mode() -> bool:
    from mounthelp import kernel_mode_unavailable_reason

    return kernel_mode_unavailable_reason() is None


def test_agent_start_refuses_a_bad_metrics_address(tmp_path: Path) -> None:
    out = cli("agent", "start", "--cache-dir", str(tmp_path / "cache"), "--metrics-port",
              "no-such-port")
    assert out.returncode != 0 and "metrics address" in out.stderr, out.stderr
    assert not (tmp_path / "cache" / "agent.sock").exists()
