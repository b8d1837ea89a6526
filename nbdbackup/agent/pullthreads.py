"""The pull's data reads on one blocking receive thread per NBD connection (docs/pullthreads.md).

Role: the receive side of `agent.pull` when the source is an `NBDDev`.  The
asyncio client (`nbd.client`) connects, negotiates and
answers the BLOCK_STATUS queries that decide what is read; then each
connection is *lent* to a thread of its own (`_Lent`): its transport stops
reading, the thread gets a duplicate of its socket in blocking mode and the
connection's sans-IO `Transmission` (`nbd.client_protocol`), and moves bytes
between them itself: READ headers out with one ``sendall`` per chunk,
``recv_into`` straight into the page-aligned chunk buffer through
`Transmission.get_buffer` (no extra copy; the GIL is released while the
kernel copies).  Each thread keeps up to ``nbuf`` chunks in flight (NBD
pipelines requests; replies may come in any order: they are matched by
cookie).  When a chunk's last reply is in, the thread calls ``finish``
(hash + write inline, or hand to a pool: the caller decides), later
``complete`` with its result, and reuses the buffer.  Afterwards the
socket goes back to the asyncio transport, which resumes reading.  A TLS
connection cannot be lent (asyncio keeps its TLS state in the transport): its
thread opens a connection of its own instead (`_Own`: `nbd.client.connect_blocking`,
an ``ssl.SSLSocket``) and closes it afterwards, while `_keepalive` keeps the idle
asyncio one from a server's idle timeout.  Those connections are opened before any
chunk is taken; if the server refuses one (a per-uid or per-address cap the asyncio
ones already fill), `run` raises `Unavailable` and the pull reads on the event loop.

Why: the asyncio path drains all connections on the one event-loop thread
(recv copy, per-request Python, waking the server's senders) while nbdcopy
has a thread per connection; the writer threads and the disk waited for
that loop (docs/pullfast.md "Left").

Errors: a server error reply fails the chunk with ``OSError(errno, ...)``
naming the request; a closed connection with requests in flight raises
`ConnectionClosed`; a protocol violation `RemoteProtocolError`.  The first
error of any thread is raised by `run` after every thread stopped; the
others stop taking chunks, finish the replies they wait for (the
connection stays in step) and leave.  A connection that broke (EOF,
violation, timeout, cancellation) is failed on the asyncio side too when it
is given back (`_Lent.give_back`), so later use raises instead of hanging.

Invariants: while lent, nothing on the event loop touches the connection
(its transport does not read, `pull` issues no request on it): the
`Transmission` has one user at a time.  A buffer is reused only after
``finish``'s result (a future) is done.  `run` returns only when every
thread has ended.

Fields (`_Lent`): ``client``; ``conn`` (its `_Conn`); ``tx`` (its
`Transmission`); ``sock`` (the duplicate socket, owned, closed by
`give_back`); ``broken`` (the connection is unusable: set by the thread).
(`_Run`): ``failed`` (first exception of any thread, or None; read by all
threads to stop); ``lock`` guards ``failed`` and the ``take`` iterator.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import threading
import time
from concurrent.futures import Future
from typing import Callable, Iterator

from ..errors import ConnectionClosed, RemoteProtocolError
from ..nbd.wire import Cmd

_READ = int(Cmd.READ)

def unsuitable(src, max_read: int) -> str | None:
    """Why `run` cannot read ``src`` (None: it can): not an `NBDDev`, TLS,
    a minimum block size above 1, a maximum below ``max_read``, requests in
    flight, a transport without a socket."""
    from ..blockdev.nbd import NBDDev

    if os.environ.get("NBDBACKUP_PULL_THREADS", "1") == "0":
        return "off (NBDBACKUP_PULL_THREADS=0)"
    if not isinstance(src, NBDDev):
        return "the source is not an NBD export"
    for c in src.clients:
        if c.uri.tls and os.environ.get("NBDBACKUP_PULL_TLS_THREADS", "1") == "0":
            return "TLS connection (threads off for TLS: NBDBACKUP_PULL_TLS_THREADS=0)"
        if c._min != 1:
            return f"the server's minimum block size is {c._min}"
        if c._max < max_read:
            return f"the server's maximum block size is {c._max}"
        conn = c._conn
        if c.closed or conn.futures or conn._wq or conn.transport is None:
            return "the connection is busy or closed"
        s = conn.transport.get_extra_info("socket")
        if s is None or s.family not in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
            return "the transport has no plain socket"
    return None


class _Lent:
    """One connection lent to a receive thread (see the module doc)."""

    def __init__(self, client, timeout: float | None) -> None:
        self.client = client
        self.conn = client._conn
        self.tx = client._tx
        raw = self.conn.transport.get_extra_info("socket")
        self.conn.transport.pause_reading()
        self.sock = socket.socket(fileno=os.dup(raw.fileno()))
        # Blocking (the file status flags are shared with the transport's
        # descriptor: `give_back` restores O_NONBLOCK).  With a timeout the
        # socket stays non-blocking and polls first.
        self.sock.settimeout(timeout)
        self.broken: BaseException | None = None

    def give_back(self) -> None:
        try:
            self.sock.setblocking(False)
        finally:
            self.sock.close()  # the duplicate only
        conn = self.conn
        if self.broken is not None:
            err = self.broken if isinstance(self.broken, (ConnectionClosed, RemoteProtocolError)) \
                else ConnectionClosed(f"connection unusable after a failed pull: {self.broken}")
            conn._fail(err)
        elif conn.transport is not None and not conn.transport.is_closing():
            conn.transport.resume_reading()


class _Own:
    """A TLS connection of the thread's own, beside the asyncio client's (see the module doc).

    asyncio's TLS transport cannot be lent (its TLS state lives in the transport), so the
    thread opens a second connection to the same export (`nbd.client.connect_blocking`:
    STARTTLS, then an ``ssl.SSLSocket`` that decrypts with the GIL released), reads over
    it and closes it with CMD_DISC.  Same interface as `_Lent` for `_thread`.

    Fields: ``client`` (the asyncio one: its URI and export); ``timeout``; ``sock``
    (None until `open` made it; then owned, closed by `give_back`); ``tx`` (its own
    `Transmission`); ``broken``.
    """

    def __init__(self, client, timeout: float | None) -> None:
        self.client = client
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.tx = None
        self.broken: BaseException | None = None
        self._cancelled = False

    def _set_sock(self, sock: socket.socket) -> None:
        self.sock = sock
        if self._cancelled:  # cancelled while it was being made
            _shutdown(sock)

    def open(self, max_read: int) -> None:
        """On the thread: connect, check it sees the export as the asyncio client does."""
        from ..nbd.client import connect_blocking

        c = self.client
        sock, tx, res = connect_blocking(c.uri, c.export.name, on_socket=self._set_sock)
        self.sock, self.tx = sock, tx
        sock.settimeout(self.timeout)
        bs = res.export.block_sizes if res.export is not None else None
        if res.export is None or res.export.size != c.export.size:
            raise ConnectionClosed(f"a second connection to {c.uri} saw another export (size "
                                   f"{getattr(res.export, 'size', None)}, not {c.export.size})")
        if bs is not None and (bs.minimum != 1 or (bs.maximum and bs.maximum < max_read)):
            raise ConnectionClosed(f"a second connection to {c.uri} got block sizes {bs}")

    def cancel(self) -> None:
        self._cancelled = True
        if self.sock is not None:
            _shutdown(self.sock)

    def give_back(self) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        try:
            if self.broken is None and self.tx is not None:
                _, hdr = self.tx.request(int(Cmd.DISC), 0, 0, 0)
                sock.settimeout(1.0)
                sock.sendall(hdr)
        except OSError:
            pass
        finally:
            sock.close()


def _shutdown(sock: socket.socket) -> None:
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the descriptor's; an SSLSocket's own drops its TLS state
    except (OSError, ValueError):
        pass


#: Seconds between the keep-alive READs of `_keepalive` (a server's idle timeout must be longer).
KEEPALIVE = 10.0


async def _keepalive(clients) -> None:
    """While threads read over connections of their own, keep the asyncio clients' idle TLS
    connections from a server's idle timeout (ours: none by default, ``serve --idle-timeout``) with a
    1-byte READ."""
    buf = bytearray(1)
    while True:
        await asyncio.sleep(KEEPALIVE)
        for c in clients:
            try:
                await c.pread(memoryview(buf), 0)
            except Exception:  # noqa: BLE001 - a dead one fails later, where it is used
                pass


class _Run:
    def __init__(self, take: Iterator[int]) -> None:
        self.failed: BaseException | None = None
        self.lock = threading.Lock()
        self._take = take

    def next(self) -> int | None:
        with self.lock:
            if self.failed is not None:
                return None
            return next(self._take, None)

    def fail(self, e: BaseException) -> None:
        with self.lock:
            if self.failed is None:
                self.failed = e


class _Chunk:
    """A chunk being read by one thread (only that thread touches it).

    ``i`` (its index); ``whole`` (its chunk buffer, reused after it is
    settled); ``base`` (source offset of ``mv[0]``); ``mv`` (the chunk's
    part of ``whole``); ``pieces`` (``(offset, length)`` requested);
    ``left`` (replies still due); ``state`` (the caller's, or the
    `OSError` of an error reply: then never finished).
    """

    __slots__ = ("i", "base", "mv", "whole", "pieces", "left", "state")

    def __init__(self, i: int, whole: memoryview, base: int, mv: memoryview, pieces, state) -> None:
        self.i = i
        self.whole = whole
        self.base = base
        self.mv = mv
        self.pieces = pieces
        self.left = 0
        self.state = state


def _thread(lent: _Lent, run: _Run, alloc: Callable[[], memoryview], nbuf: int,
            start, finish, complete) -> None:
    """One connection's loop: issue reads for free buffers, receive, finish, complete."""
    tx, sock = lent.tx, lent.sock
    # The request timeout is a deadline per request, as on the event loop (`Client._submit`),
    # not only the socket's per-receive timeout: a server trickling a reply (512 bytes every
    # 0.05 s) never let one receive time out and a 1 MiB READ took ~100 s (hunt 8).
    # ``sent``: (time sent, cookie) in sending order; the head is the oldest still due.
    timeout = sock.gettimeout()
    sent: collections.deque[tuple[float, int]] = collections.deque()
    free: list[memoryview] = []
    made = 0
    reading: dict[int, _Chunk] = {}  # cookie -> chunk
    finishing: list[tuple[object, _Chunk]] = []  # (Future or value, chunk)
    exhausted = False
    try:
        while True:
            # Settle what finished (any order); a failed finish fails the run.
            if finishing:
                keep = []
                for f, ch in finishing:
                    if isinstance(f, Future):
                        if not f.done():
                            keep.append((f, ch))
                            continue
                        value = f.result()
                    else:
                        value = f
                    complete(ch.i, value, ch.state)
                    free.append(ch.whole)
                finishing = keep
            if run.failed is not None:
                exhausted = True
            while not exhausted and (free or made < nbuf):
                i = run.next()
                if i is None:
                    exhausted = True
                    break
                if free:
                    whole = free.pop()
                else:
                    whole = alloc()
                    made += 1
                t_start = time.monotonic()
                base, mv, pieces, state = start(i, whole)
                if sent:
                    # Time ``start`` spent waiting (a rate limit, reading the previous backup)
                    # is this thread's, not the server's: the replies it left unread meanwhile
                    # get that time back.
                    spent = time.monotonic() - t_start
                    if spent > 0.01:
                        sent = collections.deque((t + spent, c) for t, c in sent)
                ch = _Chunk(i, whole, base, mv, pieces, state)
                if not pieces:
                    finishing.append((finish(ch.i, ch.base, ch.mv, ch.state), ch))
                    continue
                hdrs = []
                cookies = []
                for p, n in pieces:
                    cookie, hdr = tx.request(_READ, 0, p, n, mv[p - base : p - base + n])
                    reading[cookie] = ch
                    hdrs.append(hdr)
                    cookies.append(cookie)
                ch.left = len(pieces)
                sock.sendall(b"".join(hdrs))
                if timeout is not None:
                    now = time.monotonic()
                    sent.extend((now, c) for c in cookies)
            if reading:
                if timeout is not None:
                    while sent[0][1] not in reading:
                        sent.popleft()
                    rest = sent[0][0] + timeout - time.monotonic()
                    if rest <= 0:
                        raise TimeoutError
                    sock.settimeout(rest)
                buf = tx.get_buffer(-1)
                n = sock.recv_into(buf)
                if not n:
                    if _lost(sock):
                        raise ConnectionClosed(f"the connection to the server was lost (timed out or reset) "
                                               f"with {len(reading)} read requests in flight")
                    tx.receive_eof()
                    raise ConnectionClosed(f"the server closed the connection with {len(reading)} "
                                           f"read requests in flight")
                tx.buffer_updated(n)
                if tx.events:
                    evs = tx.events[:]
                    tx.events.clear()
                    for ev in evs:
                        ch = reading.pop(ev.cookie)
                        if ev.error:
                            e = OSError(ev.error, f"{ev.message or os.strerror(ev.error)} "
                                                  f"(NBD READ in chunk {ch.i})")
                            run.fail(e)
                            ch.state = e  # never finished: its buffer is not reused
                            continue
                        ch.left -= 1
                        if ch.left == 0 and not isinstance(ch.state, BaseException):
                            if run.failed is None:
                                finishing.append((finish(ch.i, ch.base, ch.mv, ch.state), ch))
                            else:
                                free.append(ch.whole)
                continue
            if finishing:
                f = finishing[0][0]
                if isinstance(f, Future):
                    f.exception()  # wait (the loop above settles it)
                continue
            if exhausted:
                break
    except BaseException as e:
        if isinstance(e, TimeoutError) and timeout is not None:
            e = TimeoutError(f"NBD read timed out after {timeout} s")
        run.fail(e)
        # Replies still due are parsed and dropped by the asyncio side (abandoned);
        # a dead or out-of-step connection is failed there (`_Lent.give_back`).
        for cookie in reading:
            tx.abandon(cookie)
        if reading or tx.broken or isinstance(e, (ConnectionClosed, RemoteProtocolError, TimeoutError)):
            lent.broken = e
        # Finish jobs already handed off: never free a buffer still being written.
        for f, _ in finishing:
            if isinstance(f, Future):
                try:
                    f.exception()
                except BaseException:
                    pass


async def run(clients, take: Iterator[int], *, alloc: Callable[[], memoryview], nbuf: int,
              start, finish, complete, timeout: float | None, max_read: int = 1 << 25) -> None:
    """Read the chunks ``take`` yields over ``clients`` (one thread each).

    ``start(i, whole) -> (base, mv, pieces, state)``: prepare chunk ``i`` in
    buffer ``whole``; ``pieces`` (``(offset, length)``) are read into
    ``mv`` (which holds the source from ``base``).  ``finish(i, base, mv,
    state)``: the reads are in; returns a `concurrent.futures.Future` (the
    buffer is busy until it is done) or a value.  ``complete(i, value,
    state)``: the chunk is done (on the receiving thread).  ``start`` may
    block (a rate limit sleeps there): the time it takes does not count
    against the ``timeout`` of the reads already in flight.

    Raises `Unavailable` before taking anything when a TLS thread cannot open
    its own connection (refused at a cap, say); the caller falls back to the
    event loop.
    """
    loop = asyncio.get_running_loop()
    r = _Run(take)
    lent: list = []
    keepalive = None
    try:
        for c in clients:
            lent.append(_Own(c, timeout) if c.uri.tls else _Lent(c, timeout))
        owned = [x for x in lent if isinstance(x, _Own)]
        if owned:
            # Every thread's own connection first, before any chunk is taken: where the
            # server refuses them (a per-uid or per-address cap that the asyncio ones
            # fill), the caller reads on the event loop instead (`Unavailable`).
            try:
                failed = [e for e in await asyncio.gather(*(asyncio.to_thread(_open, x, max_read)
                                                            for x in owned)) if e is not None]
            except asyncio.CancelledError:
                for x in owned:
                    x.cancel()
                raise
            if failed:
                raise Unavailable(f"no TLS connection of its own for {len(failed)} of the "
                                  f"{len(owned)} receiving threads: {failed[0]}")
            keepalive = asyncio.ensure_future(_keepalive([x.client for x in owned]))
        done = [loop.create_future() for _ in lent]

        def body(k: int) -> None:
            try:
                _thread(lent[k], r, alloc, nbuf, start, finish, complete)
            finally:
                loop.call_soon_threadsafe(_set, done[k])

        threads = [threading.Thread(target=body, args=(k,), name=f"pull-recv-{k}", daemon=True)
                   for k in range(len(lent))]
        for t in threads:
            t.start()
        try:
            await asyncio.shield(asyncio.gather(*done))
        except asyncio.CancelledError:
            # Stop the threads: no new chunks, and wake any recv.
            r.fail(ConnectionClosed("pull cancelled"))
            for x in lent:
                x.broken = x.broken or ConnectionClosed("pull cancelled")
                if isinstance(x, _Own):
                    x.cancel()
                else:
                    _shutdown(x.sock)
            await asyncio.gather(*done)
            raise
    finally:
        if keepalive is not None:
            keepalive.cancel()
            await asyncio.gather(keepalive, return_exceptions=True)
        for x in lent:
            x.give_back()
    if r.failed is not None:
        raise r.failed


#: ``tcpi_state`` of a TCP socket the kernel gave up on (timeout, reset); a peer's FIN
#: leaves it in CLOSE_WAIT (8) instead.
_TCP_CLOSE = 7


def _lost(sock: socket.socket) -> bool:
    """After an end of stream: True when the kernel dropped the TCP connection
    (a keepalive or user timeout, a reset) rather than the server closing it.
    An ``ssl.SSLSocket`` reports such an ETIMEDOUT as an end of stream (hunt 10)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError:  # not TCP (a Unix socket): an end of stream is the server's
        return False
    return bool(info) and info[0] == _TCP_CLOSE


class Unavailable(Exception):
    """`run` cannot use threads here (a TLS thread's own connection was refused);
    nothing was taken from ``take``: read on the event loop instead."""


def _open(x: _Own, max_read: int) -> BaseException | None:
    """On a worker thread: open ``x``'s connection; the error, or None."""
    try:
        x.open(max_read)
        return None
    except Exception as e:  # noqa: BLE001 - reported through `Unavailable`
        x.broken = e
        return e


def _set(f: asyncio.Future) -> None:
    if not f.done():
        f.set_result(None)
