"""Interop tests: nbdbackup against real peers (qemu-*, nbdkit, libnbd tools).

Every test collected here is marked ``interop``.  Peers are started by the
context managers in ``peers.py`` (importable as ``peers``: pytest puts this
directory on sys.path); a missing peer fails the test loudly.

Fixtures (each returns the context manager of the same name in ``peers``):
- ``serve`` (= `peers.nbdbackup_serve`), ``qemu_nbd``, ``nbdkit``,
  ``qemu_storage_daemon``.
- ``pki``: test certificates for the session (`certs.make_pki`: dirs
  ``server``, ``noclient``, ``rogue``); skipped without openssl.
- ``rgw``: a Ceph RADOS Gateway S3 store for the session (`ceph_rgw.RGW`:
  endpoint, keys, ``env()``), one per xdist worker; fails loudly if the Ceph
  packages are missing.
- ``libnbd``: a factory ``libnbd(uri, **opts) -> nbd.NBD`` connected to
  ``uri``; every handle is shut down at teardown.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

import ceph_rgw
import certs
import peers


# Repositories made by these tests wrap their keys with scrypt N=2**12, not 2**17: the
# same code path at ~1/70 of the cost, paid by every command that opens an encrypted
# repository (~0.5 s each, minutes over the suite).  Tests of the default cost unset it.
os.environ.setdefault("NBDBACKUP_SCRYPT_LOG_N", "12")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/interop/" in str(item.fspath):
            item.add_marker(pytest.mark.interop)


@pytest.fixture(scope="session")
def pki():
    """{"server": dir with CA + server + client certs, "noclient": the same without the client
    certificate, "rogue": another CA's server certificate}."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (scripts/setup installs it)")
    base = Path(peers.short_tempdir("nbdtls-"))
    yield certs.make_pki(base)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def rgw():
    """A running `ceph_rgw.RGW` (stopped and removed at the end of the session)."""
    base = peers.short_tempdir("rgw-")
    inst = ceph_rgw.start(base)
    yield inst
    inst.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def serve():
    return peers.nbdbackup_serve


@pytest.fixture(name="qemu_nbd")
def qemu_nbd_fixture():
    return peers.qemu_nbd


@pytest.fixture(name="nbdkit")
def nbdkit_fixture():
    return peers.nbdkit


@pytest.fixture(name="qemu_storage_daemon")
def qemu_storage_daemon_fixture():
    return peers.qemu_storage_daemon


@pytest.fixture
def libnbd():
    try:
        import nbd
    except ImportError:
        pytest.fail("python3-libnbd is not importable: run scripts/setup (the venv needs "
                    "--system-site-packages and apt-get install python3-libnbd)", pytrace=False)
    handles = []

    def connect(uri: str, *, opt_mode: bool = False, meta_contexts=(), strict: int | None = None,
                full_info: bool = False):
        h = nbd.NBD()
        handles.append(h)
        for ctx in meta_contexts:
            h.add_meta_context(ctx)
        if strict is not None:
            h.set_strict_mode(strict)
        if full_info:
            h.set_full_info(True)
        if opt_mode:
            h.set_opt_mode(True)
        h.connect_uri(uri)
        return h

    yield connect
    for h in handles:
        try:
            if not h.aio_is_closed() and not h.aio_is_dead() and not h.aio_is_created():
                if h.aio_is_negotiating():
                    h.opt_abort()
                else:
                    h.shutdown()
        except Exception:
            pass


@pytest.fixture
def s3env(rgw, monkeypatch):
    """This process and its children (nbdbackup, nbdkit) pointed at the session's RGW (and at no
    AWS config or credentials file); a fresh ``s3://BUCKET/backups/vm1`` URL in a new bucket."""
    for k, v in rgw.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    rgw.client().create_bucket(Bucket=bucket)
    return f"s3://{bucket}/backups/vm1"
