"""Security on a worker node, tried as an attacker would (issue 19, findings 1, 2, 3, 4,
7, 8 and 10): real mounts in both serving modes, real processes as root, as the
unprivileged user `nobody` (uid 65534) and as a second unprivileged user (uid 4242).

1. An image's setuid-root binary, 0666 device nodes and `security.capability` xattrs
   give `nobody` nothing through a default mount (nosuid, nodev, security.* hidden);
   `--suid --dev` does honour them (the same attacks then succeed: the test can fail).
2. Image content read by root through a mount cannot be found by `nobody` in the cache
   directory or in a file store casfs wrote; an existing 0755 cache directory is
   tightened to 0700.
3. A hostile stored trace (200,000 `[`, 32 MiB of `1,` or of `0.5,`) does not take the
   mount down, does not blow the daemon's memory up, and is logged and counted.
4. The node agent obeys no log path, no control characters in a mountpoint and no
   foreign cache directory from a request; the client's PATH and LD_PRELOAD reach
   neither the daemon nor the helpers it runs (nor those `casfs umount` runs).
7. A non-root user's mount records live in their own 0700 directory; another user's
   planted directory, symlink or record in /tmp is not followed and cannot make
   `casfs umount` kill an unrelated process.
8. `casfs mount --cache-dir <another user's directory>` is refused (exit 12) before
   anything is sent to a socket there.
10. Mount statistics (the `user.casfs.stats` xattr, `casfs stats`) hold no store URL.

11. A daemon's or node view's command line (`ps`) names its mountpoint or cache dir, not
   the store URL. (A file store an older casfs left open is tightened when its owner
   opens it.)

Running casfs as `nobody` needs what a normal node gives its users and this machine
does not: /dev/fuse is 0600 here (Debian ships it 0666) and the Python that runs
casfs lives under /root (0700). Such runs happen in a private mount namespace where
/dev/fuse is a 0666 node of the same device and the interpreter's prefix is bind
mounted read-only under a public directory (`UserSide`); everything else (the files,
the mount records, /tmp) is the node's own.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from casfs.testing.ocibuild import Member, directory, file
from tests.mounthelp import (
    STATS_XATTR,
    Mount,
    build_and_index,
    clear_leftovers,
    cli,
    force_cleanup,
    is_mounted,
    mount_entry,
    mounted,
    process_alive,
    require_fuse,
    unmount_checked,
    wait_gone,
    wait_stats,
)

pytestmark = pytest.mark.fuse

REPO = Path(__file__).resolve().parent.parent
NOBODY, NOGROUP = 65534, 65534
ATTACKER = 4242  # a second unprivileged user (no passwd entry needed)
MiB = 1 << 20
# A v2 file capability: cap_dac_read_search (bit 2) permitted and effective.
CAP_DAC_READ_SEARCH = bytes([1, 0, 0, 2, 4, 0, 0, 0]) + bytes(12)
OUTPUT = re.compile(r"\((?:(\w+) mode[^:]*: )?daemon pid (\d+), log (.+)\)$")
TRACE_ID = "1700000000000-0badc0de"


@pytest.fixture(autouse=True)
def _fuse() -> None:
    require_fuse()


_PUBLIC_DIRS: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def _nothing_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A safety net over each test's own cleanup: no mount of this module outlives it."""
    yield
    left = []
    for base in [tmp_path_factory.getbasetemp(), *_PUBLIC_DIRS]:
        left += clear_leftovers(base)
    for d in _PUBLIC_DIRS:
        shutil.rmtree(d, ignore_errors=True)
    assert left == [], f"mounts left behind (now cleared): {left}"


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """An empty 0755 directory every uid can reach (pytest's tmp_path is under a 0700
    directory, where no attack by another user could even start)."""
    d = Path(tempfile.mkdtemp(prefix="casfs-sec-"))
    d.chmod(0o755)
    _PUBLIC_DIRS.append(d)
    yield d
    if not clear_leftovers(d):
        shutil.rmtree(d, ignore_errors=True)


# -- helpers ----------------------------------------------------------------------------------

def file_url(path: Path) -> str:
    return f"file://{path}"


def digest_of(ref: str) -> str:
    return ref.partition(":")[2] or ref


def read_file(path: Path | str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def as_user(argv: Sequence[str], uid: int = NOBODY, gid: int = NOGROUP,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a program as another user, with no supplementary groups (root's would leak)."""
    return subprocess.run(list(argv), user=uid, group=gid, extra_groups=[], cwd="/",
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})


def vm_peak_rss(pid: int) -> int:
    """The peak resident set size of a process (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def parse_mount_output(proc: subprocess.CompletedProcess[str]) -> tuple[str, int, Path]:
    m = OUTPUT.search(proc.stdout.strip())
    assert m, f"unexpected casfs mount output: {proc.stdout!r} {proc.stderr!r}"
    return m.group(1) or "fuse", int(m.group(2)), Path(m.group(3))


@contextlib.contextmanager
def mount_told(ref: str, mountpoint: Path, store_url: str, cache_dir: Path, *args: str,
               mode: str, env: dict[str, str] | None = None
               ) -> Iterator[tuple[Mount, subprocess.CompletedProcess[str]]]:
    """`casfs mount --mode <mode>` for the block, with what the command said (stdout,
    stderr); unmounted (checked) after it, forcibly on error."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = cli("mount", ref, str(mountpoint), "--store", store_url, "--cache-dir",
               str(cache_dir), "--mode", mode, *args, env=env)
    if proc.returncode != 0:
        force_cleanup(mountpoint, None)
        raise AssertionError(f"casfs mount failed ({proc.returncode}): {proc.stderr}")
    served, pid, log = parse_mount_output(proc)
    m = Mount(mountpoint, ref, store_url, cache_dir, pid, log, list(args), served)
    try:
        yield m, proc
    except BaseException:
        force_cleanup(m.mountpoint, m.pid)
        raise
    unmount_checked(m)


# -- 1. setuid binaries, device nodes, file capabilities ------------------------------------

def privileged_layer() -> list[Member]:
    """What a hostile image author ships: a setuid-root `id`, a `cat` with
    cap_dac_read_search, a 0666 /dev/null and a 0666 block device of a loop device's
    numbers."""
    loop = os.stat("/dev/loop0").st_rdev if os.path.exists("/dev/loop0") else os.makedev(7, 0)
    return [
        directory("bin"),
        file("bin/id", read_file("/usr/bin/id"), mode=0o4755, uid=0, gid=0),
        file("bin/cat", read_file("/usr/bin/cat"), mode=0o755,
             xattrs={"security.capability": CAP_DAC_READ_SEARCH}),
        directory("dev"),
        Member("dev/null", "char", devmajor=1, devminor=3, mode=0o666),
        Member("dev/disk", "block", devmajor=os.major(loop), devminor=os.minor(loop),
               mode=0o666),
    ]


ATTACK = r"""
M=$1
echo "euid=$("$M/bin/id" -u)"
if "$M/bin/cat" /etc/shadow 2>/dev/null | grep -q '^root:'; then echo shadow=read
else echo shadow=refused; fi
if err=$( (echo x > "$M/dev/null") 2>&1 ); then echo null=written
else echo "null=$err"; fi
if err=$( (: < "$M/dev/disk") 2>&1 ); then echo disk=opened
else echo "disk=$err"; fi
"""


def attack_as_nobody(mountpoint: Path) -> dict[str, str]:
    """What `nobody` gets from the image's privileged files: euid of the setuid `id`,
    whether the capable `cat` read /etc/shadow, what opening the device nodes did."""
    proc = as_user(["/bin/sh", "-c", ATTACK, "sh", str(mountpoint)])
    out = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    for key in ("null", "disk"):  # keep the errno text only
        if "Permission denied" in out.get(key, ""):
            out[key] = "denied"
    return out


def test_image_setuid_devices_and_capabilities_give_nobody_nothing(
        public_dir: Path, tmp_path: Path, mode: str) -> None:
    # The attacks are real: /etc/shadow is closed to nobody on the node itself.
    assert as_user(["/bin/cat", "/etc/shadow"]).returncode != 0
    store = file_url(tmp_path / "store")
    ref = build_and_index(tmp_path / "img", [privileged_layer()], store)
    cache = tmp_path / "cache"

    with mount_told(ref, public_dir / "mnt", store, cache, mode=mode) as (m, told):
        got = attack_as_nobody(m.mountpoint)
        assert got == {"euid": str(NOBODY), "shadow": "refused", "null": "denied",
                       "disk": "denied"}, got
        with pytest.raises(OSError) as err:
            os.getxattr(m.path("bin/cat"), "security.capability")
        assert err.value.errno == errno.ENODATA
        assert "security.capability" not in os.listxattr(m.path("bin/cat"))
        assert os.stat(m.path("bin/id")).st_mode & 0o7777 == 0o4755  # shown as in the image
        entry = mount_entry(m.mountpoint)
        assert entry is not None and {"nosuid", "nodev"} <= set(entry["options"].split(","))
        assert "nosuid" in told.stderr and "nodev" in told.stderr, told.stderr  # said so

    # The control: asked for (as `casfs run` does under its root-only state directory),
    # the same image makes nobody root, so the checks above can fail.
    with mount_told(ref, public_dir / "mnt", store, cache, "--suid", "--dev",
                    mode=mode) as (m, told):
        assert "nosuid" not in told.stderr and "nodev" not in told.stderr, told.stderr
        got = attack_as_nobody(m.mountpoint)
        assert got["euid"] == "0" and got["shadow"] == "read" and got["null"] == "written", got
        assert got["disk"] != "denied", got  # opened, or the driver's own error
        assert os.getxattr(m.path("bin/cat"), "security.capability") == CAP_DAC_READ_SEARCH
        entry = mount_entry(m.mountpoint)
        assert entry is not None and not {"nosuid", "nodev"} & set(entry["options"].split(","))


# -- 2. private cache and store -------------------------------------------------------------

def open_to_others(top: Path) -> list[str]:
    """Files and directories under top that its group or others may use (the node
    view's FUSE mount inside a cache directory is not walked into: it is no file of
    the cache's, and the 0700 directory above it keeps others out)."""
    found = []
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if not os.path.ismount(os.path.join(root, d))]
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            if st.st_mode & 0o077 and not stat.S_ISLNK(st.st_mode):
                found.append(f"{os.path.join(root, name)} {stat.filemode(st.st_mode)}")
    return found


def test_content_read_by_root_stays_out_of_reach_of_nobody(
        public_dir: Path, tmp_path: Path, mode: str) -> None:
    marker = f"CASFS-SECRET-{secrets.token_hex(16)}"
    # Random bytes after the marker: the zstd blob in the store keeps them (and the
    # marker) verbatim, so a grep finds the content wherever it is kept.
    secret = marker.encode() + b"\n" + os.urandom(8192)
    layout = tmp_path / "img"  # the image itself is not the node's to protect
    from casfs.testing import ocibuild as ob

    ob.write_oci_layout(layout, [[file("secret", secret, mode=0o600)]], tag="t")
    store, cache = public_dir / "store", public_dir / "cache"
    indexed = cli("index", f"oci:{layout}:t", "--store", file_url(store), check=True)
    ref = indexed.stdout.strip().splitlines()[-1]
    cache.mkdir()
    cache.chmod(0o755)  # as an older casfs left it

    with mounted(ref, public_dir / "mnt", file_url(store), cache, mode=mode) as m:
        assert read_file(m.path("secret")) == secret  # root reads it through the mount
        # root finds the content on the node: the search below can find it
        seen = subprocess.run(["grep", "-r", "-l", "-a", "-F", marker, str(cache), str(store)],
                              capture_output=True, text=True, timeout=60)
        where = seen.stdout.split()
        assert any(p.startswith(f"{cache}/") for p in where), where
        assert any(p.startswith(f"{store}/") for p in where), where
        # nobody finds nothing, and cannot even look
        grep = as_user(["grep", "-r", "-l", "-a", "-F", marker, str(cache), str(store)])
        assert grep.stdout == "", f"nobody found the 0600 file's content in {grep.stdout}"
        assert "Permission denied" in grep.stderr
        for top in (cache, store):
            listing = as_user(["ls", "-A", str(top)])
            assert listing.returncode != 0 and listing.stdout == "", listing
        # the existing cache directory was tightened, the store made private, and
        # nothing casfs created in them is open to others
        assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700, "cache dir not tightened"
        assert stat.S_IMODE(os.stat(store).st_mode) == 0o700
        assert open_to_others(cache) + open_to_others(store) == []


def test_a_store_an_older_casfs_left_open_is_tightened(public_dir: Path, tmp_path: Path) -> None:
    from casfs.testing import ocibuild as ob

    marker = f"CASFS-SECRET-{secrets.token_hex(16)}"
    secret = marker.encode() + b"\n" + os.urandom(8192)
    ob.write_oci_layout(tmp_path / "img", [[file("secret", secret, mode=0o600)]], tag="t")
    ob.write_oci_layout(tmp_path / "img2", [[file("other", "other")]], tag="t")
    store = public_dir / "store"
    cli("index", f"oci:{tmp_path / 'img'}:t", "--store", file_url(store), check=True)
    for p in [store, *store.rglob("*")]:  # as casfs wrote it before (umask 022)
        p.chmod(0o755 if p.is_dir() else 0o644)
    assert as_user(["grep", "-r", "-l", "-a", "-F", marker, str(store)]).stdout != ""
    # casfs writes to the store again (a later index; a mount's trace does the same)
    cli("index", f"oci:{tmp_path / 'img2'}:t", "--store", file_url(store), check=True)
    grep = as_user(["grep", "-r", "-l", "-a", "-F", marker, str(store)])
    assert grep.stdout == "", f"nobody found the 0600 file's content in {grep.stdout}"
    assert stat.S_IMODE(os.stat(store).st_mode) == 0o700


# -- 3. hostile traces ------------------------------------------------------------------------

def hostile_trace(shape: str) -> bytes:
    """The decompressed bytes of a hostile trace."""
    if shape == "deep":  # json.loads would recurse 200,000 deep
        return b"[" * 200_000
    unit = {"ints": b"1,", "floats": b"0.5,"}[shape]
    body = unit * ((32 * MiB - 4) // len(unit))  # 32 MiB once wrapped: the size bound
    return b"[ " + body + b"1]"


@pytest.mark.parametrize("shape", ["deep", "ints", "floats"])
def test_hostile_trace_cannot_take_the_mount_down(tmp_path: Path, mode: str, shape: str) -> None:
    from casfs.store import open_store

    store = file_url(tmp_path / "store")
    content = os.urandom(300_000)
    ref = build_and_index(tmp_path / "img", [[directory("app"), file("app/data", content)]],
                          store)
    planted = hostile_trace(shape)
    assert len(planted) <= 32 * MiB
    open_store(store).put_trace(digest_of(ref), TRACE_ID, planted, [])

    with mounted(ref, tmp_path / "mnt", store, tmp_path / "cache", mode=mode) as m:
        st = wait_stats(m, lambda s: s["prefetch"].get("rejected_traces", 0) >= 1
                        or s["prefetch"].get("state") in ("done", "failed"),
                        "the planted trace to be loaded", timeout=120)
        assert read_file(m.path("app/data")) == content  # the mount serves
        assert process_alive(m.pid)
        shown = json.loads(cli("stats", "--json", str(m.mountpoint), check=True).stdout)
        pf = shown["prefetch"]
        assert pf.get("rejected_traces", 0) + pf.get("failures", 0) >= 1, (pf, st)
        assert TRACE_ID in m.log(), m.log()[-3000:]  # the failure is logged
        # Holding the 32 MiB the trace decompresses to is expected (the daemon peaks at
        # 30 MiB without it, about 60 MiB with it); building Python objects from it is
        # not (224 MiB for the ints, 417 MiB for the floats before the fix).
        peak = vm_peak_rss(m.pid)
        assert peak < 150 * MiB, f"daemon peaked at {peak / MiB:.0f} MiB parsing a trace"


# -- 4. the agent trusts nobody's settings ------------------------------------------------------

def agent_exchange(sock_path: Path, request: dict[str, Any], timeout: float = 60.0) -> list[str]:
    """Send one request line to an agent; the lines it answers until ready, an error, a
    refusal, or the end of the connection."""
    lines: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(sock_path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        buf = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            buf += chunk
            *done, buf = buf.split(b"\n")
            lines += [d.decode(errors="replace") for d in done]
            if lines and re.match(r"(ready|error: |refused: )", lines[-1]):
                break
    return lines


@contextlib.contextmanager
def agent_running(cache: Path, env: dict[str, str] | None = None) -> Iterator[int]:
    """`casfs agent start` on a cache directory for the block; stopped after it."""
    started = cli("agent", "start", "--cache-dir", str(cache), env=env, check=True)
    pid = int(re.search(r"pid (\d+)", started.stdout).group(1))  # type: ignore[union-attr]
    try:
        yield pid
    finally:
        cli("agent", "stop", "--cache-dir", str(cache))
        if not wait_gone(pid, 10):
            os.kill(pid, signal.SIGKILL)


def test_agent_requests_cannot_choose_files_or_foreign_cache_dirs(
        public_dir: Path, tmp_path: Path) -> None:
    from casfs.agent import PROTOCOL
    from casfs.mountconfig import MountConfig

    store = file_url(tmp_path / "store")
    ref = build_and_index(tmp_path / "img", [[file("hello", "hi")]], store)
    cache, other = tmp_path / "cache", public_dir / "other-cache"
    cron = public_dir / "cron.d"
    cron.mkdir()
    other.mkdir()
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def request(mountpoint: str, log_name: str, cache_dir: Path = cache) -> dict[str, Any]:
        cfg = MountConfig(ref=ref, mountpoint=mountpoint, store_url=store,
                          cache_dir=str(cache_dir), cache_size=1 << 30)
        return {"protocol": PROTOCOL, "config": cfg.as_dict(), "verbose": False,
                "env": {"PATH": os.environ.get("PATH", "")}, "log_path": str(cron / log_name)}

    with agent_running(cache):
        sock = cache / "agent.sock"
        # A well-formed mount asking for its log in a file of the requester's choosing:
        # mounted, logging where the agent decides.
        answer = agent_exchange(sock, request(str(mnt), "from-request"))
        try:
            assert answer and answer[-1] == "ready", answer
            pid = int(answer[0].split()[1])
            assert is_mounted(mnt)
            assert not (cron / "from-request").exists(), "the agent logged where asked"
            from casfs.locations import mount_log_path

            assert f"casfs[{pid}]" in mount_log_path(cache, str(mnt)).read_text()
        finally:
            if is_mounted(mnt):
                cli("umount", str(mnt), check=True)
        # A newline in the mountpoint, to forge a line in whatever file is written.
        forged = f"{mnt}\n* * * * * root touch {public_dir}/pwned\n"
        answer = agent_exchange(sock, request(forged, "cron-line"))
        assert answer and answer[-1].startswith("refused: "), answer
        # A cache directory not the agent's (another user's, say).
        answer = agent_exchange(sock, request(str(mnt), "other", cache_dir=other))
        assert answer and answer[-1].startswith("refused: "), answer
        time.sleep(0.5)  # a forked daemon would have written by now
    assert sorted(os.listdir(cron)) == [], "a request chose a file the agent wrote"
    assert sorted(os.listdir(other)) == [], "the agent wrote into a cache dir not its own"
    assert not (public_dir / "pwned").exists() and not is_mounted(mnt)
    logs = "".join(p.read_text(errors="replace") for p in (cache / "logs").glob("*"))
    assert not re.search(r"^\* \* \* \* \*", logs, re.M), "a request forged a log line"


PRELOAD_SOURCE = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

__attribute__((constructor)) static void casfs_marker(void) {
    char cmd[512] = {0}, line[700];
    int c = open("/proc/self/cmdline", O_RDONLY);
    ssize_t n = c >= 0 ? read(c, cmd, sizeof cmd - 1) : 0;
    for (ssize_t i = 0; i < n; i++) if (cmd[i] == 0) cmd[i] = ' ';
    if (c >= 0) close(c);
    int fd = open(MARKER, O_WRONLY | O_CREAT | O_APPEND, 0666);
    if (fd < 0) return;
    int len = snprintf(line, sizeof line, "%d %s\n", (int)getpid(), cmd);
    if (write(fd, line, (size_t)len) < 0) {}
    close(fd);
}
"""

FAKE_HELPER = """#!/bin/sh
echo "$0 $*" >> {marker}
exec {real} "$@"
"""


def build_marker_library(where: Path, marker: Path) -> Path:
    """A shared library that notes every process it is preloaded into."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the LD_PRELOAD marker")
    src, lib = where / "marker.c", where / "libcasfsmarker.so"
    src.write_text(PRELOAD_SOURCE)
    subprocess.run([cc, "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(lib), str(src)],
                   check=True, capture_output=True)
    return lib


def plant_helpers(where: Path, marker: Path) -> Path:
    """fusermount3, umount and mount that note they ran, then do the real thing."""
    bindir = where / "evil-bin"
    bindir.mkdir()
    for name in ("fusermount3", "umount", "mount"):
        real = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
        assert real is not None
        fake = bindir / name
        fake.write_text(FAKE_HELPER.format(marker=marker, real=real))
        fake.chmod(0o755)
    return bindir


def mounts_at(path: Path) -> int:
    """How many mounts are stacked on a path (from the mount table)."""
    target = os.fspath(path).encode()
    with open("/proc/self/mountinfo", "rb") as f:
        return sum(1 for line in f if line.split()[4] == target)


def process_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(e.decode(errors="replace").partition("=")[::2] for e in raw.split(b"\0") if e)


def test_client_path_and_ld_preload_reach_no_daemon_and_no_helper(
        public_dir: Path, tmp_path: Path, mode: str) -> None:
    store = file_url(tmp_path / "store")
    ref = build_and_index(tmp_path / "img", [[file("hello", "hi")]], store)
    cache, mnt = tmp_path / "cache", tmp_path / "mnt"
    mnt.mkdir()
    helpers_ran, preloaded = public_dir / "helpers-ran", public_dir / "preloaded"
    bindir = plant_helpers(public_dir, helpers_ran)
    lib = build_marker_library(public_dir, preloaded)
    hostile = {"PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
               "LD_PRELOAD": str(lib)}

    def mount() -> int:
        done = cli("mount", ref, str(mnt), "--store", store, "--cache-dir", str(cache),
                   "--mode", mode, env=hostile)
        assert done.returncode == 0, done.stderr
        pid = parse_mount_output(done)[1]
        if mode == "fuse":  # a daemon of the agent, whose environment is the request's
            assert "by the node agent" in done.stdout, done.stdout
            env = process_environ(pid)
            assert "LD_PRELOAD" not in env and str(bindir) not in env.get("PATH", ""), env
        return pid

    pid = None
    with contextlib.ExitStack() as stack:
        if mode == "fuse":  # FUSE daemons come from the node agent, started cleanly
            agent = stack.enter_context(agent_running(cache))
        try:
            pid = mount()
            if mode == "fuse":
                # An agent holding the connection would replace a killed daemon
                # (failover): without one, the daemon's death leaves a stale mount.
                os.kill(agent, signal.SIGKILL)
                assert wait_gone(agent, 10)
            # The daemon dies (killed): the next mount finds a stale mount to clear,
            # which the daemon (FUSE) or the node view (kernel) does with a system helper.
            os.kill(pid, signal.SIGKILL)
            assert wait_gone(pid, 10)
            assert mounts_at(mnt) == 1  # stale, to be cleared
            if mode == "fuse":
                stack.enter_context(agent_running(cache))  # a new agent for the next mount
            pid = mount()
            assert mounts_at(mnt) == 1, "the stale mount was not cleared"
            assert read_file(mnt / "hello") == b"hi"
            gone = cli("umount", str(mnt), env=hostile)  # the same PATH and LD_PRELOAD
            assert gone.returncode == 0, gone.stderr
            assert not is_mounted(mnt) and wait_gone(pid, 15)
            pid = None
        except BaseException:
            force_cleanup(mnt, pid)
            raise
    assert not helpers_ran.exists(), f"planted helpers ran: {helpers_ran.read_text()}"
    marks = preloaded.read_text().splitlines() if preloaded.exists() else []
    assert any("casfs.cli" in line for line in marks), "the marker library never ran"
    foreign = [line for line in marks if "casfs.cli" not in line]
    assert foreign == [], f"LD_PRELOAD reached processes casfs started: {foreign}"


# -- running casfs as an unprivileged user ------------------------------------------------------

class UserSide:
    """Runs programs (casfs among them) as `nobody` in a private mount namespace that
    looks like a normal node to its users: /dev/fuse usable by everyone, the Python
    running casfs reachable. Files, /tmp and mount records are the node's own."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.prefix = Path(sys.base_prefix).resolve()
        try:
            rel = Path(sys.executable).resolve().relative_to(self.prefix)
        except ValueError:
            pytest.skip(f"{sys.executable} is not under its prefix {self.prefix}")
        self.py_root = base / "py"
        self.py_root.mkdir()
        self.python = self.py_root / rel
        self.fuse = base / "fuse"
        os.mknod(self.fuse, 0o666 | stat.S_IFCHR, os.stat("/dev/fuse").st_rdev)
        self.fuse.chmod(0o666)

    def _setup(self, uid: int, gid: int) -> str:
        return (f"mount --bind {self.fuse} /dev/fuse && "
                f"mount --bind {self.prefix} {self.py_root} && "
                f"mount -o remount,bind,ro {self.py_root} && "
                f"exec setpriv --reuid={uid} --regid={gid} --clear-groups -- \"$@\"")

    def argv(self, cmd: Sequence[str], uid: int = NOBODY, gid: int = NOGROUP,
             join: int | None = None) -> list[str]:
        """cmd as uid in a new such namespace, or in that of process `join`."""
        if join is not None:
            return ["nsenter", "-m", "-t", str(join), "setpriv", f"--reuid={uid}",
                    f"--regid={gid}", "--clear-groups", "--", *cmd]
        return ["unshare", "-m", "--propagation", "private", "sh", "-c",
                self._setup(uid, gid), "sh", *cmd]

    def env(self, **extra: str) -> dict[str, str]:
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "PYTHONPATH": str(REPO),
               "LD_LIBRARY_PATH": str(self.py_root / "lib"), "PYTHONDONTWRITEBYTECODE": "1"}
        env.update(extra)
        return env

    def casfs(self, *args: str, env: dict[str, str], join: int | None = None,
              timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv([str(self.python), "-m", "casfs.cli", *args],
                                        join=join),
                              env=env, capture_output=True, text=True, timeout=timeout,
                              cwd="/", stdin=subprocess.DEVNULL)

    def python_popen(self, code: str, *args: str, env: dict[str, str],
                     uid: int = NOBODY, gid: int = NOGROUP) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv([str(self.python), "-c", code, *args], uid, gid),
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd="/", stdin=subprocess.DEVNULL)


@pytest.fixture
def user_side(public_dir: Path) -> UserSide:
    for tool in ("unshare", "nsenter", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (util-linux) is needed to run casfs as nobody")
    return UserSide(public_dir)


@pytest.fixture
def nobody_image(public_dir: Path, user_side: UserSide) -> dict[str, Any]:
    """A home for nobody (0700), an image indexed by nobody into their own store."""
    from casfs.testing import ocibuild as ob

    home = public_dir / "home"
    home.mkdir(mode=0o700)
    os.chown(home, NOBODY, NOGROUP)
    layout = public_dir / "img"
    ob.write_oci_layout(layout, [[file("hello", "hello from nobody")]], tag="t")
    for p in [layout, *layout.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    env = user_side.env(HOME=str(home))
    done = user_side.casfs("index", f"oci:{layout}:t", "--store", file_url(home / "store"),
                           env=env)
    assert done.returncode == 0, done.stderr
    return {"home": home, "ref": done.stdout.strip().splitlines()[-1],
            "store": file_url(home / "store"), "env": env}


@contextlib.contextmanager
def tmp_paths_aside(*paths: Path) -> Iterator[None]:
    """Move node-wide paths in /tmp out of the way for the block (and back after it)."""
    moved = []
    for p in paths:
        if os.path.lexists(p):
            aside = p.with_name(f"{p.name}.aside-{secrets.token_hex(4)}")
            os.rename(p, aside)
            moved.append((p, aside))
    try:
        yield
    finally:
        for p in paths:
            if os.path.lexists(p) and not os.path.islink(p) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.lexists(p):
                p.unlink()
        for p, aside in moved:
            os.rename(aside, p)


def kill_quietly(pid: int | None) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 10)


def record_key(mountpoint: Path) -> str:
    import hashlib

    return hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:24]


# -- 7. mount records of an unprivileged user -----------------------------------------------------

def swap_record(key: str, pid: int, *dirs: Path) -> str:
    """A shell script replacing the record of `key` in each directory (where its user
    may) with one naming pid."""
    record = json.dumps({"pid": pid, "mode": "fuse"})
    return "".join(f"rm -f {d}/{key}.json; printf '%s' '{record}' > {d}/{key}.json; "
                   for d in dirs) + "true"


def test_records_of_a_user_go_to_their_own_private_dir(
        public_dir: Path, user_side: UserSide, nobody_image: dict[str, Any]) -> None:
    home = nobody_image["home"]
    run = public_dir / "run"
    run.mkdir(mode=0o700)
    os.chown(run, NOBODY, NOGROUP)
    env = {**nobody_image["env"], "XDG_RUNTIME_DIR": str(run)}
    mnt, cache = home / "mnt", home / "cache"
    as_user(["mkdir", str(mnt)])
    done = user_side.casfs("mount", nobody_image["ref"], str(mnt), "--store",
                           nobody_image["store"], "--cache-dir", str(cache), "--mode", "fuse",
                           "--no-agent", env=env)
    assert done.returncode == 0, done.stderr
    pid = parse_mount_output(done)[1]
    running: int | None = pid
    try:
        found = list(run.rglob("*.json"))
        assert [p.name for p in found] == [f"{record_key(mnt)}.json"]
        st = os.lstat(found[0])
        assert stat.S_ISREG(st.st_mode) and st.st_uid == NOBODY
        assert stat.S_IMODE(st.st_mode) == 0o600, stat.filemode(st.st_mode)
        assert json.loads(found[0].read_text())["pid"] == pid
        records = found[0].parent
        for p in (records, *records.relative_to(run).parents[:-1]):
            st = os.lstat(run / p)
            assert stat.S_ISDIR(st.st_mode) and st.st_uid == NOBODY
            assert stat.S_IMODE(st.st_mode) == 0o700, f"{run / p} {stat.filemode(st.st_mode)}"
        assert records == run / "casfs" / "mounts"
        shown = user_side.casfs("stats", "--json", str(mnt), env=env, join=pid)
        assert shown.returncode == 0, shown.stderr
        gone = user_side.casfs("umount", str(mnt), env=env, join=pid)
        assert gone.returncode == 0, gone.stderr
        assert wait_gone(pid, 15)
        running = None
        assert list(records.glob("*")) == []
    finally:
        kill_quietly(running)


def test_planted_tmp_records_are_not_followed(
        public_dir: Path, user_side: UserSide, nobody_image: dict[str, Any]) -> None:
    """No XDG_RUNTIME_DIR: records go under /tmp, where another user was first."""
    home, env = nobody_image["home"], nobody_image["env"]
    mnt, cache = home / "mnt", home / "cache"
    as_user(["mkdir", str(mnt)])
    precious = home / "precious"
    precious.write_text("the victim's own file\n")
    os.chown(precious, NOBODY, NOGROUP)
    key = record_key(mnt)
    ours, shared = Path(f"/tmp/casfs-{NOBODY}"), Path("/tmp/casfs-mounts")
    sleeper = subprocess.Popen(["sleep", "600"], user=NOBODY, group=NOGROUP, extra_groups=[])
    pid = None
    with tmp_paths_aside(ours, shared):
        # The attacker prepares the directories the victim's casfs will use (this
        # casfs's, and the shared one older versions used), symlinks where the record
        # is written, and a record naming one of the victim's processes.
        plant = (f"set -e; for d in {ours} {ours}/mounts {shared}; do mkdir -m 777 $d; done; "
                 f"for d in {ours}/mounts {shared}; do "
                 f"ln -s {precious} $d/{key}.tmp; "
                 f"printf '%s' '{{\"pid\": {sleeper.pid}, \"mountpoint\": \"{mnt}\", "
                 f"\"mode\": \"fuse\", \"cache_dir\": \"{cache}\"}}' > $d/{key}.json; done")
        planted = as_user(["/bin/sh", "-c", plant], uid=ATTACKER, gid=ATTACKER)
        assert planted.returncode == 0, planted.stderr
        try:
            done = user_side.casfs("mount", nobody_image["ref"], str(mnt), "--store",
                                   nobody_image["store"], "--cache-dir", str(cache),
                                   "--mode", "fuse", "--no-agent", env=env)
            if done.returncode == 0:
                pid = parse_mount_output(done)[1]
                # the attacker puts their record back wherever they can
                as_user(["/bin/sh", "-c", swap_record(key, sleeper.pid, ours / "mounts", shared)],
                        uid=ATTACKER, gid=ATTACKER)
                gone = user_side.casfs("umount", str(mnt), env=env, join=pid)
                assert gone.returncode == 0, gone.stderr
                assert wait_gone(pid, 20)
                pid = None
            else:  # refused: the records directory is not the victim's own
                assert f"{ours}" in done.stderr, done.stderr
            assert precious.read_text() == "the victim's own file\n", "written through a symlink"
            assert sleeper.poll() is None, "casfs umount killed the process a planted record named"
            for d in (ours, ours / "mounts", shared):  # the victim wrote nothing there
                written = [p.name for p in d.iterdir() if p.lstat().st_uid != ATTACKER]
                assert written == [], f"the victim's casfs wrote {written} into {d}"
        finally:
            kill_quietly(pid)
            sleeper.kill()
            sleeper.wait()


def test_planted_record_in_the_users_own_dir_is_impossible(
        public_dir: Path, user_side: UserSide, nobody_image: dict[str, Any]) -> None:
    """No XDG_RUNTIME_DIR, /tmp free: the victim's records directory is made private,
    another user cannot put a record in it, and `casfs umount` kills nothing else."""
    home, env = nobody_image["home"], nobody_image["env"]
    mnt, cache = home / "mnt", home / "cache"
    as_user(["mkdir", str(mnt)])
    key = record_key(mnt)
    ours, shared = Path(f"/tmp/casfs-{NOBODY}"), Path("/tmp/casfs-mounts")
    sleeper = subprocess.Popen(["sleep", "600"], user=NOBODY, group=NOGROUP, extra_groups=[])
    pid = None
    with tmp_paths_aside(ours, shared):
        # the shared directory of older versions, made by the attacker, open to all
        assert as_user(["mkdir", "-m", "1777", str(shared)], uid=ATTACKER,
                       gid=ATTACKER).returncode == 0
        try:
            done = user_side.casfs("mount", nobody_image["ref"], str(mnt), "--store",
                                   nobody_image["store"], "--cache-dir", str(cache),
                                   "--mode", "fuse", "--no-agent", env=env)
            assert done.returncode == 0, done.stderr
            pid = parse_mount_output(done)[1]
            # the attacker replaces whatever record they can reach
            as_user(["/bin/sh", "-c", swap_record(key, sleeper.pid, ours / "mounts", shared)],
                    uid=ATTACKER, gid=ATTACKER)
            gone = user_side.casfs("umount", str(mnt), env=env, join=pid)
            assert gone.returncode == 0, gone.stderr
            assert wait_gone(pid, 20)
            pid = None
            assert sleeper.poll() is None, "casfs umount killed the process a planted record named"
            for d in (ours, ours / "mounts"):
                st = os.lstat(d)
                assert stat.S_ISDIR(st.st_mode) and st.st_uid == NOBODY
                assert stat.S_IMODE(st.st_mode) == 0o700
        finally:
            kill_quietly(pid)
            sleeper.kill()
            sleeper.wait()


# -- 8. a cache directory of another user ---------------------------------------------------------

LISTENER = r"""
import json, os, select, socket, sys, time
socks = []
for path in sys.argv[1:]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(8)
    socks.append(s)
print("listening", flush=True)
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    ready, _, _ = select.select(socks, [], [], 0.2)
    for s in ready:
        conn, _ = s.accept()
        conn.settimeout(5)
        got = b""
        try:
            while not got.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                got += chunk
            conn.sendall(b"pid 1\nready\n")
        except OSError:
            pass
        print(json.dumps({"socket": s.getsockname(), "got": got.decode(errors="replace")}),
              flush=True)
        conn.close()
"""


def test_a_cache_dir_of_another_user_is_refused_before_anything_is_sent(
        public_dir: Path, tmp_path: Path, user_side: UserSide) -> None:
    store = file_url(tmp_path / "store")
    ref = build_and_index(tmp_path / "img", [[file("hello", "hi")]], store)
    theirs = public_dir / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOGROUP)
    listener = user_side.python_popen(LISTENER, str(theirs / "agent.sock"),
                                      str(theirs / "view.sock"), env=user_side.env())
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "listening", listener.stderr
        secret = f"casfs-secret-{secrets.token_hex(8)}"
        for mode in ("fuse", "kernel"):
            mnt = tmp_path / f"mnt-{mode}"
            mnt.mkdir()
            tried = cli("mount", ref, str(mnt), "--store", store, "--cache-dir", str(theirs),
                        "--mode", mode, env={"AWS_SECRET_ACCESS_KEY": secret})
            if tried.returncode == 0:  # (the pid is whatever the listener said)
                force_cleanup(mnt, None)
            assert tried.returncode == 12, (mode, tried.returncode, tried.stdout, tried.stderr)
            assert "belongs to uid 65534" in tried.stderr, tried.stderr
            assert not is_mounted(mnt)
        started = cli("agent", "start", "--cache-dir", str(theirs),
                      env={"AWS_SECRET_ACCESS_KEY": secret})
        assert started.returncode == 12, (started.stdout, started.stderr)
    finally:
        listener.kill()
        out, err = listener.communicate(timeout=10)
    received = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert received == [], f"sent to another user's socket: {received}"
    assert sorted(p.name for p in theirs.iterdir()) == ["agent.sock", "view.sock"]


# -- 10. no store URL in the statistics -----------------------------------------------------------

@pytest.mark.parametrize("store_kind", ["file", "s3"])
def test_stats_do_not_tell_the_store_url(request: pytest.FixtureRequest, tmp_path: Path,
                                        mode: str, store_kind: str) -> None:
    if store_kind == "s3":
        store = str(request.getfixturevalue("s3_bucket_url"))
        telling = store.removeprefix("s3://").split("/")[0]  # the bucket's name
    else:
        telling = f"store-{secrets.token_hex(8)}"
        store = file_url(tmp_path / telling)
    ref = build_and_index(tmp_path / "img", [[file("hello", "hi")]], store)
    with mounted(ref, tmp_path / "mnt", store, tmp_path / "cache", mode=mode) as m:
        assert read_file(m.path("hello")) == b"hi"
        told = [json.dumps(m.stats())]
        if mode == "fuse":
            told.append(os.getxattr(m.mountpoint, STATS_XATTR).decode(errors="replace"))
        for args in (("stats", "--json"), ("stats",)):
            shown = cli(*args, str(m.mountpoint), check=True)
            told.append(shown.stdout + shown.stderr)
        assert digest_of(ref) in told[0]  # the statistics are there, about this mount
        for text in told:
            assert telling not in text and store not in text, text


def test_the_daemon_command_line_does_not_tell_the_store_url(tmp_path: Path, mode: str) -> None:
    """The daemon (FUSE) or node view (kernel) is forked from `casfs mount` without an
    exec: it rewrites its command line, which every user reads, to name its mountpoint
    or cache dir only."""
    telling = f"store-{secrets.token_hex(8)}"
    store = file_url(tmp_path / telling)
    ref = build_and_index(tmp_path / "img", [[file("hello", "hi")]], store)
    with mounted(ref, tmp_path / "mnt", store, tmp_path / "cache", mode=mode) as m:
        shown = as_user(["ps", "-ww", "-o", "args=", "-p", str(m.pid)])
        assert shown.stdout.strip(), shown  # nobody sees the daemon
        assert telling not in shown.stdout, shown.stdout
        assert shown.stdout.startswith(("casfs daemon ", "casfs view ")), shown.stdout
