"""`nbdbackup serve`: serve exports over NBD (Unix socket and/or TCP).

``nbdbackup serve --socket PATH [--listen HOST:PORT] [--read-only] NAME=SPEC ...``
where SPEC is a raw image path or block device, ``memory:SIZE`` or an NBD
URI, and a ``ro:`` prefix makes one export read-only (``disk=ro:/img``).
``--description NAME=TEXT`` sets what NBD clients see as the export's
description; there is none by default, so no server-side path leaves the host
(a separate option, because a SPEC may contain any character).

TLS: ``--tls-creds DIR`` (``ca-cert.pem``, ``server-cert.pem``,
``server-key.pem``: QEMU's and nbdkit's layout) turns on NBD_OPT_STARTTLS;
``--tls require`` (the default with credentials: every client must upgrade
before anything else) or ``--tls on`` (clients may upgrade);
``--tls-verify-peer`` also requires a client certificate signed by the CA.

Access control (`nbd.access`): ``--tls-authz PATTERN`` admits only client
certificates whose subject matches; ``--allow-user`` / ``--allow-group``
admit only those peers on Unix sockets.  A refused client gets ERR_POLICY
with the reason for every option.

``--socket-mode MODE`` / ``--socket-group GROUP`` set the permission bits
and group of the ``--socket`` files (`nbdbackup.sockets.set_socket_access`),
so a group's members can attach; the control socket stays 0600 (it can start
and cancel backups).

Remote control (`control.remote`): ``--control-listen HOST:PORT``
(repeatable) serves the control socket on TCP, TLS from the first byte with
``--control-tls-creds DIR`` (the NBD layout) and a client certificate
required; ``--control-authz PATTERN`` admits matching subjects to every
command, ``--control-authz-read PATTERN`` to ``query-*`` only.  Without
credentials or without any pattern it refuses to start.

``--metrics HOST:PORT`` serves Prometheus text at ``/metrics`` (`nbdbackup.metrics`).

Limits against hostile or broken clients (`nbd.server`, `nbd.budget`):
``--max-connections`` (default 1024), ``--max-connections-per-peer`` (one IP
address on TCP, default 64) and ``--max-connections-per-uid`` (one uid on
Unix sockets, default the global cap: every VM of a libvirt/Proxmox host is
the same uid); at a cap only a connection quiet in the handshake is evicted
for a newcomer, never one in transmission (a VM's idle disk), else the
newcomer waits and is refused at its handshake timeout.  The soft
RLIMIT_NOFILE is raised to the hard limit (`raise_fd_limit`).
``--handshake-timeout``, ``--idle-timeout`` (TCP) / ``--unix-idle-timeout``
(both off by default), ``--dead-peer-timeout`` (TCP keepalive and user
timeout: vanished peers), ``--max-buffer-memory`` (all request
buffers together).  Its default and the ``--workers`` default follow the
process's cgroup (a container's ``--memory``/``--cpus``): `resource_defaults`.

Lifecycle: every argument is validated before anything listens (a missing
file, a bad size, a duplicate name or a busy socket is one clear error line
and exit 1).  SIGINT/SIGTERM/SIGHUP stop accepting, let in-flight requests
finish, flush every writable export and exit 0.

systemd (`nbdbackup.systemd`):
- Socket activation: when LISTEN_PID is our pid and LISTEN_FDS > 0, the
  passed sockets are served INSTEAD of ``--socket``/``--listen`` (which are
  then ignored, with a warning), as systemd's convention is; the one named
  ``control`` (FileDescriptorName=control) is the control socket instead of
  ``--control`` (then only a fallback, ignored without a warning).  With
  only a control socket passed, ``--socket``/``--listen`` still apply.
  Passed sockets are never unlinked by us.
- Readiness: with NOTIFY_SOCKET set, READY=1 (with STATUS= and MAINPID=) is
  sent once every export is published and every listener, the control socket
  and the metrics endpoint listen; STOPPING=1 when a shutdown begins;
  WATCHDOG=1 every WATCHDOG_USEC/2 while the event loop runs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from ..errors import ConfigError
from ..sockets import DEAD_PEER_TIMEOUT

log = logging.getLogger("nbdbackup.serve")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve exports over NBD",
                       description="Serve one or more exports over NBD.",
                       epilog="Under systemd socket activation (LISTEN_FDS) the passed sockets replace "
                              "--socket/--listen, and one named 'control' replaces --control; with "
                              "NOTIFY_SOCKET set, READY=1 is sent once everything listens.")
    p.add_argument("exports", nargs="+", metavar="NAME=SPEC",
                   help="export NAME serving SPEC: a raw file or block device path, memory:SIZE, "
                        "or an NBD URI; prefix SPEC with ro: for a read-only export; "
                        "restore:REPO#SNAPSHOT,target=SPEC[,state=DIR,speed=N,...] serves a snapshot "
                        "while it is restored onto SPEC (instant recovery, docs/instant.md); "
                        "repo:REPO#SNAPSHOT serves a snapshot read-only, straight from the repository")
    p.add_argument("--socket", "-k", action="append", default=[], metavar="PATH",
                   help="listen on this Unix socket (repeatable)")
    p.add_argument("--socket-mode", metavar="MODE",
                   help="permission bits of the --socket files, octal (e.g. 0660: owner and group may "
                        "connect; default: what the umask leaves, i.e. only the owner)")
    p.add_argument("--socket-group", metavar="GROUP",
                   help="group (name or gid) of the --socket files; the server must be a member")
    p.add_argument("--listen", "-l", action="append", default=[], metavar="HOST:PORT",
                   help="listen on TCP (repeatable; use 127.0.0.1:10809 or [::1]:10809)")
    p.add_argument("--read-only", "-r", action="store_true", help="make every export read-only")
    p.add_argument("--description", "-D", action="append", default=[], metavar="NAME=TEXT",
                   help="the description NBD clients see for export NAME (repeatable; default: none, "
                        "so no server-side path is shown)")
    p.add_argument("--control", metavar="PATH", help="QMP-compatible control socket")
    p.add_argument("--control-listen", action="append", default=[], metavar="HOST:PORT",
                   help="also serve the control socket on TCP, TLS only with client certificates "
                        "(repeatable; needs --control-tls-creds and --control-authz[-read])")
    p.add_argument("--control-tls-creds", metavar="DIR",
                   help="credentials of --control-listen (ca-cert.pem, server-cert.pem, server-key.pem); "
                        "clients must present a certificate this CA signed")
    p.add_argument("--control-authz", action="append", default=[], metavar="PATTERN",
                   help="admit control clients whose certificate subject (RFC 4514) matches this glob "
                        "to every command (repeatable)")
    p.add_argument("--control-authz-read", action="append", default=[], metavar="PATTERN",
                   help="admit control clients whose certificate subject matches this glob to query-* "
                        "commands only (repeatable)")
    p.add_argument("--state-dir", metavar="DIR", help="directory for persistent state (dirty bitmaps)")
    p.add_argument("--max-connections", type=int, default=1024, metavar="N",
                   help="connections at once; when full, a connection quiet in the handshake is evicted "
                        "for a new one (never one in transmission), else the new one waits and is refused "
                        "at its handshake timeout (default 1024)")
    p.add_argument("--max-connections-per-peer", type=int, default=64, metavar="N",
                   help="connections at once from one IP address (TCP), same rule (default 64)")
    p.add_argument("--max-connections-per-uid", type=int, default=None, metavar="N",
                   help="connections at once from one uid (Unix sockets), same rule (default: "
                        "--max-connections; on a hypervisor host every VM is the same uid)")
    p.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="close a connection still negotiating after this long (default 10)")
    p.add_argument("--idle-timeout", type=float, default=0.0, metavar="SECONDS",
                   help="close a TCP connection with nothing in flight that sends nothing for this long "
                        "(default 0 = never: an idle VM disk is a normal client; dead peers are "
                        "found by --dead-peer-timeout)")
    p.add_argument("--dead-peer-timeout", type=float, default=DEAD_PEER_TIMEOUT, metavar="SECONDS",
                   help="reset a TCP connection whose peer has acknowledged nothing (data or keepalive "
                        "probes) for this long: a vanished host or a partition (TCP keepalive and "
                        "TCP_USER_TIMEOUT; 0 = the kernel's defaults; default %(default)g)")
    p.add_argument("--unix-idle-timeout", type=float, default=0.0, metavar="SECONDS",
                   help="the same for Unix socket connections (default 0 = never)")
    p.add_argument("--max-buffer-memory", default=None, metavar="SIZE",
                   help="memory for request buffers of all connections together (WRITE payloads, "
                        "READ replies); at least 64M (default 256M, or half the cgroup's memory "
                        "limit when that is less, at least 64M; -v logs the choice)")
    p.add_argument("--tls-creds", metavar="DIR",
                   help="X.509 credentials directory (ca-cert.pem, server-cert.pem, server-key.pem)")
    p.add_argument("--tls", choices=["off", "on", "require"],
                   help="TLS mode (default: require with --tls-creds, else off)")
    p.add_argument("--tls-verify-peer", action="store_true",
                   help="require a client certificate signed by the credentials' CA")
    p.add_argument("--tls-authz", action="append", default=[], metavar="PATTERN",
                   help="admit only client certificates whose subject (RFC 4514, e.g. 'CN=agent1,O=Example') "
                        "matches this glob (repeatable; implies --tls-verify-peer)")
    p.add_argument("--allow-user", action="append", default=[], metavar="USER",
                   help="on Unix sockets admit only this user (name or uid; repeatable)")
    p.add_argument("--allow-group", action="append", default=[], metavar="GROUP",
                   help="on Unix sockets admit only this group (name or gid; repeatable)")
    add_io_engine_option(p)
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes serving the data path of plain file exports with no backup "
                        "or bitmap attached (each its own core; docs/workers.md); 0 = none "
                        "(default: env NBDBACKUP_WORKERS, else one per CPU when there are at least 2, "
                        "at most 8; CPUs as the affinity mask and the cgroup's CPU quota allow, and "
                        "under a cgroup memory limit only as many as get 64M of buffers each)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (use a loopback address)")
    from .repoargs import add_repo_options

    add_repo_options(p)  # for NAME=restore:... and NAME=repo:REPO#SNAPSHOT (commands/instant.py)
    p.set_defaults(func=run)


def add_io_engine_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--io-engine", choices=["auto", "io_uring", "threads", "sync"], default=None,
                   help="how file I/O leaves the event loop: io_uring, a batched thread pool, or the "
                        "plain path (default auto: the plain path, measured fastest, see docs/ioengine.md; "
                        "env NBDBACKUP_IO_ENGINE)")


def resource_defaults(args: argparse.Namespace, limits=None, report: list | None = None) -> tuple[int, int]:
    """``(request-buffer budget in bytes, worker processes)``: the options,
    else defaults sized to this process's cgroup (`nbdbackup.cgroup`; a
    container's ``--memory``/``--cpus``, a unit's ``MemoryMax=``/``CPUQuota=``).

    - budget: ``--max-buffer-memory``, else 256M, or half the memory limit
      when less (at least 64M: twice the largest request);
    - workers: ``--workers``, else ``$NBDBACKUP_WORKERS``, else one per CPU
      (`nbd.worker.default_workers` over `cgroup.cpu_count`: the quota
      rounded up counts), and under a memory limit no more than give every
      process (owner and workers) its own 64M share of the budget
      (`nbd.server.budget_share`), so that all together stay within it.

    Measured reason (docs/hunt9.md): with the host's defaults, 24 stalled
    32 MiB WRITEs from one client OOM-killed a ``--memory 256m`` server with
    one CPU (PID 1: the container died) and both workers of a ``128m`` one.
    The choice is logged (``serve -v``); an explicit budget above half the
    limit is warned about.  With ``report`` (a list) the log records are
    appended there as ``(level, message, *args)`` instead, for the caller to
    emit once the rest of the command line is known good (a refused command
    line prints only its error).
    """
    from .. import cgroup
    from ..nbd.server import DEFAULT_BUFFER_MEMORY
    from ..nbd.wire import MAX_PAYLOAD
    from ..nbd.worker import ENV, default_workers

    if limits is None:
        limits = cgroup.read_limits()
    share_min = 2 * MAX_PAYLOAD
    explicit_budget = getattr(args, "max_buffer_memory", None) is not None
    if explicit_budget:
        budget = buffer_memory(args.max_buffer_memory)
    else:
        budget = cgroup.buffer_default(limits, DEFAULT_BUFFER_MEMORY, share_min)
    why = []
    explicit_workers = getattr(args, "workers", None) is not None
    try:
        n = args.workers if explicit_workers else default_workers(cgroup.cpu_count(limits))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if n < 0:
        raise ConfigError("--workers must not be negative")
    if not explicit_workers and not os.environ.get(ENV) and limits.memory is not None:
        cap = cgroup.workers_for_memory(budget, share_min)
        if n > cap:
            why.append(f"{n} CPU(s) but the memory limit leaves buffers for {cap}")
            n = cap
    records: list = [(logging.INFO, "limits: %s; request buffers %d MiB (%s), %d worker process(es)%s",
                      limits.describe(), budget >> 20, "--max-buffer-memory" if explicit_budget else "default",
                      n, f" ({'; '.join(why)})" if why else "")]
    total = max(budget, (n + 1) * share_min) if n else budget
    if limits.memory is not None and total > limits.memory * cgroup.BUFFER_FRACTION:
        records.append((logging.WARNING, "request buffers may take %d MiB (%d process(es)) of a %d MiB memory "
                        "limit: a burst of large writes can get the server OOM-killed; lower --max-buffer-memory "
                        "or --workers, or raise the limit", total >> 20, n + 1, limits.memory >> 20))
    if report is None:
        for level, msg, *rest in records:
            log.log(level, msg, *rest)
    else:
        report.extend(records)
    return budget, n


#: Descriptors beyond one per connection: listeners, exports, bitmaps, the
#: control socket, worker channels, backup scratch files.
FD_MARGIN = 256


def raise_fd_limit(max_connections: int, limits=None) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one (the server uses epoll,
    never select, so a high limit costs nothing); ``(soft, hard)`` after.
    systemd starts services with soft 1024: with hundreds of VM disks the
    server hit EMFILE, where (measured, hunt 11) uvloop closes each new
    connection at once (libuv's reserve-descriptor trick: the client fails at
    connect), asyncio stops accepting for a second at a time and logs a
    traceback each time (clients wait in the listen backlog, with no
    greeting), and opening a file (an export, a bitmap, a backup's scratch)
    fails; connections already open are not affected, and both recover once
    descriptors free.  A limit still below
    ``max_connections`` + `FD_MARGIN` is warned about.  ``limits``: the
    ``resource`` module's getrlimit/setrlimit pair, for tests."""
    import resource

    get, put = limits if limits is not None else (resource.getrlimit, resource.setrlimit)
    soft, hard = get(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            put(resource.RLIMIT_NOFILE, (want, hard))
            log.info("file-descriptor limit raised from %d to %d", soft, want)
            soft = want
        except (OSError, ValueError) as e:
            log.warning("cannot raise the file-descriptor limit from %d: %s", soft, e)
    if soft != resource.RLIM_INFINITY and soft < max_connections + FD_MARGIN:
        log.warning("file-descriptor limit %d is below --max-connections %d + %d: connections beyond it "
                    "are closed at once (uvloop) or wait in the listen backlog (asyncio), and opening files "
                    "fails (raise LimitNOFILE=)",
                    soft, max_connections, FD_MARGIN)
    return soft, hard


def select_io_engine(args: argparse.Namespace) -> None:
    """Choose the I/O engine once, before any export opens; log it (-v)."""
    from ..blockdev import ioengine

    try:
        name, why = ioengine.select(getattr(args, "io_engine", None))
    except (ValueError, OSError) as e:
        raise ConfigError(f"--io-engine: {getattr(e, 'strerror', None) or e}") from None
    log.info("I/O engine: %s (%s)", name, why)


def access_policy(args: argparse.Namespace):
    """The `AccessPolicy` the options ask for."""
    from ..nbd.access import AccessPolicy, parse_group, parse_user

    if args.tls_authz and not args.tls_creds:
        raise ConfigError("--tls-authz needs --tls-creds DIR")
    return AccessPolicy(frozenset(parse_user(u) for u in args.allow_user),
                        frozenset(parse_group(g) for g in args.allow_group), tuple(args.tls_authz))


def tls_config(args: argparse.Namespace):
    """The `ServerTLS` the options ask for (validated, not yet loaded)."""
    from ..nbd.tls import ServerTLS

    mode = args.tls or ("require" if args.tls_creds else "off")
    if mode != "off" and not args.tls_creds:
        raise ConfigError(f"--tls {mode} needs --tls-creds DIR")
    if mode == "off" and (args.tls_creds or args.tls_verify_peer or args.tls_authz):
        raise ConfigError("--tls off contradicts --tls-creds / --tls-verify-peer / --tls-authz")
    return ServerTLS(mode, args.tls_creds or "", args.tls_verify_peer or bool(args.tls_authz))


def parse_export_args(items: list[str], all_read_only: bool) -> list[tuple[str, str, bool]]:
    """[(name, spec, read_only)] from NAME=SPEC arguments, with clear errors."""
    out: list[tuple[str, str, bool]] = []
    seen: set[str] = set()
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep:
            raise ConfigError(f"bad export {item!r}: expected NAME=SPEC")
        if name in seen:
            raise ConfigError(f"export name {name!r} given twice")
        read_only = all_read_only
        if spec.startswith("ro:"):
            spec, read_only = spec[3:], True
        if not spec:
            raise ConfigError(f"export {name!r}: empty SPEC")
        seen.add(name)
        out.append((name, spec, read_only))
    return out


def buffer_memory(text: str) -> int:
    from ..blockdev import parse_size

    try:
        return parse_size(text)
    except ConfigError as e:
        raise ConfigError(f"--max-buffer-memory: {e}") from None


def parse_descriptions(items: list[str], names: list[str]) -> dict[str, str]:
    """{name: text} from ``--description NAME=TEXT`` options.

    NAME is everything before the first ``=`` (export names never contain
    one, see `parse_export_args`), so TEXT may hold any character.
    """
    out: dict[str, str] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"bad --description {item!r}: expected NAME=TEXT")
        if name not in names:
            raise ConfigError(f"--description for {name!r}, which is not an export given")
        if name in out:
            raise ConfigError(f"--description for {name!r} given twice")
        out[name] = text
    return out


def parse_listen(text: str, option: str = "--listen") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"bad {option} {text!r}: expected HOST:PORT (port 0-65535; 0 = any free one)")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def activated_sockets(fds) -> tuple[list, object]:
    """(NBD listening sockets, control socket or None) from the fds systemd
    passed (`nbdbackup.systemd.take_listen_fds`); `ConfigError` if one is not
    a listening stream socket or two are named ``control``."""
    from .. import systemd

    nbd_socks, control = [], None
    for lfd in fds:
        sock = systemd.listening_socket(lfd)
        if lfd.name == systemd.CONTROL_FDNAME:
            if control is not None:
                raise ConfigError("systemd passed more than one socket named 'control'")
            control = sock
        else:
            nbd_socks.append(sock)
    return nbd_socks, control


def run(args: argparse.Namespace) -> int:
    from .. import systemd

    exports = parse_export_args(args.exports, args.read_only)
    descriptions = parse_descriptions(args.description, [e[0] for e in exports])
    from ..daemon import check_description

    for name, text in descriptions.items():
        check_description(name, text)
    listens = [parse_listen(x) for x in args.listen]
    metrics = parse_listen(args.metrics, "--metrics") if args.metrics else None
    from ..control.remote import server_config

    remote = server_config([parse_listen(x, "--control-listen") for x in args.control_listen],
                           args.control_tls_creds, args.control_authz, args.control_authz_read)
    passed, control = activated_sockets(systemd.take_listen_fds())
    if passed and (args.socket or listens):
        log.warning("socket activation: serving the %d socket(s) systemd passed; ignoring --socket/--listen",
                    len(passed))
        args.socket, listens = [], []
    if control is not None and args.control:
        # Not a warning: the shipped unit names --control as the fallback for
        # when nbdbackup-control.socket is not running.
        log.info("socket activation: serving the control socket systemd passed; ignoring --control %s",
                 args.control)
    if not passed and not args.socket and not listens:
        raise ConfigError("nothing to listen on: give --socket PATH and/or --listen HOST:PORT "
                          "(or start under systemd socket activation)")
    from ..nbd.access import parse_group
    from ..sockets import parse_socket_mode

    if (args.socket_mode or args.socket_group) and not args.socket and not passed:
        raise ConfigError("--socket-mode/--socket-group need --socket PATH")
    socket_mode = parse_socket_mode(args.socket_mode) if args.socket_mode else None
    socket_gid = parse_group(args.socket_group) if args.socket_group else None
    select_io_engine(args)  # after the checks above: a refused command line prints only its error
    from . import run_async

    return run_async(_serve(args, exports, listens, metrics, descriptions=descriptions, passed=passed,
                            control_sock=control, socket_mode=socket_mode, socket_gid=socket_gid,
                            remote=remote))


async def _serve(args: argparse.Namespace, exports, listens, metrics_at, *, descriptions: dict[str, str],
                 passed=(), control_sock=None, socket_mode: int | None = None,
                 socket_gid: int | None = None, remote=None) -> int:
    from .. import daemon
    from .. import metrics
    from .. import systemd
    from ..nbd.server import Server

    choice: list = []
    budget, workers = resource_defaults(args, report=choice)
    notifier = systemd.Notifier()
    raise_fd_limit(args.max_connections)
    server = Server(max_connections=args.max_connections, handshake_timeout=args.handshake_timeout,
                    tls=tls_config(args), access=access_policy(args),
                    max_connections_per_peer=args.max_connections_per_peer,
                    max_connections_per_uid=args.max_connections_per_uid,
                    idle_timeout=args.idle_timeout, unix_idle_timeout=args.unix_idle_timeout,
                    dead_peer_timeout=args.dead_peer_timeout,
                    max_buffer_memory=budget, workers=workers)
    for level, msg, *rest in choice:  # the options are valid: say what the limits made of them
        log.log(level, msg, *rest)
    app = daemon.App(server)
    metrics_srv = None
    where: list[str] = []
    try:
        # Workers first: before the control socket opens (a client of it may
        # stop us as soon as it answers) and before any listener.
        await server.start_workers()
        app = await daemon.start(server, args, control_sock, remote=remote,
                                 exports=[(name, spec, ro, descriptions.get(name, "")) for name, spec, ro in exports])
        for sock in passed:
            where.append(systemd.describe(sock))
            await server.start_socket(sock)
        for path in args.socket:
            try:
                await server.start_unix(path, socket_mode, socket_gid)
            except PermissionError:
                raise  # the CLI's one line with the uid/gid hint
            except OSError as e:  # e.g. a missing directory (uvloop names no file)
                raise ConfigError(f"cannot listen on unix:{path}: {e.strerror}") from None
            where.append(f"unix:{path}")
        for host, port in listens:
            try:
                bound = await server.start_tcp(host, port)
            except OSError as e:
                raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
            where.append(f"tcp:{host}:{bound}")
        if metrics_at is not None:
            try:
                metrics_srv = await metrics.start(app, *metrics_at)
            except OSError as e:
                raise ConfigError(f"cannot serve metrics on {args.metrics}: {e.strerror}") from None
    except BaseException:
        await daemon.stop(app)
        await server.shutdown()
        notifier.close()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP too (a closed terminal or ssh session): a graceful stop, as qemu-nbd,
    # qemu-storage-daemon and nbdkit do, not the default's abrupt death (no flush,
    # bitmaps not closed clean).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    log.info("serving %d export(s); pid %d", len(exports), os.getpid())
    # Everything listens (a connection made now is accepted from the backlog)
    # and every export is in the table: tell systemd.
    notifier.notify("READY=1", STATUS=f"serving {len(exports)} export(s) on {', '.join(where)}",
                    MAINPID=os.getpid())
    watchdog = asyncio.create_task(notifier.watchdog(), name="sd-watchdog")
    await stop.wait()
    log.info("stopping: finishing in-flight requests")
    notifier.notify("STOPPING=1", STATUS="stopping: finishing in-flight requests and flushing")
    try:
        if metrics_srv is not None:
            metrics_srv.close()
        await daemon.stop(app)
        await server.shutdown()
    finally:
        watchdog.cancel()
        notifier.close()
    log.info("stopped")
    return 0
