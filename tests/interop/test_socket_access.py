"""``serve --socket-mode MODE --socket-group GROUP``: who may attach to the NBD socket.

Contract: the ``--socket`` files get exactly MODE and GROUP once the server
listens (the control socket stays 0600); with 0660 a user who is in GROUP can
attach and one who is not is refused by the kernel (EACCES), checked with
nbdinfo run as ``nobody`` through setpriv.  A bad MODE is one error line.
"""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

import peers

pytestmark = pytest.mark.interop

#: A group ``nobody`` is not in (no name needed: root may chown to any gid).
GID = 10809
NOBODY = 65534


def test_socket_gets_mode_and_group_control_stays_private(short_tmp):
    gid = GID if os.geteuid() == 0 else os.getegid()
    ctl = str(short_tmp / "c.sock")
    with peers.nbdbackup_serve("m=memory:1M", extra=["--socket-mode", "0660", "--socket-group", str(gid),
                                                      "--control", ctl]) as p:
        st = os.stat(p.socket)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid
        assert stat.S_IMODE(os.stat(ctl).st_mode) == 0o600


def test_umask_decides_without_the_option():
    umask = os.umask(0o022)
    os.umask(umask)
    with peers.nbdbackup_serve("m=memory:1M") as p:  # inherits our umask
        assert stat.S_IMODE(os.stat(p.socket).st_mode) == 0o777 & ~umask


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run nbdinfo as another user (setpriv)")
def test_group_member_attaches_others_are_refused():
    setpriv, nbdinfo = peers.require("setpriv"), peers.require("nbdinfo")
    with peers.nbdbackup_serve("m=memory:1M", extra=["--socket-mode", "0660", "--socket-group", str(GID)]) as p:
        os.chmod(p.dir, 0o711)  # let nobody traverse the private directory
        as_nobody = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}"]
        ok = subprocess.run([*as_nobody, f"--groups={GID}", nbdinfo, "--size", p.uri_for("m")],
                            capture_output=True, timeout=30)
        assert ok.returncode == 0 and ok.stdout.strip() == b"1048576", ok.stderr.decode(errors="replace")
        refused = subprocess.run([*as_nobody, "--clear-groups", nbdinfo, "--size", p.uri_for("m")],
                                 capture_output=True, timeout=30)
        assert refused.returncode != 0
        assert b"ermission denied" in refused.stderr, refused.stderr.decode(errors="replace")


@pytest.mark.parametrize("mode", ["rw", "0999", "01777"])
def test_bad_socket_mode_is_one_error_line(short_tmp, mode):
    sock = str(short_tmp / "s.sock")
    r = subprocess.run(peers.nbdbackup_argv(sock, "m=memory:1M", extra=["--socket-mode", mode]),
                       capture_output=True, timeout=30, cwd=str(peers.REPO))
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 1 and "Traceback" not in err, err
    assert f"bad socket mode {mode!r}" in err, err
    assert not os.path.exists(sock)
