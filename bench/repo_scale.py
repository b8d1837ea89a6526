"""The chunk repository at scale: time, CPU and peak RSS of its maintenance paths (docs/hunt13.md).

Synthesises repositories through the repository's own API (no pull, no NBD), fast:

- ``snaps``: ``--snapshots`` snapshots of a ``--virtual``-byte disk (1 MiB chunks), each with
  ``--data`` data chunks at spread offsets (the rest holes) of which ``--churn`` change from one
  snapshot to the next; the data chunks are real objects (a counter, then zeros: zstd makes them
  tiny), so verify and restore read them;
- ``--garbage`` extra chunk objects nobody references (empty files written straight under
  chunks/xx/: only gc's listing and deletion see them).

Then each operation runs in a fresh process (``python -c``), timed, with its peak RSS
(``VmHWM``) and CPU: ``list`` (what ``repo list`` reads), ``load`` (the newest snapshot's
manifest), ``referenced`` (gc's mark phase), ``gc``, ``verify``, ``prune-dry`` (``prune --dry-run
--gc --keep-last 5``), ``restore`` (the newest, to a sparse file), ``meta`` (the snapshot object's size).

    python bench/repo_scale.py --virtual 1T --snapshots 10 --data 200 --churn 20 \
        --ops list,load,referenced,verify,restore,gc --python .venv/bin/python

Run it with /work/main's python too (``--python /work/main/.venv/bin/python --path /work/main``)
for the before figures; the repository is built once by this checkout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OPS = {
    "noop": "out['n'] = 0",
    "list": "names = repo.snapshots()\nfor n in names: repo.snapshot_info(n)\nout['n'] = len(names)",
    "load": "man = repo.load_snapshot(repo.snapshots()[-1])\nout['n'] = man.count",
    "referenced": "out['n'] = len(repo.referenced())",
    "gc": "with store.lock(exclusive=True): out['n'] = repo.gc()",
    "verify": ("from nbdbackup.agent.verify import verify\n"
               "r = verify(repo, repo.snapshots(), workers=4)\n"
               "out['n'] = (r.chunks_checked, len(r.problems))"),
    "verify-sample": ("from nbdbackup.agent.verify import verify\n"
                      "r = verify(repo, repo.snapshots(), sample=1, seed=1, workers=4)\n"
                      "out['n'] = (r.chunks_checked, len(r.problems))"),
    "prune": ("from nbdbackup.cli import main\nimport contextlib, io\n"
              "with contextlib.redirect_stdout(io.StringIO()):\n"
              "    out['n'] = main(['repo', 'prune', '--keep-last', '10', os.environ['REPO']])\n"
              "out['left'] = len(repo.snapshots())"),
    "prune-dry": ("from nbdbackup.cli import main\nimport contextlib, io\nbuf = io.StringIO()\n"
                  "with contextlib.redirect_stdout(buf):\n"
                  "    main(['repo', 'prune', '--dry-run', '--gc', '--keep-last', '5', '--json', os.environ['REPO']])\n"
                  "out['n'] = json.loads(buf.getvalue())['gc']"),
    "restore": ("from nbdbackup.cli import main\n"
                "p = os.environ['OUT']\n"
                "rc = main(['restore', os.environ['REPO'], repo.snapshots()[-1], p])\n"
                "out['n'] = (rc, os.stat(p).st_size, os.stat(p).st_blocks * 512)\nos.unlink(p)"),
}

#: Ops that change the repository: with several interpreters each runs on its own copy.
DESTRUCTIVE = ("gc", "prune")

RUNNER = """
import os, resource, sys, time, json
sys.path.insert(0, os.environ['SRC'])
from nbdbackup.agent.repo import DirStore, Repository
store = DirStore(os.environ['REPO'])
repo = Repository.open(store)
out = {}
with open('/proc/self/clear_refs', 'w') as f:  # peak RSS from here on (VmHWM): the op's, not the imports'
    f.write('5')
t0 = time.monotonic(); c0 = time.process_time()
%s
out['wall'] = time.monotonic() - t0
out['cpu'] = time.process_time() - c0
# VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec (the bench itself)
out['rss_mb'] = [int(l.split()[1]) // 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
print(json.dumps(out, default=str))
"""


def size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def build(path: str, virtual: int, snapshots: int, data: int, churn: int, garbage: int) -> dict:
    sys.path.insert(0, HERE)
    from nbdbackup.agent.manifest import Manifest
    from nbdbackup.agent.repo import DirStore, Repository, _chunk_key

    store = DirStore(path)
    repo = Repository.init(store, compression=1)
    cs = repo.chunk_size
    count = -(-virtual // cs)
    step = max(1, count // max(1, data))
    positions = [j * step for j in range(min(data, count))]
    version = {p: 0 for p in positions}
    buf = bytearray(cs)

    def chunk_id(pos: int, ver: int) -> bytes:
        buf[:16] = pos.to_bytes(8, "little") + ver.to_bytes(8, "little")
        d = repo.chunk_id(buf)
        repo.put_chunk(d, buf)
        return d

    ids = {p: chunk_id(p, 0) for p in positions}
    zero = repo.zero_id(cs)
    t0 = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    for k in range(snapshots):
        if k:
            for j in range(churn):
                p = positions[(k * churn + j) % len(positions)]
                version[p] += 1
                ids[p] = chunk_id(p, version[p])
        man = Manifest(virtual, cs)
        man.chunks = [zero] * count
        for p, d in ids.items():
            man.chunks[p] = d
        repo.save_snapshot(f"s{k:05d}", man, source="bench", parent=f"s{k - 1:05d}" if k else None,
                           created=t0 + datetime.timedelta(hours=k))
    for g in range(garbage):  # unreferenced objects: listing and deletion only
        key = _chunk_key(g.to_bytes(8, "little") + bytes(24))  # spread over the 256 chunks/xx, as real ids
        p = os.path.join(path, *key.split("/"))
        os.makedirs(os.path.dirname(p), exist_ok=True)
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT, 0o644))
    store.flush()
    meta = os.path.getsize(os.path.join(path, "snapshots", f"s{snapshots - 1:05d}"))
    nchunks = sum(len(f) for _, _, f in os.walk(os.path.join(path, "chunks")))
    return {"snapshot_object_bytes": meta, "chunk_objects": nchunks}


def run(op: str, python: str, src: str, repo: str, tmp: str) -> dict:
    env = dict(os.environ, SRC=src, REPO=repo, OUT=os.path.join(tmp, "restored.img"))
    r = subprocess.run(["nice", "-n", "19", python, "-c", RUNNER % OPS[op]], env=env, capture_output=True,
                       text=True, cwd=src)
    if r.returncode:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"rc {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def timed(argv: list[str], env: dict, cwd: str) -> dict:
    """``argv`` under /usr/bin/time -v (niced): wall, CPU (user+sys) and peak RSS of the command."""
    t0 = time.monotonic()
    r = subprocess.run(["nice", "-n", "19", "/usr/bin/time", "-v", *argv], env=env, cwd=cwd, capture_output=True,
                       text=True)
    wall = time.monotonic() - t0
    f = {}
    for line in r.stderr.splitlines():
        k, _, v = line.strip().rpartition(": ")
        f[k] = v
    if r.returncode:
        raise RuntimeError(f"{argv[:4]}: rc {r.returncode}: {r.stderr[-600:]}")
    return {"wall": round(wall, 2), "cpu": round(float(f["User time (seconds)"]) + float(f["System time (seconds)"]), 2),
            "rss_mb": int(f["Maximum resident set size (kbytes)"]) // 1024, "stdout": r.stdout}


def e2e(a, python: str, src: str, tmp: str) -> None:
    """A ``--virtual`` disk (sparse file, ``--data`` MiB of random data spread over it) served live by
    ``nbdbackup serve``; ``agent backup`` full, 64 MiB changed through the export (qemu-io), ``agent
    backup`` incremental; ``repo list``, ``restore`` (sparse file: holes must stay holes),
    ``qemu-img compare``, ``repo verify`` (all and ``--sample 1``), the restore plugin's open time."""
    import random
    import socket as socketmod

    work = tempfile.mkdtemp(prefix="e2e.", dir=tmp)
    img, repo, out = (os.path.join(work, n) for n in ("disk.img", "repo", "restored.img"))
    sock, ctl = os.path.join(work, "nbd.sock"), os.path.join(work, "ctl.sock")
    env = dict(os.environ, PYTHONPATH=src)
    py = [python, "-m", "nbdbackup.cli"]
    rnd = random.Random(1)
    mib = 1 << 20
    slots = a.virtual // mib
    with open(img, "wb") as f:
        f.truncate(a.virtual)
        for k in range(a.data):
            f.seek((k * slots // a.data) * mib)
            f.write(rnd.randbytes(mib))
    res = {"virtual": a.virtual, "data_mib": a.data, "src": src}
    srv = subprocess.Popen(["nice", "-n", "19", *py, "serve", f"disk={img}", "--socket", sock, "--control", ctl,
                            "--state-dir", os.path.join(work, "state")], env=env, cwd=src,
                           stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "serve.log"), "w"))
    try:
        for _ in range(300):
            if os.path.exists(ctl):
                break
            time.sleep(0.1)
        subprocess.run([*py, "repo", "init", repo], env=env, cwd=src, check=True, capture_output=True)
        backup = [*py, "agent", "backup", "--control", ctl, "--nbd", f"nbd+unix:///?socket={sock}", "--disk", "disk",
                  "--repo", repo, "--verify", "off", "--json", "--progress", "never"]
        r = timed(backup, env, src)
        res["backup_full"] = {k: r[k] for k in ("wall", "cpu", "rss_mb")}
        cmds = []
        for _ in range(64):
            cmds += ["-c", f"write -P {rnd.randrange(1, 255)} {rnd.randrange(slots) * mib} 1M"]
        subprocess.run(["qemu-io", "-f", "raw", *cmds, f"nbd+unix:///disk?socket={sock}"], check=True,
                       capture_output=True)
        r = timed(backup, env, src)
        res["backup_incr"] = {k: r[k] for k in ("wall", "cpu", "rss_mb")}
        snaps = sorted(os.listdir(os.path.join(repo, "snapshots")))
        res["snapshot_object_bytes"] = [os.path.getsize(os.path.join(repo, "snapshots", n)) for n in snaps]
        for name, argv in (("list", ["repo", "list", repo]), ("verify", ["repo", "verify", repo]),
                           ("verify_sample", ["repo", "verify", "--sample", "1", "--seed", "1", repo]),
                           ("restore", ["restore", repo, snaps[-1], out])):
            r = timed([*py, *argv], env, src)
            res[name] = {k: r[k] for k in ("wall", "cpu", "rss_mb")}
        st = os.stat(out)
        res["restored_alloc_mib"] = st.st_blocks * 512 // mib
        # the image changed after the incremental? no: compare against the image as served now
        c = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", img, out], capture_output=True, text=True)
        res["compare"] = c.stdout.strip() or c.stderr.strip()
        os.unlink(out)
        psock = os.path.join(work, "plugin.sock")
        t0 = time.monotonic()
        plug = subprocess.Popen(["nbdkit", "-f", "-U", psock, "python", os.path.join(src, "plugins", "restore.py"),
                                 f"repo={repo}", f"snapshot={snaps[-1]}"], env=env, cwd=src,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            subprocess.run(["nbdinfo", "--size", f"nbd+unix:///?socket={psock}"], check=True, capture_output=True,
                           timeout=120) if _wait(psock) else None
            res["plugin_open_s"] = round(time.monotonic() - t0, 2)
        finally:
            plug.terminate()
            plug.wait()
        del socketmod
    finally:
        srv.terminate()
        srv.wait()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res), flush=True)


RGW_RUNNER = """
import os, resource, sys, time, json, datetime
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, os.environ['SRC'])
from nbdbackup.agent.manifest import Manifest
from nbdbackup.agent.repo import Repository, _chunk_key
from nbdbackup.agent.s3store import S3Store
ttl = float(os.environ['TTL'])
store = S3Store(os.environ['URL'], lease_ttl=ttl, gc_grace=0)
repo = Repository.init(store, compression=1)
n = int(os.environ['GARBAGE'])
keep = []
for k in range(4):  # a snapshot of 4 data chunks
    b = bytes([k + 1]) * repo.chunk_size
    keep.append(repo.chunk_id(b)); repo.put_chunk(keep[-1], b)
man = Manifest(64 * repo.chunk_size, repo.chunk_size)
man.chunks = keep + [repo.zero_id(repo.chunk_size)] * 60
repo.save_snapshot('s0', man)
with ThreadPoolExecutor(16) as pool:  # garbage: small objects under chunk keys
    list(pool.map(lambda g: store.put(_chunk_key(g.to_bytes(8, 'little') + bytes(24)), b'x'), range(n)))
store.requests.clear()
with open('/proc/self/clear_refs', 'w') as f:  # peak RSS from here on (VmHWM)
    f.write('5')
out = {}
t0 = time.monotonic(); c0 = time.process_time()
try:
    with store.lock(exclusive=True):
        out['gc'] = repo.gc(0)
except Exception as e:
    out['error'] = f'{type(e).__name__}: {e}'
out['wall'] = round(time.monotonic() - t0, 2)
out['cpu'] = round(time.process_time() - c0, 2)
out['rss_mb'] = [int(l.split()[1]) // 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
out['requests'] = dict(store.requests)
out['left'] = sum(1 for _ in store.list('chunks'))
out['locks_left'] = sorted(store.list('locks'))
out['verify'] = Repository.open(store).verify()
print(json.dumps(out, default=str))
"""


RGW_SNAPS = """
import os, sys, datetime
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, os.environ['SRC'])
from nbdbackup.agent.manifest import Manifest
from nbdbackup.agent.repo import Repository
from nbdbackup.agent.s3store import S3Store
store = S3Store(os.environ['URL'])
repo = Repository.init(store, compression=1)
b = bytes([1]) * repo.chunk_size
d = repo.chunk_id(b); repo.put_chunk(d, b)
man = Manifest(1 << 30, repo.chunk_size)
man.chunks = [d] + [repo.zero_id(repo.chunk_size)] * (man.count - 1)
t0 = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
with ThreadPoolExecutor(16) as pool:
    list(pool.map(lambda k: repo.save_snapshot(f's{k:05d}', man, created=t0 + datetime.timedelta(hours=k)),
                  range(int(os.environ['N']))))
"""


def rgw_buckets(a, pythons, tmp: str, prefix: str):
    """A real Ceph RGW (tests/interop/ceph_rgw.py) for the run; yields ``(python, src, bucket env)``
    ``--repeat`` times per checkout, each with a bucket of its own (``URL``: s3://BUCKET/r)."""
    import uuid

    sys.path.insert(0, os.path.join(HERE, "tests", "interop"))
    import ceph_rgw

    rgw = ceph_rgw.start(os.path.join(tmp, "rgw"))
    try:
        for _ in range(a.repeat):
            for py, src in pythons:
                bucket = f"{prefix}-{uuid.uuid4().hex[:12]}"
                rgw.client().create_bucket(Bucket=bucket)
                yield py, src, dict(os.environ, **rgw.env(), SRC=src, URL=f"s3://{bucket}/r",
                                    AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")
    finally:
        rgw.stop()


def rgw_snaps(a, pythons, tmp: str) -> None:
    """``repo list`` and ``repo prune --keep-last 10`` of ``--snapshots`` snapshots on a real Ceph RGW
    (each checkout on its own bucket, built by this checkout's API)."""
    for py, src, env in rgw_buckets(a, pythons, tmp, "snaps"):
        env = dict(env, N=str(a.snapshots), PYTHONPATH=src)
        subprocess.run([sys.executable, "-c", RGW_SNAPS], env=dict(env, SRC=HERE), check=True, cwd=HERE)
        out = {"op": "rgw-snaps", "src": src, "snapshots": a.snapshots}
        for name, argv in (("list", ["repo", "list", env["URL"]]),
                           ("prune", ["repo", "prune", "--keep-last", "10", env["URL"]])):
            r = timed([py, "-m", "nbdbackup.cli", *argv], env, src)
            out[name] = {k: r[k] for k in ("wall", "cpu", "rss_mb")}
        print(json.dumps(out), flush=True)


def rgw_gc(a, pythons, tmp: str) -> None:
    """gc of ``--garbage`` unreferenced objects on a real Ceph RGW (tests/interop/ceph_rgw.py): list
    pagination past 1000 keys, DeleteObjects in batches of 1000, lease renewal through a gc that
    outlives ``--ttl``; a snapshot's 4 chunks must survive, no lock object may be left."""
    for py, src, env in rgw_buckets(a, pythons, tmp, "scale"):
        env = dict(env, TTL=str(a.ttl), GARBAGE=str(a.garbage))
        r = subprocess.run(["nice", "-n", "19", py, "-c", RGW_RUNNER], env=env, capture_output=True, text=True,
                           cwd=src)
        line = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else json.dumps({"error": r.stderr[-800:]})
        print(json.dumps({"op": "rgw-gc", "src": src, "garbage": a.garbage, "ttl": a.ttl, **json.loads(line)}),
              flush=True)


def writers(a, python: str, src: str, tmp: str, url: str | None, env_extra: dict) -> dict:
    """``--writers`` pulls at once into one repository (``url``: s3://..., else a directory), each
    of its own 32 MiB disk (half of it the same bytes in every disk: dedup between writers) served
    by nbdkit, while ``repo gc`` and ``repo prune --keep-within 1d`` (four old snapshots to remove)
    are tried in a loop; then gc and prune once more, and every pulled snapshot restored and
    compared (``qemu-img compare``), ``repo verify``, the lock objects left (S3) counted."""
    import random

    work = tempfile.mkdtemp(prefix="writers.", dir=tmp)
    env = dict(os.environ, PYTHONPATH=src, **env_extra)
    py = [python, "-m", "nbdbackup.cli"]
    repo = url or os.path.join(work, "repo")
    rnd = random.Random(2)
    shared = rnd.randbytes(16 << 20)
    subprocess.run([*py, "repo", "init", repo], env=env, cwd=src, check=True, capture_output=True)
    # four old snapshots for prune to remove (written through the API: created in 2020)
    seed = (f"import sys; sys.path.insert(0, {src!r}); import datetime\n"
            "from nbdbackup.agent.repo import Repository, open_store\nfrom nbdbackup.agent.manifest import Manifest\n"
            f"r = Repository.open(open_store({repo!r}))\n"
            "b = bytes([9]) * r.chunk_size; d = r.chunk_id(b); r.put_chunk(d, b)\n"
            "m = Manifest(r.chunk_size, r.chunk_size); m.chunks = [d]\n"
            "for k in range(4): r.save_snapshot(f'old{k}', m, created=datetime.datetime(2020, 1, 1 + k, "
            "tzinfo=datetime.timezone.utc))\n")
    subprocess.run([python, "-c", seed], env=env, cwd=src, check=True, capture_output=True)
    procs, imgs = [], []
    try:
        for k in range(a.writers):
            img = os.path.join(work, f"d{k}.img")
            with open(img, "wb") as f:
                f.write(shared + rnd.randbytes(16 << 20))
            imgs.append(img)
            sock = os.path.join(work, f"n{k}.sock")
            procs.append(subprocess.Popen(["nbdkit", "-f", "-r", "-U", sock, "file", img],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _wait(sock)
        t0 = time.monotonic()

        def start(k: int) -> subprocess.Popen:
            return subprocess.Popen(["nice", "-n", "19", *py, "pull", f"nbd+unix:///?socket={work}/n{k}.sock",
                                     "--repo", repo, "--snapshot", f"w{k}", "--connections", "2"], env=env, cwd=src,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        pulls = [start(k) for k in range(a.writers)]
        refused = 0  # pulls refused at their start because a gc or prune held the lock: started again
        tries = {"gc": [0, 0], "prune": [0, 0]}  # [ran, refused busy]
        while any(p.poll() is None for p in pulls) or any(p.returncode for p in pulls):
            for k, p in enumerate(pulls):
                if p.poll() and "busy" in (err := p.stderr.read()):
                    refused += 1
                    pulls[k] = start(k)
                elif p.returncode:
                    raise RuntimeError(f"pull w{k}: {err[-400:]}")
            for name, argv in (("gc", ["repo", "gc", repo, "--grace", "0"]),
                               ("prune", ["repo", "prune", repo, "--keep-within", "1d"])):
                r = subprocess.run([*py, *argv], env=env, cwd=src, capture_output=True, text=True)
                tries[name][0 if r.returncode == 0 else 1] += 1
                if r.returncode and "busy" not in r.stderr:
                    raise RuntimeError(f"{name}: {r.stderr[-400:]}")
        wall = time.monotonic() - t0
        rcs = [p.returncode for p in pulls]
        for argv in (["repo", "gc", repo, "--grace", "0"], ["repo", "prune", repo, "--keep-within", "1d"]):
            subprocess.run([*py, *argv], env=env, cwd=src, check=True, capture_output=True)
        same, bad = 0, []
        for k, img in enumerate(imgs):
            out = os.path.join(work, "r.img")
            r = subprocess.run([*py, "restore", repo, f"w{k}", out], env=env, cwd=src, capture_output=True, text=True)
            if r.returncode:
                bad.append(f"w{k}: {r.stderr.strip()[-300:]}")
                continue
            c = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", img, out], capture_output=True)
            same += c.returncode == 0
            os.unlink(out)
        v = subprocess.run([*py, "repo", "verify", repo], env=env, cwd=src, capture_output=True, text=True)
        lst = subprocess.run([*py, "repo", "list", "--json", repo], env=env, cwd=src, capture_output=True, text=True)
        names = [r["name"] for r in json.loads(lst.stdout)]
        locks = None
        if url:
            sys.path.insert(0, src)
            from nbdbackup.agent.s3store import S3Store

            os.environ.update(env_extra)
            locks = sorted(S3Store(url).list("locks"))
        return {"op": "writers", "store": "rgw" if url else "dir", "writers": a.writers, "src": src,
                "pulls_wall": round(wall, 1), "pull_rcs": rcs, "pulls_refused_busy": refused, "gc_prune_tries": tries,
                "restored_identical": same, "restore_failures": bad,
                "verify_rc": v.returncode, "snapshots": names, "locks_left": locks}
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)


def _wait(path: str, timeout: float = 120.0) -> bool:
    t = time.monotonic() + timeout
    while time.monotonic() < t:
        if os.path.exists(path):
            return True
        time.sleep(0.02)
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--virtual", type=size, default=size("1T"))
    ap.add_argument("--snapshots", type=int, default=10)
    ap.add_argument("--data", type=int, default=200)
    ap.add_argument("--churn", type=int, default=20)
    ap.add_argument("--garbage", type=int, default=0)
    ap.add_argument("--ops", default="list,load,referenced,verify,restore,gc")
    ap.add_argument("--python", action="append", default=[],
                   help="interpreter[=source tree] to run the ops with (repeat: A/B, interleaved)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--keep", metavar="DIR", help="build into DIR (kept) instead of a temporary directory")
    ap.add_argument("--e2e", action="store_true",
                    help="the end-to-end run instead (`e2e`; --data is then MiB of data in the disk)")
    ap.add_argument("--rgw", action="store_true", help="gc of --garbage objects on a Ceph RGW instead (`rgw_gc`)")
    ap.add_argument("--writers", type=int, default=0,
                    help="N pulls at once into one repository instead (`writers`; with --rgw: on RGW)")
    ap.add_argument("--rgw-snapshots", action="store_true",
                    help="with --rgw: repo list and prune of --snapshots snapshots instead (`rgw_snaps`)")
    ap.add_argument("--ttl", type=float, default=60.0, help="with --rgw: the lease ttl (s)")
    a = ap.parse_args()
    pythons = [(p.split("=", 1) + [HERE])[:2] for p in (a.python or [sys.executable])]
    tmp = tempfile.mkdtemp(prefix="repo_scale.", dir="/tmp")
    if a.writers:
        try:
            rgw = None
            if a.rgw:
                import uuid

                sys.path.insert(0, os.path.join(HERE, "tests", "interop"))
                import ceph_rgw

                rgw = ceph_rgw.start(os.path.join(tmp, "rgw"))
            for _ in range(a.repeat):
                for py, src in pythons:
                    url, extra = None, {}
                    if rgw is not None:
                        bucket = f"w-{uuid.uuid4().hex[:12]}"
                        rgw.client().create_bucket(Bucket=bucket)
                        url = f"s3://{bucket}/r"
                        extra = dict(rgw.env(), AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")
                    print(json.dumps(writers(a, py, src, tmp, url, extra)), flush=True)
        finally:
            if rgw is not None:
                rgw.stop()
            shutil.rmtree(tmp, ignore_errors=True)
        return
    if a.rgw:
        try:
            rgw_snaps(a, pythons, tmp) if a.rgw_snapshots else rgw_gc(a, pythons, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    if a.e2e:
        try:
            for _ in range(a.repeat):
                for py, src in pythons:
                    e2e(a, py, src, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    path = a.keep or os.path.join(tmp, "repo")
    try:
        t0 = time.monotonic()
        facts = build(path, a.virtual, a.snapshots, a.data, a.churn, a.garbage)
        facts.update(virtual=a.virtual, snapshots=a.snapshots, data=a.data, churn=a.churn, garbage=a.garbage,
                     build_s=round(time.monotonic() - t0, 1))
        print(json.dumps(facts))
        for op in a.ops.split(","):
            for _ in range(a.repeat):
                for py, src in pythons:
                    if op in DESTRUCTIVE and len(pythons) > 1:
                        continue  # measured on copies, below
                    print(json.dumps({"op": op, "src": src, **run(op, py, src, path, tmp)}), flush=True)
            if op in DESTRUCTIVE and len(pythons) > 1:
                for py, src in pythons:
                    shutil.copytree(path, path + ".gc", symlinks=True)
                    print(json.dumps({"op": op, "src": src, **run(op, py, src, path + ".gc", tmp)}), flush=True)
                    shutil.rmtree(path + ".gc")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # (a --keep repository is outside it)


if __name__ == "__main__":
    main()
