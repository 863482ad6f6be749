"""The benchmark images: what goes in them, building them reproducibly as OCI layouts
(cached under benchmarks/work/images/), extracting them to local disk (the "native"
baseline and the full pull's last phase), and running a workload against a root.

Images
------
- ``big``: a layer with the Python prefix (interpreter, libpython, stdlib with its
  ``__pycache__``) and a layer with ``pip install --target`` of torch==2.13.0 (CPU), numpy
  and pandas, placed in the prefix's own site-packages. Workloads ``import torch``,
  ``import numpy, pandas`` and a stdlib-only import.
- ``small``: the same prefix layer and numpy alone (for ``--quick``).
- ``toy``: a tiny pure-Python package, no interpreter (run by the host's python with the
  image's site dir on PYTHONPATH): for the harness's own end-to-end test.

Reproducibility: pip installs pinned versions with ``--no-compile``; every installed file's
mtime is then set to ``DEFAULT_MTIME`` and the tree is byte-compiled (timestamp pycs, so they
record DEFAULT_MTIME and stay valid when the image is mounted or extracted), and the layer
is written with that same mtime. The pycs name their sources by their path in the image. The prefix
layer keeps the host's file mtimes, which is what keeps the host's stdlib pycs valid
(directories get DEFAULT_MTIME). Same inputs, same digests (tests check the toy image; the
small image was checked by rebuilding it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import WORK, BenchError, log
from casfs.testing import ocibuild as ob

BUILD_VERSION = 2  # bump to invalidate every cached image
TAG = "latest"
PY_VER = f"python{sys.version_info.major}.{sys.version_info.minor}"
PREFIX = sys.base_prefix
IMAGE_SITE = f"{PREFIX}/lib/{PY_VER}/site-packages"
TOY_SITE = "/app/site"

# Versions resolved from the local mirror when this suite was written; pinning them
# (with their dependencies) is what makes a rebuild produce the same layer.
BIG_CONSTRAINTS = (
    "torch==2.13.0", "numpy==2.4.6", "pandas==3.1.1", "python-dateutil==4.0.0",
    "tzdata==2026.6", "filelock==4.2.11", "fsspec==2026.9.0", "jinja2==3.1.6",
    "MarkupSafe==3.0.4", "mpmath==1.3.0", "networkx==3.6.1", "setuptools==84.2.1",
    "sympy==1.14.0", "typing-extensions==4.16.0",
)


@dataclass(frozen=True)
class Workload:
    name: str
    code: str
    modules: tuple[str, ...]  # checked (once, untimed) to load from the image's root


STDLIB = Workload("stdlib", "import json, email, http.client", ("json", "email", "http.client"))


@dataclass(frozen=True)
class ImageSpec:
    name: str
    description: str
    python: str  # "image": the prefix layer is in the image; "host": run the host's python
    requirements: tuple[str, ...] = ()
    constraints: tuple[str, ...] = ()
    toy: bool = False
    workloads: tuple[Workload, ...] = ()
    compression: str = "gzip"

    @property
    def site(self) -> str:
        return IMAGE_SITE if self.python == "image" else TOY_SITE

    def key(self) -> str:
        """Everything the built bytes depend on, hashed: the cache key."""
        return _source_key(asdict(self), sys.version, PREFIX)


IMAGES: dict[str, ImageSpec] = {
    "big": ImageSpec(
        "big", "Python prefix + pip --target torch==2.13.0 (CPU), numpy, pandas", "image",
        requirements=("torch==2.13.0", "numpy", "pandas"), constraints=BIG_CONSTRAINTS,
        workloads=(Workload("torch", "import torch", ("torch",)),
                   Workload("numpy_pandas", "import numpy, pandas", ("numpy", "pandas")),
                   STDLIB)),
    "small": ImageSpec(
        "small", "Python prefix + pip --target numpy", "image",
        requirements=("numpy",), constraints=BIG_CONSTRAINTS,
        workloads=(Workload("numpy", "import numpy", ("numpy",)), STDLIB)),
    "toy": ImageSpec(
        "toy", "a tiny pure-Python package (run by the host python)", "host", toy=True,
        workloads=(Workload("toy", "import casfs_toy", ("casfs_toy",)),
                   Workload("toy_small", "import casfs_toy_small", ("casfs_toy_small",)))),
}


# -- building ---------------------------------------------------------------------------


def prefix_members() -> list[ob.Member]:
    """The interpreter prefix with the stdlib's pycs (host mtimes, so the pycs stay valid);
    optimised (.opt-1/.opt-2) pycs left out: nothing in the workloads uses them."""
    members = ob.python_prefix_layer(PREFIX, include_pycache=True, mtime=None)
    members = [m for m in members if not m.name.endswith((".opt-1.pyc", ".opt-2.pyc"))]
    for m in members:
        if m.type == "dir":  # a host pip install touches bin/ and site-packages/
            m.mtime = ob.DEFAULT_MTIME
    return members


def _normalize_mtimes(root: Path, mtime: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (mtime, mtime), follow_symlinks=False)
    os.utime(root, (mtime, mtime))


def pip_members(requirements: tuple[str, ...], constraints: tuple[str, ...],
                site: str) -> tuple[list[ob.Member], list[str]]:
    """``pip install --target`` of ``requirements`` as members under ``site``; also returns
    what got installed (name==version)."""
    with tempfile.TemporaryDirectory(prefix="casfs-bench-pip-") as tmp:
        target = Path(tmp) / "site"
        cons = Path(tmp) / "constraints.txt"
        cons.write_text("\n".join(constraints) + "\n")
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile",
               "--disable-pip-version-check", "--no-warn-script-location",
               "--target", str(target), "-c", str(cons), *requirements]
        log("$ " + " ".join(cmd))
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise BenchError(f"pip install failed: {p.stderr[-3000:]}")
        installed = sorted(
            d.name.removesuffix(".dist-info").replace("-", "==", 1)
            for d in target.glob("*.dist-info"))
        _normalize_mtimes(target, ob.DEFAULT_MTIME)
        log("byte-compiling the installed packages")
        # -s/-p: the pycs name their sources by their path in the image, not by this
        # temp dir (whose random name would otherwise end up in every code object).
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j0",
                        "--invalidation-mode", "timestamp", "-s", str(target), "-p", site,
                        str(target)], capture_output=True, text=True)
        members = ob.layer_from_directory(target, site, mtime=ob.DEFAULT_MTIME)
    return ob.parent_dirs(site + "/x") + members, installed


def toy_members(site: str) -> list[ob.Member]:
    """A package of 20 modules imported by its __init__, with a 1 MiB data file read at
    import (several chunks), and a one-line module; fully determined by this code."""
    pkg = site.strip("/") + "/casfs_toy"
    members = ob.parent_dirs(pkg + "/x") + [ob.directory(pkg)]
    n = 20
    init = "".join(f"from casfs_toy import m{i:02d}\n" for i in range(n))
    init += ("import os\n"
             "with open(os.path.join(os.path.dirname(__file__), 'data.bin'), 'rb') as f:\n"
             "    DATA_LEN = len(f.read())\n")
    members.append(ob.file(pkg + "/__init__.py", init))
    for i in range(n):
        body = f'"""toy module {i}"""\nVALUE = {i}\n' + "".join(
            f"def f{j}(x):\n    return x * {j} + VALUE\n" for j in range(200))
        members.append(ob.file(f"{pkg}/m{i:02d}.py", body))
    data = b"".join(hashlib.sha256(b"toy%d" % i).digest() for i in range(1 << 15))  # 1 MiB
    members.append(ob.file(pkg + "/data.bin", data))
    members.append(ob.file(site.strip("/") + "/casfs_toy_small.py", "VALUE = 1\n"))
    return members


def _layer_stats(name: str, layer: ob.Layer, members: list[ob.Member]) -> dict[str, Any]:
    counts = {"file": 0, "dir": 0, "symlink": 0, "hardlink": 0}
    for m in members:
        counts[m.type] = counts.get(m.type, 0) + 1
    whiteouts = sum(1 for m in members if m.name.rsplit("/", 1)[-1].startswith(".wh."))
    return {
        "name": name,
        "digest": layer.digest,
        "media_type": layer.media_type("oci"),
        "compressed_bytes": len(layer.blob),
        "uncompressed_bytes": len(layer.tar),
        "file_bytes": sum(len(m.data) for m in members if m.type == "file"),
        "entries": len(members),
        "files": counts["file"],
        "dirs": counts["dir"],
        "symlinks": counts["symlink"],
        "hardlinks": counts["hardlink"],
        "whiteouts": whiteouts,
    }


def write_image(spec: ImageSpec, oci_dir: Path) -> dict[str, Any]:
    """Build ``spec`` as an OCI layout at ``oci_dir``; return its description."""
    t0 = time.perf_counter()
    named: list[tuple[str, list[ob.Member]]] = []
    installed: list[str] = []
    if spec.python == "image":
        log("collecting the Python prefix layer")
        named.append(("python-prefix", prefix_members()))
    if spec.requirements:
        members, installed = pip_members(spec.requirements, spec.constraints, spec.site)
        named.append(("pip-target", members))
    if spec.toy:
        named.append(("toy-package", toy_members(spec.site)))
    layers, stats = [], []
    for name, members in named:
        log(f"writing layer {name} ({len(members)} entries)")
        layer = ob.Layer.from_members(members, spec.compression)  # type: ignore[arg-type]
        _ = layer.blob  # compress now, timed as part of the build
        stats.append(_layer_stats(name, layer, members))
        layers.append(layer)
        del members
    config = {"Env": [f"PATH={PREFIX}/bin:/usr/bin:/bin"]} if spec.python == "image" else {}
    if oci_dir.exists():
        shutil.rmtree(oci_dir)
    built = ob.write_oci_layout(oci_dir, layers, config=config, tag=TAG)
    info = {
        "name": spec.name,
        "description": spec.description,
        "oci_dir": str(oci_dir),
        "tag": TAG,
        "digest": built.digest,
        "layers": stats,
        "compressed_bytes": sum(s["compressed_bytes"] for s in stats),
        "uncompressed_bytes": sum(s["uncompressed_bytes"] for s in stats),
        "file_bytes": sum(s["file_bytes"] for s in stats),
        "entries": sum(s["entries"] for s in stats),
        "files": sum(s["files"] for s in stats),
        "python": {"mode": spec.python, "prefix": PREFIX, "site": spec.site},
        "installed": installed,
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    return info


def build_image(spec: ImageSpec, work: Path = WORK, rebuild: bool = False) -> dict[str, Any]:
    """The image for ``spec``, built once and cached under ``work/images/<name>``."""
    log_desc = f"{spec.name}: {spec.description}"
    return _cached(work, spec.name, spec.key(), lambda oci: write_image(spec, oci), log_desc,
                   rebuild)


def _cached(work: Path, name: str, key: str, write: Any, desc: str,
            rebuild: bool = False) -> dict[str, Any]:
    base = work / "images" / name
    meta_path = base / "image.json"
    if not rebuild and meta_path.exists():
        with contextlib.suppress(ValueError, OSError):
            meta = json.loads(meta_path.read_text())
            if meta.get("key") == key and (Path(meta["oci_dir"]) / "index.json").exists():
                log(f"image {name}: cached ({meta['digest'][:19]}, "
                    f"{meta['uncompressed_bytes'] / 1e6:.0f} MB uncompressed)")
                return meta
    log(f"building image {desc}")
    base.mkdir(parents=True, exist_ok=True)
    meta = write(base / "oci")
    meta["key"] = key
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)
    log(f"image {name}: {meta['digest'][:19]}, {meta['files']} files, "
        f"{meta['uncompressed_bytes'] / 1e6:.0f} MB uncompressed, "
        f"{meta['compressed_bytes'] / 1e6:.0f} MB compressed, built in {meta['build_seconds']}s")
    return meta


def _source_key(*parts: object) -> str:
    """Cache key: the inputs, the image builder's source and BUILD_VERSION (bump it when
    this module's way of building changes)."""
    d = {"parts": [repr(p) for p in parts], "v": BUILD_VERSION,
         "src": hashlib.sha256(Path(ob.__file__).read_bytes()).hexdigest()}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# -- read-path images: one big incompressible file; a 100k-entry tree ---------------------

BIGFILE_PATH = "data/weights.bin"


class _XofReader:
    """Deterministic incompressible bytes: the BLAKE3 extendable output of a seed."""

    def __init__(self, seed: bytes, size: int) -> None:
        import blake3

        self.h = blake3.blake3(seed)
        self.pos = 0
        self.size = size

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n < 0 else min(n, self.size - self.pos)
        if n <= 0:
            return b""
        out = self.h.digest(length=n, seek=self.pos)
        self.pos += n
        return out


class _HashSink:
    def __init__(self, f: Any, h: Any) -> None:
        self.f, self.h, self.n = f, h, 0

    def write(self, b: bytes) -> int:
        self.h.update(b)
        self.n += len(b)
        if self.f is not None:
            self.f.write(b)
        return len(b)


def _write_streamed_layout(oci_dir: Path, blob_tmp: Path, diff_id: str, blob_digest: str,
                           blob_size: int, media_type: str) -> str:
    """index.json, config and manifest around a layer blob already written to blob_tmp."""
    blobs = oci_dir / "blobs" / "sha256"
    os.replace(blob_tmp, blobs / blob_digest.split(":", 1)[1])
    layer = ob.Layer(b"")  # only for make_config's shape; diff_ids replaced below
    cfg = ob.make_config([layer])
    cfg["rootfs"]["diff_ids"] = [diff_id]
    cfg_bytes = ob._json(cfg)
    cfg_digest = "sha256:" + hashlib.sha256(cfg_bytes).hexdigest()
    (blobs / cfg_digest.split(":", 1)[1]).write_bytes(cfg_bytes)
    manifest = {"schemaVersion": 2, "mediaType": ob.OCI_MANIFEST,
                "config": {"mediaType": ob.OCI_CONFIG, "digest": cfg_digest,
                           "size": len(cfg_bytes)},
                "layers": [{"mediaType": media_type, "digest": blob_digest, "size": blob_size}]}
    man_bytes = ob._json(manifest)
    man_digest = "sha256:" + hashlib.sha256(man_bytes).hexdigest()
    (blobs / man_digest.split(":", 1)[1]).write_bytes(man_bytes)
    index = {"schemaVersion": 2, "mediaType": ob.OCI_INDEX,
             "manifests": [{"mediaType": ob.OCI_MANIFEST, "digest": man_digest,
                            "size": len(man_bytes),
                            "annotations": {ob.REF_NAME_ANNOTATION: TAG}}]}
    (oci_dir / "oci-layout").write_bytes(ob._json({"imageLayoutVersion": "1.0.0"}))
    (oci_dir / "index.json").write_bytes(ob._json(index))
    return man_digest


def write_bigfile_image(oci_dir: Path, size: int, seed: bytes = b"casfs-bench") -> dict[str, Any]:
    """One zstd layer holding ``data/weights.bin``: ``size`` incompressible bytes, streamed
    (never all in memory)."""
    import tarfile

    import zstandard

    t0 = time.perf_counter()
    if oci_dir.exists():
        shutil.rmtree(oci_dir)
    (oci_dir / "blobs" / "sha256").mkdir(parents=True)
    blob_tmp = oci_dir / "layer.tmp"
    diff_h, blob_h = hashlib.sha256(), hashlib.sha256()
    with open(blob_tmp, "wb") as f:
        blob_sink = _HashSink(f, blob_h)
        cctx = zstandard.ZstdCompressor(level=3)
        with cctx.stream_writer(blob_sink, closefd=False) as zw:
            tar_sink = _HashSink(zw, diff_h)
            with tarfile.open(fileobj=tar_sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for m in ob.parent_dirs(BIGFILE_PATH):
                    tar.addfile(m.tarinfo())
                info = ob.file(BIGFILE_PATH).tarinfo()
                info.size = size
                tar.addfile(info, _XofReader(seed, size))
    blob_digest = "sha256:" + blob_h.hexdigest()
    media_type = ob.LAYER_MEDIA_TYPES[("oci", "zstd")]
    digest = _write_streamed_layout(oci_dir, blob_tmp, "sha256:" + diff_h.hexdigest(),
                                    blob_digest, blob_sink.n, media_type)
    layer = {"name": "bigfile", "digest": blob_digest, "media_type": media_type,
             "compressed_bytes": blob_sink.n, "uncompressed_bytes": tar_sink.n,
             "file_bytes": size, "entries": 2, "files": 1, "dirs": 1, "symlinks": 0,
             "hardlinks": 0, "whiteouts": 0}
    return {"name": "bigfile", "description": f"one {size / 2**30:g} GiB incompressible file",
            "oci_dir": str(oci_dir), "tag": TAG, "digest": digest, "layers": [layer],
            "compressed_bytes": blob_sink.n, "uncompressed_bytes": tar_sink.n,
            "file_bytes": size, "entries": 2, "files": 1, "path": "/" + BIGFILE_PATH,
            "python": None, "installed": [], "build_seconds": round(time.perf_counter() - t0, 1)}


def build_bigfile_image(size: int, work: Path = WORK) -> dict[str, Any]:
    name = f"bigfile-{size}"
    return _cached(work, name, _source_key("bigfile", size), lambda oci: {
        **write_bigfile_image(oci, size), "name": name}, f"{name}: one incompressible file")


def tree_members(entries: int) -> list[ob.Member]:
    """At least ``entries`` entries (100,101 for 100,000): 100 top directories of 10
    subdirectories, each holding one symlink and empty files."""
    per_sub = max(1, math.ceil(((entries - 1) / 100 - 1) / 10 - 2))
    members: list[ob.Member] = [ob.directory("tree")]
    for i in range(100):
        members.append(ob.directory(f"tree/d{i:03d}"))
        for j in range(10):
            sub = f"tree/d{i:03d}/s{j:02d}"
            members.append(ob.directory(sub))
            members.append(ob.symlink(f"{sub}/link", "f0000"))
            members += [ob.file(f"{sub}/f{k:04d}") for k in range(per_sub)]
    return members


def build_tree_image(entries: int, work: Path = WORK) -> dict[str, Any]:
    name = f"tree-{entries}"

    def write(oci: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        members = tree_members(entries)
        layer = ob.Layer.from_members(members, "gzip")
        if oci.exists():
            shutil.rmtree(oci)
        built = ob.write_oci_layout(oci, [layer], tag=TAG)
        stats = _layer_stats("tree", layer, members)
        return {"name": name, "description": f"{len(members):,} entries (empty files, dirs, "
                "symlinks)", "oci_dir": str(oci), "tag": TAG, "digest": built.digest,
                "layers": [stats], "compressed_bytes": stats["compressed_bytes"],
                "uncompressed_bytes": stats["uncompressed_bytes"],
                "file_bytes": 0, "entries": len(members), "files": stats["files"],
                "python": None, "installed": [],
                "build_seconds": round(time.perf_counter() - t0, 1)}

    return _cached(work, name, _source_key("tree-v2", entries), write, f"{name}: a wide tree")


def layer_blob_path(meta: dict[str, Any], layer: dict[str, Any]) -> Path:
    return Path(meta["oci_dir"]) / "blobs" / "sha256" / layer["digest"].split(":", 1)[1]


# -- extracting -------------------------------------------------------------------------


def decompress_blob(src: Path, media_type: str, dst: Path) -> int:
    """Layer blob -> uncompressed tar file; returns the tar's size."""
    if media_type.endswith("+gzip") or media_type.endswith(".gzip"):
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            while buf := fi.read(4 << 20):
                fo.write(d.decompress(buf))
            fo.write(d.flush())
    elif media_type.endswith("+zstd"):
        import zstandard

        with open(src, "rb") as fi, open(dst, "wb") as fo:
            zstandard.ZstdDecompressor().copy_stream(fi, fo)
    else:
        shutil.copyfile(src, dst)
    return dst.stat().st_size


def extract_tar(tar_path: Path, dest: Path) -> None:
    """Unpack one layer tar over ``dest`` with GNU tar (the benchmark images carry no
    whiteouts; image building records their count and extraction refuses them)."""
    dest.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["tar", "-xf", str(tar_path), "-C", str(dest), "--numeric-owner",
                        "--same-permissions"], capture_output=True, text=True)
    if p.returncode != 0:
        raise BenchError(f"tar -x {tar_path} failed: {p.stderr[-2000:]}")


def native_root(meta: dict[str, Any], work: Path = WORK) -> Path:
    """The image extracted to local disk, once (cached under ``work/rootfs``)."""
    root = work / "rootfs" / f"{meta['name']}-{meta['digest'].split(':')[1][:12]}"
    done = root.with_name(root.name + ".done")
    if done.exists() and root.is_dir():
        return root
    earlier = re.compile(re.escape(meta["name"]) + r"-[0-9a-f]{12}(\.done)?")
    for stale in root.parent.glob(f"{meta['name']}-*"):  # earlier builds of this image
        if earlier.fullmatch(stale.name) and not stale.name.startswith(root.name):
            log(f"removing {stale} (an earlier build)")
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    log(f"extracting image {meta['name']} to {root}")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=work, prefix="extract-") as tmp:
        for layer in meta["layers"]:
            if layer.get("whiteouts"):
                raise BenchError("layer has whiteouts; the benchmark extractor does not apply them")
            tar = Path(tmp) / "layer.tar"
            decompress_blob(layer_blob_path(meta, layer), layer["media_type"], tar)
            extract_tar(tar, root)
            tar.unlink()
    done.touch()
    return root


# -- running a workload -----------------------------------------------------------------


@dataclass
class WorkloadResult:
    seconds: float
    stdout: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def workload_command(meta: dict[str, Any], root: Path, code: str,
                     home: Path) -> tuple[list[str], dict[str, str]]:
    """argv and env to run ``python -c code`` with ``root`` as the image's root of paths:
    the image's own interpreter (PYTHONHOME=<root><prefix>, LD_LIBRARY_PATH=<root><prefix>/lib)
    or, for images without one, the host's python with the image's site dir on PYTHONPATH."""
    py = meta["python"]
    base = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1"}
    if py["mode"] == "image":
        pfx = f"{root}{py['prefix']}"
        env = {**base, "PYTHONHOME": pfx, "LD_LIBRARY_PATH": f"{pfx}/lib"}
        return [f"{pfx}/bin/python3", "-c", code], env
    env = {**base, "PYTHONPATH": f"{root}{py['site']}"}
    return [sys.executable, "-S", "-s", "-c", code], env


def run_workload(meta: dict[str, Any], root: Path, code: str, home: Path,
                 timeout: float = 1800) -> float:
    """Wall seconds of one run (process start to exit); raises if it fails."""
    argv, env = workload_command(meta, root, code, home)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"workload {code!r} on {root} timed out after {timeout:.0f}s") from exc
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise BenchError(f"workload {code!r} on {root} failed ({p.returncode}): "
                         f"{p.stderr.strip()[-2000:]}")
    return seconds


def verify_workload(meta: dict[str, Any], root: Path, wl: Workload, home: Path) -> None:
    """Check (untimed) that the workload's modules really load from ``root``."""
    check = (f"{wl.code}\nimport sys\nroot = {str(root) + '/'!r}\n"
             f"bad = [(n, sys.modules[n].__file__) for n in {wl.modules!r} "
             f"if not sys.modules[n].__file__.startswith(root)]\n")
    if meta["python"]["mode"] == "image":
        check += "bad += [('os', sys.modules['os'].__file__)] if not sys.modules['os'].__file__.startswith(root) else []\n"
    check += "assert not bad, bad\n"
    run_workload(meta, root, check, home)
