"""Store doubles against the contract they stand for, so that a double cannot drift from
the real store unnoticed (the fuzz harness's stand-in did: it kept `put_blob(data,
digest)` after the indexer began passing the packed form, and every tar and zstd input
that reached an upload ended in a TypeError inside the harness).

Owns the drift checks and the behavioural checks of the shared doubles:

- Every stand-in for the store found in tests/, benchmarks/ and casfs/testing/ (a class
  defining a method of `casfs.store.Store`, such as `put_blob` or `get_blob`, stands
  for Store; one defining `get`/`put` whose first parameter is `key` stands for
  `casfs.store.backend.ObjectBackend`), read from the source (doubles local to a
  function are found too): each public method of the real class or Protocol exists on
  it, unless it passes unknown attributes on (`__getattr__`), and each method it does
  define has the real one's parameter names and kinds (defaults may differ; a method of
  a backend beyond the Protocol, like `size`, is compared with the file backend's).
- The shared doubles (casfs.testing.doubles) pass the same behavioural checks as the real
  file store, for every operation: put/get round trip, ObjectNotFound on a missing key,
  bounded reads, ranges, listing, deletion, syncing; and the real `Store` over each.
- The fuzz harness (casfs.testing.fuzz) accepts all its seeds and tells a broken double
  (a harness error, which stops the run) from casfs refusing bad input.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from inspect import Parameter
from pathlib import Path
from typing import Any

import pytest

from casfs.errors import CasfsError, ObjectNotFound, TagNotFound
from casfs.store import Store
from casfs.store import backend as backend_module
from casfs.store.backend import ObjectBackend
from casfs.store.local import FileBackend
from casfs.testing import fuzz
from casfs.testing.doubles import FaultyBackend, MemoryBackend, fail_first, fail_first_per_key
from casfs.testing.sources import python_files

REPO = Path(__file__).resolve().parent.parent
SCANNED = ("tests", "benchmarks", "casfs/testing")

Params = list[tuple[str, Any]]  # (name, inspect.Parameter kind), self left out


# == the contract, read from the real classes ======================================================

def public_methods(cls: type) -> dict[str, Params]:
    """name -> parameters of every public method a class or Protocol defines (its own and
    inherited, not object's or typing's)."""
    out: dict[str, Params] = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__ in ("builtins", "typing"):
            continue
        for name, member in vars(klass).items():
            if name.startswith("_") or not inspect.isfunction(member):
                continue
            params = list(inspect.signature(member).parameters.values())[1:]
            out[name] = [(p.name, p.kind) for p in params]
    return out


CONTRACTS: dict[str, dict[str, Params]] = {
    "ObjectBackend": public_methods(ObjectBackend),
    "Store": public_methods(Store),
}
BEYOND_PROTOCOL = public_methods(FileBackend)
"""Methods a backend may have beyond the Protocol (`size`): compared with the file store's."""


def drift(stands_for: str, methods: dict[str, Params], delegates: bool) -> list[str]:
    """How a double differs from the contract it stands for ([] when it does not)."""
    contract = CONTRACTS[stands_for]
    problems = []
    for name, params in contract.items():
        if name not in methods:
            if not delegates:
                problems.append(f"lacks {stands_for}.{name}{_fmt(params)}")
        elif methods[name] != params:
            problems.append(f"{name}{_fmt(methods[name])} differs from "
                            f"{stands_for}.{name}{_fmt(params)}")
    if stands_for == "ObjectBackend":
        for name, params in methods.items():
            real = BEYOND_PROTOCOL.get(name)
            if name not in contract and real is not None and params != real:
                problems.append(f"{name}{_fmt(params)} differs from FileBackend.{name}"
                                f"{_fmt(real)}")
    return problems


def _fmt(params: Params) -> str:
    marks = {Parameter.VAR_POSITIONAL: "*", Parameter.VAR_KEYWORD: "**"}
    out, star = [], False
    for name, kind in params:
        if kind == Parameter.KEYWORD_ONLY and not star:
            out.append("*")
            star = True
        star = star or kind == Parameter.VAR_POSITIONAL
        out.append(marks.get(kind, "") + name)
    return f"({', '.join(out)})"


# == every double, found in the source ==============================================================

@dataclass
class Double:
    where: str  # path:line
    name: str
    stands_for: str
    methods: dict[str, Params]
    delegates: bool

    @property
    def id(self) -> str:
        return f"{self.where.split(':')[0]}::{self.name}"


def _ast_params(fn: ast.FunctionDef) -> Params:
    a = fn.args
    params: Params = [(x.arg, Parameter.POSITIONAL_ONLY) for x in a.posonlyargs]
    params += [(x.arg, Parameter.POSITIONAL_OR_KEYWORD) for x in a.args]
    if a.vararg:
        params.append((a.vararg.arg, Parameter.VAR_POSITIONAL))
    params += [(x.arg, Parameter.KEYWORD_ONLY) for x in a.kwonlyargs]
    if a.kwarg:
        params.append((a.kwarg.arg, Parameter.VAR_KEYWORD))
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)
    return params if static else params[1:]


STORE_ONLY = set(CONTRACTS["Store"]) - set(CONTRACTS["ObjectBackend"])


def doubles_in(source: str, path: str) -> list[Double]:
    """The store doubles a module's source defines (at any depth: in functions too)."""
    tree = ast.parse(source)
    classes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}

    def own(cls: ast.ClassDef) -> dict[str, ast.FunctionDef]:
        return {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}

    def merged(cls: ast.ClassDef, seen: frozenset[str] = frozenset()) -> dict[str, ast.FunctionDef]:
        out: dict[str, ast.FunctionDef] = {}
        for base in cls.bases:  # bases defined in the same module
            if isinstance(base, ast.Name) and base.id in classes and base.id not in seen:
                out.update(merged(classes[base.id], seen | {cls.name}))
        out.update(own(cls))
        return out

    found = []
    for cls in classes.values():
        fns = merged(cls)
        names = set(fns)
        keyed = any(n in fns and _ast_params(fns[n])[:1] and _ast_params(fns[n])[0][0] == "key"
                    for n in ("get", "put"))
        if names & STORE_ONLY:
            stands_for = "Store"
        elif keyed:
            stands_for = "ObjectBackend"
        else:
            continue
        methods = {n: _ast_params(f) for n, f in fns.items() if not n.startswith("_")}
        found.append(Double(f"{path}:{cls.lineno}", cls.name, stands_for, methods,
                            "__getattr__" in fns))
    return found


def scan(root: Path = REPO) -> list[Double]:
    out = []
    for top in SCANNED:
        for path in python_files(root / top):
            if path.name == "test_doubles.py":
                continue
            out += doubles_in(path.read_text(), str(path.relative_to(root)))
    return out


KNOWN_DRIFT: dict[str, str] = {
    # Doubles known to have drifted (expected to fail, not strict) until brought in line;
    # none today: any drift fails.
}


FOUND = scan()


@pytest.mark.parametrize("double", [
    pytest.param(d, id=d.id, marks=[pytest.mark.xfail(reason=KNOWN_DRIFT[d.id], strict=False)]
                 if d.id in KNOWN_DRIFT else [])
    for d in FOUND])
def test_double_keeps_the_contract(double: Double) -> None:
    problems = drift(double.stands_for, double.methods, double.delegates)
    assert problems == [], (
        f"{double.where} {double.name} stands for {double.stands_for} and has drifted from "
        f"it: {'; '.join(problems)}. Use casfs.testing.doubles.MemoryBackend (under the real "
        "Store where a Store is needed), or bring the double in line.")


def test_the_scan_finds_the_shared_doubles() -> None:
    names = {(d.where.split(":")[0], d.name) for d in FOUND}
    assert ("casfs/testing/doubles.py", "MemoryBackend") in names
    assert ("casfs/testing/doubles.py", "FaultyBackend") in names


# The fuzz harness's stand-in as it was (benchmarks/faults.py before this module): it
# stood for Store and kept put_blob(data, digest) when the indexer began passing the
# stored form as a third argument.
DRIFTED_FUZZ_DOUBLE = '''
def fuzz_targets():
    class NoStore:
        def put_blob(self, data: bytes, digest: str | None = None) -> tuple[str, int]:
            return digest or "", 0

    return NoStore()
'''


def test_the_drifted_fuzz_double_is_caught() -> None:
    (double,) = doubles_in(DRIFTED_FUZZ_DOUBLE, "benchmarks/faults.py")
    assert double.stands_for == "Store"
    problems = drift(double.stands_for, double.methods, double.delegates)
    assert "put_blob(data, digest) differs from Store.put_blob(data, digest, packed)" in problems
    assert any(p.startswith("lacks Store.get_blob") for p in problems)


def test_signatures_compare_names_and_kinds_not_defaults() -> None:
    def real(self: Any, key: str, *, max_bytes: int | None = None) -> None: ...
    def other_default(self: Any, key: str, *, max_bytes: int | None = 5) -> None: ...
    def positional(self: Any, key: str, max_bytes: int | None = None) -> None: ...
    def renamed(self: Any, name: str, *, max_bytes: int | None = None) -> None: ...

    def params(f: Callable[..., Any]) -> Params:
        return [(p.name, p.kind) for p in list(inspect.signature(f).parameters.values())[1:]]

    assert params(other_default) == params(real)
    assert params(positional) != params(real)
    assert params(renamed) != params(real)


# == the shared doubles behave as the file store does =================================================

def _file(tmp: Path) -> Any:
    return FileBackend(tmp / "store")


BACKENDS: dict[str, Callable[[Path], Any]] = {
    "FileBackend (the reference)": _file,
    "MemoryBackend": lambda tmp: MemoryBackend(),
    "FaultyBackend(MemoryBackend)": lambda tmp: FaultyBackend(MemoryBackend()),
    "FaultyBackend(FileBackend)": lambda tmp: FaultyBackend(_file(tmp)),
}


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    return BACKENDS[request.param](tmp_path)


def _has_param(method: str, name: str) -> bool:
    return any(n == name for n, _ in CONTRACTS["ObjectBackend"].get(method, []))


def test_backend_put_get_round_trip(backend: Any) -> None:
    assert isinstance(backend.url, str) and backend.url
    data = random.Random(1).randbytes(70_000)
    backend.put("blobs/ab/abcd", data)
    assert backend.get("blobs/ab/abcd") == data
    assert backend.exists("blobs/ab/abcd")
    backend.put("tags/t", b"one")
    backend.put("tags/t", b"two")  # tags: last writer wins
    assert backend.get("tags/t") == b"two"
    backend.put("empty", b"")
    assert backend.get("empty") == b""


def test_backend_missing_key(backend: Any) -> None:
    with pytest.raises(ObjectNotFound):
        backend.get("blobs/00/missing")
    with pytest.raises(ObjectNotFound):
        backend.get_range("blobs/00/missing", 0, 10)
    assert not backend.exists("blobs/00/missing")
    backend.delete("blobs/00/missing")  # deleting a missing key is no error


def test_backend_ranges(backend: Any) -> None:
    backend.put("packs/p", bytes(range(100)))
    assert backend.get_range("packs/p", 10, 5) == bytes(range(10, 15))
    assert backend.get_range("packs/p", 95, 10) == bytes(range(95, 100))  # fewer at the end
    assert backend.get_range("packs/p", 0, 100) == bytes(range(100))


def test_backend_bounded_get(backend: Any) -> None:
    if not _has_param("get", "max_bytes"):
        pytest.skip("the Protocol's get takes no max_bytes")
    too_large = backend_module.ObjectTooLarge  # type: ignore[attr-defined]
    backend.put("manifests/m", b"x" * 100)
    assert backend.get("manifests/m", max_bytes=100) == b"x" * 100
    assert backend.get("manifests/m", max_bytes=None) == b"x" * 100
    with pytest.raises(too_large):
        backend.get("manifests/m", max_bytes=99)
    with pytest.raises(ObjectNotFound):
        backend.get("manifests/none", max_bytes=10)


def test_backend_size(backend: Any) -> None:
    backend.put("a/b", b"12345")
    assert backend.size("a/b") in (5, -1)
    assert backend.size("a/missing") is None


def test_backend_listing(backend: Any) -> None:
    keys = ["blobs/aa/aa1", "blobs/aa/aa2", "blobs/bb/bb1", "manifests/m1", "tags/x"]
    for i, k in enumerate(keys):
        backend.put(k, b"v" * (i + 1))
    assert sorted(backend.list("blobs/")) == keys[:3]
    assert sorted(backend.list("blobs/aa/")) == keys[:2]
    assert sorted(backend.list("blobs/aa/aa1")) == ["blobs/aa/aa1"]
    assert list(backend.list("nothing/")) == []
    assert sorted(backend.list("")) == sorted(keys)  # each exactly once
    before = time.time() - 60
    info = sorted(backend.list_info("blobs/"))
    assert [(k, n) for k, n, _ in info] == [(k, i + 1) for i, k in enumerate(keys[:3])]
    assert all(isinstance(t, float) and t > before for _, _, t in info)
    backend.delete("blobs/aa/aa1")
    assert sorted(backend.list("blobs/aa/")) == ["blobs/aa/aa2"]
    with pytest.raises(ObjectNotFound):
        backend.get("blobs/aa/aa1")


def test_backend_syncs(backend: Any) -> None:
    backend.put("a", b"1")
    backend.sync()
    if "deferred_syncs" not in CONTRACTS["ObjectBackend"]:
        return
    with backend.deferred_syncs():
        backend.put("b", b"2")
        with backend.deferred_syncs():  # blocks nest
            backend.put("c", b"3")
        assert backend.get("b") == b"2"  # visible before it is durable
        backend.sync()
    assert sorted(backend.list("")) == ["a", "b", "c"]
    with pytest.raises(RuntimeError), backend.deferred_syncs():
        backend.put("d", b"4")
        raise RuntimeError("the block's own error is what is reported")
    assert backend.get("d") == b"4"


def test_memory_backend_models_durability() -> None:
    b = MemoryBackend()
    b.put("a", b"1")
    assert b.unsynced == set()
    if "deferred_syncs" not in CONTRACTS["ObjectBackend"]:
        return
    with b.deferred_syncs():
        b.put("b", b"2")
        assert b.unsynced == {"b"}
    assert b.unsynced == set() and b.syncs == 1


def test_store_over_each_backend(backend: Any) -> None:
    store = Store(backend)
    store.check_format(create=True)
    data = random.Random(2).randbytes(5000) + b"\0" * 5000
    digest, uploaded = store.put_blob(data)
    assert uploaded > 0 and store.has_blob(digest) and store.get_blob(digest) == data
    assert store.put_blob(data) == (digest, 0)  # present: not uploaded again
    with pytest.raises(ObjectNotFound):
        Store(backend).get_blob("0" * 64)
    m = store.put_manifest(b"not really a manifest")
    assert store.get_manifest(m) == b"not really a manifest"
    store.set_tag("t", m)
    assert store.list_tags() == ["t"] and store.get_tag("t") == m
    store.delete_tag("t")
    with pytest.raises(TagNotFound):
        store.get_tag("t")
    pack = store.put_pack(b"0123456789")
    assert store.get_pack_range(pack, 3, 4) == b"3456"


def test_faulty_backend_counts_and_injects() -> None:
    b = FaultyBackend(MemoryBackend(), fail_first_per_key(1, ops=("get",), prefix="blobs/"))
    b.put("blobs/a", b"x")
    b.put("tags/t", b"y")
    with pytest.raises(CasfsError, match="injected"):
        b.get("blobs/a")
    assert b.get("blobs/a") == b"x"  # the second get of the key goes through
    assert b.get("tags/t") == b"y"
    assert b.gets["blobs/a"] == 2 and b.calls["put"] == 2 and b.puts == ["blobs/a", "tags/t"]
    assert b.injected == 1
    first = FaultyBackend(MemoryBackend(), fail_first(2))
    for _ in range(2):
        with pytest.raises(CasfsError):
            first.exists("k")
    assert first.exists("k") is False


# == the fuzz harness ================================================================================

@pytest.fixture(scope="module")
def targets() -> list[fuzz.Target]:
    return fuzz.fuzz_targets()


def test_fuzz_targets_accept_their_seeds(targets: list[fuzz.Target]) -> None:
    """What benchmarks/faults.py checks before it fuzzes: a double out of step with what
    the indexer calls fails here, in the test suite, and not only in a benchmark run."""
    fuzz.check_seeds(targets)
    assert [t.name for t in targets] == ["manifest reader", "tar ingestion",
                                         "gzip layer ingestion", "zstd layer ingestion"]


@contextlib.contextmanager
def _no_alarm() -> Iterator[None]:
    import signal

    old = signal.signal(signal.SIGALRM, lambda *a: None)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_fuzz_counts_refusals_and_stops_on_a_harness_error(targets: list[fuzz.Target],
                                                            tmp_path: Path) -> None:
    tar = targets[1]
    with _no_alarm():
        tar.execute(b"not a tar" * 100, tmp_path, "mutational")  # casfs refuses it
        assert tar.stats["refused"] >= 1 and tar.stats["crashes"] == 0
        tar.execute(tar.corpus[0], tmp_path, "mutational")
        assert tar.stats["accepted"] >= 1

        def drifted(data: bytes) -> str:
            MemoryBackend().get("k", b"an argument the double does not take")  # type: ignore[call-arg]
            return "accepted"

        broken = fuzz.Target("broken", [b""], drifted)
        with pytest.raises(fuzz.HarnessError, match="the harness failed, not casfs"):
            broken.execute(b"x", tmp_path, "mutational")
        assert broken.stats["crashes"] == 0  # not counted as a finding in casfs

        def finding(data: bytes) -> str:
            raise AssertionError("an accepted layer built something invalid")

        found = fuzz.Target("finding", [b""], finding)
        found.execute(b"x", tmp_path, "mutational")
        assert found.stats["crashes"] == 1 and found.crashes


def test_harness_errors_told_from_casfs_errors() -> None:
    def call_drifted() -> None:  # what Python raises at a caller passing what a double lacks
        raise TypeError("MemoryBackend.get() got an unexpected keyword argument 'max_bytes'")

    with pytest.raises(TypeError) as info:
        call_drifted()
    assert fuzz.is_harness_error(info.value)  # names a harness double
    try:
        int("x")  # raised here, in a test module: casfs code as far as the harness knows
    except ValueError as exc:
        assert not fuzz.is_harness_error(exc)
    assert not fuzz.is_harness_error(AssertionError("a finding"))
