"""A throw-away S3 object store for the tests: Ceph's RADOS Gateway (Debian 12's Ceph 16).

Role: the real peer of `nbdbackup.agent.s3store`.  `start(dir)` brings up a
one-node, loopback-only cluster under ``dir``: one monitor, one OSD whose
objectstore is ``memstore`` (data in RAM, wiped with the process), no
manager, ``auth none``, and ``radosgw`` serving S3 (beast frontend) on
127.0.0.1:<free port>; it then creates an S3 user with known keys.  It takes
2-4 s on the reference machine.  `RGW.stop` ends the daemons it started.

Facts this module depends on (measured with the Debian packages radosgw,
ceph-mon, ceph-osd, ceph-common; scripts/setup installs them):

- With ``auth none`` there is no session key, so every ``ms * mode`` must be
  ``crc``: radosgw's default "secure" client mode otherwise loops on
  ``get_initial_auth_request returned -13``.
- The monitor proposes one map change per second by default; radosgw's
  first start makes ~7 pools, so ``paxos propose interval``/``min wait``
  are shortened (13 s -> 2 s).
- ``cluster addr`` as well as ``public addr`` = 127.0.0.1, or the OSD
  listens on every interface.
- One OSD: pool size 1, 8 PGs per pool, ``mon max pg per osd`` raised.
- beast ``tcp_nodelay=1``: without it a small GET (a config or key object)
  stalls ~40 ms because the response headers and body leave in separate
  segments and Nagle holds the second until the client's delayed ACK
  (measured by the restore helper; production RGWs set it for the same reason).

Invariants: every daemon runs in the foreground in its own session, as a
child of this process (so it is reaped); it is only signalled while
``/proc/PID/cmdline`` still names this instance's ``ceph.conf`` (PID reuse);
nothing listens beyond 127.0.0.1; everything lives under ``dir``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid

from peers import free_tcp_port

#: The programs the cluster needs and the Debian package of each.
PROGRAMS = {"ceph-mon": "ceph-mon", "monmaptool": "ceph-mon", "ceph-authtool": "ceph-common",
            "ceph-osd": "ceph-osd", "radosgw": "radosgw", "radosgw-admin": "radosgw", "ceph": "ceph-common"}
ACCESS_KEY = "NBDBACKUPTESTACCESS1"
SECRET_KEY = "nbdbackuptestsecretkey00000000000000000001"
REGION = "us-east-1"


def missing_programs() -> list[str]:
    return sorted({pkg for prog, pkg in PROGRAMS.items() if shutil.which(prog) is None})


@dataclasses.dataclass
class RGW:
    """A running instance: ``endpoint`` (http://127.0.0.1:PORT), the S3 user's
    keys, ``dir`` (everything it keeps) and ``pids`` (daemon name -> Popen,
    stopped in reverse start order)."""

    dir: str
    endpoint: str = ""
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    procs: dict[str, subprocess.Popen] = dataclasses.field(default_factory=dict)

    @property
    def conf(self) -> str:
        return os.path.join(self.dir, "ceph.conf")

    def env(self) -> dict[str, str]:
        """The AWS environment variables that point boto3 (and nbdbackup) at this store."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": self.region, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region,
                            config=Config(s3={"addressing_style": "path"}))

    def _ours(self, pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return self.conf.encode() in f.read().split(b"\0")
        except OSError:
            return False

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            p = self.procs.pop(name)
            if p.poll() is None and self._ours(p.pid):
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    if self._ours(p.pid):
                        p.kill()
                    p.wait(timeout=10)
            else:
                p.poll()

    def _daemon(self, name: str, *argv: str) -> None:
        log = open(os.path.join(self.dir, "log", f"{name}.out"), "ab")
        with log:
            self.procs[name] = subprocess.Popen([*argv, "-c", self.conf, "-f"], stdin=subprocess.DEVNULL,
                                                stdout=log, stderr=log, start_new_session=True)

    def _run(self, *argv: str, timeout: float = 30) -> str:
        r = subprocess.run(argv, capture_output=True, timeout=timeout, env=self._env)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.decode(errors='replace')}"
                               + self._tails())
        return r.stdout.decode(errors="replace")

    @property
    def _env(self) -> dict[str, str]:
        return {**os.environ, "CEPH_CONF": self.conf}

    def _tails(self) -> str:
        out = []
        logdir = os.path.join(self.dir, "log")
        for f in sorted(os.listdir(logdir)) if os.path.isdir(logdir) else ():
            with open(os.path.join(logdir, f), "rb") as fh:
                lines = fh.read().decode(errors="replace").splitlines()[-10:]
            out.append(f"\n--- {f}\n" + "\n".join(lines))
        return "".join(out)

    def _wait(self, name: str, what: str, check, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if check():
                    return
            except (OSError, RuntimeError, subprocess.TimeoutExpired, ValueError):
                pass
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"ceph-rgw: {name} exited ({self.procs[name].returncode}) waiting for {what}"
                                   + self._tails())
            if time.monotonic() > deadline:
                raise RuntimeError(f"ceph-rgw: timeout waiting for {what}" + self._tails())
            time.sleep(0.2)


def _conf(d: str, fsid: str, mon_v2: int, mon_v1: int, port: int, memstore_bytes: int) -> str:
    return f"""[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{mon_v2},v1:127.0.0.1:{mon_v1}]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
ms cluster mode = crc
ms service mode = crc
ms client mode = crc
ms mon cluster mode = crc
ms mon service mode = crc
ms mon client mode = crc
auth allow insecure global id reclaim = true
mon warn on insecure global id reclaim allowed = false
keyring = {d}/keyring
run dir = {d}/run
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
mon cluster log file = {d}/log/cluster.log
crash dir = {d}/run/crash
log to stderr = false
err to stderr = true
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
mon data avail warn = 2
mon data avail crit = 1
paxos propose interval = 0.05
paxos min wait = 0.01
[mon]
mon data = {d}/mon/$cluster-$id
[osd]
osd data = {d}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
osd crush initial weight = 1
osd check max object name len on startup = false
[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:{port} tcp_nodelay=1
rgw data = {d}/rgw
rgw thread pool size = 64
"""


def start(d: str, memstore_bytes: int = 4 << 30) -> RGW:
    """Start a fresh instance under the (new or empty) directory ``d``; see the module doc."""
    missing = missing_programs()
    if missing:
        raise RuntimeError(f"ceph-rgw: missing Debian packages {' '.join(missing)} (run scripts/setup)")
    d = os.path.realpath(d)
    for sub in ("mon", "osd/ceph-0", "run", "log", "rgw"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    rgw = RGW(d)
    port, mon_v2, mon_v1 = free_tcp_port(), free_tcp_port(), free_tcp_port()
    fsid = str(uuid.uuid4())
    with open(rgw.conf, "w") as f:
        f.write(_conf(d, fsid, mon_v2, mon_v1, port, memstore_bytes))
    try:
        monmap = os.path.join(d, "monmap")
        rgw._run("monmaptool", "--create", "--fsid", fsid, "--addv", "a",
                 f"[v2:127.0.0.1:{mon_v2},v1:127.0.0.1:{mon_v1}]", monmap)
        rgw._run("ceph-authtool", "--create-keyring", "--gen-key", "--name=mon.", "--cap", "mon", "allow *",
                 os.path.join(d, "keyring"))
        rgw._run("ceph-mon", "-c", rgw.conf, "--mkfs", "-i", "a", "--monmap", monmap,
                 "--keyring", os.path.join(d, "keyring"))
        rgw._daemon("mon", "ceph-mon", "-i", "a")
        rgw._wait("mon", "the monitor", lambda: rgw._run("ceph", "--connect-timeout", "3", "mon", "stat",
                                                         timeout=6) is not None)
        osd_uuid = str(uuid.uuid4())
        osd_id = rgw._run("ceph", "osd", "new", osd_uuid).strip()
        if osd_id != "0":
            raise RuntimeError(f"ceph-rgw: unexpected osd id {osd_id!r}")
        rgw._run("ceph-osd", "-c", rgw.conf, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
        rgw._daemon("osd", "ceph-osd", "-i", "0")

        def osd_up() -> bool:
            osds = json.loads(rgw._run("ceph", "osd", "dump", "--format=json", timeout=10))["osds"]
            return bool(osds) and osds[0]["up"] == 1

        rgw._wait("osd", "osd.0 up", osd_up)
        rgw._daemon("rgw", "radosgw", "-n", "client.rgw")
        rgw.endpoint = f"http://127.0.0.1:{port}"

        def http_ok() -> bool:
            with urllib.request.urlopen(rgw.endpoint + "/", timeout=2) as r:
                return r.status == 200

        rgw._wait("rgw", f"radosgw on 127.0.0.1:{port}", http_ok)
        rgw._run("radosgw-admin", "user", "create", "--uid=nbdbackup", "--display-name=nbdbackup tests",
                 f"--access-key={rgw.access_key}", f"--secret={rgw.secret_key}")
    except BaseException:
        rgw.stop()
        raise
    return rgw
