"""How every command names and opens a chunk repository (`agent.repo`).

Role: the one seam between the command line and `Repository.open`, so that a
repository option (the S3 endpoint today; the passphrase sources and such
tomorrow) is added once and every command that reads or writes a repository
(``repo ...``, ``pull --repo``, ``restore``, ``agent ...``) accepts it the same
way.  Commands call `add_repo_options` on their parser and `open_repo` with
the repository argument; nothing else opens stores or repositories.

An encrypted repository is unlocked here: its passphrase comes from
``--passphrase-file FILE``, else ``NBDBACKUP_PASSPHRASE``, else a prompt when
stdin is a terminal (`agent.crypto.read_passphrase`), and is asked for only
when the repository is encrypted; ``--key-file PATH`` names the wrapped key
(a ``keyfile`` repository's, default under $XDG_CONFIG_HOME/nbdbackup/keys/,
or an exported copy of a ``repokey``).

Invariant: `open_repo` returns a repository whose format and keys were
checked (a wrong repository or secret is a `ConfigError`, never a later EIO).
"""

from __future__ import annotations

import argparse

REPO_HELP = "a directory or s3://BUCKET/PREFIX"


def add_repo_options(p: argparse.ArgumentParser) -> None:
    """The options that say how to reach and unlock a repository."""
    p.add_argument("--s3-endpoint", metavar="URL",
                   help="S3 endpoint for an s3:// repository (default: AWS_ENDPOINT_URL, else AWS)")
    p.add_argument("--passphrase-file", metavar="FILE",
                   help="an encrypted repository's passphrase: the first line of FILE "
                        "(default: NBDBACKUP_PASSPHRASE, else a prompt on a terminal)")
    p.add_argument("--key-file", metavar="PATH",
                   help="an encrypted repository's wrapped key (default: in the repository for repokey, "
                        "$XDG_CONFIG_HOME/nbdbackup/keys/ID for keyfile)")


def passphrase_of(args: argparse.Namespace, *, confirm: bool = False, spec: str | None = None):
    """A function returning the passphrase the options give (asked when called)."""
    from ..agent.crypto import read_passphrase

    return lambda: read_passphrase(getattr(args, "passphrase_file", None), confirm=confirm,
                                   prompt=f"Passphrase of {spec}" if spec else None)


def open_store_args(args: argparse.Namespace, spec: str):
    """The store of repository ``spec`` with the options of `add_repo_options`."""
    from ..agent.repo import open_store

    return open_store(spec, endpoint=getattr(args, "s3_endpoint", None))


def open_repo(args: argparse.Namespace, spec: str):
    """(store, repository) for ``spec`` with the options of `add_repo_options`."""
    from ..agent.repo import Repository

    store = open_store_args(args, spec)
    key_file = getattr(args, "key_file", None)
    return store, Repository.open(store, passphrase=passphrase_of(args, spec=spec), key_file=key_file,
                                  require_encryption=bool(key_file or getattr(args, "passphrase_file", None)))
