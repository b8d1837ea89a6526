"""The fresh-machine check: the README's two commands on a stock Debian 12.

Role: prove on every run of the suite that a machine nobody set up by hand
can run the demo and the tests.  The machine is a clean Debian 12 container
(``base_image``: debian:12-slim, or the same made by ``debootstrap
--variant=minbase bookworm`` where no registry is reachable), as root and with
nothing added; the project goes in as a clean clone of the working tree would
have it (the files git tracks plus those it does not ignore, as they are now,
so an uncommitted change is checked too); then, exactly as the README writes
them:

1. ``./scripts/demo`` must end with its success line and exit 0;
2. ``./scripts/test`` must pass; inside the container it runs every test but
   the container tests (no container engine runs inside a container; those
   tests skip there with that reason), so the subset is given as pytest
   arguments: ``./scripts/test -m "not containers"``.  The hypothesis tests
   run a quarter of their examples there (``scripts/hunt_examples.py``, at
   least one each): this run proves that a stock machine can run every test;
   searching for counter-examples is the host run's job, with all of them.
   The slowest tests are listed in the log (``--durations``), since this
   step bounds the whole suite's wall time.
3. Both commands again: the second set-up must find everything in place and
   install nothing (idempotent), and be quick.

Everything runs in one container (``docker run``), its output kept in a log
file beside the test's temporary directory and shown when it fails.  The
container's locale is the stock one (POSIX, no LANG): tool output decoded as
UTF-8 by a test would fail here.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


#: The demo's last line when every proof holds (nbdbackup.demo).
DEMO_SUCCESS = "RESULT: the backup is the disk exactly as it was at the start"

#: What runs inside the container: the README's two commands, then both again.
#: Markers in the output let the test time and check each step.
SCRIPT = r"""
set -u
exec 2>&1  # one stream, in order: the markers below split it into steps
cd /src
step() { printf '\n@@@ %s %s\n' "$1" "$(date +%s.%N)"; }
step demo
./scripts/demo; echo "@@@ rc demo $?"
step test
NBDBACKUP_HUNT_FACTOR=0.25 ./scripts/test -m "not containers" -p scripts.hunt_examples \
    -p no:cacheprovider -rfEs --durations=30; echo "@@@ rc test $?"
step demo2
./scripts/demo; echo "@@@ rc demo2 $?"
step setup2
bash scripts/setup; echo "@@@ rc setup2 $?"
step end
"""


def source_tar() -> bytes:
    """A tar of the working tree as a clean clone would hold it (tracked and
    not-ignored files, current content), under ``src/``."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           check=True, capture_output=True, timeout=60).stdout.split(b"\0")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for raw in names:
            if not raw:
                continue
            name = os.fsdecode(raw)
            path = ROOT / name
            if not path.exists() and not path.is_symlink():
                continue  # deleted in the working tree, not yet in git
            tar.add(path, arcname=f"src/{name}", recursive=False)
    return buf.getvalue()


def steps(log: str) -> dict[str, float]:
    """Step name -> seconds it took, from the ``@@@ NAME TIME`` markers."""
    marks = [(m.group(1), float(m.group(2))) for m in re.finditer(r"^@@@ (\w+) ([0-9.]+)$", log, re.M)]
    return {a: t2 - t1 for (a, t1), (_, t2) in zip(marks, marks[1:])}


def codes(log: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^@@@ rc (\w+) (\d+)$", log, re.M)}


@pytest.mark.timeout(1500)
def test_readme_commands_on_a_stock_debian12(docker_engine, base_image, tmp_path):
    name = f"nbdbackup-fresh-{os.getpid()}-{int(time.time())}"
    tar = tmp_path / "src.tar"
    tar.write_bytes(source_tar())
    # The container: the stock image, the project copied in (not mounted: the
    # host's .venv and caches must not leak in), the stock environment.
    docker_engine.run("create", "--name", name, "--workdir", "/", base_image,
                      "bash", "-c", f"mkdir -p /src && tar -C / -xf /src.tar && rm /src.tar\n{SCRIPT}",
                      timeout=120)
    try:
        docker_engine.run("cp", str(tar), f"{name}:/src.tar", timeout=120)
        t0 = time.monotonic()
        p = docker_engine.run("start", "--attach", name, check=False, timeout=1400)
        took = time.monotonic() - t0
    finally:
        docker_engine.run("rm", "-f", name, check=False, timeout=120)
    log = (p.stdout or b"").decode("utf-8", "replace") + (p.stderr or b"").decode("utf-8", "replace")
    (tmp_path / "container.log").write_text(log)
    tail = "\n".join(log.splitlines()[-120:])
    rcs = codes(log)
    times = steps(log)
    print(f"fresh Debian 12: {took:.0f} s in all; steps (s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))

    assert rcs.get("demo") == 0, f"./scripts/demo failed on a stock Debian 12:\n{tail}"
    demo_out = log.split("@@@ demo", 1)[1].split("@@@ rc demo", 1)[0]
    assert DEMO_SUCCESS in demo_out, f"the demo did not print its success line:\n{tail}"
    assert rcs.get("test") == 0, f"./scripts/test failed on a stock Debian 12:\n{tail}"
    test_out = log.split("@@@ test", 1)[1].split("@@@ rc test", 1)[0]
    m = re.search(r"(\d+) passed", test_out)
    assert m and int(m.group(1)) >= 100, f"the test command ran too few tests:\n{tail}"
    assert not re.search(r"\d+ (failed|errors?)\b", test_out), tail
    # Second runs: set-up finds everything in place (no apt, no pip) and is quick.
    assert rcs.get("demo2") == 0, tail
    assert rcs.get("setup2") == 0, tail
    again = log.split("@@@ demo2", 1)[1]
    assert "installing" not in again and "creating" not in again, f"set-up is not idempotent:\n{again[-3000:]}"
    assert times["setup2"] < 10, f"a second set-up took {times['setup2']:.1f} s"
