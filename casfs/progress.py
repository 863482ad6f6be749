"""Progress lines for long work, drawn on stderr only when it is a terminal."""

from __future__ import annotations

import sys
import time


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    """One updating status line; silent when stderr is not a terminal (or when disabled)."""

    def __init__(self, enabled: bool | None = None, interval: float = 0.2) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.interval = interval
        self._last = 0.0
        self._width = 0

    def update(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        pad = max(0, self._width - len(text))
        self._width = len(text)
        sys.stderr.write("\r" + text + " " * pad)
        sys.stderr.flush()

    def done(self, text: str = "") -> None:
        if self.enabled:
            self.update(text, force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._width = 0
