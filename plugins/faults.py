"""nbdkit Python plugin: a raw file whose requests fail or stall by rule.

Role: targeted fault injection for backup sources and targets.  nbdkit's
error filter fails requests at a rate or while a file exists; this plugin
fails exactly the requests that touch a byte range, a given number of times,
after letting a given number through, with the errno asked for, and can
delay them.  Tests (and people reproducing a field problem) can say "the
second write to cluster 7 fails with ENOSPC" and know which one it was.

Run by nbdkit as a subprocess (nbdkit embeds its own Python; the project's
fallocate binding comes from this checkout, see `_plugincommon.use_checkout`)::

    nbdkit -U SOCK python plugins/faults.py file=DISK [rules=RULES.json] [log=LOG.jsonl] [readonly=1]

``rules`` is a JSON list; each rule is an object with:

=========  ============================================================
op         ``pread``, ``pwrite``, ``zero``, ``trim``, ``flush``,
           ``extents``, ``cache`` or ``any``
offset     first byte of the range a request must overlap (default 0)
length     length of that range; ``null`` (default) runs to the end.
           FLUSH has no range and matches any range.
error      errno name (``EIO``, ``ENOSPC``, ...) to fail with; absent or
           ``null``: no error (a pure delay)
delay      seconds to sleep before answering (default 0)
skip       matching requests to let through before firing (default 0)
count      how many times to fire; ``null`` (default): every time
=========  ============================================================

The first rule that fires decides a request.  The rules file is re-read when
its inode, size or mtime changes (write it elsewhere and rename it over) (checked on every request; a missing file means no
rules), and the counters restart with it, so a test can arm, change and
disarm faults while clients stay connected.  Every firing appends one JSON
line to ``log``: ``{"rule", "op", "offset", "length", "error", "delay"}``.

Serving: thread model ``parallel``; one file descriptor shared by every
connection, so multi-conn is advertised and FLUSH (``fdatasync``) covers
every connection's writes; FUA is native (``RWF_DSYNC``).  TRIM punches a
hole; WRITE_ZEROES uses ``fallocate`` (punch when trimming is allowed, zero
range otherwise) and falls back to writing zeroes.  Extents come from
``SEEK_DATA``/``SEEK_HOLE``; CACHE is ``posix_fadvise(WILLNEED)``.

Invariants: rule state (counters, the loaded file identity) changes only
under ``_lock``; a request that fires is never performed (an injected write
error leaves the disk unchanged); delays sleep outside the lock.
"""

from __future__ import annotations

import errno
import io
import json
import os
import sys
import threading
import time

import nbdkit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _plugincommon import seek_extents, use_checkout  # noqa: E402

use_checkout()
from nbdbackup.blockdev.file import (  # noqa: E402
    FALLOC_FL_KEEP_SIZE as _FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE as _FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE as _FALLOC_FL_ZERO_RANGE,
    fallocate,
)

API_VERSION = 2

#: Configuration (set by `config`, fixed after `config_complete`).
_file: str | None = None
_rules_path: str | None = None
_log_path: str | None = None
_readonly = False

#: The backing file (opened in `get_ready`) and its size.
_fd = -1
_size = 0

#: Guards the rule state below.
_lock = threading.Lock()
#: (inode, size, mtime_ns) of the rules file last loaded, or None if it was missing.
_rules_id: tuple[int, int, int] | None = None
#: The loaded rules, validated; each a dict with every field filled in.
_rules: list[dict] = []
#: Per rule index: matching requests seen, and times fired.
_seen: list[int] = []
_fired: list[int] = []

OPS = ("pread", "pwrite", "zero", "trim", "flush", "extents", "cache", "any")

def _fallocate(mode: int, offset: int, length: int) -> bool:
    """fallocate(2) through the project's binding; False when the file system
    does not support ``mode``."""
    try:
        fallocate(_fd, mode, offset, length)
        return True
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise


# -- configuration ----------------------------------------------------------


def config(key: str, value: str) -> None:
    global _file, _rules_path, _log_path, _readonly
    if key == "file":
        _file = os.path.abspath(value)
    elif key == "rules":
        _rules_path = os.path.abspath(value)
    elif key == "log":
        _log_path = os.path.abspath(value)
    elif key == "readonly":
        _readonly = value.lower() in ("1", "true", "yes", "on")
    else:
        raise RuntimeError(f"faults: unknown parameter {key!r} (file=, rules=, log=, readonly=)")


def config_complete() -> None:
    if _file is None:
        raise RuntimeError("faults: file=DISK is required")
    if _rules_path is not None:
        _reload(force=True)  # a bad rules file fails at start, not at the first request


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def get_ready() -> None:
    global _fd, _size
    _fd = os.open(_file, os.O_RDONLY if _readonly else os.O_RDWR)
    _size = os.fstat(_fd).st_size


# -- rules --------------------------------------------------------------------


def _parse_rules(text: str) -> list[dict]:
    raw = json.loads(text) if text.strip() else []
    if not isinstance(raw, list):
        raise ValueError("the rules file must hold a JSON list")
    out = []
    for i, r in enumerate(raw):
        if not isinstance(r, dict):
            raise ValueError(f"rule {i}: not an object")
        unknown = set(r) - {"op", "offset", "length", "error", "delay", "skip", "count"}
        if unknown:
            raise ValueError(f"rule {i}: unknown fields {sorted(unknown)}")
        op = r.get("op", "any")
        if op not in OPS:
            raise ValueError(f"rule {i}: op {op!r} is not one of {', '.join(OPS)}")
        err = r.get("error")
        if err is not None and (not isinstance(err, str) or not isinstance(getattr(errno, err, None), int)):
            raise ValueError(f"rule {i}: error {err!r} is not an errno name")
        offset, length = r.get("offset", 0), r.get("length")
        skip, count, delay = r.get("skip", 0), r.get("count"), r.get("delay", 0)
        for name, v, ok in (("offset", offset, isinstance(offset, int) and offset >= 0),
                            ("length", length, length is None or (isinstance(length, int) and length > 0)),
                            ("skip", skip, isinstance(skip, int) and skip >= 0),
                            ("count", count, count is None or (isinstance(count, int) and count >= 0)),
                            ("delay", delay, isinstance(delay, (int, float)) and 0 <= delay <= 3600)):
            if not ok:
                raise ValueError(f"rule {i}: bad {name} {v!r}")
        out.append({"op": op, "offset": offset, "length": length, "error": err,
                    "errno": getattr(errno, err) if err else 0, "delay": float(delay),
                    "skip": skip, "count": count})
    return out


def _reload(force: bool = False) -> None:
    """Load the rules file if it changed (caller holds ``_lock`` or is single-threaded)."""
    global _rules_id, _rules, _seen, _fired
    try:
        st = os.stat(_rules_path)
        ident: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
    except FileNotFoundError:
        ident = None
    if not force and ident == _rules_id:
        return
    if ident is None:
        rules: list[dict] = []
    else:
        with io.open(_rules_path) as f:
            text = f.read()
        try:
            rules = _parse_rules(text)
        except ValueError as e:
            if force:
                raise RuntimeError(f"faults: {_rules_path}: {e}") from None
            nbdkit.debug(f"faults: {_rules_path}: {e}; keeping the previous rules")
            return  # a half-written file: keep the old rules, retry next time
    _rules_id, _rules = ident, rules
    _seen, _fired = [0] * len(rules), [0] * len(rules)


def _decide(op: str, offset: int, length: int) -> dict | None:
    """The rule that fires for this request (its counters updated), or None."""
    if _rules_path is None:
        return None
    with _lock:
        _reload()
        for i, r in enumerate(_rules):
            if r["op"] not in (op, "any"):
                continue
            if op != "flush":
                end = None if r["length"] is None else r["offset"] + r["length"]
                if offset + length <= r["offset"] or (end is not None and offset >= end):
                    continue
            _seen[i] += 1
            if _seen[i] <= r["skip"]:
                continue
            if r["count"] is not None and _fired[i] >= r["count"]:
                continue
            _fired[i] += 1
            fired = dict(r, rule=i)
            break
        else:
            return None
    if _log_path is not None:
        line = json.dumps({"rule": fired["rule"], "op": op, "offset": offset, "length": length,
                           "error": fired["error"], "delay": fired["delay"]})
        with io.open(_log_path, "a") as f:
            f.write(line + "\n")
    return fired


def _inject(op: str, offset: int, length: int) -> None:
    """Apply the rule that fires, if any: sleep, then raise its errno."""
    r = _decide(op, offset, length)
    if r is None:
        return
    if r["delay"]:
        time.sleep(r["delay"])
    if r["errno"]:
        nbdkit.set_error(r["errno"])
        raise OSError(r["errno"], f"injected by faults rule {r['rule']}")


# -- serving ------------------------------------------------------------------


# nbdkit requires the name ``open``; it shadows the builtin in this module,
# so files are opened with ``io.open``.
def open(readonly: bool):  # noqa: A001
    return {}


def get_size(h) -> int:
    return _size


def can_write(h) -> bool:
    return not _readonly


def can_flush(h) -> bool:
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_trim(h) -> bool:
    return not _readonly


def can_zero(h) -> bool:
    return not _readonly


def can_fast_zero(h) -> bool:
    return not _readonly  # FLAG_FAST_ZERO fails with ENOTSUP where fallocate cannot zero


def can_multi_conn(h) -> bool:
    return True


def can_extents(h) -> bool:
    return True


def can_cache(h):
    return nbdkit.CACHE_NATIVE


def pread(h, buf, offset: int, flags: int) -> None:
    _inject("pread", offset, len(buf))
    mv = memoryview(buf)
    done = 0
    while done < len(mv):
        n = os.preadv(_fd, [mv[done:]], offset + done)
        if n == 0:
            mv[done:] = bytes(len(mv) - done)  # the file shrank: zeroes
            return
        done += n


def pwrite(h, buf, offset: int, flags: int) -> None:
    _inject("pwrite", offset, len(buf))
    mv = memoryview(buf)
    dsync = os.RWF_DSYNC if flags & nbdkit.FLAG_FUA else 0
    done = 0
    while done < len(mv):
        done += os.pwritev(_fd, [mv[done:]], offset + done, dsync)


def flush(h, flags: int) -> None:
    _inject("flush", 0, 0)
    os.fdatasync(_fd)


def trim(h, count: int, offset: int, flags: int) -> None:
    _inject("trim", offset, count)
    _fallocate(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, count)  # advisory
    if flags & nbdkit.FLAG_FUA:
        os.fdatasync(_fd)


def zero(h, count: int, offset: int, flags: int) -> None:
    _inject("zero", offset, count)
    done = False
    if flags & nbdkit.FLAG_MAY_TRIM:
        done = _fallocate(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, count)
    if not done:
        done = _fallocate(_FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, count)
    if not done:
        if flags & nbdkit.FLAG_FAST_ZERO:
            nbdkit.set_error(errno.ENOTSUP)
            raise OSError(errno.ENOTSUP, "no fast zero here")
        chunk = bytes(min(count, 1 << 20))
        pos = 0
        while pos < count:
            n = min(len(chunk), count - pos)
            os.pwrite(_fd, chunk[:n], offset + pos)
            pos += n
    if flags & nbdkit.FLAG_FUA:
        os.fdatasync(_fd)


def extents(h, count: int, offset: int, flags: int):
    _inject("extents", offset, count)
    return seek_extents(_fd, _size, count, offset, flags)


def cache(h, count: int, offset: int, flags: int) -> None:
    _inject("cache", offset, count)
    os.posix_fadvise(_fd, offset, count, os.POSIX_FADV_WILLNEED)
