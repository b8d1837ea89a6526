"""Test certificates made with the openssl CLI (shared by the TLS interop tests).

Role: a throw-away X.509 PKI per test session, laid out as QEMU's
``tls-creds-x509``, nbdkit's ``--tls-certificates`` and libnbd's
``tls-certificates`` expect (``ca-cert.pem``, ``server-cert.pem``,
``server-key.pem``, ``client-cert.pem``, ``client-key.pem``), so one
directory serves all of them.  The ``pki`` fixture (tests/interop/conftest.py)
calls `make_pki`; `make_client` adds a client directory with a certificate of
any subject, signed by an existing CA.

Invariant: keys are unencrypted RSA 2048 and certificates valid two days; the
CA key stays in the CA's directory (``ca-key.pem``) so more certificates can
be signed later.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, errors="replace")
    assert r.returncode == 0, f"openssl {' '.join(args)}: {r.stderr}"


def make_ca(d: Path, name: str) -> None:
    """``ca-cert.pem`` / ``ca-key.pem`` of a self-signed CA called NAME in D."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
             "-days", "2", "-subj", f"/CN={name}", cwd=d)


def make_cert(d: Path, prefix: str, cn: str, ext: str, ca_dir: Path | None = None) -> None:
    """``PREFIX-cert.pem`` / ``PREFIX-key.pem`` in D for subject CN, with the
    x509v3 extensions EXT, signed by the CA in CA_DIR (default: D)."""
    ca_dir = ca_dir or d
    (d / f"{prefix}.ext").write_text(ext)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{prefix}-key.pem", "-out", f"{prefix}.csr",
             "-subj", f"/CN={cn}", cwd=d)
    _openssl("x509", "-req", "-in", f"{prefix}.csr", "-CA", str(ca_dir / "ca-cert.pem"),
             "-CAkey", str(ca_dir / "ca-key.pem"), "-CAcreateserial", "-out", f"{prefix}-cert.pem", "-days", "2",
             "-extfile", f"{prefix}.ext", cwd=d)


def make_client(ca_dir: str | Path, dest: str | Path, cn: str) -> str:
    """A client credentials directory DEST (``ca-cert.pem`` of CA_DIR,
    ``client-cert.pem``/``client-key.pem`` for subject ``CN=cn`` signed by
    that CA); returns DEST."""
    ca_dir, dest = Path(ca_dir), Path(dest)
    dest.mkdir()
    shutil.copy(ca_dir / "ca-cert.pem", dest / "ca-cert.pem")
    make_cert(dest, "client", cn, "extendedKeyUsage=clientAuth\n", ca_dir=ca_dir)
    return str(dest)


def make_pki(base: Path) -> dict[str, str]:
    """{"server": dir with CA + server + client certs, "noclient": the same without the client
    certificate, "rogue": another CA's server certificate} under BASE."""
    good, rogue, noclient = base / "good", base / "rogue", base / "noclient"
    for d in (good, rogue, noclient):
        d.mkdir()
    make_ca(good, "nbdbackup test CA")
    make_cert(good, "server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n"
                                           "extendedKeyUsage=serverAuth\n")
    make_cert(good, "client", "nbdbackup test client", "extendedKeyUsage=clientAuth\n")
    for f in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        shutil.copy(good / f, noclient / f)
    make_ca(rogue, "some other CA")
    make_cert(rogue, "server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    return {"server": str(good), "noclient": str(noclient), "rogue": str(rogue)}
