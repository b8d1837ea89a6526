"""`S3Store`: the chunk repository's object store on S3-compatible object storage.

Role: the same small interface as `agent.repo.DirStore` (put/put_new/flush/
get/get_range/exists/list/list_times/delete/delete_many/mtime/lock) over one bucket and key prefix,
addressed as ``s3://BUCKET/PREFIX`` (`agent.repo.open_store` picks it).
Tested against Ceph's RADOS Gateway; uses boto3 with path-style addressing.

Configuration is boto3's usual: credentials from ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` (or ``~/.aws/credentials``, ``AWS_PROFILE``...),
region from ``AWS_DEFAULT_REGION`` / ``AWS_REGION`` (default us-east-1), the
endpoint from the ``endpoint`` argument (CLI ``--s3-endpoint``), else
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (read here too, so an older
boto3 such as Debian's 1.26 honours them), else boto3's own (config file,
AWS).

Writes: a PUT that returned is durable, so `flush` does nothing.  Chunks are
written with `put_new`, a conditional PUT (``If-None-Match: *``): a store
that already holds the key answers 412, which means "already there" --
concurrent writers never rewrite a chunk, and since a chunk's key is its
digest, whoever wrote it first wrote the same bytes.

Locking (the `DirStore`'s flock, rebuilt from objects with expiry):

- shared (pull, verify): a lease object ``locks/shared-<uuid>``;
- exclusive (gc, delete, prune): ``locks/exclusive``, created with
  ``If-None-Match: *`` (so at most one holder).

A lease is live until its LastModified (the store's clock) plus its ``ttl``
(in its body), measured against the store's clock (the ``Date`` of a
response), so client clocks do not matter.  Holders rewrite their lease
every ``ttl/3`` s from a background thread.  Each side writes its own lease
FIRST and only then lists the other side's, and backs off (deletes its lease,
raises ConfigError) if it finds a live one: with S3's read-after-write and
list-after-write consistency, of a pull and a gc that start together at least
one sees the other, so they never both proceed (both may refuse).  Expired
leases are ignored, and removed by whoever finds them.

Race windows, honestly:

- A holder stalled longer than ``ttl`` (a stopped process, a long network
  outage) loses its lease without knowing until its next renewal; a gc may
  then run.  A renewal that finds its lease gone, or replaced by another
  holder's (its ETag changed: every lease write carries a nonce), marks the lock
  lost, and `check_lock` (called by `Repository.save_snapshot`) refuses to
  save a snapshot under a lost lock, so such a pull fails instead of saving a
  snapshot whose chunks gc may have removed.  `Repository.gc` calls it too, before each
  batch of deletions: a gc stalled past its lease may have let a pull in, which found
  an unreferenced chunk in the store (dedup: not uploaded, so not covered by the grace
  period) and saved a snapshot using it; that gc stops instead of deleting it.
  `check_lock` also checks the lease itself (HEAD, ETag, time since the last
  renewal), so a process that was stopped as a whole notices too; what
  remains is the moment between that check and the snapshot's PUT.
- Replacing an expired ``locks/exclusive`` is delete-then-create: of two
  processes that both saw it expired, the second may delete the first's fresh
  lease and create its own; the first's renewal then sees the ETag change
  and marks its lock lost, but two gc/delete/prune runs can overlap for up
  to ``ttl/3`` s (gc and delete only remove; pulls stay locked out throughout).
- As a second line of defence, gc never deletes a chunk younger than its
  grace period (`S3Store.gc_grace`, LastModified from the listing, against the
  store's own clock from `S3Store.now`, never the gc host's), which covers
  chunks uploaded by a pull that started before gc's lock check.

Reads into a buffer (`S3Store.get_into`, a restore's path: one GET per chunk)
skip botocore: a GET signed here (SigV4, the credentials boto3 resolved) on an
``http.client`` connection kept per thread, the body read straight into the
caller's buffer.  boto3's ``get_object`` costs ~1.2 ms of client CPU per GET
of a 0.3 MB chunk, this ~0.3 ms (bench/rgw_put_floor.py ``--get``; radosgw's own
cost is ~0.8 ms).  Any answer but 200, and any failure of the connection, goes
through boto3 again (its retries, its errors: FileNotFoundError for a missing
key).  ``NBDBACKUP_S3_RAW_GET=0`` turns it off.  Conditional PUTs (`S3Store.put_new`:
chunks and snapshots) go the same way, the body's SHA-256 signed so the store
rejects a damaged body (what botocore does over plain http); 200 means
created, 412 "already there" (believed once a HEAD shows the key: a store
answering 412 to a PUT it never stored would leave a snapshot's chunk
missing), anything else or a failure goes through boto3 (a retry there of a
PUT that did land answers 412: "already there", as botocore's own retries
would; a 409 there, a concurrent conditional PUT in progress, counts as
"already there" unchecked).  ``NBDBACKUP_S3_RAW_PUT=0`` turns that off.

Invariants: keys are '/'-separated and relative to the prefix; `get` of a
missing key raises FileNotFoundError (as the DirStore's open does); a chunk
key, once written, is never overwritten by this module.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import email.utils
import errno
import json
import os
import socket
import threading
import time
import uuid
from typing import Iterator
from urllib.parse import urlsplit

from ..errors import ConfigError

#: Lease lifetime (seconds) and the default gc grace period for S3 repositories.
LEASE_TTL = 60.0
GC_GRACE = 3600.0


class S3Error(ConfigError, OSError):
    """A request to the object store failed: one line for the CLI (a ConfigError),
    an errno for the restore plugin and the pull (an OSError: EIO, ENOENT, EACCES)."""

    def __str__(self) -> str:
        return str(self.strerror)


def parse_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` -> (bucket, prefix without slashes at either end)."""
    u = urlsplit(url)
    if u.scheme != "s3" or not u.netloc or u.query or u.fragment:
        raise ConfigError(f"{url!r}: give an S3 repository as s3://BUCKET/PREFIX")
    prefix = u.path.strip("/")
    if ".." in prefix.split("/"):
        raise ConfigError(f"{url!r}: '..' in the prefix")
    return u.netloc, prefix


class _RawS3:
    """SigV4-signed GETs and conditional PUTs over ``http.client`` (one kept-open
    connection per thread), for `S3Store.get_into` and `S3Store.put_new`.  Fields: ``scheme``, ``host``, ``port``, ``netloc`` (of the
    endpoint), ``region``, ``credentials`` (botocore's: possibly refreshing, frozen per
    request), ``cafile`` (https: as botocore verifies), ``_tls`` (per-thread connection),
    ``failures`` (connection failures in a row: at `MAX_FAILURES` the raw path is off
    for good -- e.g. a CA that only botocore's configuration file names)."""

    MAX_FAILURES = 3

    def __init__(self, endpoint: str, region: str, credentials, cafile: str | None) -> None:
        u = urlsplit(endpoint)
        self.scheme, self.host, self.netloc = u.scheme, u.hostname or "", u.netloc
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.base = u.path.rstrip("/")
        self.region, self.credentials, self.cafile = region, credentials, cafile
        self._tls = threading.local()
        self._ctx = None
        self.failures = 0

    def _conn(self):
        import http.client

        c = getattr(self._tls, "c", None)
        if c is None:
            if self.scheme == "https":
                if self._ctx is None:
                    import ssl

                    self._ctx = ssl.create_default_context(cafile=self.cafile)
                c = http.client.HTTPSConnection(self.host, self.port, timeout=60, context=self._ctx)
            else:
                c = http.client.HTTPConnection(self.host, self.port, timeout=60)
            self._tls.c = c
        return c

    def drop(self) -> None:
        c = getattr(self._tls, "c", None)
        self._tls.c = None
        if c is not None:
            with contextlib.suppress(Exception):
                c.close()

    def _headers(self, path: str, method: str = "GET", payload: str = "UNSIGNED-PAYLOAD",
                 extra: dict[str, str] | None = None) -> dict[str, str]:
        """SigV4 headers for ``method path``; ``payload`` is the body's hex SHA-256
        (signed: the store checks the body against it) or UNSIGNED-PAYLOAD;
        ``extra`` headers (lower-case names) are signed too."""
        import hashlib
        import hmac

        creds = self.credentials.get_frozen_credentials()
        amz = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        day = amz[:8]
        h = {"host": self.netloc, "x-amz-content-sha256": payload, "x-amz-date": amz, **(extra or {})}
        if creds.token:
            h["x-amz-security-token"] = creds.token
        names = sorted(h)
        creq = "\n".join([method, path, "", "".join(f"{k}:{h[k]}\n" for k in names), ";".join(names),
                          payload])
        scope = f"{day}/{self.region}/s3/aws4_request"
        sts = "\n".join(["AWS4-HMAC-SHA256", amz, scope, hashlib.sha256(creq.encode()).hexdigest()])
        k = hmac.new(("AWS4" + creds.secret_key).encode(), day.encode(), hashlib.sha256).digest()
        for part in (self.region, "s3", "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        h["authorization"] = (f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, "
                              f"SignedHeaders={';'.join(names)}, "
                              f"Signature={hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()}")
        return h

    def get_into(self, bucket: str, key: str, buf: memoryview) -> int | None:
        """The object's length, read into ``buf``; -1 if it is longer than ``buf``; None
        for any other outcome (not 200, a connection failure): the caller asks boto3."""
        from urllib.parse import quote

        if self.failures >= self.MAX_FAILURES:
            return None
        path = f"{self.base}/{quote(bucket)}/{quote(key, safe='/~')}"
        try:
            c = self._conn()
            c.request("GET", path, headers=self._headers(path))
            r = c.getresponse()
            size = int(r.headers.get("Content-Length", -1))
            if r.status != 200 or size < 0 or size > len(buf):
                r.read()
                return -1 if r.status == 200 and size > len(buf) else None
            n = 0
            while n < size:
                k = r.readinto(buf[n:size])
                if not k:
                    break
                n += k
            if n != size or not r.isclosed() and r.read(1):
                self.drop()
                return None
            self.failures = 0
            return n
        except Exception:  # noqa: BLE001 - any failure here (http.client's, a refresh's): boto3 decides
            self.drop()
            self.failures += 1
            return None


    def put_new(self, bucket: str, key: str, body: memoryview) -> bool | None:
        """A conditional PUT (``If-None-Match: *``) of ``body``, its SHA-256 signed (the
        store rejects a body that does not match, as with botocore over plain http):
        True if it was created, False if the key exists (412); None for any other
        outcome (409, a concurrent conditional PUT in progress, included): the caller
        asks boto3."""
        import hashlib
        from urllib.parse import quote

        if self.failures >= self.MAX_FAILURES:
            return None
        path = f"{self.base}/{quote(bucket)}/{quote(key, safe='/~')}"
        try:
            h = self._headers(path, "PUT", hashlib.sha256(body).hexdigest(), {"if-none-match": "*"})
            h["content-length"] = str(len(body))
            c = self._conn()
            c.request("PUT", path, body=body, headers=h)
            r = c.getresponse()
            r.read()
            if r.status not in (200, 412):
                return None
            self.failures = 0
            return r.status == 200
        except Exception:  # noqa: BLE001 - any failure here: boto3 decides (and retries)
            self.drop()
            self.failures += 1
            return None


def _client(endpoint: str | None):
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:
        raise ConfigError(f"s3:// repositories need boto3 ({e}); run scripts/setup") from None
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    session = boto3.session.Session()
    region = session.region_name or "us-east-1"
    cfg = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"},
                 max_pool_connections=32, connect_timeout=10, read_timeout=60)
    return session.client("s3", endpoint_url=endpoint, region_name=region, config=cfg)


class S3Store:
    """Objects under ``s3://bucket/prefix`` (see the module doc).

    Fields: ``root`` (the URL, for messages); ``bucket``, ``prefix``;
    ``client`` (a boto3 S3 client; thread-safe, shared by the pull's worker
    threads); ``lease_ttl`` and ``gc_grace`` (seconds); ``_lost`` (set by the
    renewal thread when the held lease vanished or could not be renewed
    in time; read by `check_lock`); ``_lease_etag`` (see `_put_lease`).
    """

    #: An existence check is a round trip here (`repo.ProbeGate` decides when to make it).
    remote = True

    def __init__(self, url: str, *, endpoint: str | None = None, lease_ttl: float = LEASE_TTL,
                 gc_grace: float = GC_GRACE) -> None:
        self.bucket, self.prefix = parse_url(url)
        self.root = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.client = _client(endpoint)
        #: Raw signed GETs for `get_into` (None: off, or no credentials to sign with).
        self._raw: _RawS3 | None = None
        creds = self.client._get_credentials() if hasattr(self.client, "_get_credentials") else None
        if creds is None:
            creds = getattr(getattr(self.client, "_request_signer", None), "_credentials", None)
        if creds is not None and os.environ.get("NBDBACKUP_S3_RAW_GET", "1") != "0":
            from botocore.httpsession import get_cert_path

            cafile = os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True)  # what boto3 verifies with
            self._raw = _RawS3(self.client.meta.endpoint_url, self.client.meta.region_name, creds,
                                cafile if isinstance(cafile, str) else None)
        #: Conditional PUTs (`put_new`: chunks, snapshots) signed here too, unless
        #: ``NBDBACKUP_S3_RAW_PUT=0``.
        self._raw_put = os.environ.get("NBDBACKUP_S3_RAW_PUT", "1") != "0"
        self.lease_ttl = lease_ttl
        self.gc_grace = gc_grace
        self._lost: str | None = None
        self._holding = False
        #: ETag and time.monotonic() of this store's last lease write; the key of the lease held.
        self._lease_etag: str | None = None
        self._renewed_at = 0.0
        self._held_key: str | None = None
        ops = self.client.meta.service_model.operation_model("PutObject").input_shape.members
        #: Whether this botocore knows PutObject's IfNoneMatch (1.35+); if not, the header is added by hand.
        self._native_if_none_match = "IfNoneMatch" in ops
        #: Otherwise: whether the header hook is registered, and a per-thread "this PUT is conditional".
        self._hooked = False
        self._conditional = threading.local()
        #: API calls made, by operation name (``PutObject``: n; a call retried by botocore
        #: counts once): what a run costs in round trips (the agent's ``--json`` report,
        #: bench/repo_bench.py).  Guarded by ``_count_lock`` (worker threads call at once).
        self.requests: collections.Counter[str] = collections.Counter()
        self._count_lock = threading.Lock()
        self.client.meta.events.register("before-call.s3", self._count, unique_id="nbdbackup-count")

    def _count(self, model, **_) -> None:
        with self._count_lock:
            self.requests[model.name] += 1

    # -- keys and errors -----------------------------------------------------

    def _key(self, key: str) -> str:
        assert ".." not in key.split("/") and not key.startswith("/"), key
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    @staticmethod
    def _code(e: Exception) -> tuple[str, int]:
        r = getattr(e, "response", None) or {}
        return str(r.get("Error", {}).get("Code", "")), int(r.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))

    def _fail(self, e: Exception, what: str) -> S3Error:
        """The `S3Error` for a botocore exception (ClientError or BotoCoreError)."""
        code, status = self._code(e)
        if code == "NoSuchBucket":
            return S3Error(errno.ENOENT, f"{self.root}: no bucket {self.bucket!r}")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
            return S3Error(errno.EACCES, f"{self.root}: access denied ({code or status}) on {what}")
        return S3Error(errno.EIO, f"{self.root}: {what}: {e}")

    def _call(self, what: str, fn, **kw):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kw)
        except (ClientError, BotoCoreError) as e:
            raise self._fail(e, what) from e

    # -- the store interface ---------------------------------------------------

    def create(self) -> None:
        """Make the bucket if it does not exist (``repo init``)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as e:
            if self._code(e)[1] != 404:
                raise self._fail(e, "head bucket") from e
        except BotoCoreError as e:
            raise self._fail(e, "head bucket") from e
        self._call("create bucket", self.client.create_bucket, Bucket=self.bucket)

    def put(self, key: str, data) -> None:
        self._call(f"put {key}", self.client.put_object, Bucket=self.bucket, Key=self._key(key),
                   Body=bytes(memoryview(data).cast("B")))

    def put_new(self, key: str, data) -> bool:
        """Write ``key`` unless it exists (conditional PUT); True if this call created it."""
        from botocore.exceptions import BotoCoreError, ClientError

        if self._raw is not None and self._raw_put:
            made = self._raw.put_new(self.bucket, self._key(key), memoryview(data).cast("B"))
            if made is not None:
                with self._count_lock:
                    self.requests["PutObject"] += 1
                if not made:
                    self._held_after_412(key)
                return made
        kw = dict(Bucket=self.bucket, Key=self._key(key), Body=bytes(memoryview(data).cast("B")))
        try:
            if self._native_if_none_match:
                self.client.put_object(IfNoneMatch="*", **kw)
            else:
                with self._if_none_match():
                    self.client.put_object(**kw)
        except ClientError as e:
            code, status = self._code(e)
            if status == 412 or code == "PreconditionFailed":
                self._held_after_412(key)
                return False
            if status == 409 or code == "ConditionalRequestConflict":  # a concurrent conditional PUT won
                return False
            raise self._fail(e, f"put {key}") from e
        except BotoCoreError as e:
            raise self._fail(e, f"put {key}") from e
        return True

    def _held_after_412(self, key: str) -> None:
        """A 412 ("already there") is believed only if the store then shows the key (one
        HEAD; 412s are rare: `repo.ProbeGate` probes again after one).  A store or proxy
        that answered 412 to a PUT it never stored made a pull record a snapshot whose
        chunk was missing (hunt 8); now that pull fails."""
        if not self.exists(key):
            raise S3Error(errno.EIO, f"{self.root}: the store answered 412 (already there) to the PUT "
                                     f"of {key} but does not hold it")

    @contextlib.contextmanager
    def _if_none_match(self):
        """For a botocore without PutObject's IfNoneMatch: the header, on this thread's PUTs only."""
        if not self._hooked:
            self.client.meta.events.register("before-sign.s3.PutObject", self._add_if_none_match,
                                             unique_id="nbdbackup-if-none-match")
            self._hooked = True
        self._conditional.on = True
        try:
            yield
        finally:
            self._conditional.on = False

    def _add_if_none_match(self, request, **_) -> None:
        if getattr(self._conditional, "on", False):
            request.headers["If-None-Match"] = "*"

    def flush(self) -> None:
        """Nothing to do: a PUT that returned is durable."""

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return r["Body"].read()
        except ClientError as e:
            if self._code(e)[0] in ("NoSuchKey", "404") or self._code(e)[1] == 404:
                raise FileNotFoundError(errno.ENOENT, f"{self.root}/{key}: no such object") from None
            raise self._fail(e, f"get {key}") from e
        except BotoCoreError as e:
            raise self._fail(e, f"get {key}") from e

    def get_into(self, key: str, buf) -> int:
        """Read ``key`` into the writable buffer ``buf``; its length, or -1 if it is longer
        than ``buf`` (a raw signed GET: see the module doc; else `get`)."""
        mv = memoryview(buf).cast("B")
        if self._raw is not None:
            n = self._raw.get_into(self.bucket, self._key(key), mv)
            if n is not None:
                with self._count_lock:
                    self.requests["GetObject"] += 1
                return n
        data = self.get(key)
        if len(data) > len(mv):
            return -1
        mv[:len(data)] = data
        return len(data)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """At most ``length`` bytes of ``key`` from ``offset`` (a ranged GET; fewer at its end)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self._key(key),
                                       Range=f"bytes={offset}-{offset + length - 1}")
            return r["Body"].read()
        except ClientError as e:
            if self._code(e)[0] in ("NoSuchKey", "404") or self._code(e)[1] == 404:
                raise FileNotFoundError(errno.ENOENT, f"{self.root}/{key}: no such object") from None
            if self._code(e)[1] == 416:  # offset at or past the end
                return b""
            raise self._fail(e, f"get {key}") from e
        except BotoCoreError as e:
            raise self._fail(e, f"get {key}") from e

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if self._code(e)[1] == 404:
                return None
            raise self._fail(e, f"head {key}") from e
        except BotoCoreError as e:
            raise self._fail(e, f"head {key}") from e

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def list_times(self, prefix: str) -> Iterator[tuple[str, float]]:
        """``(key, LastModified as seconds since the epoch)`` under ``prefix`` (a key path)."""
        full = self._key(prefix.rstrip("/")) + "/" if prefix else (f"{self.prefix}/" if self.prefix else "")
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            for page in pages:
                for o in page.get("Contents", ()):
                    yield self._rel(o["Key"]), o["LastModified"].timestamp()
        except ClientError as e:
            raise self._fail(e, f"list {prefix}") from e
        except BotoCoreError as e:
            raise self._fail(e, f"list {prefix}") from e

    def list(self, prefix: str) -> Iterator[str]:
        for k, _ in self.list_times(prefix):
            yield k

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def delete_many(self, keys) -> None:
        """Delete ``keys`` (an iterable), up to 1000 per request (gc at scale)."""
        keys = list(keys)
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i:i + 1000]]
            r = self._call(f"delete {len(batch)} objects", self.client.delete_objects, Bucket=self.bucket,
                           Delete={"Objects": batch, "Quiet": True})
            errors = r.get("Errors") or []
            if errors:
                e = errors[0]
                raise S3Error(errno.EIO, f"{self.root}: delete {self._rel(e.get('Key', '?'))}: "
                                         f"{e.get('Code')} {e.get('Message') or ''}".rstrip())

    def mtime(self, key: str) -> float:
        h = self._head(key)
        if h is None:
            raise FileNotFoundError(errno.ENOENT, f"{self.root}/{key}: no such object")
        return h["LastModified"].timestamp()

    def now(self) -> float:
        """The store's clock (the ``Date`` of a HEAD of the bucket): what LastModified is measured by."""
        return _server_time(self._call("head bucket", self.client.head_bucket, Bucket=self.bucket))

    # -- leases ------------------------------------------------------------------

    def _put_lease(self, key: str, *, exclusive_create: bool) -> tuple[bool, float]:
        """Write a lease; (written, the store's time of the write).  With
        ``exclusive_create`` only if absent."""
        from botocore.exceptions import BotoCoreError, ClientError

        # The nonce makes every write's ETag unique, so a renewal can tell its lease from a successor's.
        body = json.dumps({"ttl": self.lease_ttl, "host": socket.gethostname(), "pid": os.getpid(),
                           "nonce": uuid.uuid4().hex}).encode()
        kw = dict(Bucket=self.bucket, Key=self._key(key), Body=body)
        try:
            if exclusive_create and self._native_if_none_match:
                r = self.client.put_object(IfNoneMatch="*", **kw)
            elif exclusive_create:
                with self._if_none_match():
                    r = self.client.put_object(**kw)
            else:
                r = self.client.put_object(**kw)
        except ClientError as e:
            code, status = self._code(e)
            if exclusive_create and (status in (409, 412) or code == "PreconditionFailed"):
                return False, 0.0
            raise self._fail(e, f"put {key}") from e
        except BotoCoreError as e:
            raise self._fail(e, f"put {key}") from e
        self._lease_etag = r.get("ETag")
        self._renewed_at = time.monotonic()
        return True, _server_time(r)

    def _live(self, key: str, now: float) -> bool | None:
        """Whether the lease ``key`` is live at the store's time ``now`` (None: gone).
        A lease whose body cannot be read (damaged, truncated, foreign) is someone's lease of
        unknown ttl: ours is assumed, so it blocks the other side until it expires, and is
        then replaced or removed like any expired lease (never "gone": a gc could run beside
        the pull that holds it; never live forever: no gc could run again)."""
        try:
            h = self._head(key)
            if h is None:
                return None
            body = self.get(key)
        except FileNotFoundError:
            return None
        try:
            ttl = float(json.loads(body).get("ttl", self.lease_ttl))
            if not 0 <= ttl < float("inf"):
                raise ValueError(ttl)
        except (ValueError, AttributeError, TypeError):
            ttl = self.lease_ttl
        return h["LastModified"].timestamp() + ttl > now

    def _live_shared(self, now: float, mine: str | None = None) -> list[str]:
        live = []
        for k in list(self.list("locks")):
            if k.startswith("locks/shared-") and k != mine:
                state = self._live(k, now)
                if state:
                    live.append(k)
                elif state is False:
                    self.delete(k)  # expired: whoever finds it removes it
        return live

    @contextlib.contextmanager
    def lock(self, exclusive: bool) -> Iterator[None]:
        """Shared or exclusive repository lease for the ``with`` block (see the module doc);
        a busy repository raises ConfigError at once."""
        if exclusive:
            key = "locks/exclusive"
            for _ in range(2):
                ok, now = self._put_lease(key, exclusive_create=True)
                if ok:
                    break
                state = self._live(key, self.now())
                if state:
                    raise ConfigError(f"repository {self.root} is busy (being cleaned)")
                if state is False:
                    self.delete(key)  # expired: replace it
            else:
                raise ConfigError(f"repository {self.root} is busy (being cleaned)")
            if self._live_shared(now):
                self.delete(key)
                raise ConfigError(f"repository {self.root} is busy (in use)")
        else:
            key = f"locks/shared-{uuid.uuid4().hex}"
            _, now = self._put_lease(key, exclusive_create=False)
            if self._live("locks/exclusive", now):
                self.delete(key)
                raise ConfigError(f"repository {self.root} is busy (being cleaned)")
        self._lost = None
        self._holding = True
        self._held_key = key
        stop = threading.Event()
        t = threading.Thread(target=self._renew, args=(key, stop), name=f"lease {key}", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()
            self._holding = False
            self._held_key = None
            with contextlib.suppress(OSError):
                self.delete(key)

    def _renew(self, key: str, stop: threading.Event) -> None:
        last = time.monotonic()
        while not stop.wait(self.lease_ttl / 3):
            try:
                h = self._head(key)
                if h is None:
                    self._lost = f"lease {key} vanished (expired and removed by another process?)"
                    return
                if h.get("ETag") != self._lease_etag:
                    self._lost = f"lease {key} was taken over by another process (ours had expired)"
                    return
                if time.monotonic() - last > self.lease_ttl:  # checked BEFORE rewriting it: a lapsed
                    # lease renewed first would look fresh to `check_lock` until `_lost` is set
                    self._lost = f"lease {key} was not renewed for {time.monotonic() - last:.0f} s"
                    return
                self._put_lease(key, exclusive_create=False)
                last = time.monotonic()
            except Exception as e:  # noqa: BLE001  (an unreachable store included: keep trying until the ttl)
                if time.monotonic() - last > self.lease_ttl:
                    self._lost = f"lease {key} could not be renewed: {e}"
                    return

    def check_lock(self) -> None:
        """Raise ConfigError if the lease held by the current `lock` was lost: checked
        now, not only by the renewal thread (which a stopped process does not run either)."""
        key = self._held_key
        if key and not self._lost:
            if time.monotonic() - self._renewed_at > self.lease_ttl:
                self._lost = f"lease {key} was not renewed for {time.monotonic() - self._renewed_at:.0f} s"
            else:
                h = self._head(key)
                if h is None:
                    self._lost = f"lease {key} vanished (expired and removed by another process?)"
                elif h.get("ETag") != self._lease_etag:
                    self._lost = f"lease {key} was taken over by another process (ours had expired)"
        if self._lost:
            raise ConfigError(f"repository {self.root}: {self._lost}; stopped (nothing saved or deleted after this)")


def _server_time(response: dict) -> float:
    """The store's clock from a response's ``Date`` header (seconds since the epoch)."""
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if date:
        with contextlib.suppress(TypeError, ValueError):
            return email.utils.parsedate_to_datetime(date).timestamp()
    return datetime.datetime.now(datetime.timezone.utc).timestamp()
