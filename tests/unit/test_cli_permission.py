"""A directory the running uid cannot write is one error line naming the fix, not a traceback
(``docker run --user 12345:0`` on a volume owned by someone else: docs/hunt9.md)."""

from __future__ import annotations

import os

from nbdbackup import cli


def test_permission_denied_is_one_line_with_the_fix(tmp_path, monkeypatch, capsys):
    def denied(path, *a, **kw):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "makedirs", denied)  # as for uid 12345 under a 10809-owned 0755 /backup
    target = str(tmp_path / "repo")
    assert cli.main(["repo", "init", target]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"nbdbackup: error: Permission denied: {target} (running as uid {os.getuid()} gid ")
    assert "chgrp" in err and "README 'Containers'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
