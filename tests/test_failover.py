"""Failover for real (casfs.failover, casfs.agent): a process keeps reading files it never
read, re-reading others with their pages dropped and importing modules, through a mount
whose serving process (a FUSE-mode daemon, the kernel mode's node view) is SIGKILLed ten
times: no error, no wrong byte, every failover under a second, and reads issued while
the process was dead answered by its successor (its request counters show them). Also:
requests the dead process had taken are resent by the kernel (FUSE_NOTIFY_RESEND) and
answered; `casfs agent restart` with three mounts under readers (nothing unmounted);
an upgrade installed under running mounts; the holder itself killed; the view's object
inode numbers derived from object names."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from casfs.testing.failover import (
    Reader,
    agent_held,
    failover_image,
    killed_under_reader,
    read_now,
    running_agent,
    stop_agent_of,
    wait_served,
)
from tests.mounthelp import (
    clear_leftovers,
    cli,
    force_cleanup,
    mount_entry,
    process_alive,
    require_fuse,
    require_mode,
    start_mount,
    unmount_checked,
    wait_gone,
)

pytestmark = pytest.mark.fuse
KILLS = 10


@pytest.fixture(autouse=True)
def _fuse(tmp_path: Path) -> Any:
    require_fuse()
    yield
    assert clear_leftovers(tmp_path) == [], "mounts left behind"


def url(path: Path) -> str:
    return f"file://{path}"


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def fuse_stats(mountpoint: Path) -> dict[str, Any]:
    return dict(json.loads(os.getxattr(mountpoint, "user.casfs.stats")))


def kernel_stats(cache: Path, mountpoint: Path) -> dict[str, Any]:
    from casfs.kernel import client

    return client.stats(str(cache), str(mountpoint))


def summary(what: str, report: Any, kill_times: list[float]) -> str:
    stalls = report.reader_stalls(kill_times)
    agent = [k.agent_stall for k in report.kills]
    dead = [k.dead_read["seconds"] for k in report.kills]
    return (f"{what}: {len(report.kills)} SIGKILLs; failover (death seen -> successor "
            f"serving) max {max(agent) * 1000:.0f} ms, mean {sum(agent) / len(agent) * 1000:.0f}"
            f" ms; read issued while dead max {max(dead) * 1000:.0f} ms; reader stall per kill"
            f" max {max(stalls) * 1000:.0f} ms, total {sum(stalls) * 1000:.0f} ms; "
            f"{len(report.reader['ops'])} reader operations; resent requests "
            f"{sum(k.resent for k in report.kills)}")


def check(report: Any, kill_times: list[float]) -> None:
    reader = report.reader
    assert reader["errors"] == [] and reader["wrong"] == [], \
        (reader["errors"][:5], reader["wrong"][:5])
    assert all(op[4] for op in reader["ops"])
    assert len(report.kills) == KILLS
    assert len({k.killed_pid for k in report.kills} | {k.successor for k in report.kills}) \
        == KILLS + 1  # a new process each time
    for kill in report.kills:
        assert kill.dead_read["ok"], kill.dead_read
        assert kill.agent_stall < 1.0, kill
        assert kill.dead_read["seconds"] < 1.0, kill
        # the successor counted the read issued while its predecessor was dead
        assert kill.successor_requests >= 1, kill
    assert max(report.reader_stalls(kill_times)) < 1.0
    kinds = {op[0] for op in reader["ops"]}
    assert kinds == {"read", "reread", "import"}, kinds
    # reader operations ran across the dead windows, and went on after
    spanning = sum(1 for t in kill_times for op in reader["ops"] if op[2] <= t <= op[3])
    assert spanning >= 1
    assert max(op[3] for op in reader["ops"]) > kill_times[-1]


def test_fuse_daemon_killed_ten_times_under_a_reader(tmp_path: Path) -> None:
    store, cache, mnt = tmp_path / "store", tmp_path / "cache", tmp_path / "mnt"
    image = failover_image(tmp_path / "img", url(store))
    with running_agent(cache):
        m = start_mount(image.ref, mnt, url(store), cache, "--no-prefetch")
        try:
            report, kill_times = killed_under_reader(
                cache, str(mnt), mnt, image, lambda: fuse_stats(mnt), kills=KILLS)
            print(summary("fuse mode", report, kill_times))
            check(report, kill_times)
            held = agent_held(cache, str(mnt))
            assert held is not None and held["restarts"] == {"crash": KILLS}
            st = fuse_stats(mnt)
            assert st["failover"]["takeover"] == "crash" and st["failover"]["linked"]
            assert st["mount"]["pid"] == held["pid"]
            # the record names the serving process; casfs umount takes the mount down
            m.pid = held["pid"]
        finally:
            unmount_checked(m)


def test_node_view_killed_ten_times_under_a_reader(tmp_path: Path) -> None:
    require_mode("kernel")
    store, cache, mnt = tmp_path / "store", tmp_path / "cache", tmp_path / "mnt"
    image = failover_image(tmp_path / "img", url(store))
    with running_agent(cache) as agent:
        m = start_mount(image.ref, mnt, url(store), cache, "--no-prefetch", mode="kernel")
        try:
            first = agent_held(cache, "view")  # forked by the agent (warm), held by it
            assert first is not None and parent_of(int(first["pid"])) == agent
            report, kill_times = killed_under_reader(
                cache, "view", mnt, image, lambda: kernel_stats(cache, mnt), kills=KILLS)
            print(summary("kernel mode (node view)", report, kill_times))
            check(report, kill_times)
            held = agent_held(cache, "view")
            assert held is not None and held["restarts"] == {"crash": KILLS}
            assert held["mounts"] == [str(mnt)]
            st = kernel_stats(cache, mnt)
            assert st["view"]["takeover"] == "crash"
            # reads of files the node lacked went through the re-attached view
            assert st["kernel"]["files_through_view"] >= 1
            m.pid = held["pid"]
        finally:
            unmount_checked(m)


# -- requests the dead process had taken: resent by the kernel ---------------------------------


@pytest.mark.s3
@pytest.mark.parametrize("mode", ["fuse", "kernel"])
def test_requests_taken_by_the_dead_process_are_resent(tmp_path: Path, seaweed: Any,
                                                       mode: str) -> None:
    """The store answers after 400 ms (a latency proxy in front of SeaweedFS): a read is
    in the serving process when it is killed; the kernel resends it to the successor
    (FUSE_NOTIFY_RESEND, Linux 6.9+), which answers it."""
    from casfs.testing.faults import s3_environment
    from casfs.testing.proxy import LatencyProxy
    from casfs.testing.seaweed import s3_env

    require_mode(mode)
    bucket = f"s3://{seaweed.make_bucket()}/casfs"
    with s3_environment(seaweed):
        image = failover_image(tmp_path / "img", bucket, n_files=20, n_modules=2, n_spare=0)
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    key = "view" if mode == "kernel" else str(mnt)
    with LatencyProxy("127.0.0.1", seaweed.s3_port, latency_ms=400) as proxy:
        env = s3_env(seaweed, proxy.url)
        with running_agent(cache, env=env):
            m = start_mount(image.ref, mnt, bucket, cache, "--no-prefetch", env=env, mode=mode)
            try:
                names = sorted(image.files)[:3]
                for rel in names:
                    held = wait_served(cache, key)
                    result: dict[str, Any] = {}
                    reading = threading.Thread(target=lambda r=rel, out=result: out.update(
                        read_now(mnt / r, image.files[r])))
                    reading.start()
                    time.sleep(0.15)  # the read is in the process, waiting on the store
                    os.kill(int(held["pid"]), signal.SIGKILL)
                    reading.join(30)
                    assert result.get("ok"), result
                    wait_served(cache, key, not_pid=int(held["pid"]))
                st = fuse_stats(mnt) if mode == "fuse" else kernel_stats(cache, mnt)
                resent = (st.get("failover") or st.get("view") or {})["resent_requests"]
                assert resent >= 1, st
                m.pid = int(wait_served(cache, key)["pid"])
            finally:
                unmount_checked(m)


# -- upgrades -----------------------------------------------------------------------------------


def mount_ids(*mountpoints: Path) -> list[str]:
    """The kernel's mount IDs: an unmount and remount would change them."""
    ids = []
    for mp in mountpoints:
        with open("/proc/self/mountinfo") as f:
            ids += [line.split()[0] for line in f if line.split()[4] == str(mp)]
    return ids


def test_agent_restart_with_three_mounts_serving_readers(tmp_path: Path) -> None:
    require_mode("kernel")
    store, cache = tmp_path / "store", tmp_path / "cache"
    image = failover_image(tmp_path / "img", url(store), n_files=900, n_modules=150)
    names = [p for p in sorted(image.files) if p not in image.spare]
    mnts = [tmp_path / "m1", tmp_path / "m2", tmp_path / "k1"]
    with running_agent(cache) as old_agent:
        mounts = [start_mount(image.ref, mnts[0], url(store), cache, "--no-prefetch"),
                  start_mount(image.ref, mnts[1], url(store), cache, "--no-prefetch"),
                  start_mount(image.ref, mnts[2], url(store), cache, "--no-prefetch",
                              mode="kernel")]
        try:
            before = {key: agent_held(cache, key) for key in (str(mnts[0]), str(mnts[1]), "view")}
            ids = mount_ids(*mnts)
            readers = [Reader(mp, image, tmp_path / f"r{i}", files=names[i::3])
                       for i, mp in enumerate(mnts)]
            results = []
            try:
                time.sleep(1.0)
                out = cli("agent", "restart", "--cache-dir", str(cache), timeout=120)
                time.sleep(1.0)
            finally:
                results = [r.stop() for r in readers]
            print(out.stdout)
            assert out.returncode == 0, out.stdout + out.stderr
            assert "3 daemons replaced, nothing unmounted" in out.stdout, out.stdout
            for res in results:
                assert res["errors"] == [] and res["wrong"] == [], res["errors"][:5]
                assert len(res["ops"]) > 50
            assert mount_ids(*mnts) == ids  # nothing unmounted, nothing remounted
            assert wait_gone(old_agent, 10)
            for key, was in before.items():
                now = wait_served(cache, key)
                assert was is not None and now["pid"] != was["pid"]
                assert now["restarts"] == {"handover": 1}
            stalls = [float(line.rsplit(",", 1)[1].split()[0]) for line in
                      out.stdout.splitlines() if "->" in line]
            assert len(stalls) == 3 and max(stalls) < 1000, stalls
            for m, key in zip(mounts, (str(mnts[0]), str(mnts[1]), "view"), strict=True):
                m.pid = int(wait_served(cache, key)["pid"])
        finally:
            for m in mounts:
                unmount_checked(m)


def test_an_upgrade_installed_under_running_mounts(tmp_path: Path) -> None:
    """casfs is upgraded (another copy of the code, one file changed) under a mount and
    its reader: stopping the old agent and starting the new one (what `systemctl
    restart` does with KillMode=process) adopts the old daemon, sees it runs other code
    and replaces it; nothing unmounted, no read fails."""
    store, cache, mnt = tmp_path / "store", tmp_path / "cache", tmp_path / "mnt"
    image = failover_image(tmp_path / "img", url(store), n_files=600, n_modules=100)
    new = tmp_path / "new"
    root = Path(__file__).resolve().parent.parent
    for package in ("casfs", "prefetch", "indexer"):
        shutil.copytree(root / package, new / package,
                        ignore=shutil.ignore_patterns("__pycache__", "work", "results"))
    with open(new / "casfs" / "__init__.py", "a") as f:
        f.write("# upgraded\n")
    new_env = {"PYTHONPATH": str(new)}
    with running_agent(cache) as old_agent:
        m = start_mount(image.ref, mnt, url(store), cache, "--no-prefetch")
        try:
            old = agent_held(cache, str(mnt))
            assert old is not None
            ids = mount_ids(mnt)
            reader = Reader(mnt, image, tmp_path / "r")
            try:
                time.sleep(0.5)
                cli("agent", "stop", "--cache-dir", str(cache), check=True)
                assert wait_gone(old_agent, 10)
                # the new casfs: its own directory first on the path (python -m puts the
                # working directory first)
                out = subprocess.run(
                    [sys.executable, "-m", "casfs.cli", "agent", "start", "--cache-dir",
                     str(cache)], cwd=new, env={**os.environ, **new_env}, capture_output=True,
                    text=True, check=True, timeout=60).stdout
                deadline = time.monotonic() + 20
                while True:
                    held = agent_held(cache, str(mnt))
                    if held and held["state"] == "serving" and held["pid"] != old["pid"] \
                            and held["linked"]:
                        break
                    assert time.monotonic() < deadline, held
                    time.sleep(0.05)
                time.sleep(0.5)
            finally:
                res = reader.stop()
            assert res["errors"] == [] and res["wrong"] == [], res["errors"][:5]
            report = json.loads(cli("agent", "status", "--cache-dir", str(cache), "--json",
                                    check=True).stdout)["agent"]
            assert report["code"] != old["code"]  # the new casfs
            assert held["code"] == report["code"] and held["restarts"] == {"handover": 1}
            assert mount_ids(mnt) == ids
            assert "agent serving" in out
            m.pid = held["pid"]
        finally:
            unmount_checked(m)
            stop_agent_of(cache)


# -- the holder killed --------------------------------------------------------------------------


def test_the_holder_killed(tmp_path: Path) -> None:
    """SIGKILL to the agent: every mount keeps serving (each daemon holds its own
    connection), without failover; `casfs agent status` says the agent died (1). A
    daemon dying then leaves its mount stale, as without an agent. The next agent adopts
    the daemons still running (they link to it by themselves), and failover is back."""
    store, cache = tmp_path / "store", tmp_path / "cache"
    image = failover_image(tmp_path / "img", url(store), n_files=60, n_modules=2, n_spare=10)
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    with running_agent(cache) as agent:
        a = start_mount(image.ref, m1, url(store), cache, "--no-prefetch")
        b = start_mount(image.ref, m2, url(store), cache, "--no-prefetch")
        try:
            os.kill(agent, signal.SIGKILL)
            assert wait_gone(agent, 10)
            assert cli("agent", "status", "--cache-dir", str(cache)).returncode == 1
            spare = list(image.spare)
            for mp in (m1, m2):
                rel = spare.pop()
                assert read_now(mp / rel, image.files[rel])["ok"]
            # without a holder, a daemon's death is the mount's: stale (ENOTCONN)
            os.kill(b.pid, signal.SIGKILL)
            assert wait_gone(b.pid, 10)
            rel = spare.pop()
            res = read_now(m2 / rel, image.files[rel])
            assert not res["ok"] and res["error"].startswith(("107", "103")), res
            # a new agent: the live daemon links to it, and is failed over again
            with running_agent(cache):
                held = wait_served(cache, str(m1), timeout=15)
                assert held["pid"] == a.pid and held["state"] == "serving"
                os.kill(a.pid, signal.SIGKILL)
                rel = spare.pop()
                assert read_now(m1 / rel, image.files[rel])["ok"]
                a.pid = int(wait_served(cache, str(m1), not_pid=a.pid)["pid"])
                unmount_checked(a)
        finally:
            for m in (a, b):
                if mount_entry(m.mountpoint) is not None:
                    force_cleanup(m.mountpoint, m.pid if process_alive(m.pid) else None)


# -- the view's inode numbers -----------------------------------------------------------------


def test_view_object_numbers_come_from_names_and_an_ambiguous_one_is_refused() -> None:
    import errno

    from casfs.errors import FsError
    from casfs.kernel.view import OBJECT_INO_BIT, ObjectView, object_ino
    from casfs.manifest.objects import ObjectTable, encode_table

    a = bytes.fromhex("11" * 32)
    b = bytes.fromhex("11" * 7 + "21" + "00" * 24)  # not the same 62 bits
    c = bytes.fromhex("11" * 7 + "12" + "ff" * 24)  # the same first 62 bits as a
    assert object_ino(a) == object_ino(c) != object_ino(b)
    assert all(object_ino(n) & OBJECT_INO_BIT and object_ino(n) < 1 << 63 for n in (a, b, c))

    class Source:
        def __init__(self, names: list[bytes]) -> None:
            self.table = ObjectTable(encode_table({i + 1: n for i, n in enumerate(names)}))
            self.closed = False

    one, two = Source([a, b]), Source([c])
    view = ObjectView(lambda: [one])  # type: ignore[list-item, return-value]
    assert view._name_of(object_ino(a)) == a and view._name_of(object_ino(b)) == b
    with pytest.raises(FsError) as missing:
        view._name_of(object_ino(b"\x22" * 32))
    assert missing.value.errno == errno.ENOENT
    both = ObjectView(lambda: [one, two])  # type: ignore[list-item, return-value]
    with pytest.raises(FsError) as ambiguous:
        both._name_of(object_ino(a))
    assert ambiguous.value.errno == errno.EIO and both.ambiguous == 1
