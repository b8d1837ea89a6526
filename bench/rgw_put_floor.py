"""Benchmark: the floor a Ceph RGW sets under an incremental's uploads -- N PUTs of S bytes.

Role: how much of ``nbdbackup agent backup``'s time on ``s3://`` is the store's own.
An incremental of bench/repo_bench.py (1 GiB, ~5% changed, 1 MiB chunks) uploads about
90 encrypted chunks of 1 MiB + 40 bytes (and a few small objects: the lease, the
snapshot); this replays the same number and sizes of PUTs, ``--concurrency`` at once
(the agent's ``--workers``, 8), from ONE warm process, three ways:

- ``boto3``: ``put_object`` with ``If-None-Match: *`` (what `agent.s3store` sends),
  a client created and warmed (one PUT) before the clock starts;
- ``raw``: the same requests signed by hand (SigV4, ``UNSIGNED-PAYLOAD``, as
  boto3 sends over plain http... see below) on ``http.client`` connections kept
  open, one per thread: no botocore at all, so what remains is the network
  stack, the HTTP parsing and radosgw + the OSD;
- ``raw-seq``: ``raw`` one request at a time (the per-request latency).

``--get``: then the same objects are read back (``--get-concurrency``, a restore's 16
from S3), with boto3 ``get_object`` and with the signed ``http.client`` GET (body read
into a reused buffer): the per-GET client CPU and the store's own cost of a restore.

Each round uploads fresh keys (random bytes: nothing deduplicates or compresses);
rounds alternate the ways.  Printed per way: median wall seconds for the N PUTs,
the process's CPU seconds (client side), MB/s; radosgw's and ceph-osd's CPU during
the way's rounds (from /proc, by the PIDs the RGW helper started), so the note can
say what the store itself costs on the 2 shared cores.

Usage: .venv/bin/python bench/rgw_put_floor.py [--count 90] [--size 1048616]
       [--concurrency 8] [--rounds 5] [--endpoint URL]  (default: start a one-node
       RGW from tests/interop/ceph_rgw.py, ~15 s, and stop it after)
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import hmac
import http.client
import os
import resource
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "interop"))


def _proc_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def _store_pids() -> list[int]:
    """radosgw, ceph-osd and ceph-mon processes of this user (the bench's own RGW when it started one)."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/comm") as f:
                comm = f.read().strip()
            if comm in ("radosgw", "ceph-osd", "ceph-mon") and os.stat(f"/proc/{p}").st_uid == os.getuid():
                out.append(int(p))
        except OSError:
            pass
    return out


class RawS3:
    """SigV4-signed PUTs over ``http.client`` (one kept-open connection per thread)."""

    def __init__(self, endpoint: str, access: str, secret: str, region: str) -> None:
        u = urlsplit(endpoint)
        self.host, self.port = u.hostname, u.port or 80
        self.netloc = u.netloc
        self.access, self.secret, self.region = access, secret, region
        self._tls = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        c = getattr(self._tls, "c", None)
        if c is None:
            c = self._tls.c = http.client.HTTPConnection(self.host, self.port, timeout=60)
        return c

    def _sign(self, method: str, path: str, headers: dict[str, str]) -> None:
        now = datetime.datetime.now(datetime.timezone.utc)
        amz = now.strftime("%Y%m%dT%H%M%SZ")
        day = amz[:8]
        headers["x-amz-date"] = amz
        headers["x-amz-content-sha256"] = "UNSIGNED-PAYLOAD"
        headers["host"] = self.netloc
        names = sorted(h.lower() for h in headers)
        canon_headers = "".join(f"{h}:{headers[h].strip()}\n" for h in names)
        signed = ";".join(names)
        creq = "\n".join([method, path, "", canon_headers, signed, "UNSIGNED-PAYLOAD"])
        scope = f"{day}/{self.region}/s3/aws4_request"
        sts = "\n".join(["AWS4-HMAC-SHA256", amz, scope, hashlib.sha256(creq.encode()).hexdigest()])
        k = hmac.new(("AWS4" + self.secret).encode(), day.encode(), hashlib.sha256).digest()
        for part in (self.region, "s3", "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
        headers["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.access}/{scope}, "
                                    f"SignedHeaders={signed}, Signature={sig}")

    def get_into(self, bucket: str, key: str, buf: memoryview) -> int:
        path = f"/{bucket}/{key}"
        headers: dict[str, str] = {}
        self._sign("GET", path, headers)
        c = self._conn()
        c.request("GET", path, headers=headers)
        r = c.getresponse()
        if r.status != 200:
            r.read()
            raise RuntimeError(f"GET {path}: {r.status} {r.reason}")
        n = 0
        while True:
            k = r.readinto(buf[n:])
            if not k:
                break
            n += k
        return n

    def put(self, bucket: str, key: str, data: bytes) -> None:
        path = f"/{bucket}/{key}"
        headers = {"if-none-match": "*", "content-length": str(len(data))}
        self._sign("PUT", path, headers)
        c = self._conn()
        c.request("PUT", path, body=data, headers=headers)
        r = c.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"PUT {path}: {r.status} {r.reason}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=90)
    ap.add_argument("--size", type=int, default=(1 << 20) + 40, help="bytes per object (1 MiB chunk + header/nonce/tag)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--get", action="store_true", help="then read the objects back (boto3 vs raw)")
    ap.add_argument("--get-concurrency", type=int, default=16)
    ap.add_argument("--endpoint", help="an RGW already running (AWS_* credentials from the environment)")
    a = ap.parse_args()
    import common  # bench/common.py: touch fresh guest memory once per boot
    common.warm_guest_memory()
    rgw = None
    try:
        if a.endpoint:
            endpoint = a.endpoint
            access, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
            region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
        else:
            import ceph_rgw

            d = f"/tmp/bench-rgwfloor-{os.getpid()}"
            os.makedirs(d)
            t0 = time.perf_counter()
            rgw = ceph_rgw.start(d, memstore_bytes=max(4 << 30, 4 * a.count * a.size * a.rounds))
            print(f"# RGW up in {time.perf_counter() - t0:.1f} s at {rgw.endpoint}", flush=True)
            endpoint, access, secret, region = rgw.endpoint, rgw.access_key, rgw.secret_key, rgw.region
        import boto3
        from botocore.config import Config

        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=access, aws_secret_access_key=secret,
                          region_name=region, config=Config(s3={"addressing_style": "path"},
                                                            max_pool_connections=32))

        def if_none_match(request, **_):
            request.headers["If-None-Match"] = "*"

        s3.meta.events.register("before-sign.s3.PutObject", if_none_match)
        bucket = f"floor{os.getpid()}"
        s3.create_bucket(Bucket=bucket)
        raw = RawS3(endpoint, access, secret, region)
        blobs = [os.urandom(a.size) for _ in range(min(a.count, 16))]
        s3.put_object(Bucket=bucket, Key="warm", Body=blobs[0])  # warm: client, connection, models
        raw.put(bucket, "warm-raw", blobs[0])
        store = _store_pids()
        ways = {
            "boto3": (a.concurrency, lambda k, b: s3.put_object(Bucket=bucket, Key=k, Body=b)),
            "raw": (a.concurrency, lambda k, b: raw.put(bucket, k, b)),
            "raw-seq": (1, lambda k, b: raw.put(bucket, k, b)),
        }
        res: dict[str, list[tuple[float, float, float]]] = {w: [] for w in ways}
        for rnd in range(a.rounds):
            for way, (conc, put) in ways.items():
                keys = [f"r{rnd}/{way}/{i:05d}" for i in range(a.count)]
                s0 = sum(_proc_cpu(p) for p in store)
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                t0 = time.perf_counter()
                with ThreadPoolExecutor(conc) as ex:
                    list(ex.map(lambda ik: put(ik[1], blobs[ik[0] % len(blobs)]), enumerate(keys)))
                dt = time.perf_counter() - t0
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
                res[way].append((dt, cpu, sum(_proc_cpu(p) for p in store) - s0))
                print(f"  round {rnd} {way:8} {dt:6.3f} s  client cpu {cpu:6.3f} s  store cpu "
                      f"{res[way][-1][2]:6.2f} s", flush=True)
        gets: dict[str, list[tuple[float, float, float]]] = {}
        if a.get:
            tls = threading.local()

            def raw_get(k: str) -> None:
                buf = getattr(tls, "buf", None)
                if buf is None:
                    buf = tls.buf = memoryview(bytearray(a.size + 4096))
                raw.get_into(bucket, k, buf)

            gways = {"boto3": lambda k: s3.get_object(Bucket=bucket, Key=k)["Body"].read(), "raw": raw_get}
            gets = {w: [] for w in gways}
            for rnd in range(a.rounds):
                for way, get in gways.items():
                    keys = [f"r{rnd}/{w}/{i:05d}" for w in ways for i in range(a.count)]
                    s0 = sum(_proc_cpu(p) for p in store)
                    r0 = resource.getrusage(resource.RUSAGE_SELF)
                    t0 = time.perf_counter()
                    with ThreadPoolExecutor(a.get_concurrency) as ex:
                        list(ex.map(get, keys))
                    dt = time.perf_counter() - t0
                    r1 = resource.getrusage(resource.RUSAGE_SELF)
                    gets[way].append((dt, r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime,
                                      sum(_proc_cpu(p) for p in store) - s0))
                    print(f"  round {rnd} GET {way:6} {len(keys)} objects {dt:6.3f} s  client cpu "
                          f"{gets[way][-1][1]:6.3f} s  store cpu {gets[way][-1][2]:6.2f} s", flush=True)
        mb = a.count * a.size / 1e6
        print(f"\n{a.count} PUTs of {a.size} bytes ({mb:.1f} MB), medians of {a.rounds} rounds, load "
              f"{os.getloadavg()[0]:.1f}:")
        for way, xs in res.items():
            dt = statistics.median(x[0] for x in xs)
            print(f"  {way:8} {dt:6.3f} s  ({mb / dt:6.0f} MB/s, {1000 * dt / a.count:5.2f} ms/PUT)  client cpu "
                  f"{statistics.median(x[1] for x in xs):6.3f} s  radosgw+osd+mon cpu "
                  f"{statistics.median(x[2] for x in xs):6.2f} s")
        n = a.count * 3
        for way, xs in gets.items():
            dt = statistics.median(x[0] for x in xs)
            print(f"  GET {way:6} {n} objects {dt:6.3f} s  ({1000 * dt / n:5.2f} ms/GET at {a.get_concurrency} at once)  "
                  f"client cpu {1000 * statistics.median(x[1] for x in xs) / n:5.2f} ms/GET  radosgw+osd+mon cpu "
                  f"{1000 * statistics.median(x[2] for x in xs) / n:5.2f} ms/GET")
    finally:
        if rgw is not None:
            rgw.stop()
            shutil.rmtree(rgw.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
