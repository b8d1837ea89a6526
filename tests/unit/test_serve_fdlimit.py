"""`serve` raises its soft RLIMIT_NOFILE to the hard one (hunt 11).

systemd starts services with a soft limit of 1024: below a host's worth of VM
disks at the default ``--max-connections`` (1024), where the event loop stops
accepting at EMFILE and opening files fails.  Fake getrlimit/setrlimit.
"""

from __future__ import annotations

import logging
import resource

from nbdbackup.commands.serve import FD_MARGIN, raise_fd_limit


class Limits:
    def __init__(self, soft, hard, fail: bool = False) -> None:
        self.soft, self.hard, self.fail = soft, hard, fail

    def get(self, which):
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def put(self, which, value):
        assert which == resource.RLIMIT_NOFILE
        if self.fail:
            raise ValueError("not allowed")
        self.soft, self.hard = value


def test_soft_limit_is_raised_to_the_hard_one(caplog):
    lim = Limits(1024, 524288)
    with caplog.at_level(logging.INFO):
        assert raise_fd_limit(1024, (lim.get, lim.put)) == (524288, 524288)
    assert lim.soft == 524288
    assert "raised from 1024 to 524288" in caplog.text and "below" not in caplog.text


def test_an_unlimited_hard_limit_gets_a_finite_soft_one():
    lim = Limits(1024, resource.RLIM_INFINITY)
    raise_fd_limit(1024, (lim.get, lim.put))
    assert lim.soft == 1 << 20 and lim.hard == resource.RLIM_INFINITY


def test_a_limit_below_the_connection_cap_is_warned_about(caplog):
    lim = Limits(1024, 1024)
    with caplog.at_level(logging.INFO):
        assert raise_fd_limit(1024, (lim.get, lim.put)) == (1024, 1024)
    assert f"below --max-connections 1024 + {FD_MARGIN}" in caplog.text
    caplog.clear()
    lim = Limits(512, 4096, fail=True)
    with caplog.at_level(logging.INFO):
        assert raise_fd_limit(100, (lim.get, lim.put))[0] == 512
    assert "cannot raise the file-descriptor limit from 512" in caplog.text
    assert "below" not in caplog.text  # 512 >= 100 + 256
