"""A remote NBD export as a `BlockDev` (``nbd://``, ``nbd+unix://`` SPECs).

Role: lets nbdbackup read from, write to and re-export any NBD server (qemu-nbd,
nbdkit, qemu-storage-daemon, ourselves) through the one `BlockDev` interface.

Connections: `NBDDev.open` opens one connection; with ``connections=N`` and a
server that offers CAN_MULTI_CONN it opens N and spreads requests over them
round-robin (without CAN_MULTI_CONN several connections could see each
other's writes out of order and FLUSH would not cover them, so we keep one).

Meta contexts: every connection selects the contexts the server offers among
`base:allocation`, `qemu:allocation-depth` and all ``qemu:dirty-bitmap:*``
(found with the ``qemu:dirty-bitmap:`` query); `meta_contexts` lists what the
server agreed to (`base:allocation` is always answerable: all data when the
server has no such context).

Capabilities map one to one from the transmission flags; WRITE_ZEROES without
server support is emulated with writes (never "fast"); CACHE without server
support is a no-op.  Block sizes are the server's (minimum, preferred,
maximum clamped to `wire.MAX_PAYLOAD`); see `nbd.client` for what happens to
unaligned requests.

Invariant: all connections reached the same export with the same size and
flags (checked at open).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
from typing import Sequence

from ..errors import ConfigError, ConnectionClosed, OptionError, RemoteProtocolError
from ..nbd.client import Client, connect
from ..nbd.uri import NBDURI, parse_uri
from ..nbd.wire import MAX_PAYLOAD, TransmissionFlag as TF
from .base import (
    ALLOCATION_DEPTH,
    BASE_ALLOCATION,
    DIRTY_BITMAP_PREFIX,
    BlockDev,
    BlockSize,
    Buffer,
    Capabilities,
    Extent,
    write_zeroes_slowly,
)

#: What NBDDev asks every server for.
WANTED_CONTEXTS = (BASE_ALLOCATION, ALLOCATION_DEPTH, DIRTY_BITMAP_PREFIX)


class NBDDev(BlockDev):
    """A remote export over one or more NBD connections.

    Fields: ``uri`` (parsed); ``spec`` (the URI string as given, for
    messages and "is this the same disk" checks); ``clients`` (connections, all to the same
    export); ``_rr`` (round-robin iterator over them); ``_read_only``
    (forced by the caller or by the server); ``_caps``; ``_connect_kw`` (what `open`
    connected with, for `reopen_lost`; None when constructed directly).
    """

    def __init__(self, uri: NBDURI, clients: list[Client], *, read_only: bool = False, spec: str | None = None) -> None:
        assert clients
        self.uri = uri
        self.spec = spec if spec is not None else str(uri)
        self.clients = clients
        self._rr = itertools.cycle(clients)
        self._connect_kw: dict | None = None
        c = clients[0]
        self._read_only = read_only or c.read_only
        bs = c.block_sizes
        mx = min(bs.maximum, MAX_PAYLOAD)
        mx -= mx % bs.minimum
        pref = max(bs.preferred, bs.minimum)
        while pref > mx:  # keep it a power of 2 (minimum <= maximum, both checked)
            pref >>= 1
        self._caps = Capabilities(
            read_only=self._read_only,
            can_flush=c.can(TF.SEND_FLUSH),
            can_fua=c.can(TF.SEND_FUA),
            can_trim=c.can(TF.SEND_TRIM),
            can_zero=True,
            can_fast_zero=c.can(TF.SEND_WRITE_ZEROES) and c.can(TF.SEND_FAST_ZERO),
            can_cache=True,
            can_multi_conn=c.can(TF.CAN_MULTI_CONN),
            can_extents=BASE_ALLOCATION in c.meta_contexts,
            rotational=c.can(TF.ROTATIONAL),
            block_size=BlockSize(bs.minimum, pref, mx),
        )

    @classmethod
    async def open(
        cls,
        uri: str | NBDURI,
        *,
        read_only: bool = False,
        connections: int | None = None,
        export: str | None = None,
        meta_contexts: Sequence[str] = WANTED_CONTEXTS,
        connect_timeout: float | None = 30.0,
        request_timeout: float | None = None,
        max_in_flight: int = 64,
    ) -> "NBDDev":
        """Connect; ``connections`` (default 1) is honoured only with CAN_MULTI_CONN.

        Raises `ConfigError` for a bad URI, a server that cannot be reached
        or that refuses the export (the first connection); failures of the
        extra connections raise what `connect` raises.
        """
        u = parse_uri(uri) if isinstance(uri, str) else uri
        n = 1 if connections is None else connections
        if n < 1:
            raise ConfigError("connections must be >= 1")
        kw = dict(export=export, meta_contexts=meta_contexts, connect_timeout=connect_timeout,
                  request_timeout=request_timeout, max_in_flight=max_in_flight)
        try:
            first = await connect(u, **kw)  # type: ignore[arg-type]
        except OptionError as e:
            raise ConfigError(f"{u}: server refused the export: {e.message or e}") from e
        except (OSError, TimeoutError, ConnectionClosed, RemoteProtocolError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ConfigError(f"{u}: cannot connect: {why}") from e
        clients = [first]
        try:
            if n > 1 and first.can(TF.CAN_MULTI_CONN):
                more = await asyncio.gather(*(connect(u, **kw) for _ in range(n - 1)))  # type: ignore[arg-type]
                clients += more
                for c in more:
                    if (c.size, c.flags, c.meta_contexts) != (first.size, first.flags, first.meta_contexts):
                        raise OSError(errno.EIO, f"{u}: connections disagree about the export")
        except BaseException:
            await asyncio.gather(*(c.disconnect() for c in clients), return_exceptions=True)
            raise
        dev = cls(u, clients, read_only=read_only, spec=uri if isinstance(uri, str) else None)
        dev._connect_kw = kw
        return dev

    async def reopen_lost(self) -> int:
        """Replace connections the server closed (an idle timeout, an eviction at its
        connection cap: a TLS pull's receive threads open connections of their own,
        `agent.pullthreads`) with new ones to the same export; returns how many.  Each new
        one must agree with the first about the export, as in `open`."""
        if self._connect_kw is None:
            return 0
        lost = [k for k, c in enumerate(self.clients) if c.closed]
        if not lost:
            return 0
        new = await asyncio.gather(*(connect(self.uri, **self._connect_kw) for _ in lost))  # type: ignore[arg-type]
        ref = next((c for c in self.clients if not c.closed), new[0])
        for c in new:
            if (c.size, c.flags, c.meta_contexts) != (ref.size, ref.flags, ref.meta_contexts):
                await asyncio.gather(*(x.disconnect() for x in new), return_exceptions=True)
                raise OSError(errno.EIO, f"{self.uri}: a new connection disagrees about the export")
        for k, c in zip(lost, new):
            self.clients[k] = c
        self._rr = itertools.cycle(self.clients)
        return len(lost)

    # -- BlockDev ---------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.clients[0].size

    def capabilities(self) -> Capabilities:
        return self._caps

    def meta_contexts(self) -> Sequence[str]:
        agreed = list(self.clients[0].meta_contexts)
        if BASE_ALLOCATION not in agreed:
            agreed.insert(0, BASE_ALLOCATION)
        return tuple(agreed)

    def _next(self) -> Client:
        return next(self._rr)

    def _writable(self) -> None:
        if self._read_only:
            raise OSError(errno.EPERM, "read-only device")

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self._next().pread(buf, offset)

    async def pwrite(self, buf: Buffer, offset: int, *, fua: bool = False) -> None:
        self._writable()
        c = self._next()
        await c.pwrite(buf, offset, fua=fua and c.can(TF.SEND_FUA))
        if fua and not c.can(TF.SEND_FUA) and c.can(TF.SEND_FLUSH):
            await c.flush()

    async def zero(self, offset: int, length: int, *, may_trim: bool = False,
                   fua: bool = False, fast: bool = False) -> None:
        self._writable()
        c = self._next()
        if not c.can(TF.SEND_WRITE_ZEROES):
            if fast:
                raise OSError(errno.ENOTSUP, "fast zero not supported")
            await write_zeroes_slowly(self, offset, length, fua=fua)
            return
        if fast and not c.can(TF.SEND_FAST_ZERO):
            raise OSError(errno.ENOTSUP, "fast zero not supported")
        await c.zero(offset, length, no_hole=not may_trim, fast=fast, fua=fua and c.can(TF.SEND_FUA))
        if fua and not c.can(TF.SEND_FUA) and c.can(TF.SEND_FLUSH):
            await c.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._writable()
        c = self._next()
        if c.can(TF.SEND_TRIM):
            await c.trim(offset, length, fua=fua and c.can(TF.SEND_FUA))

    async def flush(self) -> None:
        c = self._next()
        if c.can(TF.SEND_FLUSH):
            if self._caps.can_multi_conn or len(self.clients) == 1:
                await c.flush()
            else:  # pragma: no cover - we never open several without multi-conn
                await asyncio.gather(*(x.flush() for x in self.clients))

    async def extents(self, offset: int, length: int, context: str = BASE_ALLOCATION) -> list[Extent]:
        c = self._next()
        if context not in c.meta_contexts:
            if context == BASE_ALLOCATION:
                return [Extent(offset, length, 0)]
            raise OSError(errno.EINVAL, f"unknown meta context {context!r}")
        return await c.block_status(offset, length, context)

    async def cache(self, offset: int, length: int) -> None:
        c = self._next()
        if c.can(TF.SEND_CACHE):
            await c.cache(offset, length)

    async def close(self) -> None:
        await asyncio.gather(*(c.disconnect() for c in self.clients), return_exceptions=True)
