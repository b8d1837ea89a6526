"""A container engine (dockerd) and a Debian 12 base image for the container tests.

Role: find a docker daemon that answers, or install and start one; make the
``debian:12-slim`` base image without a registry (debootstrap + docker
import) when it is missing.  Used by tests/containers/conftest.py (fixtures
``docker_engine`` and ``base_image``) and by any test that needs containers.

Invariants:
- A daemon is stopped only if `find_or_start_engine` started it, and only by
  the PID it recorded (`Engine.stop_started_daemon`); a daemon that was already
  running is never touched.
- When containers cannot run here, the caller gets `EngineUnavailable` with
  the exact reason (no daemon and not root, dockerd exited with its log tail,
  no answer within the timeout); the fixtures turn it into ``pytest.skip``,
  or into a failure when ``NBDBACKUP_REQUIRE_CONTAINERS=1``.
- The base image is built at most once per machine at a time: builders hold
  an exclusive ``fcntl.flock`` on `BASE_LOCK` and look again after taking it;
  project image builds hold `BUILD_LOCK`, so that two xdist workers (the
  ``xdist_group`` does not group with pytest 9.2 + xdist 3.8) never build
  the same layers twice at once.
- Subprocess output is bytes (the suite runs under a POSIX locale).

Public API:
    DEBIAN_PACKAGES                       what `install_engine_packages` installs
    install_engine_packages()             apt-get install what is missing (root)
    find_or_start_engine(log_dir) -> Engine
    Engine.cli / .compose / .run(...) / .compose_run(...) / .stop_started_daemon()
    ensure_base_image(engine, tag) -> str
    machine_lock(path)                    flock context manager (BASE_LOCK, BUILD_LOCK)
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

#: Debian packages that give this machine a container engine, compose v1 and
#: the base-image builder.  One list, so scripts/setup can take it over.
DEBIAN_PACKAGES = ("docker.io", "docker-compose", "debootstrap")
#: The base every image of this project starts from (Dockerfile ARG BASE_IMAGE).
BASE_IMAGE = "debian:12-slim"
BASE_LOCK = os.path.join(tempfile.gettempdir(), "nbdbackup-base-image.lock")
#: Held around ``docker build`` of the project image: a second builder waits and hits the cache.
BUILD_LOCK = os.path.join(tempfile.gettempdir(), "nbdbackup-image-build.lock")
DAEMON_READY_TIMEOUT = 60.0
DEFAULT_MIRROR = "http://deb.debian.org/debian"


class EngineUnavailable(Exception):
    """Containers cannot run on this machine; the message says why."""


@dataclass
class Engine:
    """A docker daemon that answers.

    Fields: ``cli`` (argv prefix of the docker CLI), ``compose`` (argv prefix
    of ``docker compose`` v2 or ``docker-compose`` v1; empty if neither is
    installed), ``server_version`` (the daemon's, e.g. ``20.10.24+dfsg1``),
    ``started_pid`` (PID of the dockerd we started, else None), ``log_path``
    (that dockerd's log file).
    """

    cli: list[str]
    compose: list[str] = field(default_factory=list)
    server_version: str = ""
    started_pid: int | None = None
    log_path: str | None = None

    def run(self, *args: str, check: bool = True, timeout: float = 300,
            input: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run ``docker ARGS...``; bytes stdout/stderr; raise with both on failure if ``check``."""
        return _run([*self.cli, *args], check=check, timeout=timeout, input=input, env=env)

    def compose_run(self, *args: str, check: bool = True, timeout: float = 300,
                    env: dict | None = None) -> subprocess.CompletedProcess:
        """Run ``docker-compose ARGS...`` (or ``docker compose``), like `run`."""
        if not self.compose:
            raise EngineUnavailable("neither 'docker compose' nor docker-compose is installed")
        return _run([*self.compose, *args], check=check, timeout=timeout, env=env)

    def stop_started_daemon(self, timeout: float = 30.0) -> None:
        """SIGTERM the dockerd we started (by PID), SIGKILL after ``timeout``."""
        pid, self.started_pid = self.started_pid, None
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _run(argv: Sequence[str], *, check: bool, timeout: float, input: bytes | None = None,
         env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = None
    if env:
        full_env = dict(os.environ)
        full_env.update(env)
    r = subprocess.run(list(argv), capture_output=True, timeout=timeout, input=input, env=full_env)
    if check and r.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {r.returncode}\n--- stdout\n{r.stdout.decode(errors='replace')[-4000:]}"
            f"\n--- stderr\n{r.stderr.decode(errors='replace')[-4000:]}")
    return r


def _in_container() -> str:
    for marker in ("/.dockerenv", "/run/.containerenv"):
        if os.path.exists(marker):
            return f" (this machine is itself a container: {marker} exists)"
    return ""


def _cli_candidates() -> list[str]:
    """Docker CLIs to try: Debian's (same version as its dockerd) first, then PATH's."""
    out = []
    for c in ("/usr/bin/docker", shutil.which("docker")):
        if c and os.access(c, os.X_OK) and os.path.realpath(c) not in map(os.path.realpath, out):
            out.append(c)
    return out


def _server_version(cli: str) -> str | None:
    try:
        r = subprocess.run([cli, "version", "--format", "{{.Server.Version}}"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    v = r.stdout.decode(errors="replace").strip()
    return v if r.returncode == 0 and v else None


def _compose_for(cli: str) -> list[str]:
    try:
        if subprocess.run([cli, "compose", "version"], capture_output=True, timeout=20).returncode == 0:
            return [cli, "compose"]
    except (OSError, subprocess.TimeoutExpired):
        pass
    v1 = shutil.which("docker-compose")
    return [v1] if v1 else []


def _dpkg_installed(pkg: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", pkg], capture_output=True)
    return r.returncode == 0 and r.stdout == b"installed"


def install_engine_packages(packages: Sequence[str] = DEBIAN_PACKAGES) -> list[str]:
    """apt-get install the ``packages`` that dpkg does not list as installed; return them.

    Needs root (raises `EngineUnavailable` otherwise) and apt-get.
    """
    if not shutil.which("dpkg-query"):
        raise EngineUnavailable("not a Debian system (no dpkg-query): install docker by hand")
    missing = [p for p in packages if not _dpkg_installed(p)]
    if not missing:
        return []
    if os.geteuid() != 0:
        raise EngineUnavailable(f"{' '.join(missing)} not installed and not root to apt-get install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-q"],
                 ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]):
        r = subprocess.run(argv, capture_output=True, env=env, timeout=900)
        if r.returncode != 0:
            raise EngineUnavailable(f"{' '.join(argv)} failed: {r.stderr.decode(errors='replace')[-2000:]}")
    return missing


def find_or_start_engine(log_dir: str | os.PathLike) -> Engine:
    """An `Engine` whose daemon answers: the running one, else a dockerd we start.

    The started dockerd runs in its own session with its log in
    ``log_dir/dockerd.log``; call `Engine.stop_started_daemon` at the end.
    """
    for cli in _cli_candidates():
        v = _server_version(cli)
        if v:
            return Engine(cli=[cli], compose=_compose_for(cli), server_version=v)
    if os.geteuid() != 0:
        raise EngineUnavailable("no docker daemon answers and not root to start one" + _in_container())
    install_engine_packages()
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not os.access(dockerd, os.X_OK):
        raise EngineUnavailable(f"dockerd not found after installing {' '.join(DEBIAN_PACKAGES)}")
    cli = _cli_candidates()[0]
    log_path = os.path.join(os.fspath(log_dir), "dockerd.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([dockerd], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    engine = Engine(cli=[cli], compose=_compose_for(cli), started_pid=proc.pid, log_path=log_path)
    end = time.monotonic() + DAEMON_READY_TIMEOUT
    while time.monotonic() < end:
        if proc.poll() is not None:
            engine.started_pid = None
            tail = Path(log_path).read_text(errors="replace")[-1500:]
            raise EngineUnavailable(f"dockerd exited {proc.returncode}{_in_container()}; log {log_path}:\n{tail}")
        v = _server_version(cli)
        if v:
            engine.server_version = v
            return engine
        time.sleep(0.5)
    engine.stop_started_daemon()
    raise EngineUnavailable(f"dockerd did not answer within {DAEMON_READY_TIMEOUT:.0f} s{_in_container()};"
                            f" log {log_path}")


# ------------------------------------------------------------------ base image

def image_exists(engine: Engine, tag: str) -> bool:
    return engine.run("image", "inspect", tag, check=False, timeout=60).returncode == 0


def host_mirror() -> str:
    """The Debian mirror the host's apt uses (first ``URIs:`` of a deb822
    .sources file, else the first ``deb`` line of sources.list)."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        text = Path(path).read_text(errors="replace")
        for stanza in re.split(r"\n\s*\n", text):
            if re.search(r"^Suites:.*\bbookworm\b", stanza, re.M) and "debian-security" not in stanza:
                m = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
                if m:
                    return m.group(1)
    lists = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]
    for path in lists:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) >= 3 and words[0] == "deb":
                uri = next((w for w in words[1:] if not w.startswith("[")), "")
                if uri and "security" not in uri:
                    return uri
    return DEFAULT_MIRROR


#: What a slim Debian image leaves out (docs, manuals, translations) -- also
#: for packages installed later, through dpkg path-exclude rules.
_SLIM_DPKG_CFG = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
"""
#: apt keeps neither downloaded .debs nor its binary caches in image layers.
_APT_CLEAN_CFG = """\
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
"""


def build_base_image(engine: Engine, tag: str, work_dir: str | os.PathLike, mirror: str | None = None) -> None:
    """``debootstrap --variant=minbase bookworm`` from the host's mirror, slimmed,
    with the host's extra CA certificates, imported as ``tag``."""
    if os.geteuid() != 0:
        raise EngineUnavailable(f"{tag} is missing and debootstrap needs root to make it")
    install_engine_packages(("debootstrap",))
    mirror = mirror or host_mirror()
    rootfs = Path(tempfile.mkdtemp(prefix="rootfs-", dir=os.fspath(work_dir)))
    try:
        _run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror], check=True, timeout=1200)
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (rootfs / sub).glob("*"):
                if p.is_file():
                    p.unlink()
        for sub in ("usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian"):
            shutil.rmtree(rootfs / sub, ignore_errors=True)
            (rootfs / sub).mkdir(parents=True, exist_ok=True)
        for p in (rootfs / "usr/share/doc").rglob("*"):
            if p.is_file() and p.name != "copyright":
                p.unlink()
        (rootfs / "etc/dpkg/dpkg.cfg.d/docker-slim").write_text(_SLIM_DPKG_CFG)
        (rootfs / "etc/apt/apt.conf.d/docker-clean").write_text(_APT_CLEAN_CFG)
        cas = rootfs / "usr/local/share/ca-certificates"
        cas.mkdir(parents=True, exist_ok=True)
        for crt in glob.glob("/usr/local/share/ca-certificates/*.crt"):
            shutil.copy2(crt, cas)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        try:
            imp = subprocess.run([*engine.cli, "import", "--change", 'CMD ["/bin/bash"]', "-", tag],
                                 stdin=tar.stdout, capture_output=True, timeout=600)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait(timeout=600)
        if imp.returncode != 0 or tar.returncode != 0:
            raise AssertionError(f"docker import {tag} failed (tar {tar.returncode}, import {imp.returncode}): "
                                 f"{imp.stderr.decode(errors='replace')[-2000:]}")
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


@contextlib.contextmanager
def machine_lock(path: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing): one holder per machine."""
    with open(path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_base_image(engine: Engine, tag: str = BASE_IMAGE, work_dir: str | os.PathLike | None = None) -> str:
    """``tag`` if the engine has it; else build it (once, under `BASE_LOCK`)."""
    if image_exists(engine, tag):
        return tag
    with machine_lock(BASE_LOCK):
        if not image_exists(engine, tag):  # another worker may have made it meanwhile
            build_base_image(engine, tag, work_dir or tempfile.gettempdir())
    return tag
