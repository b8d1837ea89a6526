"""docker/compose.yaml end to end: server, host peers, backup, agent, stop, restart.

Contract:
- compose (v2 plugin if installed, else Debian's docker-compose 1.29)
  accepts the file as it is;
- ``up`` starts the server, whose HEALTHCHECK becomes ``healthy``;
- host nbdinfo/nbdcopy reach the live export through the socket in the
  bind-mounted volume and through the port published on 127.0.0.1;
- a fleecing backup started from the host through the control socket in the
  volume, while a host writer keeps writing to the live export, gives a
  snapshot export whose content (blake3) is the disk's at the backup's start;
- the agent service pulls that snapshot into the repository (a bind-mounted
  host directory) and verifies it; its manifest matches the disk at the start;
- ``docker stop`` while the writer still writes: exit code 0 within
  `STOP_WITHIN` s, both sockets removed; after ``start`` the server serves
  every write it acknowledged (the one in flight at the stop may or may not
  have landed).
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

import peers

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = str(ROOT / "docker" / "compose.yaml")
NBDBACKUP = str(ROOT / ".venv" / "bin" / "nbdbackup")
UID = 10809
DISK = 64 << 20
BLOCK = 64 << 10
#: ``docker stop`` of the server under writes: ~0.3 s measured.
STOP_WITHIN = 5.0


def test_compose_config_is_accepted(docker_engine):
    r = docker_engine.compose_run("-f", COMPOSE_FILE, "config", "-q")
    assert r.returncode == 0


def blake3_of(path) -> str:
    import blake3

    return blake3.blake3(Path(path).read_bytes()).hexdigest()


class Writer(threading.Thread):
    """Writes random BLOCK-sized blocks to an NBD export (libnbd), one at a time.

    Fields: ``acked`` (block index -> bytes of the last acknowledged write),
    ``inflight`` ((index, bytes) of the write not yet acknowledged, else
    None), ``count`` (acknowledged writes), ``error`` (what ended the loop).
    ``pause()`` returns once no write is in flight; ``resume()`` continues.
    """

    def __init__(self, uri: str, blocks: int) -> None:
        super().__init__(daemon=True)
        import nbd

        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.blocks = blocks
        self.acked: dict[int, bytes] = {}
        self.inflight: tuple[int, bytes] | None = None
        self.count = 0
        self.error: BaseException | None = None
        self._run = threading.Event()
        self._run.set()
        self._idle = threading.Event()
        self._halt = threading.Event()
        self._rng = random.Random(1)

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                if not self._run.is_set():
                    self._idle.set()
                    self._run.wait(0.1)
                    continue
                self._idle.clear()
                i = self._rng.randrange(self.blocks)
                data = self._rng.randbytes(BLOCK)
                self.inflight = (i, data)
                self.h.pwrite(data, i * BLOCK)
                self.acked[i] = data
                self.inflight = None
                self.count += 1
                time.sleep(0.002)
        except BaseException as e:  # the server went away: expected at docker stop
            self.error = e
        finally:
            self._idle.set()

    def pause(self) -> None:
        self._run.clear()
        assert self._idle.wait(30), "writer did not pause"

    def resume(self) -> None:
        self._idle.clear()
        self._run.set()

    def stop(self) -> None:
        self._halt.set()
        self._run.set()
        self.join(30)


def nbdcopy(src: str, dst: str) -> None:
    subprocess.run([peers.require("nbdcopy"), src, dst], check=True, capture_output=True, timeout=120)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown the bind-mounted volumes to uid 10809")
def test_compose_stack_end_to_end(docker_engine, nbdbackup_image, short_tmp, record_property):
    os.chmod(short_tmp, 0o711)
    dirs = {}
    for name in ("sockets", "backup"):
        d = dirs[name] = short_tmp / name
        d.mkdir()
        os.chown(d, UID, UID)
        os.chmod(d, 0o770)
    nbd_sock, ctl_sock = str(dirs["sockets"] / "nbd.sock"), str(dirs["sockets"] / "control.sock")
    port = peers.free_tcp_port()
    env = {"NBDBACKUP_IMAGE": nbdbackup_image.tag, "NBDBACKUP_PORT": str(port), "NBDBACKUP_DISK_SIZE": str(DISK),
           "NBDBACKUP_SOCKET_DIR": str(dirs["sockets"]), "NBDBACKUP_BACKUP_DIR": str(dirs["backup"]),
           "NBDBACKUP_HEALTH_INTERVAL": "1s"}
    project = f"nbdbt{uuid.uuid4().hex[:8]}"

    def compose(*args, check=True, timeout=300):
        return docker_engine.compose_run("-f", COMPOSE_FILE, "-p", project, *args, env=env, check=check,
                                         timeout=timeout)

    timings = {}
    writer = None
    try:
        t0 = time.monotonic()
        compose("up", "-d", "--no-build")
        cid = compose("ps", "-q", "nbdbackup").stdout.decode().strip()
        assert cid
        wait_healthy(docker_engine, cid)
        timings["up_to_healthy_s"] = time.monotonic() - t0

        # Host peers: the socket in the volume, and TCP published on 127.0.0.1.
        unix_uri, tcp_uri = peers.nbd_uri(nbd_sock, "disk"), f"nbd://127.0.0.1:{port}/disk"
        for uri in (unix_uri, tcp_uri):
            r = subprocess.run([peers.require("nbdinfo"), "--size", uri], capture_output=True, timeout=30)
            assert r.stdout.strip() == str(DISK).encode(), r.stderr
        src = short_tmp / "src.img"
        rng = random.Random(7)
        with open(src, "wb") as f:
            f.truncate(DISK)
            for off in range(0, DISK, 4 << 20):  # 1 MiB of data every 4 MiB, holes between
                f.seek(off)
                f.write(rng.randbytes(1 << 20))
        nbdcopy(str(src), unix_uri)
        nbdcopy(tcp_uri, str(short_tmp / "tcp.img"))
        assert blake3_of(short_tmp / "tcp.img") == blake3_of(src)

        # Backup while the host writes: paused only for the instant of the start.
        writer = Writer(unix_uri, DISK // BLOCK)
        writer.start()
        time.sleep(0.3)
        writer.pause()
        nbdcopy(unix_uri, str(short_tmp / "start.img"))
        at_start = blake3_of(short_tmp / "start.img")
        subprocess.run([NBDBACKUP, "backup", "start", "--control", ctl_sock, "-e", "disk", "-j", "b1",
                        "--sync", "none", "-t", "/data/b1.scratch", "--snapshot", "snap"],
                       check=True, capture_output=True, timeout=60)
        writer.resume()
        time.sleep(0.5)
        n_before = writer.count
        nbdcopy(peers.nbd_uri(nbd_sock, "snap"), str(short_tmp / "snap.img"))
        assert blake3_of(short_tmp / "snap.img") == at_start

        t0 = time.monotonic()
        r = compose("run", "--rm", "-e", "NBDBACKUP_SNAPSHOT_EXPORT=snap", "-e", "NBDBACKUP_REPO_SNAPSHOT=s1",
                    "agent")
        timings["agent_pull_verify_s"] = time.monotonic() - t0
        assert b"OK: 1 snapshot(s), 0 bad chunk(s)" in r.stdout, r.stdout + r.stderr
        assert writer.count > n_before + 10 and writer.error is None, (writer.count, writer.error)
        # The agent's manifest describes the disk at the backup's start.
        from nbdbackup.agent.repo import DirStore, Repository

        Repository.open(DirStore(str(dirs["backup"] / "repo"))).load_snapshot("s1").save(str(short_tmp / "s1.json"))
        subprocess.run([NBDBACKUP, "verify", str(short_tmp / "start.img"), "--manifest", str(short_tmp / "s1.json")],
                       check=True, capture_output=True, timeout=60)
        live_now = short_tmp / "live.img"
        nbdcopy(unix_uri, str(live_now))
        assert blake3_of(live_now) != at_start  # the writes went to the live export, not the snapshot

        # docker stop while the writer writes.
        t0 = time.monotonic()
        docker_engine.run("stop", cid, timeout=60)
        timings["docker_stop_s"] = elapsed = time.monotonic() - t0
        writer.stop()
        code = docker_engine.run("inspect", "-f", "{{.State.ExitCode}}", cid).stdout.strip()
        assert code == b"0", docker_engine.run("logs", cid).stderr[-3000:]
        assert elapsed < STOP_WITHIN, f"docker stop took {elapsed:.1f} s"
        assert not os.path.exists(nbd_sock) and not os.path.exists(ctl_sock)
        assert writer.error is not None  # it was still writing when the server went away

        # Restart: the same data, every acknowledged write included.
        docker_engine.run("start", cid)
        wait_healthy(docker_engine, cid)
        check_writes(unix_uri, writer)
        r = subprocess.run([peers.require("nbdinfo"), "--size", tcp_uri], capture_output=True, timeout=30)
        assert r.stdout.strip() == str(DISK).encode(), r.stderr
    finally:
        try:
            if writer is not None:
                writer.stop()
        finally:
            compose("down", "-v", "--remove-orphans", check=False, timeout=120)
            for k, v in timings.items():
                record_property(k, round(v, 2))
            print("compose timings:", {k: round(v, 2) for k, v in timings.items()})


def wait_healthy(engine, cid: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    status = b""
    while time.monotonic() < end:
        status = engine.run("inspect", "-f", "{{.State.Health.Status}}", cid).stdout.strip()
        if status == b"healthy":
            return
        time.sleep(0.2)
    logs = engine.run("logs", cid, check=False)
    pytest.fail(f"container {cid[:12]} not healthy after {timeout} s (status {status!r}):\n"
                f"{(logs.stdout + logs.stderr).decode(errors='replace')[-3000:]}")


def check_writes(uri: str, writer: Writer) -> None:
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        assert writer.acked
        for i, data in writer.acked.items():
            got = h.pread(BLOCK, i * BLOCK)
            if got != data:
                assert writer.inflight is not None and writer.inflight[0] == i and got == writer.inflight[1], \
                    f"block {i}: acknowledged write lost"
    finally:
        h.shutdown()
