"""Repository keys: a random master key set, wrapped by a passphrase through scrypt.

Role: everything secret about an encrypted repository (`agent.repo`).  A
repository created with ``--encryption repokey|keyfile`` gets a `MasterKey`
of two independent random 256-bit keys:

- ``enc_key``: AES-256-GCM key of every chunk and snapshot object
  (`agent.codec`);
- ``id_key``: the key of the keyed blake3 that names chunks
  (``blake3(data, key=id_key)``), so identical chunks still deduplicate
  while someone who holds a known file cannot test whether the repository
  holds it by computing its plain blake3.

The master key is stored only wrapped (the *key blob*, JSON)::

    {"format": "nbdbackup-key", "version": 1, "repository": "<repo id>",
     "kdf": {"name": "scrypt", "n": 131072, "r": 8, "p": 1, "salt": "<b64>"},
     "cipher": "aes-256-gcm", "nonce": "<b64>", "data": "<b64 of 64 bytes + tag>"}

The wrapping key is scrypt(passphrase, salt) with the parameters in the
blob (memory-hard: 128 MiB and ~0.3 s per try with the defaults); the
associated data is ``nbdbackup-key:<repo id>``, so a blob opens only the
repository it was made for.  ``repokey`` keeps the blob in the repository
(``keys/repokey``), ``keyfile`` in a local file (`default_key_path`, or
``--key-file``); either way ``repo key export`` copies it out for safekeeping
and ``--key-file`` can point at such a copy.

**Unattended runs without the KDF** (``--kdf none``, as Proxmox Backup
Server's keyfiles with ``--kdf none``): ``repo init --encryption keyfile
--kdf none`` or ``repo key export --kdf none FILE`` write a *plain key file*::

    {"format": "nbdbackup-key", "version": 1, "repository": "<repo id>",
     "kdf": {"name": "none"}, "cipher": "none", "data": "<b64 of 64 bytes>",
     "check": "<b64 of 16 bytes>"}

``check`` is the first 16 bytes of blake3("nbdbackup-key-check:<repo id>" +
data), so a damaged or foreign file is refused before it can encrypt
anything.  A plain key file opens the repository with no passphrase and no
scrypt (~0.3 s and 128 MiB saved per run); it is accepted only from a local
file that is a regular file owned by the user running the command and not
readable or writable by group or others (`check_private`), and never from
the store (a ``keys/repokey`` without a KDF is refused: the store's
operator must never hold an unwrapped key).  Threat model: docs/incr.md.

Invariants: a wrong passphrase or a damaged blob is one `ConfigError`
("wrong passphrase or damaged key") and nothing is written; a passphrase
is never logged nor put in an error message; `read_passphrase` never
prompts when stdin is not a terminal (a non-interactive run without a
passphrase is a clear `ConfigError`).
"""

from __future__ import annotations

import base64
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable

from .. import durable
from ..errors import ConfigError

KEY_FORMAT = "nbdbackup-key"
KEY_VERSION = 1
#: scrypt cost of the keys made from now on: N = 2**LOG_N (128 MiB of memory with
#: r=8, ~0.3-0.6 s here), r, p.  A key records its own parameters, so opening a
#: repository always uses the ones it was made with.  ``NBDBACKUP_SCRYPT_LOG_N``
#: (10..20) overrides LOG_N: the test suite makes its repositories with 12 so that
#: each of its ~hundreds of commands does not spend half a second deriving a key
#: (the passphrase path is the same; the default's cost is covered by its own tests).
#: Not meant for real repositories: a lower N makes a stolen key blob cheaper to attack.
LOG_N_DEFAULT = 17
R, P = 8, 1


def _env_log_n() -> int:
    try:
        n = int(os.environ.get("NBDBACKUP_SCRYPT_LOG_N", LOG_N_DEFAULT))
    except ValueError:
        return LOG_N_DEFAULT
    return n if 10 <= n <= 20 else LOG_N_DEFAULT


LOG_N = _env_log_n()
PASSPHRASE_ENV = "NBDBACKUP_PASSPHRASE"
NEW_PASSPHRASE_ENV = "NBDBACKUP_NEW_PASSPHRASE"
BAD_KEY = "wrong passphrase or damaged key"
#: The key-derivation choices of ``--kdf``: scrypt (a passphrase-wrapped blob) or none (a plain key file).
KDFS = ("scrypt", "none")


@dataclass(frozen=True)
class MasterKey:
    """The secret key set of an encrypted repository (see the module doc)."""

    enc_key: bytes
    id_key: bytes

    @classmethod
    def generate(cls) -> "MasterKey":
        return cls(os.urandom(32), os.urandom(32))

    def __repr__(self) -> str:  # never print key material
        return "MasterKey(...)"


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _kek(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode())


def wrap(master: MasterKey, passphrase: str, repo_id: str, *, log_n: int = LOG_N) -> bytes:
    """The key blob of ``master`` under ``passphrase`` (fresh salt and nonce)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not passphrase:
        raise ConfigError("an empty passphrase is not allowed")
    salt, nonce = os.urandom(16), os.urandom(12)
    n = 1 << log_n
    kek = _kek(passphrase, salt, n, R, P)
    data = AESGCM(kek).encrypt(nonce, master.enc_key + master.id_key, f"nbdbackup-key:{repo_id}".encode())
    doc = {"format": KEY_FORMAT, "version": KEY_VERSION, "repository": repo_id,
           "kdf": {"name": "scrypt", "n": n, "r": R, "p": P, "salt": _b64(salt)},
           "cipher": "aes-256-gcm", "nonce": _b64(nonce), "data": _b64(data)}
    return (json.dumps(doc, indent=1) + "\n").encode()


def blob_repository(blob: bytes, where: str) -> str:
    """The repository id a key blob is for (checks it is one)."""
    return _parse(blob, where)["repository"]


def _parse(blob: bytes, where: str) -> dict:
    try:
        doc = json.loads(blob)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != KEY_FORMAT or doc.get("version") != KEY_VERSION \
            or not isinstance(doc.get("repository"), str):
        raise ConfigError(f"{where}: not an {KEY_FORMAT} version {KEY_VERSION} key ({BAD_KEY})")
    return doc


def unwrap(blob: bytes, passphrase: str, repo_id: str, where: str = "key") -> MasterKey:
    """The master key in ``blob`` (read from ``where``), or `ConfigError`."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    doc = _parse(blob, where)
    if doc["repository"] != repo_id:
        raise ConfigError(f"{where}: the key of repository {doc['repository']}, not of {repo_id}")
    try:
        kdf = doc["kdf"]
        if kdf["name"] != "scrypt" or doc["cipher"] != "aes-256-gcm":
            raise ValueError("unknown algorithm")
        n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
        if not (2 <= n <= 1 << 24 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
            raise ValueError("scrypt parameters out of range")
        salt, nonce, data = (base64.b64decode(x, validate=True) for x in (kdf["salt"], doc["nonce"], doc["data"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {BAD_KEY} ({e})") from None
    kek = _kek(passphrase, salt, n, r, p)
    try:
        raw = AESGCM(kek).decrypt(nonce, data, f"nbdbackup-key:{repo_id}".encode())
    except (InvalidTag, ValueError):
        raise ConfigError(f"{where}: {BAD_KEY}") from None
    if len(raw) != 64:
        raise ConfigError(f"{where}: {BAD_KEY} (wrong length)")
    return MasterKey(raw[:32], raw[32:])


def _check_value(raw: bytes, repo_id: str) -> bytes:
    import blake3

    return blake3.blake3(b"nbdbackup-key-check:" + repo_id.encode() + raw).digest()[:16]


def plain_blob(master: MasterKey, repo_id: str) -> bytes:
    """A plain key file's content (``--kdf none``: no passphrase; see the module doc)."""
    raw = master.enc_key + master.id_key
    doc = {"format": KEY_FORMAT, "version": KEY_VERSION, "repository": repo_id, "kdf": {"name": "none"},
           "cipher": "none", "data": _b64(raw), "check": _b64(_check_value(raw, repo_id))}
    return (json.dumps(doc, indent=1) + "\n").encode()


def blob_kdf(blob: bytes, where: str) -> str:
    """The KDF of a key blob: ``scrypt`` (passphrase-wrapped) or ``none`` (a plain key file)."""
    kdf = _parse(blob, where).get("kdf")
    name = kdf.get("name") if isinstance(kdf, dict) else None
    return "none" if name == "none" else "scrypt"


def unwrap_plain(blob: bytes, repo_id: str, where: str = "key") -> MasterKey:
    """The master key of a plain key file (``kdf none``), checked, or `ConfigError`."""
    doc = _parse(blob, where)
    if doc["repository"] != repo_id:
        raise ConfigError(f"{where}: the key of repository {doc['repository']}, not of {repo_id}")
    try:
        if doc["kdf"]["name"] != "none" or doc["cipher"] != "none":
            raise ValueError("not a plain key")
        raw, check = (base64.b64decode(doc[k], validate=True) for k in ("data", "check"))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{where}: damaged key ({e})") from None
    if len(raw) != 64 or check != _check_value(raw, repo_id):
        raise ConfigError(f"{where}: damaged key (check value mismatch)")
    return MasterKey(raw[:32], raw[32:])


def check_private(st: os.stat_result, path: str) -> None:
    """Refuse a plain key file that anyone but its owner -- the user running
    this -- could read or change (``ConfigError`` saying how to fix it)."""
    import stat

    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path}: a key without passphrase must be a regular file")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{path}: a key without passphrase must belong to the user running nbdbackup "
                          f"(uid {os.geteuid()}), not uid {st.st_uid}")
    if st.st_mode & 0o077:
        raise ConfigError(f"{path}: a key without passphrase must not be accessible by group or others "
                          f"(mode {stat.S_IMODE(st.st_mode):04o}): run 'chmod 600 {path}'")


def default_key_path(repo_id: str) -> str:
    """Where a ``keyfile`` repository's key lives: $XDG_CONFIG_HOME/nbdbackup/keys/<repo id>."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "nbdbackup", "keys", repo_id)


def write_private(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably, readable by its owner only.

    Durably: the file's data (fsync), its name (an fsync of its directory after the rename)
    and every directory this creates (an fsync of each one's parent): a key file is often the
    only copy of a repository's key (``--encryption keyfile``, ``repo key export --kdf none``),
    and without the directory fsyncs a power loss right after could lose it
    (tests/interop/test_powercut_agent.py)."""
    d = os.path.dirname(os.path.abspath(path))
    durable.makedirs_durable(d, mode=0o700)
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    durable.fsync_dir(d)


#: A passphrase, or a function that obtains one when (and only if) it is needed.
Passphrase = str | Callable[[], str] | None


def read_passphrase(file: str | None = None, *, env: str = PASSPHRASE_ENV, what: str = "passphrase",
                    confirm: bool = False, interactive: bool | None = None, prompt: str | None = None) -> str:
    """A passphrase from ``file`` (its first line), else the environment
    variable ``env``, else a terminal prompt (twice with ``confirm``)."""
    if file is not None:
        try:
            with open(file, "rb") as f:
                text = f.read().decode().split("\n", 1)[0].rstrip("\r")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file}: cannot read the {what}: {getattr(e, 'strerror', None) or e}") from None
        if not text:
            raise ConfigError(f"{file}: the {what} file is empty")
        return text
    value = os.environ.get(env)
    if value:
        return value
    if interactive is None:
        interactive = sys.stdin is not None and sys.stdin.isatty()
    if not interactive:
        raise ConfigError(f"a {what} is needed: set {env}, give a file, or run on a terminal")
    import getpass

    text = getpass.getpass(f"{prompt or f'Enter {what}'}: ")
    if confirm and getpass.getpass(f"Enter {what} again: ") != text:
        raise ConfigError(f"the two {what}s differ")
    if not text:
        raise ConfigError(f"an empty {what} is not allowed")
    return text
