"""Wiring of a running server: exports, backup engine, control socket, state.

Role: the one place that assembles the pieces `nbdbackup serve` runs (the
NBD `Server`, the live-export filter, the backup `Engine`, the QMP control
socket, the bitmap store), so the CLI stays thin and tests can build the same
application in-process with `start`.

Invariants:
- Every writable export is served through a `LiveDev`, so that backups and
  dirty bitmaps can hook live writes at any time without swapping the device
  under open connections.
- The control socket is opened only after every piece it drives exists, and
  closed first at stop, so no command runs against a half-built or
  half-stopped application.
- Dirty bitmaps (`bitmap.manager.BitmapManager`, ``app.bitmaps``): every
  writable export, at start or added later, is a `bitmap.hook.BitmapLiveDev`
  whose dirty hook is attached before the export is published; its persistent
  bitmaps load when it opens (``--state-dir``, file exports only) and are
  closed cleanly when the export's device closes (after the server drained
  and flushed it, at shutdown or block-export-del), never earlier.  The
  engine reaches the registries through `backup.bitmaps.RegistryBitmapSource`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

from .blockdev import open_spec
from .blockdev.base import BlockDev
from .errors import ConfigError

log = logging.getLogger("nbdbackup.daemon")


def wrap_live(dev: BlockDev, read_only: bool, name: str = "", bitmaps: Any = None) -> BlockDev:
    """The device an export serves: writable ones go through `LiveDev` (a
    `bitmap.hook.BitmapLiveDev` with dirty tracking when ``bitmaps``, the
    `BitmapManager`, is given)."""
    if read_only:
        return dev
    if bitmaps is not None:
        return bitmaps.wrap(name, dev)
    from .blockdev.live import LiveDev

    return LiveDev(dev)


@dataclass
class App:
    """What `start` built.

    Fields: ``server`` (the NBD `Server`, owner of the export table);
    ``engine`` (the backup `Engine`); ``control`` (the `QMPServer`, None
    without ``--control``); ``specs`` (export name -> SPEC it was opened from,
    for ``query-block-exports``); ``bitmaps`` (the `bitmap.manager.BitmapManager`:
    per-export dirty bitmaps, persistent under ``--state-dir``).
    """

    server: Any
    engine: Any = None
    control: Any = None
    specs: dict = field(default_factory=dict)
    bitmaps: Any = None
    #: the command-line options (repository options for ``restore:`` exports), or None
    args: Any = None


def check_description(name: str, description: str) -> None:
    """An export description is an NBD string (proto.md "Conventions"): UTF-8,
    no NUL, at most 4096 bytes."""
    if "\0" in description:
        raise ConfigError(f"export {name!r}: the description contains a NUL character")
    if len(description.encode("utf-8", "surrogatepass")) > 4096:
        raise ConfigError(f"export {name!r}: the description is longer than 4096 bytes")


async def add_export(app: App, name: str, spec: str, read_only: bool = False, description: str = "") -> None:
    """Open SPEC and publish it as export NAME (CLI start-up and block-export-add).

    ``description`` is what NBD clients see in OPT_LIST and NBD_INFO_DESCRIPTION;
    by default none, so the server-side SPEC (a file path, a URI with a socket
    path) never leaves the host.  ``query-block-exports`` on the control socket
    still shows the SPEC.
    """
    if spec.startswith("restore:"):  # instant recovery (commands/instant.py)
        from .commands.instant import add_restore_spec

        await add_restore_spec(app, name, spec, read_only, description)
        return
    if spec.startswith("repo:"):  # a repository snapshot, read-only (commands/instant.py)
        from .commands.instant import add_repo_spec

        await add_repo_spec(app, name, spec, True, description)
        return
    if name in app.server.exports:
        raise ConfigError(f"export {name!r} already exists")
    check_description(name, description)
    dev = await open_spec(spec, read_only=read_only, replay=True)
    live = None
    try:
        live = wrap_live(dev, read_only, name, app.bitmaps)
        app.server.add_export(name, live, read_only=read_only, description=description)
    except BaseException:
        if live is not None and live is not dev:
            await live.close()  # closes the bitmaps (cleanly) and the disk
        else:
            await dev.close()
        raise
    app.specs[name] = spec


def register_export_commands(qmp: Any, app: App) -> None:
    """``query-block-exports``, ``query-export-stats``, ``block-export-add``, ``block-export-del``."""

    async def query_block_exports() -> list:
        out = []
        for name, exp in app.server.exports.items():
            out.append({
                "id": name,
                "name": name,
                "type": "nbd",
                "spec": app.specs.get(name, exp.description),
                "description": exp.description,
                "size": exp.dev.size,
                "read-only": exp.read_only,
                "shutting-down": exp.removed,
                "connections": sum(1 for c in app.server.connections if c.export is exp),
            })
        return out

    async def block_export_add(name: str, spec: str, read_only: bool = False, description: str = "") -> dict:
        await add_export(app, name, spec, read_only, description)
        return {}

    async def block_export_del(name: str, mode: str = "safe") -> dict:
        """QEMU's modes: ``safe`` (the default) refuses while clients are
        connected; ``hard`` closes their connections (requests in flight
        finish first).  Before hunt 11 the export went with clients attached,
        which then got ESHUTDOWN on every request on a connection left open:
        a VM's disk failing for good, where QEMU refuses."""
        exp = app.server.get(name)
        if exp is None:
            raise ConfigError(f"no export named {name!r}")
        n = sum(1 for c in app.server.connections if c.export is exp)
        if n and mode != "hard":
            raise ConfigError(f"export {name!r} is still in use by {n} connection(s); "
                              f"mode 'hard' disconnects them")
        if app.engine is not None and hasattr(app.engine, "export_in_use"):
            job = app.engine.export_in_use(name)
            if job:
                raise ConfigError(f"export {name!r} is in use by job {job!r}; cancel and dismiss it first")
        if app.bitmaps is not None:
            app.bitmaps.check_removable(name)
        await app.server.remove_export(name, disconnect=True)
        app.specs.pop(name, None)
        return {}

    async def query_export_stats() -> list:
        """Per-export request statistics (QEMU ``query-blockstats`` field names)."""
        return [{"export": name, "connections": sum(1 for c in app.server.connections if c.export is exp),
                 "inflight": exp.inflight, "stats": exp.stats.to_qmp()}
                for name, exp in app.server.exports.items()]

    qmp.register("query-export-stats", query_export_stats)
    qmp.register("query-block-exports", query_block_exports)
    qmp.register("block-export-add", block_export_add)
    qmp.register("block-export-del", block_export_del)


def register_engine_commands(qmp: Any, engine: Any, bitmaps: Any = None) -> None:
    """Backup and job commands: the engine's own table (`backup.engine.register_commands`),
    with ``backup-start`` first asking the bitmap manager to refuse an
    inconsistent bitmap early."""
    from .backup.engine import register_commands

    register_commands(qmp, engine)
    if bitmaps is None:
        return

    async def backup_start(export: str, job_id: str, sync: str, target: str, **kw: Any) -> dict:
        bitmaps.check_backup(export, sync, kw.get("bitmap"), kw.get("bitmap_mode"))
        return await engine.backup_start(export, job_id, sync, target,
                                         durable_point=bitmaps.durable_point(export, kw.get("bitmap")), **kw)

    qmp.register("backup-start", backup_start)


async def start(server, args: argparse.Namespace | None = None, control_sock: Any = None,
                remote: Any = None, exports: Sequence[tuple[str, str, bool, str]] = ()) -> App:
    """Build the bitmaps, the engine, publish ``exports`` ((name, spec,
    read_only, description), as `add_export`), then (with ``args.control``,
    or ``control_sock``, a listening Unix socket systemd passed, which wins)
    open the control socket; with ``remote`` (a `control.remote.RemoteControl`)
    also listen for remote control on its TCP addresses (`ConfigError` if
    one cannot be bound).

    The exports come first: a control client may already be waiting (a
    socket-activated control socket queues it before we start), and its
    first ``query-block-exports`` must see them.

    With ``args.state_dir`` persistent bitmaps live there (`bitmap.store`);
    exports added later (`add_export`) load theirs when they open.
    """
    from .backup.bitmaps import RegistryBitmapSource
    from .backup.engine import Engine
    from .bitmap.manager import BitmapManager
    from .bitmap.manager import register_commands as register_bitmap_commands

    app = App(server, args=args)
    try:
        app.bitmaps = BitmapManager(getattr(args, "state_dir", None))
    except OSError as e:
        from .errors import permission_hint

        hint = f" ({permission_hint(args.state_dir)})" if isinstance(e, PermissionError) else ""
        raise ConfigError(f"--state-dir {args.state_dir}: {e.strerror or e}{hint}") from None
    control_path = getattr(args, "control", None)
    qmp = None
    if control_path or control_sock is not None or remote is not None:
        from .control.qmp import QMPServer

        from .sockets import DEAD_PEER_TIMEOUT

        qmp = QMPServer(dead_peer_timeout=getattr(server, "dead_peer_timeout", DEAD_PEER_TIMEOUT))
    app.engine = Engine(server, emit=qmp.emit if qmp else None,
                        bitmaps=RegistryBitmapSource(app.bitmaps.lookup))
    app.bitmaps.engine = app.engine
    app.engine.scratch_dir = getattr(args, "state_dir", None)  # default scratch files go there
    for path in app.engine.sweep_scratch():  # left by a crash
        log.info("removed stale scratch file %s", path)
    for name, spec, read_only, description in exports:
        await add_export(app, name, spec, read_only, description)
    if qmp is not None:
        register_engine_commands(qmp, app.engine, app.bitmaps)
        register_export_commands(qmp, app)
        register_bitmap_commands(qmp, app.bitmaps)
        from .commands.instant import register_restore_commands

        register_restore_commands(qmp, app)
        try:
            if control_sock is not None:
                await qmp.start_socket(control_sock)
            elif control_path:
                await qmp.start(control_path)
                log.info("control socket on %s", control_path)
            for host, port in (remote.listens if remote is not None else ()):
                try:
                    await qmp.start_tcp(host, port, remote.ssl, remote.authz.classify)
                except OSError as e:
                    raise ConfigError(f"cannot listen for control on {host}:{port}: {e.strerror or e}") from None
        except BaseException:
            await qmp.close()  # a listener already open (the socket file) goes away
            raise
        app.control = qmp
    return app


async def stop(app: App) -> None:
    """Close the control socket, then stop every job (snapshot exports go away)."""
    if app.control is not None:
        await app.control.close()
    if app.engine is not None:
        await app.engine.shutdown()
