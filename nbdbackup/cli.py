"""The `nbdbackup` command line: a thin dispatcher.

Each subcommand lives in its own module under `nbdbackup.commands` exposing
``register(subparsers)``, which adds its parser and sets ``func`` (a callable
taking the parsed namespace and returning an exit code).  Errors the user can
fix (`ConfigError`, refused control commands) print one clear line and exit 1;
they never print a traceback.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import sys

from . import __version__
from .errors import NBDBackupError

#: Subcommand modules, in help order.  A module missing from the tree is skipped
#: (work in progress never breaks the other commands).
COMMAND_MODULES = ["serve", "info", "backup", "job", "bitmap", "export", "pull", "repo", "restore", "agent"]


def _command_of(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names, if it is a known one and help is not asked at the top."""
    for a in argv:
        if a in ("-h", "--help", "--version"):
            return None
        if not a.startswith("-"):
            return a if a in COMMAND_MODULES else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given ``argv`` naming a subcommand, only that subcommand's module is
    imported (a scheduled ``agent backup`` does not pay for the other nine: ~20 modules)."""
    p = argparse.ArgumentParser(prog="nbdbackup", description="Point-in-time backup exports over NBD.")
    p.add_argument("--version", action="version", version=f"nbdbackup {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    only = _command_of(argv) if argv is not None else None
    for name in COMMAND_MODULES:
        if only is not None and name != only:
            continue
        try:
            mod = importlib.import_module(f"nbdbackup.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"nbdbackup.commands.{name}":
                continue
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if from_command_line:
        gc.disable()  # the command's imports: ~23k objects, none of them garbage (see _collect_for)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if from_command_line:
        _collect_for(args)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    if args.command == "serve":
        level = min(level, logging.INFO)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if args.command == "serve" and from_command_line:
        from . import logqueue

        logqueue.install(level, fmt)  # a stderr nobody reads must not stop the server (logqueue)
    else:
        logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = int(args.func(args) or 0)
        # A block-buffered stdout (a pipe, without PYTHONUNBUFFERED) is written
        # here, not at exit, so a reader that went away lands in the handler below.
        sys.stdout.flush()
        if from_command_line and getattr(args, "quick_exit", False):
            _quick_exit(rc)
        return rc
    except NBDBackupError as e:
        _flush_logs()
        print(f"nbdbackup: error: {e}", file=sys.stderr)
        return 1
    except PermissionError as e:
        _flush_logs()
        # A directory this uid cannot write (a container's arbitrary --user,
        # a volume owned by someone else): one line naming the fix, no traceback.
        from .errors import permission_hint

        print(f"nbdbackup: error: {e.strerror or 'Permission denied'}: {e.filename or ''} "
              f"({permission_hint(e.filename)})", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError) as e:
        # A path the user gave that does not fit (``pull SRC /no/such/dir/x.img``,
        # ``repo init`` on a file): one line naming it.  Only errors that name a
        # file; anything else is not the user's input and keeps its traceback.
        if not e.filename:
            raise
        _flush_logs()
        print(f"nbdbackup: error: {e.strerror}: {e.filename}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout went away (``| head``): not an error worth a traceback.  What
        # is still buffered would fail again at exit: point fd 1 at /dev/null.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass
        return 141


def _flush_logs() -> None:
    """Let ``serve``'s queued log lines out before the final error line (`logqueue`)."""
    if "nbdbackup.logqueue" in sys.modules:
        sys.modules["nbdbackup.logqueue"].flush(1.0)


def _collect_for(args: argparse.Namespace) -> None:
    """Turn the cyclic garbage collector back on after the start-up's imports (an agent
    backup's imports ran 50 young and 4 middle collections for no garbage: ~4-5 ms), with a
    ~30x larger first generation for a short command run from the command line (one that
    ends by `_quick_exit`: ``agent backup``, ``restore``, ``pull``), whose later imports and pull make
    few cycles (~7 ms of CPU less per ~0.35 s fs incremental in all, 16 interleaved runs);
    the default thresholds for the rest (``serve`` runs for months)."""
    if getattr(args, "quick_exit", False):
        gc.set_threshold(20_000, 20, 20)
    gc.enable()


def _quick_exit(rc: int) -> None:
    """End the process now, for a command whose work is done, durable and reported
    (``agent backup``, ``restore``, ``pull``: their stores are flushed/fsynced, their
    files closed and their threads joined before they return).  Tearing the interpreter
    down (boto3's clients and models, a large manifest) took 0.1-0.3 s of a run
    that may itself take 0.3 s; after a 1 GiB ``pull`` (4 MiB buffers, 4 NBD
    connections, thread pools) 15-20 ms of ~0.75 s (docs/pullrate.md).  Only from the command line (``main()`` with no
    argv), never when a test or a program calls ``main(argv)``."""
    logging.shutdown()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
