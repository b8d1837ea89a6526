"""Static checks of the backup agent's systemd units (systemd/nbdbackup-agent@.*), read as systemd reads them.

- nbdbackup-agent@.service is a oneshot template whose EnvironmentFile= is
  named by the instance, and whose ExecStart -- specifiers and $VARIABLES from
  the shipped example nbdbackup-agent.env expanded -- is a command line the
  ``nbdbackup`` CLI parser accepts as ``agent backup`` with disks, a
  repository, an NBD URI and a retention policy; the control address and
  credentials come from the environment the command reads.
- nbdbackup-agent@.timer starts the same instance, persistently, and is
  enabled under timers.target.
- It runs as the user nbdbackup-agent.sysusers creates, with the hardening of
  the server's unit.
Same helpers as tests/unit/test_systemd_units.py; `systemd-analyze verify`
runs in tests/interop/test_agent_units.py.
"""

from __future__ import annotations

import shlex

import pytest

from test_systemd_units import UNITS, expand_exec, one, read_unit


def agent_env() -> dict[str, str]:
    out = {}
    for line in (UNITS / "nbdbackup-agent.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = shlex.split(value)[0] if value else ""
    return out


@pytest.fixture(scope="module")
def service():
    return read_unit("nbdbackup-agent@.service")


@pytest.fixture(scope="module")
def timer():
    return read_unit("nbdbackup-agent@.timer")


def test_oneshot_template_with_instance_environment(service):
    assert one(service, "Service", "Type") == "oneshot"
    assert one(service, "Service", "EnvironmentFile") == "/etc/nbdbackup/agent/%i.env"
    assert "Install" not in service  # started by its timer only


def test_exec_start_is_accepted_by_the_cli(service):
    from nbdbackup.cli import build_parser
    from nbdbackup.control.cliutil import ENV_CONTROL, ENV_CONTROL_TLS_CREDS

    env = agent_env()
    argv = expand_exec(one(service, "Service", "ExecStart"), env)
    assert argv[0] == "/opt/nbdbackup/.venv/bin/nbdbackup"
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as e:
        pytest.fail(f"the nbdbackup CLI rejects ExecStart {argv}: exit {e.code}")
    assert (args.command, args.agent_command) == ("agent", "backup")
    assert args.disk == ["vda", "vdb"] and args.repo == env["NBDBACKUP_AGENT_REPO"]
    assert args.nbd.startswith("nbds://") and args.json and args.progress == "never"
    assert args.keep_daily == 7 and args.keep_weekly == 4 and args.keep_monthly == 6
    # The control address is not on the command line: the command reads it from the environment.
    assert args.control is None
    assert env[ENV_CONTROL].startswith("qmps://") and env[ENV_CONTROL_TLS_CREDS]


def test_timer_starts_the_same_instance(timer):
    assert one(timer, "Timer", "Unit") == "nbdbackup-agent@%i.service"
    assert one(timer, "Timer", "OnCalendar")
    assert one(timer, "Timer", "Persistent") == "true"
    assert one(timer, "Install", "WantedBy") == "timers.target"


def test_dedicated_user_from_sysusers(service):
    user = one(service, "Service", "User")
    assert one(service, "Service", "Group") == user == "nbdbackup-agent"
    entries = [line.split() for line in (UNITS / "nbdbackup-agent.sysusers").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert entries[0][:2] == ["u", user]
    assert one(service, "Service", "StateDirectory") == "nbdbackup-agent"


@pytest.mark.parametrize("key,value", [
    ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"), ("PrivateDevices", "yes"), ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
    ("CapabilityBoundingSet", ""), ("MemoryDenyWriteExecute", "yes"), ("SystemCallFilter", "@system-service"),
])
def test_hardening(service, key, value):
    assert one(service, "Service", key) == value
