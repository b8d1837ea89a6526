#!/usr/bin/env python3
"""Run every benchmark script present in bench/, one after the other.

Role: the single entry point for "measure everything".  A bench script is
any ``bench/*.py`` other than this file and the shared ``common.py``; each
is run as ``python SCRIPT [EXTRA ARGS]`` with the project interpreter, so
each keeps its own options, output table and bench/results/*.json file.

Usage: ``bench/run_all.py [--list] [--only NAME,...] [--skip NAME,...] [-- EXTRA ARGS]``
(EXTRA ARGS go to every script, e.g. ``-- --size 256M --rounds 1``; only
pass options every selected script understands).

Invariant: a failing script is reported and the others still run; the exit
status is non-zero if any script failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

#: soak.py checks invariants under faults (docs/hunt16.md): not a benchmark.
NOT_BENCHES = {"run_all.py", "common.py", "__init__.py", "soak.py"}


def bench_scripts(directory: Path = common.BENCH_DIR) -> list[Path]:
    """Bench scripts in ``directory``, sorted by name."""
    return sorted(p for p in directory.glob("*.py")
                  if p.name not in NOT_BENCHES and not p.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="list the bench scripts and exit")
    ap.add_argument("--only", default="", help="comma-separated script names (without .py)")
    ap.add_argument("--skip", default="", help="comma-separated script names to skip")
    args = ap.parse_args(argv)
    only = {s.strip().removesuffix(".py") for s in args.only.split(",") if s.strip()}
    skip = {s.strip().removesuffix(".py") for s in args.skip.split(",") if s.strip()}
    scripts = [p for p in bench_scripts() if (not only or p.stem in only) and p.stem not in skip]
    if args.list:
        for p in scripts:
            print(p.stem)
        return 0
    failed = []
    for p in scripts:
        print(f"===== {p.stem} {' '.join(extra)}", flush=True)
        t0 = time.monotonic()
        try:
            rc = subprocess.call([common.VENV_PYTHON, str(p), *extra], cwd=str(common.REPO_DIR))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        print(f"===== {p.stem}: exit {rc} in {time.monotonic() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(p.stem)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
