"""Terminal progress for long commands (pull, restore, verify, prune): done/total, rate, ETA.

Role: one line on stderr, redrawn in place with ``\\r`` at most every
`Progress.interval` seconds (4 per second), for commands that move many
bytes (or chunks).  Only drawn when the user is watching: stderr is a TTY
and the command does not print ``--json``, or ``--progress`` forces it
(`wanted`).  Nothing is ever written to stdout, so ``--json`` output and
pipes stay clean.  No dependency: plain ANSI (``\\r`` and erase-line).

The formatting is pure (`format_line`, `format_bytes`, `format_duration`)
and unit-tested; `Progress` only adds the clock, the rate window and the
stream.

Invariants: `Progress.update` is cheap when nothing is drawn (a lock, a
compare); it may be called from any thread; ``done`` never goes backwards
on screen; nothing is drawn in the first `Progress.interval` (a quick run
prints nothing); `Progress.close` redraws and ends the line only if one was drawn.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import TextIO

#: Erase from the cursor to the end of the line (ANSI EL).
_EL = "\x1b[K"


def add_progress_option(p: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress`` (default: on when stderr is a TTY and no --json)."""
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="draw progress on stderr even when it is not a terminal (default: only on a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="never draw progress")


def wanted(args: argparse.Namespace, stream: TextIO | None = None) -> bool:
    """Whether to draw: ``--progress``/``--no-progress`` if given, else stderr is a
    TTY and the command prints no ``--json``."""
    forced = getattr(args, "progress", None)
    if forced is not None:
        return bool(forced)
    stream = sys.stderr if stream is None else stream
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tty and not getattr(args, "json", False)


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``; binary units, 3 significant figures."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            if unit == "B":
                return f"{int(n)} B"
            return f"{n:.2f} {unit}" if abs(n) < 10 else f"{n:.1f} {unit}" if abs(n) < 100 else f"{n:.0f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(s: float) -> str:
    """Seconds as ``'42s'``, ``'3m05s'``, ``'2h07m'``."""
    s = int(round(max(0.0, s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_line(label: str, done: int, total: int | None, rate: float | None, elapsed: float,
                unit: str = "bytes") -> str:
    """One progress line: ``'restore  64.0 MiB / 256 MiB  25%  120 MiB/s  ETA 2s'``.

    ``total`` None: unknown (no percentage, no ETA).  ``rate`` in units per
    second, None or 0 while unknown.  ``unit`` "bytes" (binary sizes) or a
    word for counted things (``"chunks"``).
    """
    def amount(x: float) -> str:
        return format_bytes(x) if unit == "bytes" else f"{int(x)}"

    parts = [label]
    if total is not None:
        parts.append(f"{amount(done)} / {amount(total)}" + ("" if unit == "bytes" else f" {unit}"))
        parts.append(f"{100.0 * done / total:3.0f}%" if total else "100%")
    else:
        parts.append(amount(done) + ("" if unit == "bytes" else f" {unit}"))
    if rate:
        parts.append(f"{format_bytes(rate)}/s" if unit == "bytes" else f"{rate:.1f} {unit}/s")
    if total is not None and done >= total:
        parts.append(f"in {format_duration(elapsed)}")
    elif total is not None and rate:
        parts.append(f"ETA {format_duration((total - done) / rate)}")
    return "  ".join(parts)


class Progress:
    """A progress line on ``stream`` (see the module doc).

    Fields: ``label``; ``total`` (None: unknown); ``unit``; ``stream`` (None:
    draw nothing); ``interval`` (seconds between redraws); ``_done`` (latest
    count); ``_t0`` (monotonic start); ``_samples`` ((time, done) of the last
    ``WINDOW`` seconds, for the rate); ``_last_draw``; ``_drawn`` (a line is
    on screen); ``_lock`` (guards all of these).
    """

    WINDOW = 5.0

    def __init__(self, label: str, total: int | None = None, *, stream: TextIO | None = None,
                 unit: str = "bytes", interval: float = 0.25, clock=time.monotonic) -> None:
        self.label, self.total, self.unit, self.stream, self.interval = label, total, unit, stream, interval
        self._clock = clock
        self._t0 = clock()
        self._done = 0
        self._samples: list[tuple[float, int]] = [(self._t0, 0)]
        self._last_draw = self._t0  # nothing drawn in the first interval: quick runs stay quiet
        self._drawn = False
        self._lock = threading.Lock()

    @classmethod
    def for_args(cls, args: argparse.Namespace, label: str, total: int | None = None, **kw) -> "Progress":
        """A Progress that draws on stderr when `wanted` says so."""
        return cls(label, total, stream=sys.stderr if wanted(args) else None, **kw)

    def rate(self, now: float | None = None) -> float | None:
        """Units per second over the last `WINDOW` seconds (None before any progress)."""
        now = self._clock() if now is None else now
        t, d = self._samples[0]
        if now - t <= 0 or self._done == d:
            return None
        return (self._done - d) / (now - t)

    def update(self, done: int, total: int | None = None) -> None:
        """Progress is now ``done`` (of ``total``, if it changed); redraw if due."""
        if self.stream is None:
            return
        with self._lock:
            if total is not None:
                self.total = total
            self._done = max(self._done, done)
            now = self._clock()
            if now - self._last_draw < self.interval:
                return
            self._sample(now)
            self._draw(now)

    def add(self, n: int) -> None:
        """Progress advanced by ``n``."""
        if self.stream is None:
            return
        with self._lock:
            self._done += n
            done = self._done
        self.update(done)

    def close(self) -> None:
        """Draw the final line and end it (only if anything was drawn or is due)."""
        if self.stream is None:
            return
        with self._lock:
            now = self._clock()
            self._sample(now)
            if self._drawn:
                self._draw(now, final=True)
                self.stream.write("\n")
                self.stream.flush()
            self._drawn = False

    def _sample(self, now: float) -> None:
        self._samples.append((now, self._done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.WINDOW:
            self._samples.pop(0)

    def _draw(self, now: float, final: bool = False) -> None:
        elapsed = now - self._t0
        rate = (self._done / elapsed if elapsed > 0 else None) if final else self.rate(now)
        line = format_line(self.label, self._done, self.total, rate, elapsed, self.unit)
        self.stream.write("\r" + line + _EL)
        self.stream.flush()
        self._last_draw = now
        self._drawn = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
