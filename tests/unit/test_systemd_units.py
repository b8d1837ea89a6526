"""Static checks of the shipped systemd units (systemd/), read as systemd reads them.

- nbdbackup.service is Type=notify with NotifyAccess=main, runs as the user
  that nbdbackup.sysusers creates, takes its sockets from both socket units,
  and its ExecStart -- specifiers and $VARIABLES from nbdbackup.default
  expanded -- is a command line the ``nbdbackup`` CLI parser accepts.
- nbdbackup.socket listens on the NBD socket; nbdbackup-control.socket is
  named ``control`` (what `nbdbackup.systemd.CONTROL_FDNAME` recognises) and
  sits where ExecStart's --control fallback points.
- The hardening a Debian admin expects is present.
No I/O beyond reading these files (`systemd-analyze verify` runs in
tests/interop/test_systemd.py).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from nbdbackup.systemd import CONTROL_FDNAME

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
#: systemd's specifiers for system units (systemd.unit(5), "Specifiers").
SPECIFIERS = {"%t": "/run", "%S": "/var/lib", "%C": "/var/cache", "%L": "/var/log", "%%": "%"}


def read_unit(name: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}} -- keys may repeat (ListenStream=);
    comments and blank lines skipped; no line continuations are used."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for n, raw in enumerate((UNITS / name).read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"{name}:{n}: continuation lines are not expected"
        m = re.fullmatch(r"\[([A-Za-z]+)\]", line)
        if m:
            section = out.setdefault(m.group(1), {})
            continue
        assert section is not None, f"{name}:{n}: key outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{name}:{n}: not KEY=VALUE"
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def one(unit: dict, section: str, key: str) -> str:
    values = unit[section][key]
    assert len(values) == 1, f"{key}= given {len(values)} times"
    return values[0]


def env_file() -> dict[str, str]:
    """nbdbackup.default as systemd's EnvironmentFile= reads it (KEY="VALUE")."""
    out = {}
    for line in (UNITS / "nbdbackup.default").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = shlex.split(value)[0] if value else ""
    return out


def expand_exec(cmd: str, environ: dict[str, str]) -> list[str]:
    """ExecStart= -> argv: specifiers, then ``$VAR`` split at whitespace and
    ``${VAR}`` kept as one word (systemd.service(5), "Command lines")."""
    for spec, value in SPECIFIERS.items():
        cmd = cmd.replace(spec, value)
    assert not re.search(r"%[a-zA-Z]", cmd), f"unexpanded specifier in {cmd!r}"
    argv: list[str] = []
    for word in shlex.split(cmd):
        m = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if m:
            argv += environ.get(m.group(1), "").split()
        else:
            argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: environ.get(m.group(1), ""), word))
    return argv


@pytest.fixture(scope="module")
def service():
    return read_unit("nbdbackup.service")


@pytest.fixture(scope="module")
def nbd_socket():
    return read_unit("nbdbackup.socket")


@pytest.fixture(scope="module")
def control_socket():
    return read_unit("nbdbackup-control.socket")


def exec_args(service):
    from nbdbackup.cli import build_parser

    argv = expand_exec(one(service, "Service", "ExecStart"), env_file())
    assert argv[0] == "/opt/nbdbackup/.venv/bin/nbdbackup"  # where the Dockerfile and README put it
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as e:
        pytest.fail(f"the nbdbackup CLI rejects ExecStart {argv}: exit {e.code}")


def test_service_is_type_notify_from_the_main_process(service):
    s = service["Service"]
    assert one(service, "Service", "Type") == "notify"
    assert one(service, "Service", "NotifyAccess") == "main"
    assert "Restart" in s and "TimeoutStopSec" in s


def test_exec_start_is_accepted_by_the_cli(service):
    args = exec_args(service)
    assert args.command == "serve"
    assert args.exports and all("=" in e for e in args.exports)
    # Listeners come from the socket units, so ExecStart names none.
    assert args.socket == [] and args.listen == []
    assert args.state_dir.startswith("/var/lib/nbdbackup/")


def test_exec_start_control_fallback_is_the_control_socket_path(service, control_socket):
    args = exec_args(service)
    listen = one(control_socket, "Socket", "ListenStream")
    assert args.control == listen == "/run/nbdbackup/control.sock"


def test_service_takes_both_sockets_and_needs_the_nbd_one(service):
    u = service["Unit"]
    assert one(service, "Service", "Sockets").split() == ["nbdbackup.socket", "nbdbackup-control.socket"]
    assert "nbdbackup.socket" in " ".join(u["Requires"]).split()
    assert {"nbdbackup.socket", "nbdbackup-control.socket"} <= set(" ".join(u["After"]).split())


def test_environment_file_is_etc_default(service):
    assert one(service, "Service", "EnvironmentFile") == "/etc/default/nbdbackup"
    assert set(env_file()) == {"NBDBACKUP_EXPORTS", "NBDBACKUP_OPTS"}


def test_dedicated_user_from_sysusers(service):
    user = one(service, "Service", "User")
    assert one(service, "Service", "Group") == user == "nbdbackup"
    entries = [line.split() for line in (UNITS / "nbdbackup.sysusers").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert entries[0][:2] == ["u", user]
    assert "DynamicUser" not in service["Service"]  # images need a stable owner


def test_state_and_runtime_directories(service):
    assert one(service, "Service", "StateDirectory") == "nbdbackup"
    assert one(service, "Service", "RuntimeDirectory") == "nbdbackup"
    # The socket units own files in /run/nbdbackup: a stop must not delete it.
    assert one(service, "Service", "RuntimeDirectoryPreserve") == "yes"


@pytest.mark.parametrize("key,value", [
    ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"), ("PrivateDevices", "yes"), ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"), ("ProtectControlGroups", "yes"), ("RestrictSUIDSGID", "yes"),
    ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"), ("CapabilityBoundingSet", ""),
    ("MemoryDenyWriteExecute", "yes"), ("SystemCallFilter", "@system-service"),
])
def test_hardening(service, key, value):
    assert one(service, "Service", key) == value


def test_nbd_socket(nbd_socket):
    assert one(nbd_socket, "Socket", "ListenStream") == "/run/nbdbackup/nbd.sock"
    name = one(nbd_socket, "Socket", "FileDescriptorName")
    assert name != CONTROL_FDNAME
    assert one(nbd_socket, "Socket", "SocketUser") == "nbdbackup"
    assert one(nbd_socket, "Socket", "SocketMode") == "0660"
    assert "Accept" not in nbd_socket["Socket"]  # Accept=yes passes connections; we need the listener
    assert one(nbd_socket, "Install", "WantedBy") == "sockets.target"


def test_control_socket(control_socket):
    s = control_socket["Socket"]
    assert one(control_socket, "Socket", "FileDescriptorName") == CONTROL_FDNAME
    assert one(control_socket, "Socket", "Service") == "nbdbackup.service"
    assert one(control_socket, "Socket", "SocketMode") == "0600"  # as the server's own --control socket
    assert "Accept" not in s
    assert one(control_socket, "Install", "WantedBy") == "sockets.target"
