"""`casfs run`, `casfs ps`, `casfs rm` on the real parts: a Python app in an image built
from this machine's interpreter and C library, indexed into a file store, mounted by
casfs (kernel and FUSE modes), run by crun and runc (Debian packages) as root.

The commands are run as `casfs run|ps|rm` (python -m casfs.cli). Nothing here skips when CI=true: a missing runtime
or mount facility fails the test instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from casfs.testing import ocibuild as ob
from tests.mounthelp import in_ci, mounts_under, require_mode

RUN = [sys.executable, "-m", "casfs.cli"]
RUNTIMES = ("crun", "runc")
PY = Path(sys.base_prefix) / "bin" / "python3"

APP = r'''
import json, os, signal, sys, time
mode = sys.argv[1] if len(sys.argv) > 1 else "report"
if mode == "report":
    print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
                      "cwd": os.getcwd(), "argv": sys.argv, "env": dict(os.environ),
                      "hostname": os.uname().nodename, "pid": os.getpid(),
                      "tty": [os.isatty(0), os.isatty(1)]}))
    sys.exit(int(os.environ.get("EXIT_CODE", "0")))
if mode == "write":
    with open(sys.argv[2], "w") as f:
        f.write(sys.argv[3])
    print("wrote", sys.argv[2])
elif mode == "wait-term":
    def term(sig, frame):  # may interrupt the print below: nothing reentrant here
        os.write(1, b"got SIGTERM\n")
        os._exit(42)
    signal.signal(signal.SIGTERM, term)
    print("ready", flush=True)
    time.sleep(60)
elif mode == "wait-file":
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.05)
    print("done")
elif mode == "stdin":
    print("read:", sys.stdin.read().strip())
elif mode == "mounts":
    print(open("/proc/self/mountinfo").read())
elif mode == "stat":
    st = os.stat(sys.argv[2])
    print(oct(st.st_mode))
'''


def require_runtime(name: str) -> None:
    if shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin") is None:
        if in_ci():
            pytest.fail(f"{name} is not installed in CI (scripts/install.sh installs it)")
        pytest.skip(f"{name} is not installed (apt-get install {name})")
    if name == "crun":
        prepare_cgroups_for_crun()


def prepare_cgroups_for_crun() -> None:
    """crun 1.8 refuses a hybrid cgroup layout whose v2 hierarchy holds controllers (this
    machine's: hugetlb on /sys/fs/cgroup/unified, no v1 mount of it). Mount each such
    controller as its own v1 hierarchy, as systemd's hybrid layout does; runc needs none
    of this (casfs run picks runc by default on such a node)."""
    from casfs.run.runtime import crun_refuses_cgroups

    if not crun_refuses_cgroups():
        return
    controllers = Path("/sys/fs/cgroup/unified/cgroup.controllers").read_text().split()
    for ctrl in controllers:
        target = Path("/sys/fs/cgroup") / ctrl
        target.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "cgroup", "-o", ctrl, "cgroup", str(target)],
                       capture_output=True, check=True)
    assert not crun_refuses_cgroups()


def _library_members() -> list[ob.Member]:
    """The C library and what the interpreter links, at Debian's multiarch paths."""
    out = subprocess.run(["ldd", str(PY)], capture_output=True, text=True, check=True).stdout
    members = ob.parent_dirs("usr/lib/x86_64-linux-gnu/x") + ob.parent_dirs("usr/lib64/x")
    members += [ob.symlink("lib", "usr/lib"), ob.symlink("lib64", "usr/lib64")]
    seen = set()
    for line in out.splitlines():
        m = re.match(r"\s*(\S+) => (/\S+)", line) or re.match(r"\s*(/\S+) \(", line)
        if not m:
            continue
        src = m.group(m.lastindex or 1)
        name = os.path.basename(m.group(1))
        if "pyenv" in src or name in seen:
            continue
        seen.add(name)
        where = "usr/lib64" if name.startswith("ld-linux") else "usr/lib/x86_64-linux-gnu"
        members.append(ob.file(f"{where}/{name}", Path(os.path.realpath(src)).read_bytes(),
                               mode=0o755))
    return members


def _base_members() -> list[ob.Member]:
    passwd = ("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
              "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    group = "root:x:0:\napp:x:1000:\nextra:x:2000:app\nnogroup:x:65534:\n"
    return [
        ob.directory("etc"), ob.file("etc/passwd", passwd), ob.file("etc/group", group),
        ob.directory("tmp", mode=0o1777), ob.directory("home"),
        ob.directory("home/app", uid=1000, gid=1000), ob.directory("proc"), ob.directory("sys"),
        ob.directory("dev"), ob.directory("root", mode=0o755),
        ob.directory("app"), ob.file("app/main.py", APP),
        ob.file("app/data.txt", "not a program\n"),
        ob.file("app/setuid-marker", "x", mode=0o4755),
    ]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from casfs.testing.mounting import index_layout

    work = tmp_path_factory.mktemp("runimg")
    store = f"file://{work / 'store'}"
    config = {"Env": [f"PATH={PY.parent}:/usr/bin:/bin", "APP_GREETING=hello from the image"],
              "Cmd": ["python3", "/app/main.py"], "WorkingDir": "/app"}
    layers = [_base_members() + _library_members(), ob.python_prefix_layer()]
    ob.write_oci_layout(work / "oci", layers, config=config, tag="t")
    ref = index_layout(work / "oci", "t", store, name="runapp")
    return {"ref": ref, "store": store, "work": str(work)}


@pytest.fixture
def env(image: dict[str, str], tmp_path: Path) -> Iterator[dict[str, str]]:
    """A fresh state dir and cache dir for one test; every mount under them is gone after."""
    if os.geteuid() != 0:
        if in_ci():
            pytest.fail("casfs run tests need root")
        pytest.skip("casfs run needs root")
    state = tmp_path / "state"
    cache = tmp_path / "cache"
    e = {"state": str(state), "cache": str(cache), **image}
    yield e
    # the node view of a kernel-mode cache dir exits after its last mount, in its own time
    deadline = time.monotonic() + 60
    while mounts_under(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    leftovers = mounts_under(tmp_path)
    for m in sorted(leftovers, key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True)
    assert leftovers == [], f"mounts left behind: {leftovers}"


def casfs(e: dict[str, str], *args: str, timeout: float = 120, input: str | None = None,
          runtime: str | None = None, mode: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [*RUN, args[0], "--state-dir", e["state"]]
    if args[0] == "run":
        argv += ["--store", e["store"], "--cache-dir", e["cache"]]
        if runtime:
            argv += ["--runtime", runtime]
        if mode:
            argv += ["--mode", mode]
    argv += list(args[1:])
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL)


def report(proc: subprocess.CompletedProcess[str]) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no report ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("mode", ["kernel", "fuse"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_runs_the_image_command_with_its_config(env: dict[str, str], runtime: str,
                                                mode: str) -> None:
    """The image's Cmd, Env and WorkingDir make the process; its exit code is casfs's;
    -e adds to the image's environment; the image mount is gone when the container is."""
    require_runtime(runtime)
    require_mode(mode)
    proc = casfs(env, "run", "--rm", "-e", "EXIT_CODE=7", "-e", "EXTRA=1", env["ref"],
                 runtime=runtime, mode=mode)
    assert proc.returncode == 7, proc.stderr
    r = report(proc)
    assert r["argv"] == ["/app/main.py"]
    assert r["cwd"] == "/app"
    assert r["uid"] == 0 and r["gid"] == 0
    assert r["env"]["APP_GREETING"] == "hello from the image"
    assert r["env"]["EXTRA"] == "1"
    assert r["env"]["HOME"] == "/root"
    assert r["pid"] == 1, "the app is the init of its own pid namespace"
    assert r["tty"] == [False, False]
    assert mounts_under(env["state"]) == []
    assert os.listdir(Path(env["state"]) / "containers") == []


def test_user_workdir_entrypoint_command(env: dict[str, str]) -> None:
    require_runtime("crun")
    proc = casfs(env, "run", "--rm", "-u", "app", "-w", "/tmp", env["ref"], "--",
                 "python3", "/app/main.py", "report", "x")
    assert proc.returncode == 0, proc.stderr
    r = report(proc)
    assert (r["uid"], r["gid"], r["groups"]) == (1000, 1000, [1000, 2000])
    assert r["cwd"] == "/tmp" and r["env"]["HOME"] == "/home/app"
    assert r["argv"] == ["/app/main.py", "report", "x"]

    proc = casfs(env, "run", "--rm", "-u", "1234:extra", "--entrypoint", '["python3", "-c"]',
                 env["ref"], "import os; print(os.getuid(), os.getgid())")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1234", "2000"]

    proc = casfs(env, "run", "--rm", "-u", "nosuchuser", env["ref"])
    assert proc.returncode == 125 and "nosuchuser" in proc.stderr


def test_volumes_rw_and_ro(env: dict[str, str], tmp_path: Path) -> None:
    require_runtime("runc")
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "in.txt").write_text("from the node")
    code = ("import pathlib, sys; print(pathlib.Path('/in/in.txt').read_text());"
            "pathlib.Path('/out/result').write_text('written');"
            "\ntry:\n open('/in/x', 'w')\nexcept OSError as e:\n print('ro', e.errno)")
    proc = casfs(env, "run", "--rm", "-v", f"{rw}:/out", "-v", f"{ro}:/in:ro", env["ref"],
                 "python3", "-c", code, runtime="runc")
    assert proc.returncode == 0, proc.stderr
    assert "from the node" in proc.stdout and "ro 30" in proc.stdout  # EROFS
    assert (rw / "result").read_text() == "written"
    assert not (ro / "x").exists()


def test_writes_stay_in_the_containers_upper_layer(env: dict[str, str]) -> None:
    require_runtime("crun")
    marker = f"casfs-run-marker-{os.getpid()}-{time.time_ns()}"
    proc = casfs(env, "run", "--name", "writer", env["ref"], "python3", "/app/main.py",
                 "write", "/app/main.py", marker)
    assert proc.returncode == 0, proc.stderr
    cid = next(p.name for p in (Path(env["state"]) / "containers").iterdir())
    upper = Path(env["state"]) / "containers" / cid / "upper"
    assert (upper / "app" / "main.py").read_text() == marker
    # a new container sees the image as it was
    proc = casfs(env, "run", "--rm", env["ref"], "python3", "-c",
                 "print(open('/app/main.py').read()[:40])")
    assert proc.returncode == 0 and marker not in proc.stdout
    # neither the store nor the node cache holds what the container wrote
    for root in (env["store"].removeprefix("file://"), env["cache"]):
        hits = subprocess.run(["grep", "-rl", marker, root], capture_output=True, text=True)
        assert hits.stdout == "", f"{marker} reached {hits.stdout}"
    assert casfs(env, "rm", "writer").returncode == 0
    assert not (Path(env["state"]) / "containers" / cid).exists()


def test_two_containers_share_one_mount_released_by_the_last(env: dict[str, str],
                                                               tmp_path: Path) -> None:
    require_runtime("crun")
    shared = tmp_path / "shared"
    shared.mkdir()
    argv = [*RUN, "run", "--state-dir", env["state"], "--store", env["store"], "--cache-dir",
            env["cache"], "--rm", "-v", f"{shared}:/shared", env["ref"], "python3",
            "/app/main.py", "wait-file"]
    procs = [subprocess.Popen([*argv, f"/shared/go{i}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        images = Path(env["state"]) / "images"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            users = list(images.glob("*/users/*"))
            if len(users) == 2 and len(mounts_under(env["state"])) == 3:
                break
            time.sleep(0.1)
        image_mounts = [m for m in mounts_under(env["state"]) if "/images/" in m]
        assert len(image_mounts) == 1, mounts_under(env["state"])
        assert len(list(images.glob("*/users/*"))) == 2
        (shared / "go0").touch()
        assert procs[0].wait(60) == 0
        assert [m for m in mounts_under(env["state"]) if "/images/" in m] == image_mounts, \
            "the image stays mounted while a container uses it"
        (shared / "go1").touch()
        assert procs[1].wait(60) == 0
        assert mounts_under(env["state"]) == [], "the last container releases the image"
        assert list(images.iterdir()) == []
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_exit_codes_of_casfs_failures(env: dict[str, str]) -> None:
    require_runtime("crun")
    proc = casfs(env, "run", "--rm", "no-such-tag")
    assert proc.returncode == 125, proc.stderr
    proc = casfs(env, "run", "--rm", env["ref"], "no-such-command")
    assert proc.returncode == 127, proc.stderr
    assert "no-such-command" in proc.stderr
    proc = casfs(env, "run", "--rm", env["ref"], "/app/data.txt")
    assert proc.returncode == 126, proc.stderr
    proc = casfs(env, "run", "--rm", "--runtime", "no-such-runtime", env["ref"])
    assert proc.returncode == 125
    assert os.listdir(Path(env["state"]) / "containers") == []
    assert mounts_under(env["state"]) == []


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_tty_through_the_console_socket(env: dict[str, str], runtime: str) -> None:
    """-t: the process runs on a pty the runtime made and passed over the console socket;
    casfs copies its output (stdout and stderr both go through the pty)."""
    require_runtime(runtime)
    proc = casfs(env, "run", "--rm", "-t", env["ref"], runtime=runtime)
    assert proc.returncode == 0, proc.stderr
    r = report(proc)
    assert r["tty"] == [True, True]
    assert r["env"]["TERM"] == "xterm"
    # with -i, what casfs reads goes to the pty (and is echoed by it)
    proc = casfs(env, "run", "--rm", "-t", "-i", env["ref"], "python3", "-c",
                 "import sys; print('got', sys.stdin.readline().strip()[::-1])",
                 input="olleh\n", runtime=runtime)
    assert proc.returncode == 0, proc.stderr
    assert "got hello" in proc.stdout


def test_interactive_stdin_without_tty(env: dict[str, str]) -> None:
    require_runtime("runc")
    proc = casfs(env, "run", "--rm", "-i", env["ref"], "python3", "/app/main.py", "stdin",
                 input="piped in\n", runtime="runc")
    assert proc.returncode == 0, proc.stderr
    assert "read: piped in" in proc.stdout
    proc = casfs(env, "run", "--rm", env["ref"], "python3", "/app/main.py", "stdin",
                 input="not passed\n", runtime="runc")
    assert proc.returncode == 0 and "read: \n" in proc.stdout + "\n"


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_signals_are_forwarded(env: dict[str, str], runtime: str) -> None:
    require_runtime(runtime)
    argv = [*RUN, "run", "--state-dir", env["state"], "--store", env["store"], "--cache-dir",
            env["cache"], "--runtime", runtime, "--rm", env["ref"], "python3", "/app/main.py",
            "wait-term"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready", p.stderr.read() if p.stderr else ""
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 42, err
    assert "got SIGTERM" in out


def test_ps_and_rm(env: dict[str, str], tmp_path: Path) -> None:
    require_runtime("crun")
    proc = casfs(env, "run", "--name", "done", "-e", "EXIT_CODE=3", env["ref"])
    assert proc.returncode == 3
    assert casfs(env, "run", "--name", "done", env["ref"]).returncode == 125  # name taken
    shared = tmp_path / "s"
    shared.mkdir()
    p = subprocess.Popen([*RUN, "run", "--state-dir", env["state"], "--store", env["store"],
                          "--cache-dir", env["cache"], "--name", "busy", "-v",
                          f"{shared}:/s", env["ref"], "python3", "/app/main.py", "wait-file",
                          "/s/never"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            running = json.loads(casfs(env, "ps", "--json").stdout)
            if running and running[0]["status"] == "running":
                break
            time.sleep(0.1)
        assert [c["name"] for c in running] == ["busy"]
        everything = {c["name"]: c for c in json.loads(casfs(env, "ps", "-a", "--json").stdout)}
        assert everything["done"]["status"] == "exited" and everything["done"]["exit_code"] == 3
        table = casfs(env, "ps", "-a").stdout
        assert "Exited (3)" in table and "busy" in table and "Up" in table
        rm = casfs(env, "rm", "busy")
        assert rm.returncode == 125 and "running" in rm.stderr
        assert casfs(env, "rm", "-f", "busy").returncode == 0
        assert p.wait(30) == 137  # killed by SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert casfs(env, "rm", "done").returncode == 0
    assert json.loads(casfs(env, "ps", "-a", "--json").stdout) == []
    assert mounts_under(env["state"]) == []


def test_read_only_root_and_setuid_kept(env: dict[str, str]) -> None:
    """--read-only: the root refuses writes, /tmp takes them. The image's setuid bit is
    there and honoured (the mount under the 0700 state dir is suid), unlike a default
    `casfs mount` reachable by every user."""
    require_runtime("crun")
    code = ("import os\ntry:\n open('/app/new', 'w')\nexcept OSError as e:\n print('root', e.errno)\n"
            "open('/tmp/ok', 'w').write('x'); print('tmp ok')\n"
            "print(oct(os.stat('/app/setuid-marker').st_mode))\n"
            "print([l.split()[5] for l in open('/proc/self/mountinfo') if l.split()[4] == '/'])")
    proc = casfs(env, "run", "--rm", "--read-only", env["ref"], "python3", "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert "root 30" in proc.stdout and "tmp ok" in proc.stdout
    assert "0o104755" in proc.stdout
    assert "nosuid" not in proc.stdout.splitlines()[-1]
    assert oct(os.stat(env["state"]).st_mode & 0o777) == "0o700"
