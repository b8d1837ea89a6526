"""Static checks of the container files (the engine tests are in tests/containers).

- Dockerfile: two stages on ``ARG BASE_IMAGE=debian:12-slim``; the runtime
  stage installs only Debian packages that scripts/setup also installs, none
  of the test-only ones; the builder pip-installs exactly the project's
  runtime dependencies (pyproject.toml ``dependencies`` + the ``fast`` extra),
  pinned by requirements.txt as constraints; it runs as uid 10809, has a
  HEALTHCHECK and the exec-form ``nbdbackup`` entrypoint.
- .dockerignore is an allowlist that lets in what the Dockerfile copies.
- docker/compose.yaml: no top-level ``name:`` (docker-compose 1.29 rejects
  it); every service runs the same image, one builds it from ../Dockerfile;
  the server command is accepted by the CLI's own parser, listens on
  0.0.0.0 inside and is published on 127.0.0.1 only; the demo disk is made
  where it is served; the agent pulls from the server's socket.
- scripts/ and .ci/run are what the README says; requirements are pinned.
No I/O beyond reading these files; no subprocesses.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UID = 10809


def setup_array(name: str) -> list[str]:
    """The words of the bash array ``NAME=( ... )`` in scripts/setup."""
    text = (ROOT / "scripts" / "setup").read_text()
    m = re.search(rf"^{name}=\((.*?)^\)", text, re.S | re.M)
    assert m, f"scripts/setup has no {name}=( ... ) array"
    words = []
    for line in m.group(1).splitlines():
        words += line.split("#", 1)[0].split()
    assert words, f"scripts/setup's {name} is empty"
    return words


#: Debian packages only the tests (and benches) need: never in the image.
TEST_ONLY_DEBS = set(setup_array("DEB_TEST")) | set(setup_array("DEB_CONTAINERS")) | set(setup_array("DEB_BENCH"))


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The stages' (INSTRUCTION, arguments), continuations joined, comments dropped;
    instructions before the first FROM form stage 0."""
    stages: list[list[tuple[str, str]]] = [[]]
    cur = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not cur and not line):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        instr, _, args = cur.partition(" ")
        if instr.upper() == "FROM":
            stages.append([])
        stages[-1].append((instr.upper(), args.strip()))
        cur = ""
    assert not cur, "Dockerfile ends inside a continued line"
    return stages


def commands(stage, program: list[str]) -> list[list[str]]:
    """Argument lists of the RUN commands in ``stage`` that start with ``program``."""
    out = []
    for instr, args in stage:
        if instr == "RUN":
            for cmd in re.split(r"&&|;", args):
                words = shlex.split(cmd)
                if words[:len(program)] == program:
                    out.append(words[len(program):])
    return out


def apt_packages(stage) -> list[str]:
    return [w for words in commands(stage, ["apt-get", "install"]) for w in words if not w.startswith("-")]


def test_dockerfile_stages_share_the_base():
    pre, builder, runtime = dockerfile_stages()
    assert pre == [("ARG", "BASE_IMAGE=debian:12-slim")]
    assert builder[0] == ("FROM", "${BASE_IMAGE} AS builder")
    assert runtime[0] == ("FROM", "${BASE_IMAGE}")


def test_runtime_stage_has_no_test_packages():
    _, builder, runtime = dockerfile_stages()
    pkgs = apt_packages(runtime)
    assert pkgs == ["python3"]
    assert set(pkgs) <= set(setup_array("DEB_RUNTIME"))
    assert set(apt_packages(builder)) <= set(setup_array("DEB_RUNTIME"))
    assert not set(apt_packages(builder)) & TEST_ONLY_DEBS
    assert {"qemu-utils", "nbdkit", "python3-libnbd"} <= TEST_ONLY_DEBS


def test_builder_installs_the_runtime_dependencies_pinned():
    _, builder, _ = dockerfile_stages()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {re.split(r"[<>=!~ \[]", d)[0].lower()
              for d in project["dependencies"] + project["optional-dependencies"]["fast"]}
    pip = commands(builder, ["/opt/nbdbackup/.venv/bin/pip", "install"])
    assert len(pip) == 2
    deps, project_install = pip
    assert "-c" in deps and deps[deps.index("-c") + 1] == "requirements.txt"
    named = {w.lower() for w in deps if not w.startswith("-") and w != "requirements.txt"}
    assert named == wanted
    assert "--no-deps" in project_install and project_install[-1] == "."
    pins = {line.split("==")[0].lower() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    assert wanted <= pins, "every runtime dependency is pinned in requirements.txt"


def test_runtime_stage_shape():
    _, _, runtime = dockerfile_stages()
    by = {}
    for instr, args in runtime:
        by.setdefault(instr, []).append(args)
    assert by["USER"] == [f"{UID}:{UID}"]
    assert any(a.startswith("--from=builder /opt/nbdbackup/.venv ") for a in by["COPY"])
    assert "PATH=/opt/nbdbackup/.venv/bin:" in " ".join(by["ENV"])
    assert json.loads(by["ENTRYPOINT"][-1]) == ["nbdbackup"]  # exec form: PID 1 gets SIGTERM
    assert len(by["HEALTHCHECK"]) == 1 and "nbdbackup info --list" in by["HEALTHCHECK"][0]
    assert any("useradd" in a and f"--uid {UID}" in a for a in by["RUN"])


def test_dockerignore_is_an_allowlist_of_what_is_copied():
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    copied = set()
    for stage in dockerfile_stages():
        for instr, args in stage:
            if instr == "COPY" and not args.startswith("--from"):
                copied |= set(args.split()[:-1])
    assert copied and copied <= allowed, copied - allowed
    assert {".git", ".venv", "tests"}.isdisjoint(allowed)


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = pytest.importorskip("yaml", reason="python3-yaml is needed to read docker/compose.yaml")
    return yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())


def test_compose_has_no_top_level_name(compose):
    assert set(compose) <= {"services", "volumes", "networks"}, "docker-compose 1.29 rejects top-level name:"


def test_compose_services_share_one_image_built_from_the_dockerfile(compose):
    images = {svc["image"] for svc in compose["services"].values()}
    assert images == {"${NBDBACKUP_IMAGE:-nbdbackup:latest}"}
    builds = [svc["build"] for svc in compose["services"].values() if "build" in svc]
    assert builds == [{"context": "..", "dockerfile": "Dockerfile"}]
    assert (ROOT / "docker" / ".." / "Dockerfile").resolve() == ROOT / "Dockerfile"


def test_compose_server_command_is_accepted_by_the_cli_parser(compose):
    from nbdbackup.cli import build_parser

    svc = compose["services"]["nbdbackup"]
    argv = svc["command"]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse rejects with exit 2
        pytest.fail(f"nbdbackup CLI rejects the compose command {argv}: exit {e.code}")
    assert args.command == "serve"
    assert args.socket == ["/run/nbdbackup/nbd.sock"] and args.control.startswith("/run/nbdbackup/")
    assert args.socket_mode == "0660"
    # Inside the container 0.0.0.0 (the published port arrives on the bridge
    # interface); on the host only 127.0.0.1.
    assert args.listen == ["0.0.0.0:10809"]
    assert svc["ports"] == ["127.0.0.1:${NBDBACKUP_PORT:-10809}:10809"]
    assert "${NBDBACKUP_SOCKET_DIR:-sockets}:/run/nbdbackup" in svc["volumes"]
    served = [e.split("=", 1)[1] for e in args.exports]
    demo = compose["services"]["demo-image"]
    for path in served:
        assert f"truncate -s ${{NBDBACKUP_DISK_SIZE:-1G}} {path}" in demo["command"][0]
    assert svc["depends_on"]["demo-image"]["condition"] == "service_completed_successfully"
    assert svc["healthcheck"]["test"][-1] == "nbd+unix:///?socket=/run/nbdbackup/nbd.sock"


def test_compose_agent_pulls_from_the_server_socket_and_verifies(compose):
    agent = compose["services"]["agent"]
    assert agent["profiles"] == ["agent"]
    script = agent["command"][0]
    assert "socket=/run/nbdbackup/nbd.sock" in script and "--repo /backup/repo" in script
    assert "nbdbackup repo verify /backup/repo" in script
    assert "${NBDBACKUP_SOCKET_DIR:-sockets}:/run/nbdbackup" in agent["volumes"]


def test_scripts_are_executable_and_ci_runs_the_test_script():
    for name in ("setup", "test", "demo"):
        p = ROOT / "scripts" / name
        assert p.stat().st_mode & 0o111, f"scripts/{name} is not executable"
        assert p.read_text().startswith("#!/usr/bin/env bash")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "exec bash scripts/test" in ci


def test_requirements_are_pinned():
    for name in ("requirements.txt", "requirements-test.txt"):
        path = ROOT / name
        if not path.exists():
            continue
        lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
        reqs = [line for line in lines if line and not line.startswith("-")]
        assert reqs
        for r in reqs:
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][A-Za-z0-9.]*", r), r
