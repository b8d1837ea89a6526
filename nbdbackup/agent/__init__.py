"""The pull agent: copy snapshot exports over NBD into local images, with blake3 manifests.

`pull` (full or dirty-bitmap incremental, reading only data / dirty ranges)
and `manifest` (per-chunk blake3 digests, the proof that a copy holds what
the snapshot held).  The CLI is ``nbdbackup pull`` and ``nbdbackup verify``.
`repo` is the deduplicating chunk repository (``pull --repo``, ``nbdbackup
repo``) over a directory or S3 (`s3store`); `codec` and `crypto` are how its
objects are compressed and encrypted and how its keys are kept.
"""
