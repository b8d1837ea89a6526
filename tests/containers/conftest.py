"""Container tests: the image and the compose stack on a real docker daemon.

Every test collected here is marked ``containers`` and
``xdist_group("containers")`` (so that with ``--dist loadgroup`` one xdist
worker runs them all, in order, sharing one image build -- but see
engine.py: with pytest 9.2 + xdist 3.8 loadgroup does not group, so the
fixtures are safe on several workers too), with a 900 s
timeout (a cold first build makes the base image too).  A container test
elsewhere marks itself the same way.

Session fixtures (engine.py holds the logic; other test directories may use
these names, e.g. a fresh-machine test):
- ``docker_engine``: an `engine.Engine` whose daemon answers (``.cli``,
  ``.compose``, ``.run(*args, check=True, timeout=..., input=None)``); a
  dockerd started here is stopped at the end of the session, by its PID.
- ``base_image``: the tag of a Debian 12 base image (``debian:12-slim``, or
  ``$NBDBACKUP_TEST_BASE_IMAGE``), made with debootstrap when missing.
- ``nbdbackup_image``: `BuiltImage` of the project's Dockerfile built on
  ``base_image`` (tag ``$NBDBACKUP_TEST_IMAGE``, default ``nbdbackup:test``),
  once per session; the build cache makes repeated sessions quick.

When containers cannot run here the fixtures skip with the exact reason;
``NBDBACKUP_REQUIRE_CONTAINERS=1`` turns that skip into a failure (for a CI
that must prove them).  The terminal summary reports the durations and the
image size.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import engine as eng

ROOT = Path(__file__).resolve().parents[2]
# The interop peers' helpers (nbd_uri, can_connect, free_tcp_port, require) as ``import peers``.
sys.path.insert(0, str(ROOT / "tests" / "interop"))
#: uid/gid of the image's ``nbdbackup`` user (Dockerfile).
IMAGE_UID = 10809

#: Figures for the terminal summary: (label, text).
_REPORT: list[tuple[str, str]] = []


@dataclass
class BuiltImage:
    """Fields: ``tag``; ``size`` (bytes, ``docker image inspect .Size``);
    ``base_size`` (the base image's); ``build_seconds`` (this session's
    ``docker build``)."""

    tag: str
    size: int
    base_size: int
    build_seconds: float


@pytest.hookimpl(tryfirst=True)  # before xdist reads xdist_group
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/containers/" in str(item.fspath):
            item.add_marker(pytest.mark.containers)
            item.add_marker(pytest.mark.xdist_group("containers"))
            item.add_marker(pytest.mark.timeout(900))


def _unavailable(reason: str):
    if os.environ.get("NBDBACKUP_REQUIRE_CONTAINERS") == "1":
        pytest.fail(f"containers required but unavailable: {reason}", pytrace=False)
    pytest.skip(f"containers unavailable: {reason}")


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory):
    t0 = time.monotonic()
    try:
        e = eng.find_or_start_engine(tmp_path_factory.mktemp("dockerd"))
    except eng.EngineUnavailable as exc:
        _unavailable(str(exc))
    how = f"started dockerd pid {e.started_pid}" if e.started_pid else "running daemon"
    _REPORT.append(("engine", f"{' '.join(e.cli)} -> dockerd {e.server_version} ({how}, "
                              f"{time.monotonic() - t0:.1f} s); compose: {' '.join(e.compose) or 'none'}"))
    try:
        yield e
    finally:
        e.stop_started_daemon()


@pytest.fixture(scope="session")
def base_image(docker_engine, tmp_path_factory):
    tag = os.environ.get("NBDBACKUP_TEST_BASE_IMAGE", eng.BASE_IMAGE)
    t0 = time.monotonic()
    had = eng.image_exists(docker_engine, tag)
    try:
        eng.ensure_base_image(docker_engine, tag, tmp_path_factory.mktemp("base"))
    except eng.EngineUnavailable as exc:
        _unavailable(str(exc))
    _REPORT.append(("base image", f"{tag} " + ("(present)" if had else f"built in {time.monotonic() - t0:.1f} s")))
    return tag


def image_size(engine: eng.Engine, tag: str) -> int:
    return int(engine.run("image", "inspect", "-f", "{{.Size}}", tag).stdout)


@pytest.fixture(scope="session")
def nbdbackup_image(docker_engine, base_image) -> BuiltImage:
    tag = os.environ.get("NBDBACKUP_TEST_IMAGE", "nbdbackup:test")
    t0 = time.monotonic()
    with eng.machine_lock(eng.BUILD_LOCK):
        docker_engine.run("build", "-q", "--build-arg", f"BASE_IMAGE={base_image}", "-t", tag, str(ROOT),
                          timeout=900)
    built = BuiltImage(tag, image_size(docker_engine, tag), image_size(docker_engine, base_image),
                       time.monotonic() - t0)
    _REPORT.append(("image", f"{tag}: docker build {built.build_seconds:.1f} s; size {built.size / 1e6:.1f} MB "
                             f"(base {built.base_size / 1e6:.1f} MB + {(built.size - built.base_size) / 1e6:.1f} MB)"))
    return built


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("containers")
        for label, text in _REPORT:
            terminalreporter.write_line(f"{label}: {text}")
