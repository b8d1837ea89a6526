"""Hunt 8: a broken S3 endpoint between us and a real store (Ceph RGW), invariants 4 and 5.

`s3faults.Proxy` forwards to the session's RGW and injects faults by rule
(method, key substring, fault, count).  A repository in a fresh bucket is
reached through the proxy (``AWS_ENDPOINT_URL``); an 8 MiB `rawnbd` export
(a correct server) is pulled into it in-process (`nbdbackup.cli.main`), then:

- a 412 ("already there") to a chunk PUT that never reached the store, on the
  raw signed path and on boto3's (NBDBACKUP_S3_RAW_PUT=0): the pull fails
  with one line and records nothing (before hunt 8 it recorded a snapshot
  whose chunk was missing: only a later ``repo verify`` found out);
- 503 bursts on chunk PUTs and GETs: retried, the snapshot restores exactly;
- a 500 on every chunk GET: the restore fails with one line after a bounded
  number of requests; every chunk PUT's connection closed unanswered (the
  store gone mid-pull): the pull fails the same way and records nothing;
- a 200 chunk GET with one byte changed, or a changed snapshot manifest: the
  restore fails naming the chunk / the snapshot, never writes it as good.

Afterwards ``repo verify`` passes (through the proxy, no faults left).
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

import pytest

import rawnbd
import s3faults
from nbdbackup.cli import main

SIZE = 8 << 20


def cli(*argv: str) -> tuple[int, str]:
    """``nbdbackup ARGV`` in-process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(list(argv))
    return rc, err.getvalue().strip()


@pytest.fixture
def world(s3env, rgw, monkeypatch, short_tmp):
    """(proxy, repository URL, NBD URI of the export); the repository initialised."""
    with s3faults.Proxy(rgw.endpoint) as px, rawnbd.Server(str(short_tmp / "src.sock"), "ok", SIZE) as src:
        monkeypatch.setenv("AWS_ENDPOINT_URL", px.endpoint)
        assert cli("repo", "init", s3env, "--chunk-size", "1M")[0] == 0
        yield px, s3env, f"nbd+unix:///?socket={src.path}"


def snapshots(repo: str) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["repo", "list", repo]) == 0
    return [line.split()[0] for line in out.getvalue().splitlines() if line.strip() and not line.startswith("(")]


def restored(repo: str, snap: str, out: Path) -> tuple[int, str, bool]:
    rc, err = cli("restore", repo, snap, str(out))
    return rc, err, out.exists() and out.read_bytes() == rawnbd.pattern(0, SIZE)


@pytest.mark.parametrize("raw_put", ["1", "0"])
def test_a_412_to_a_chunk_put_that_never_landed_fails_the_pull(world, monkeypatch, raw_put):
    px, repo, src = world
    monkeypatch.setenv("NBDBACKUP_S3_RAW_PUT", raw_put)
    px.add("PUT", "/chunks/", "412-dropped", 2)
    rc, err = cli("pull", src, "--repo", repo, "--snapshot", "s1")
    assert px.faults == 2
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert "answered 412 (already there) to the PUT of chunks/" in err and "no snapshot was recorded" in err, err
    assert snapshots(repo) == []
    assert cli("repo", "verify", repo)[0] == 0


def test_503_bursts_are_retried_and_the_snapshot_restores_exactly(world, short_tmp):
    px, repo, src = world
    px.add("PUT", "/chunks/", "503", 3)
    assert cli("pull", src, "--repo", repo, "--snapshot", "s1") == (0, "")
    px.add("GET", "/chunks/", "503", 3)
    rc, err, same = restored(repo, "s1", short_tmp / "out.raw")
    assert (rc, err, same) == (0, "", True)
    assert px.faults == 6
    assert cli("repo", "verify", repo)[0] == 0


def test_a_store_failing_every_chunk_get_fails_the_restore_in_bounded_requests(world, short_tmp):
    px, repo, src = world
    assert cli("pull", src, "--repo", repo, "--snapshot", "s1")[0] == 0
    px.add("GET", "/chunks/", "500", 10_000)
    t0 = time.monotonic()
    rc, err, same = restored(repo, "s1", short_tmp / "out.raw")
    took = time.monotonic() - t0
    assert rc == 1 and not same and len(err.splitlines()) == 1, err
    assert "cannot read it" in err and "InternalError" in err, err
    assert px.faults < 200 and took < 60, (px.faults, took)  # retries bounded (raw try + 5 boto3 per chunk)


@pytest.mark.parametrize("what, says", [("/chunks/", "does not match its blake3 digest"),
                                        ("/snapshots/s1", "is damaged: metadata checksum mismatch")])
def test_a_200_with_changed_bytes_is_caught(world, short_tmp, what, says):
    px, repo, src = world
    assert cli("pull", src, "--repo", repo, "--snapshot", "s1")[0] == 0
    px.add("GET", what, "flip", 1)
    rc, err, same = restored(repo, "s1", short_tmp / "out.raw")
    assert px.faults == 1
    assert rc == 1 and not same and says in err, err
    rc, err, same = restored(repo, "s1", short_tmp / "out2.raw")  # the store itself was never damaged
    assert (rc, same) == (0, True), err


def test_a_store_gone_mid_pull_fails_it_in_bounded_time_and_records_nothing(world):
    """Every chunk PUT's connection closed unanswered (the store went away after the pull
    took its lease): one line, bounded retries, no snapshot."""
    px, repo, src = world
    px.add("PUT", "/chunks/", "reset", 10_000)
    t0 = time.monotonic()
    rc, err = cli("pull", src, "--repo", repo, "--snapshot", "s1")
    took = time.monotonic() - t0
    assert rc == 1 and len(err.splitlines()) == 1 and "no snapshot was recorded" in err, err
    assert px.faults < 200 and took < 60, (px.faults, took)
    assert snapshots(repo) == []
