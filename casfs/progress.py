"""Progress lines for long work, drawn on stderr only when it is a terminal.

`Progress.update()` draws one updating status line. `Progress.bar()` adds a bar for one
piece of work (a layer being downloaded and indexed); bars run concurrently (threads),
each on its own line above the status line. A finished bar is printed once, for good,
above the live block, so the block stays as tall as the work in flight.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


class ProgressBar:
    """One piece of work: bytes done of a total (when known), a rate and a note."""

    WIDTH = 20

    def __init__(self, owner: Progress, label: str, total: int = -1) -> None:
        self.owner = owner
        self.label = label
        self.total = total
        self.done = 0
        self.note = ""
        self.phase = ""
        self.started = time.monotonic()

    def advance(self, n: int) -> None:
        self.done += n
        self.owner._draw()

    def set_phase(self, phase: str, total: int | None = None) -> None:
        """Start another pass over the work (e.g. verifying, then indexing)."""
        self.phase = phase
        self.done = 0
        self.started = time.monotonic()
        if total is not None:
            self.total = total
        self.owner._draw(force=True)

    def set_note(self, note: str) -> None:
        self.note = note
        self.owner._draw()

    def finish(self, text: str) -> None:
        self.owner._finish(self, text)

    def line(self) -> str:
        rate = self.done / max(time.monotonic() - self.started, 1e-6)
        parts = [self.label]
        if self.phase:
            parts.append(self.phase)
        if self.total > 0:
            frac = min(1.0, self.done / self.total)
            filled = int(frac * self.WIDTH)
            parts.append("[" + "#" * filled + "." * (self.WIDTH - filled) + "]")
            parts.append(f"{human_bytes(self.done)}/{human_bytes(self.total)}")
        else:
            parts.append(human_bytes(self.done))
        parts.append(f"{human_bytes(rate)}/s")
        if self.note:
            parts.append(self.note)
        return " ".join(parts)


class Progress:
    """One updating status line plus live bars; silent when stderr is not a terminal
    (or when disabled). Thread-safe."""

    def __init__(self, enabled: bool | None = None, interval: float = 0.2) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.interval = interval
        self._last = 0.0
        self._width = 0
        self._lock = threading.RLock()
        self._bars: list[ProgressBar] = []
        self._committed: list[str] = []  # finished lines not yet printed
        self._status = ""
        self._lines = 0  # height of the live block drawn last (bars mode)

    # -- the single status line ----------------------------------------------------

    def update(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._bars or self._lines:
                self._status = text
                self._draw(force)
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
        if not self.enabled:
            return
        with self._lock:
            if self._bars or self._lines or self._committed:
                self._bars.clear()
                self._status = text
                self._draw(force=True)
                if self._lines:
                    sys.stderr.write("\n")
                sys.stderr.flush()
                self._lines = 0
                self._status = ""
                return
            self.update(text, force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._width = 0

    # -- bars ------------------------------------------------------------------------

    def bar(self, label: str, total: int = -1) -> ProgressBar:
        b = ProgressBar(self, label, total)
        if self.enabled:
            with self._lock:
                if not self._bars and not self._lines and self._width:
                    sys.stderr.write("\r" + " " * self._width + "\r")  # clear the plain line
                    self._width = 0
                self._bars.append(b)
                self._draw(force=True)
        return b

    def note(self, text: str) -> None:
        """A line printed once above the live block (e.g. a layer that needs no work)."""
        if self.enabled:
            with self._lock:
                self._committed.append(text)
                self._draw(force=True)

    def _finish(self, b: ProgressBar, text: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            if b in self._bars:
                self._bars.remove(b)
            self._committed.append(f"{b.label} {text}")
            self._draw(force=True)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last < self.interval:
                return
            self._last = now
            cols = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
            out = []
            # Back to the first line of the live block, clearing it as we go.
            if self._lines > 1:
                out.append(f"\x1b[{self._lines - 1}F")
            out.append("\r\x1b[J")
            for line in self._committed:
                out.append(line[:cols] + "\n")
            self._committed.clear()
            live = [b.line()[:cols] for b in self._bars]
            if self._status:
                live.append(self._status[:cols])
            out.append("\n".join(live))
            self._lines = len(live)
            sys.stderr.write("".join(out))
            sys.stderr.flush()
