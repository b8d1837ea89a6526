#!/usr/bin/env python3
"""Hunt 11: N libnbd connections from one uid over a Unix socket (docs/hunt11.md).

Usage: bench/many_connections.py TREE WORKERS N CAP|-   (env IDLE=S: RSS again after S s idle;
BUSY=S: seconds the 20 writers run).  Starts TREE/.venv/bin/nbdbackup serve, opens N
connections (each writes a marker), 20 of them then write+verify 4 KiB blocks, every one
reads its marker back; reports connect time, server RSS (owner + workers) per connection,
whether the (N+1)th is refused at CAP, evictions logged."""
import os, subprocess, sys, threading, time, random
import nbd
tree, workers, n, cap = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
import tempfile
d = tempfile.mkdtemp(prefix="h11many.")
img = f"{d}/disk.img"
with open(img, "wb") as f: f.truncate(1 << 30)
sock = f"{d}/s.sock"
extra = ["--max-connections", cap] if cap != "-" else []
log = open(f"{d}/log", "w")
srv = subprocess.Popen([f"{tree}/.venv/bin/nbdbackup", "serve", "--socket", sock, "--workers", workers,
                        "--handshake-timeout", "3", *extra, f"disk={img}"], stdout=log, stderr=log)
while not os.path.exists(sock): time.sleep(0.05)
time.sleep(0.3)
def rss(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) // 1024
def tree_rss():
    kids = subprocess.run(["pgrep", "-P", str(srv.pid)], capture_output=True, text=True).stdout.split()
    return rss(srv.pid) + sum(rss(int(k)) for k in kids if os.path.exists(f"/proc/{k}"))
r0 = tree_rss()
uri = f"nbd+unix:///disk?socket={sock}"
hs = []
t = time.monotonic()
for i in range(n):
    h = nbd.NBD(); h.connect_uri(uri); hs.append(h)
    h.pwrite(i.to_bytes(4, "little") * 1024, i * 1 << 20)
t_conn = time.monotonic() - t
r1 = tree_rss()
time.sleep(float(os.environ.get('IDLE', 0))); r1b = tree_rss()
# beyond the cap
extra_res = "n/a"
if cap != "-":
    t = time.monotonic()
    try:
        h = nbd.NBD(); h.connect_uri(uri); extra_res = "ADMITTED"
    except nbd.Error as e:
        extra_res = f"refused after {time.monotonic() - t:.1f}s: {str(e)[:80]}"
errors = []
stop = threading.Event()
def busy(h, k):
    rng = random.Random(k); ops = 0
    try:
        while not stop.is_set():
            off = (n + k) * (1 << 20) + rng.randrange(0, 255) * 4096
            data = rng.randbytes(4096)
            h.pwrite(data, off); assert h.pread(4096, off) == data; ops += 1
    except Exception as e: errors.append(repr(e))
    busy.ops = getattr(busy, "ops", 0) + ops
ths = [threading.Thread(target=busy, args=(hs[k], k)) for k in range(20)]
for th in ths: th.start()
time.sleep(float(os.environ.get("BUSY", 5))); stop.set()
for th in ths: th.join()
bad = 0
for i, h in enumerate(hs):
    try:
        if h.pread(4096, i * 1 << 20) != i.to_bytes(4, "little") * 1024: bad += 1
    except nbd.Error as e: bad += 1; errors.append(str(e)[:80])
for h in hs:
    try: h.shutdown()
    except nbd.Error: pass
srv.terminate(); rc = srv.wait(30)
evict = sum(1 for l in open(f"{d}/log") if "evicted" in l)
print(f"{tree} workers={workers} n={n} cap={cap}: connect {t_conn:.1f}s; RSS {r0}->{r1} MiB (+{(r1-r0)*1024/n:.0f} KiB/conn), after idle {r1b} MiB (+{(r1b-r0)*1024/n:.0f} KiB/conn); "
      f"busy ops {busy.ops}; idle ones bad={bad}; errors={errors[:3]}; beyond cap: {extra_res}; evictions logged {evict}; rc={rc}")
subprocess.run(["rm", "-rf", d])
