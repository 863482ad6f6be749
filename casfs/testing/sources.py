"""The project's own source files, for the tests that read the code itself (the
architecture's floors, the doubles' signatures): scratch directories under the packages
(the benchmarks' work/ and results/, with their copies of sources and perhaps a mount
left behind by a killed run) are pruned before they are entered, never stat'ed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

SCRATCH = frozenset({"work", "results", "__pycache__", ".mypy_cache", ".ruff_cache"})


def python_files(top: Path) -> Iterator[Path]:
    """Every *.py under top, in sorted order, scratch directories left out."""
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d not in SCRATCH)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name
