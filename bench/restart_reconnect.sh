#!/bin/bash
# Hunt 11 (docs/hunt11.md): serve killed (SIG) 0.4 s into 400 aio writes of qemu-io with
# reconnect-delay, restarted on the same socket and state dir; usage: W=WORKERS restart_reconnect.sh TREE TERM|KILL

T=$1; SIG=$2; D=$(mktemp -d /tmp/h11rs.XXXX); mkdir -p $D/state
NB=$T/.venv/bin/nbdbackup
truncate -s 256M $D/disk.img
start() { $NB serve --socket $D/s.sock --control $D/c.sock --state-dir $D/state --workers ${W:-0} disk=$D/disk.img >> $D/log 2>&1 & SP=$!; for i in $(seq 100); do [ -S $D/c.sock ] && [ -S $D/s.sock ] && break; sleep 0.1; done; }
start
export NBDBACKUP_CONTROL=$D/c.sock
$NB bitmap add disk daily --persistent
$NB backup start -e disk -j b1 --sync full --bitmap daily --bitmap-mode on-success -t $D/full.img --wait >/dev/null
$NB job dismiss b1
# qemu-io with reconnect-delay: 400 x 64 KiB writes (every 10th FUA, every 25th followed by a flush and sleep 50 ms)
{ for i in $(seq 0 399); do
    f=""; [ $((i % 10)) = 0 ] && f="-f"
    echo "aio_write $f -P $((i % 250 + 1)) $((i * 640 * 1024)) 64k"
    [ $((i % 25)) = 24 ] && echo "aio_flush" && echo "sleep 20"
  done; } > $D/cmds
python3 - $D <<'PY'
import sys; d = sys.argv[1]
args = []
for l in open(f"{d}/cmds"): args += ["-c", l.strip()]
open(f"{d}/args", "w").write("\0".join(args))
PY
J='json:{"driver":"raw","file":{"driver":"nbd","server":{"type":"unix","path":"'$D/s.sock'"},"export":"disk","reconnect-delay":30}}'
xargs -0 -a $D/args qemu-io "$J" > $D/qio.out 2>&1 &
QP=$!
sleep 0.4
kill -$SIG $SP; t0=$(date +%s.%N); wait $SP; echo "serve exit rc=$? after $(echo "$(date +%s.%N) - $t0" | bc) s"
sleep 1
start
wait $QP; echo "qemu-io rc=$?"
grep -c "^wrote" $D/qio.out; grep -v "^wrote\|^64 KiB" $D/qio.out | head -5
# expected image
python3 - $D <<'PY'
import sys; d = sys.argv[1]
exp = bytearray(256 << 20)
for i in range(400):
    exp[i*640*1024:i*640*1024+65536] = bytes([i % 250 + 1]) * 65536
got = open(f"{d}/disk.img","rb").read()
print("disk matches all 400 writes:", got == bytes(exp))
PY
cp $D/full.img $D/restore.img
$NB backup start -e disk -j b2 --sync incremental --bitmap daily -t $D/inc.img --wait >/dev/null; echo "incr rc=$?"
$NB job dismiss b2
python3 - $D <<'PY'
import sys, os; d = sys.argv[1]
# apply the incremental: its allocated (non-hole) extents onto full
full = bytearray(open(f"{d}/full.img","rb").read()); inc = open(f"{d}/inc.img","rb")
fd = inc.fileno(); size = os.fstat(fd).st_size; off = 0
while off < size:
    try: data = os.lseek(fd, off, os.SEEK_DATA)
    except OSError: break
    hole = os.lseek(fd, data, os.SEEK_HOLE)
    full[data:hole] = os.pread(fd, hole - data, data); off = hole
print("full + incremental restores byte-exact:", bytes(full) == open(f"{d}/disk.img","rb").read())
PY
grep -i "warn\|error\|shutdown\|ESHUTDOWN\|inconsistent" $D/log | head -8
kill $SP; wait $SP; rm -rf $D
