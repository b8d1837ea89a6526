"""Static checks of the container files (no docker engine runs on the CI machine).

- The Dockerfile installs exactly the Debian packages scripts/setup installs
  (both parsed: the ``DEB_PACKAGES=( ... )`` array and the Dockerfile's
  ``apt-get install`` arguments).
- The Dockerfile starts from debian:12-slim, runs scripts/setup and has the
  ``nbdbackup`` entrypoint.
- docker/compose.yaml builds that Dockerfile and runs a command that the
  ``nbdbackup`` CLI's own parser accepts.
- scripts/ and .ci/run are what the README says.
No I/O beyond reading these files; no subprocesses.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def setup_array(name: str) -> list[str]:
    """The words of the bash array ``NAME=( ... )`` in scripts/setup."""
    text = (ROOT / "scripts" / "setup").read_text()
    m = re.search(rf"^{name}=\((.*?)^\)", text, re.S | re.M)
    assert m, f"scripts/setup has no {name}=( ... ) array"
    words = []
    for line in m.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        words += line.split()
    return words


def setup_packages() -> list[str]:
    """Every Debian package a full set-up installs (runtime + tests)."""
    return setup_array("DEB_RUNTIME") + setup_array("DEB_TEST")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    cur = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not cur and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        instr, _, args = cur.partition(" ")
        out.append((instr.upper(), args.strip()))
        cur = ""
    assert not cur, "Dockerfile ends inside a continued line"
    return out


def dockerfile_apt_packages() -> list[str]:
    pkgs: list[str] = []
    for instr, args in dockerfile_instructions():
        if instr != "RUN":
            continue
        for cmd in re.split(r"&&|;", args):
            words = shlex.split(cmd)
            if words[:2] == ["apt-get", "install"]:
                pkgs += [w for w in words[2:] if not w.startswith("-")]
    return pkgs


def test_setup_installs_the_documented_packages():
    pkgs = setup_packages()
    for p in ("qemu-utils", "qemu-system-common", "nbdkit", "nbdkit-plugin-python", "libnbd-bin",
              "python3-libnbd", "python3-venv"):
        assert p in pkgs
    assert len(set(pkgs)) == len(pkgs)


def test_dockerfile_installs_same_packages_as_setup():
    assert sorted(dockerfile_apt_packages()) == sorted(setup_packages())


def test_dockerfile_shape():
    instrs = dockerfile_instructions()
    assert instrs[0] == ("FROM", "debian:12-slim")
    runs = " ".join(a for i, a in instrs if i == "RUN")
    assert "scripts/setup" in runs
    assert any(i == "COPY" for i, _ in instrs)
    entry = [a for i, a in instrs if i == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["nbdbackup"]
    env = " ".join(a for i, a in instrs if i == "ENV")
    assert "/opt/nbdbackup/.venv/bin" in env  # where the entrypoint script lives


def test_dockerignore_keeps_venv_and_git_out():
    lines = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in lines and ".git" in lines


def _compose() -> dict:
    text = (ROOT / "docker" / "compose.yaml").read_text()
    try:
        import yaml
    except ImportError:  # PyYAML is optional: fall back to the flow lists we use
        return {"_text": text}
    return yaml.safe_load(text)


def _service_commands() -> list[list[str]]:
    data = _compose()
    if "_text" in data:
        # Block under "nbdbackup:" -> its command: [...] JSON-style flow list.
        text = data["_text"]
        section = text.split("\n  nbdbackup:\n", 1)[1]
        m = re.search(r"^    command: (\[.*\])$", section, re.M)
        assert m, "compose nbdbackup service has no one-line command list"
        return [json.loads(m.group(1))]
    return [data["services"]["nbdbackup"]["command"]]


def test_compose_builds_the_dockerfile():
    data = _compose()
    if "_text" in data:
        text = data["_text"]
        assert "dockerfile: Dockerfile" in text and "context: .." in text
        return
    for name, svc in data["services"].items():
        build = svc.get("build")
        if build:
            assert build["context"] == ".." and build["dockerfile"] == "Dockerfile", name
            assert (ROOT / "docker" / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"
    assert "build" in data["services"]["nbdbackup"]


def test_compose_command_is_accepted_by_the_cli_parser():
    from nbdbackup.cli import build_parser

    for argv in _service_commands():
        assert all(isinstance(a, str) for a in argv)
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # argparse rejects with exit 2
            pytest.fail(f"nbdbackup CLI rejects the compose command {argv}: exit {e.code}")
        assert args.command == "serve"
        assert args.socket, "the compose service must listen on a Unix socket"
        assert all("=" in e for e in args.exports)
        # The export and socket paths live in the compose volumes.
        assert args.socket[0].startswith("/run/nbdbackup/")
        assert any(e.split("=", 1)[1].startswith("/data/") for e in args.exports)


def test_compose_demo_image_is_created_where_it_is_served():
    data = _compose()
    text = (ROOT / "docker" / "compose.yaml").read_text()
    served = [e.split("=", 1)[1] for e in _service_commands()[0] if "=" in e and not e.startswith("-")]
    for path in served:
        assert f"qemu-img create -f raw {path}" in text, path
    if "_text" not in data:
        dep = data["services"]["nbdbackup"]["depends_on"]["demo-image"]
        assert dep["condition"] == "service_completed_successfully"


def test_scripts_are_executable_and_ci_runs_the_test_script():
    for name in ("setup", "test", "demo"):
        p = ROOT / "scripts" / name
        assert p.stat().st_mode & 0o111, f"scripts/{name} is not executable"
        assert p.read_text().startswith("#!/usr/bin/env bash")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "exec bash scripts/test" in ci


def test_requirements_are_pinned():
    lines = [line.split("#", 1)[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    reqs = [line for line in lines if line]
    assert reqs
    for r in reqs:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][A-Za-z0-9.]*", r), r
