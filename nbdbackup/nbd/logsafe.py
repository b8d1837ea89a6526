"""Client-supplied text in log lines and error messages, made safe and short.

Role: a client chooses export names, option payloads, certificate subjects;
whatever of it reaches a log line (or an error message that may be logged)
goes through `clip` first, and the warnings one connection may cause go
through a `WarningBudget`.  A hostile client once wrote 9 MB of log in a
minute by asking for 64 KiB export names; with these, a connection costs at
most a few hundred bytes per line and a bounded number of lines.

Invariants:
- `clip` returns ASCII only, with no control characters (no newline can
  forge a log line, no terminal escape or bidi override reaches a
  terminal), at most about ``10 * limit`` characters long, whatever it is given.
- A `WarningBudget` allows at most ``limit`` warnings; every further one is
  counted, and `summary` reports the count once.
"""

from __future__ import annotations

#: Characters of a client-supplied string kept in a log line.
CLIP = 64


def clip(value: str | bytes | bytearray | memoryview, limit: int = CLIP) -> str:
    """``value`` quoted for a log line: escaped like `ascii` (non-ASCII and
    non-printable characters as ``\\xNN``/``\\uNNNN``), cut to ``limit``
    characters (bytes for binary values), with the full size in bytes appended
    when cut: ``'aaaa'...(65536 bytes)``."""
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)  # one spelling: b'...'
    if len(value) <= limit:
        return ascii(value)
    total = len(value) if isinstance(value, bytes) else len(value.encode("utf-8", "surrogatepass"))
    return f"{ascii(value[:limit])}...({total} bytes)"


class WarningBudget:
    """How many more warnings one source (a connection) may log.

    Fields: ``limit`` (warnings logged in full); ``logged`` (so far);
    ``suppressed`` (warnings dropped after the limit).
    """

    def __init__(self, limit: int = 10) -> None:
        self.limit = limit
        self.logged = 0
        self.suppressed = 0

    def allow(self) -> bool:
        """True: log this warning.  False: it was counted instead."""
        if self.logged < self.limit:
            self.logged += 1
            return True
        self.suppressed += 1
        return False

    def summary(self) -> str | None:
        """One line about the dropped warnings (None when none were), then reset."""
        if not self.suppressed:
            return None
        n, self.suppressed = self.suppressed, 0
        return f"{n} more warning{'s' if n != 1 else ''} not logged (limit {self.limit} per connection)"
