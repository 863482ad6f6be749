"""The README's main job, end to end on the embedded default store: build a small
sample image (this machine's Python plus a few pure-Python packages), index it,
mount it, import through the mount cold, warm and hot, and show the timings."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from casfs.locations import default_store_url
from casfs.testing.ocibuild import layer_from_directory, python_prefix_layer, write_oci_layout

PACKAGES = ["trio", "attr", "sortedcontainers", "idna", "outcome", "sniffio"]
WORKLOAD = "import trio, json, email.parser, http.client; trio.run(trio.sleep, 0)"


def _site_layer() -> list:
    """The demo's packages, copied from this interpreter's site-packages into /opt/site."""
    members = []
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        pkg_dir = Path(next(iter(spec.submodule_search_locations)))
        members += layer_from_directory(pkg_dir, prefix=f"opt/site/{name}")
    return members


def _run(cmd: list[str], **kw) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        sys.exit(f"demo: {' '.join(cmd[:3])} failed:\n{proc.stderr.strip()}")
    return proc.stdout


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _timed_import(mnt: Path) -> float:
    prefix = Path(sys.base_prefix)
    root = mnt / prefix.relative_to("/")
    env = {"PYTHONHOME": str(root), "LD_LIBRARY_PATH": str(root / "lib"),
           "PYTHONPATH": str(mnt / "opt/site"), "PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin"}
    start = time.monotonic()
    _run([str(root / "bin" / "python3"), "-c", WORKLOAD], env=env)
    return time.monotonic() - start


def _what_it_took(stats: dict) -> str:
    """A boot's traffic, from `casfs stats --json`: store requests on demand and by
    prefetch (a trace an earlier run recorded is replayed: a repeated cold boot is faster
    for it), and in kernel mode how many files the kernel read from the node's disk."""
    m, pf, kern = stats["metrics"], stats.get("prefetch", {}), stats.get("kernel")
    parts = [f"{m['fetches']} chunks fetched on demand",
             f"{m.get('prefetch_chunks', 0)} prefetched"]
    if pf.get("traces"):
        parts.append(f"trace of {pf['traces']} earlier boot(s) replayed")
    if kern is not None:
        parts.append(f"{kern['native_opens']} files read by the kernel alone")
    return ", ".join(parts)


def main() -> None:
    casfs = [sys.executable, "-m", "casfs.cli"]
    work = Path(tempfile.mkdtemp(prefix="casfs-demo-"))
    try:
        print("1. building a sample OCI image (this Python + trio and its dependencies) ...")
        layout = work / "image"
        write_oci_layout(layout, [python_prefix_layer(include_pycache=True, mtime=None), _site_layer()], tag="demo")
        print("2. indexing it into the default store ...")
        out = _run([*casfs, "index", f"oci:{layout}:demo", "--tag", "casfs-demo"])
        print("   " + "\n   ".join(out.strip().splitlines()))
        ref = out.strip().splitlines()[-1]
        print(_run([*casfs, "inspect", ref]).rstrip())
        mnt, cache = work / "mnt", work / "cache"
        mnt.mkdir()
        rows = []
        dropped = True

        def boot(label: str, drop: bool) -> None:
            nonlocal dropped
            if drop:
                dropped = _drop_caches() and dropped
            seconds = _timed_import(mnt)
            stats = json.loads(_run([*casfs, "stats", "--json", str(mnt)]))
            rows.append((label, seconds, _what_it_took(stats)))

        mounted = _run([*casfs, "mount", ref, str(mnt), "--cache-dir", str(cache)])
        mode = "kernel" if "kernel mode" in mounted else "fuse"
        how = ("EROFS + overlayfs: the kernel serves what the node holds" if mode == "kernel"
               else "every request through the casfs daemon")
        print(f"3. mounted in {mode} mode ({how})")
        boot("cold (empty cache)", drop=True)
        _run([*casfs, "umount", str(mnt)])
        _run([*casfs, "mount", ref, str(mnt), "--cache-dir", str(cache)])
        boot("warm (cache on disk)", drop=True)
        boot("hot (page cache)", drop=False)
        _run([*casfs, "umount", str(mnt)])
        print(f"4. `{WORKLOAD}` through the mount:")
        for label, seconds, took in rows:
            print(f"   {label:<22} {seconds * 1000:8.0f} ms   {took}")
        if not dropped:
            print("   (page cache could not be dropped: not root; cold figures include page cache)")
        print(f"5. the image stays in the default store ({default_store_url()}) as tag "
              "casfs-demo: `casfs ls casfs-demo /`, `casfs mount casfs-demo <dir>`")
    finally:
        if os.path.ismount(work / "mnt"):
            subprocess.run([sys.executable, "-m", "casfs.cli", "umount", str(work / "mnt")],
                           capture_output=True)
            subprocess.run(["umount", "-l", str(work / "mnt")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
