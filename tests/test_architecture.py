"""The floors of the house (docs/architecture.md), checked: every import in casfs/,
indexer/, prefetch/ and benchmarks/, at the top of a file or inside a function, must go
from a floor to one it may depend on, and no two files may import each other, directly
or in a circle.

Floors, lowest first; a module may import its own floor and those listed:

    base      errors, digests, locations, ranges, process plumbing, metrics, progress
    store     the object store and what is stored (keys, content, pack indexes, refs)
    manifest  the manifest format and what is derived from it alone (the EROFS image)
    cache     the node cache and the fetcher
    model     the filesystem model (vfs)
    prefetch  prefetch/  (on the core floors above, never on the app)
    indexer   indexer/   (likewise)
    app       the CLI, daemons, agent, FUSE adapter, gc, check, kernel mode, test kit
    bench     benchmarks/ (anything but tests/)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from casfs.testing.sources import python_files

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("casfs", "indexer", "prefetch", "benchmarks")

FLOOR_OF: list[tuple[str, str]] = [  # (module prefix, floor): the longest prefix wins
    ("casfs.errors", "base"), ("casfs.digest", "base"), ("casfs.locations", "base"),
    ("casfs.ranges", "base"), ("casfs.process", "base"), ("casfs.metrics", "base"),
    ("casfs.progress", "base"), ("casfs.mountconfig", "base"), ("casfs.__init__", "base"),
    ("casfs.store", "store"), ("casfs.packindex", "store"), ("casfs.refs", "store"),
    ("casfs.manifest", "manifest"), ("casfs.erofs", "manifest"),
    ("casfs.cache", "cache"), ("casfs.fetch", "cache"), ("casfs.localimage", "cache"),
    ("casfs.vfs", "model"),
    ("prefetch", "prefetch"),
    ("indexer", "indexer"),
    ("casfs", "app"),
    ("benchmarks", "bench"),
]
CORE = {"base", "store", "manifest", "cache", "model"}
MAY_IMPORT: dict[str, set[str]] = {
    "base": {"base"},
    "store": {"base", "store"},
    "manifest": {"base", "manifest"},
    "cache": {"base", "store", "manifest", "cache"},
    "model": {"base", "store", "manifest", "cache", "model"},
    "prefetch": CORE | {"prefetch"},
    "indexer": CORE | {"indexer"},
    "app": CORE | {"prefetch", "indexer", "app"},
    "bench": CORE | {"prefetch", "indexer", "app", "bench"},
}


def floor_of(module: str) -> str | None:
    best = None
    for prefix, floor in FLOOR_OF:
        if (module == prefix or module.startswith(prefix + ".")) and \
                (best is None or len(prefix) > len(best[0])):
            best = (prefix, floor)
    return best[1] if best else None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] if len(parts) > 1 else parts
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    """Every source file of the packages (scratch directories under them, such as the
    benchmarks' work/ copies of sources, are not part of the house)."""
    out = {}
    for package in PACKAGES:
        for path in python_files(ROOT / package):
            out[module_name(path)] = path
    return out


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every first-party module path imports, wherever the import statement is (a
    `from pkg import name` counts as pkg.name when that is a module, else pkg)."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "tests":
                found.add(name)
                continue
            # the longest known module the name starts with
            parts = name.split(".")
            for n in range(len(parts), 0, -1):
                candidate = ".".join(parts[:n])
                if candidate in known:
                    found.add(candidate)
                    break
    found.discard(here)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    return {name: imports_of(path, known) for name, path in modules.items()}


def test_every_module_has_a_floor(graph: dict[str, set[str]]) -> None:
    assert [m for m in graph if floor_of(m) is None] == []


def test_imports_follow_the_floors(graph: dict[str, set[str]]) -> None:
    broken = []
    for module, deps in sorted(graph.items()):
        floor = floor_of(module)
        assert floor is not None
        for dep in sorted(deps):
            if dep.split(".")[0] == "tests":
                broken.append(f"{module} ({floor}) imports the test module {dep}")
                continue
            if dep.split(".")[0] == module.split(".")[0] == "casfs" and \
                    dep == "casfs":
                continue  # the package itself (its __init__ is base)
            dep_floor = floor_of(dep)
            if dep_floor not in MAY_IMPORT[floor]:
                broken.append(f"{module} ({floor}) imports {dep} ({dep_floor})")
    assert broken == []


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    """No file reaches itself through imports (counting imports inside functions).
    A package's __init__ re-exporting its modules is not a cycle of files."""
    edges = {m: {d for d in deps if d in graph and not m.startswith(d + ".")}
             for m, deps in graph.items()}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert cycles == []


def test_each_module_says_what_it_owns() -> None:
    missing = [str(p.relative_to(ROOT)) for p in all_modules().values()
               if p.stat().st_size and ast.get_docstring(ast.parse(p.read_text())) is None]
    assert missing == []


def test_heavy_dependencies_stay_in_their_modules(graph: dict[str, set[str]]) -> None:
    """pyfuse3 only in the FUSE adapter (and the daemon that starts it), boto3 only in
    the S3 store, lmdb only in the cache."""
    allowed = {"pyfuse3": ("casfs.fuse_ops", "casfs.daemon", "casfs.agent", "casfs.kernel",
                           "casfs.testing"),
               "boto3": ("casfs.store.s3", "casfs.testing", "benchmarks"),
               "botocore": ("casfs.store.s3", "casfs.testing", "benchmarks"),
               "lmdb": ("casfs.cache",)}
    offenders = []
    for name, path in all_modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for mod in mods:
                top = mod.split(".")[0]
                if top in allowed and not name.startswith(allowed[top]):
                    offenders.append(f"{name} imports {mod}")
    assert offenders == []
