"""Logging for long-running processes that never blocks on its output.

Role: ``serve`` and its worker processes log from their event-loop threads.  A
plain `logging.StreamHandler` writes stderr right there, and when whatever reads
stderr stops reading -- journald stalled, a container runtime's log driver in
blocking mode, a terminal paused with Ctrl-S, ``serve 2>&1 | less`` -- the write
blocks once the pipe is full, and every export and client of the process with
it.  Clients choose how much is logged (each connection is a line or two): 1500
connections from one script froze a server whose stderr nobody read until the
reader went away (298 s).  `install` puts one handler on the root logger that
hands each record to a bounded queue; one writer thread writes them out.  When
the queue is full the record is dropped and counted, and the writer says how
many were dropped once it gets going again.

Invariants: a log call never waits for I/O (the record is formatted by the
caller, as a `logging.handlers.QueueHandler` does, then put without blocking or
counted as dropped); the records written keep their order; a dropped record is
always counted, and the count is written where the gap is (before the next
record the queue takes, or at the end).
`flush` waits (bounded) until everything queued is written: the CLI calls it
before printing its final error line and at exit.

Fields of the shared state (module globals, set once by `install`):
``_queue`` (records, then None to stop; at most `QUEUE_RECORDS`); ``_thread``
(the writer, which holds the caller-side handler and its ``dropped`` count).
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import os
import queue
import stat
import sys
import threading
import time

__all__ = ["install", "flush", "QUEUE_RECORDS"]

#: Records held while the output is slow (~0.3-1 KB each: a few MB at most).
QUEUE_RECORDS = 10000


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """A `QueueHandler` that counts what a full queue refuses instead of blocking,
    and queues the count (`_dropped_record`) where the gap is: before the next
    record the queue takes.

    Fields: ``queue``; ``dropped`` (records refused and not yet reported; under
    ``_count_lock``, which is held only around non-blocking puts)."""

    def __init__(self, q: queue.Queue) -> None:
        super().__init__(q)
        self.dropped = 0
        self._count_lock = threading.Lock()

    def enqueue(self, record: logging.LogRecord) -> None:
        with self._count_lock:
            try:
                if self.dropped:
                    self.queue.put_nowait(_dropped_record(self.dropped))
                    self.dropped = 0
                self.queue.put_nowait(record)
            except queue.Full:
                self.dropped += 1

    def take_dropped(self) -> int:
        with self._count_lock:
            n, self.dropped = self.dropped, 0
        return n


def _dropped_record(n: int) -> logging.LogRecord:
    return logging.makeLogRecord({
        "name": "nbdbackup.log", "levelno": logging.WARNING, "levelname": "WARNING",
        "msg": f"{n} log record(s) dropped: the log's reader was not keeping up"})


_queue: queue.Queue | None = None
_thread: threading.Thread | None = None


def _write(q: queue.Queue, source: _DroppingQueueHandler, out: logging.Handler) -> None:
    while True:
        record = q.get()
        try:
            if record is None:  # the end: a count the queue never had room for
                n = source.take_dropped()
                if n:
                    out.handle(_dropped_record(n))
                return
            out.handle(record)
        finally:
            q.task_done()


def _shutdown() -> None:
    """At exit: write what is queued (bounded), then any count the queue had no room for."""
    if flush(2.0) and _queue is not None and _thread is not None:
        try:
            _queue.put(None, timeout=0.5)
        except queue.Full:
            return
        _thread.join(0.5)


def install(level: int, fmt: str, stream=None) -> None:
    """Log records of ``level`` and above to ``stream`` (stderr) in format ``fmt``,
    through the queue and its writer thread (once per process)."""
    global _queue, _thread
    assert _thread is None, "logqueue.install called twice"
    stream = sys.stderr if stream is None else stream
    out = logging.StreamHandler(stream)
    out.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.setLevel(level)
    if _is_regular_file(stream):  # a write there never waits for a reader: no queue needed
        root.addHandler(out)
        return
    _queue = queue.Queue(QUEUE_RECORDS)
    handler = _DroppingQueueHandler(_queue)
    root.addHandler(handler)
    _thread = threading.Thread(target=_write, args=(_queue, handler, out), name="nbdbackup-log", daemon=True)
    _thread.start()
    atexit.register(_shutdown)


def _is_regular_file(stream) -> bool:
    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (AttributeError, OSError, ValueError):
        return False


def flush(timeout: float = 1.0) -> bool:
    """Wait until every queued record is written, at most ``timeout`` s (the output
    may be stuck: never wait for ever); True if it was all written."""
    if _queue is None:
        return True
    deadline = time.monotonic() + timeout
    while _queue.unfinished_tasks:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)
    return True
