"""A forgetful FUSE file system: real power losses of the data, in user space (as Jepsen's LazyFS).

Role: test support.  ``python tests/powerfs.py BACKING MOUNTPOINT --seed N`` mounts a passthrough
of the directory BACKING at MOUNTPOINT (foreground, until unmounted or cut).  BACKING holds only
what is **durable**; what was written since it was last made durable lives in this daemon's
memory, visible to every reader of the mount.  A *power cut* (`cut`, or writing ``cut P SEED``
to the control file ``MOUNTPOINT/.powerfs-ctl``) keeps a seeded random part of the volatile state
in BACKING, drops the rest, and ends the daemon at once (``os._exit``; the kernel then answers
``ENOTCONN``: unmount with ``fusermount -uz``).  Mounting BACKING again is the reboot.

The model (invariants):

- **Data** is volatile per inode, in 4 KiB pages (`PAGE`): a write, a ``fallocate`` (zero range,
  punch hole: zeroes; mode 0: size only) or a truncate changes the in-memory view only.
  ``fsync``/``fdatasync`` of the file (and ``msync(MS_SYNC)``, which the kernel turns into one)
  writes its dirty pages and size to BACKING and ``os.fsync``s it.  ``close`` (FUSE ``flush``)
  does not.  At a cut each dirty page reaches BACKING with probability ``p``, independently and
  in any order (a disk's write-back order is arbitrary), the new size with probability ``p``;
  a page is never torn (4 KiB atomic).  ``p = 0``: everything unsynced is lost.
- **Namespace** operations (create, mkdir, link, symlink, rename, unlink, rmdir) are done on
  BACKING at once (so readers see them) and logged with their undo; an unlink/rmdir or a rename
  over an existing name moves the victim into the hidden graveyard ``BACKING/.powerfs`` so that it
  can come back.  ``fsyncdir`` of a directory makes durable the operations touching that
  directory, and only those (POSIX's rule; stricter than ext4 or XFS, whose journal commits every
  earlier operation too).  At a cut each other operation survives with probability ``p``, in
  any combination; the lost ones are undone newest first, each only if its name still holds
  what it made (an undone ``mkdir`` drops what is inside: the directory's entry never reached
  the disk, so neither did anything reachable only through it).  A file's fsync does not make
  its name durable.
- The mount keeps the kernel from holding writes beyond the daemon: no ``writeback_cache`` (a
  ``write`` reaches the daemon before it returns), ``big_writes``, attribute and entry caches
  off.  Shared writable ``mmap`` works through the page cache: its dirty pages reach the daemon
  when the kernel writes them back (``msync``, close, memory pressure), and are volatile there
  like any write; pages still in the kernel at the cut are lost, as in a real power loss.
  ``O_DIRECT`` is refused (``EINVAL``, loudly); ``fallocate`` modes other than 0, ZERO_RANGE and
  PUNCH_HOLE|KEEP_SIZE fail with ``EOPNOTSUPP``.  Extended attributes, modes and times are
  passed through and not modelled.

The daemon is single-threaded (``-s``): every operation runs alone, so the cut sees a
consistent state and the model needs no locks.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import random
import shutil
import stat
import sys

PAGE = 4096
CTL = "/.powerfs-ctl"
GRAVE = ".powerfs"
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


class Dirty:
    """The volatile state of one inode.

    ``fd``: a BACKING descriptor of the inode (kept open: it survives renames and unlinks).
    ``pages``: page index -> bytearray(PAGE), the current content of each page written since the
    last sync (bytes past ``size`` are zero).  ``size``: the current (logical) size.
    ``floor``: the lowest size the file had since the last sync: BACKING's bytes at and past it
    read as zeroes unless a page is dirty (a shrink then a grow reads zeroes, not old data).
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.pages: dict[int, bytearray] = {}
        self.size = size
        self.floor = size

    def durable_page(self, idx: int) -> bytearray:
        """Page ``idx`` as the file reads now without its dirty copy."""
        off = idx * PAGE
        n = max(0, min(PAGE, self.floor - off))
        b = bytearray(os.pread(self.fd, n, off)) if n else bytearray()
        b.extend(bytes(PAGE - len(b)))
        return b

    def page(self, idx: int) -> bytearray:
        p = self.pages.get(idx)
        if p is None:
            p = self.pages[idx] = self.durable_page(idx)
        return p

    def write(self, data: bytes, offset: int) -> None:
        pos, end = offset, offset + len(data)
        while pos < end:
            idx, within = divmod(pos, PAGE)
            n = min(PAGE - within, end - pos)
            self.page(idx)[within:within + n] = data[pos - offset:pos - offset + n]
            pos += n
        self.size = max(self.size, end)

    def truncate(self, size: int) -> None:
        if size < self.size:
            for idx in [i for i in self.pages if i * PAGE >= size]:
                del self.pages[idx]
            idx, within = divmod(size, PAGE)
            if within and idx in self.pages:
                self.pages[idx][within:] = bytes(PAGE - within)
            elif within:
                self.floor = min(self.floor, size)
                self.page(idx)  # a copy of the page up to ``size``, zeroes after
        self.floor = min(self.floor, size)
        self.size = size

    def read(self, size: int, offset: int) -> bytes:
        end = min(offset + size, self.size)
        out = bytearray()
        pos = offset
        while pos < end:
            idx, within = divmod(pos, PAGE)
            n = min(PAGE - within, end - pos)
            p = self.pages.get(idx)
            out += (p if p is not None else self.durable_page(idx))[within:within + n]
            pos += n
        return bytes(out)

    def sync(self, keep=lambda: True) -> None:
        """Write to BACKING the dirty pages (each only if ``keep()``) and the size (if ``keep()``)."""
        size = self.size if keep() else None
        if size is not None and self.floor < os.fstat(self.fd).st_size:
            os.ftruncate(self.fd, self.floor)
        limit = size if size is not None else os.fstat(self.fd).st_size
        for idx in sorted(self.pages):
            if keep():
                off = idx * PAGE
                n = min(PAGE, limit - off)
                if n > 0:
                    os.pwrite(self.fd, bytes(self.pages[idx][:n]), off)
        if size is not None:
            os.ftruncate(self.fd, size)
        os.fsync(self.fd)


class Model:
    """The forgetful file system over ``backing``, without FUSE (unit tests drive it directly).

    ``dirty``: BACKING inode number -> `Dirty`.  ``log``: the namespace operations not yet
    durable, oldest first, each ``(dirs, undo, finish)``: the directories it touches (paths
    relative to the mount, ``/`` first), a function undoing it, one making its victim's removal
    final.  ``fds``: open handle -> BACKING descriptor.  ``graves``: a counter naming victims.
    """

    def __init__(self, backing: str) -> None:
        self.root = os.path.realpath(backing)
        self.grave = os.path.join(self.root, GRAVE)
        os.makedirs(self.grave, exist_ok=True)
        self.dirty: dict[int, Dirty] = {}
        self.log: list[tuple[set[str], object, object]] = []
        self.fds: dict[int, int] = {}
        self.graves = len(os.listdir(self.grave))

    # -- paths and handles
    def real(self, path: str) -> str:
        if path.strip("/").split("/")[0] == GRAVE:
            raise OSError(errno.ENOENT, path)
        return os.path.join(self.root, path.lstrip("/"))

    @staticmethod
    def parent(path: str) -> str:
        return os.path.dirname(path.rstrip("/")) or "/"

    def state(self, fd: int) -> Dirty:
        ino = os.fstat(fd).st_ino
        d = self.dirty.get(ino)
        if d is None:
            d = self.dirty[ino] = Dirty(os.dup(fd), os.fstat(fd).st_size)
        return d

    def _bury(self, real: str) -> str:
        self.graves += 1
        g = os.path.join(self.grave, str(self.graves))
        os.rename(real, g)
        return g

    @staticmethod
    def _remove(g: str) -> None:
        if os.path.isdir(g) and not os.path.islink(g):
            shutil.rmtree(g)
        else:
            os.unlink(g)

    # -- namespace
    def _ino(self, real: str) -> int | None:
        try:
            return os.lstat(real).st_ino
        except OSError:
            return None

    def _log(self, dirs: set[str], undo, finish=None) -> None:
        self.log.append((dirs, undo, finish))

    def _made(self, path: str, real: str) -> None:
        """Log the creation of ``path``; undone only if ``path`` still names what was made (a
        directory's undo drops what is inside: its entry in the parent was never durable)."""
        ino = self._ino(real)

        def undo():
            if self._ino(real) == ino:
                self._remove(real)

        self._log({self.parent(path)}, undo)

    def create(self, path: str, mode: int) -> int:
        real = self.real(path)
        fd = os.open(real, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        self._made(path, real)
        return self._handle(fd)

    def mkdir(self, path: str, mode: int) -> None:
        real = self.real(path)
        os.mkdir(real, mode)
        self._made(path, real)

    def symlink(self, target: str, path: str) -> None:
        real = self.real(path)
        os.symlink(target, real)
        self._made(path, real)

    def link(self, old: str, new: str) -> None:
        real = self.real(new)
        os.link(self.real(old), real)
        self._made(new, real)

    def _restore(self, g: str, real: str) -> None:
        """Put the victim ``g`` back at ``real`` if that name is free (else it is gone)."""
        if os.path.lexists(real):
            self._remove(g)
        else:
            os.rename(g, real)

    def _remove_op(self, path: str, is_dir: bool) -> None:
        real = self.real(path)
        if is_dir:
            if os.listdir(real):
                raise OSError(errno.ENOTEMPTY, path)
        elif os.path.isdir(real) and not os.path.islink(real):
            raise OSError(errno.EISDIR, path)
        g = self._bury(real)
        self._log({self.parent(path)}, lambda: self._restore(g, real), lambda: self._remove(g))

    def unlink(self, path: str) -> None:
        self._remove_op(path, False)

    def rmdir(self, path: str) -> None:
        self._remove_op(path, True)

    def rename(self, old: str, new: str) -> None:
        ro, rn = self.real(old), self.real(new)
        ino = os.lstat(ro).st_ino
        g = None
        if os.path.lexists(rn):
            if os.path.isdir(rn) and not os.path.islink(rn) and os.listdir(rn):
                raise OSError(errno.ENOTEMPTY, new)
            g = self._bury(rn)
        try:
            os.rename(ro, rn)
        except OSError:
            if g:
                os.rename(g, rn)
            raise

        def undo():
            if self._ino(rn) == ino and not os.path.lexists(ro):
                os.rename(rn, ro)
            if g:
                self._restore(g, rn)

        self._log({self.parent(old), self.parent(new)}, undo, (lambda: self._remove(g)) if g else None)

    def fsyncdir(self, path: str) -> None:
        """Make durable every logged operation touching directory ``path`` (only those)."""
        path = path.rstrip("/") or "/"
        rest = []
        for op in self.log:
            if path in op[0]:
                if op[2]:
                    op[2]()
            else:
                rest.append(op)
        self.log = rest
        fd = os.open(self.real(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- data
    def _handle(self, fd: int) -> int:
        self.fds[fd] = fd
        return fd

    def open(self, path: str, flags: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "powerfs: O_DIRECT is not modelled")
        return self._handle(os.open(self.real(path), os.O_RDWR if flags & os.O_ACCMODE else os.O_RDONLY))

    def release(self, fh: int) -> None:
        os.close(self.fds.pop(fh))

    def size_of(self, st: os.stat_result) -> int:
        d = self.dirty.get(st.st_ino)
        return d.size if d is not None else st.st_size

    def read(self, fh: int, size: int, offset: int) -> bytes:
        d = self.dirty.get(os.fstat(fh).st_ino)
        return d.read(size, offset) if d is not None else os.pread(fh, size, offset)

    def write(self, fh: int, data: bytes, offset: int) -> int:
        self.state(fh).write(data, offset)
        return len(data)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> None:
        if fh is not None:
            self.state(fh).truncate(length)
            return
        fd = os.open(self.real(path), os.O_RDWR)
        try:
            self.state(fd).truncate(length)
        finally:
            os.close(fd)

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        d = self.state(fh)
        if mode in (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE,
                    FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):
            end = min(offset + length, d.size) if mode & FALLOC_FL_KEEP_SIZE else offset + length
            size = d.size
            if end > offset:
                d.write(bytes(end - offset), offset)
            if mode & FALLOC_FL_KEEP_SIZE:
                d.size = size
        elif mode == 0:
            d.size = max(d.size, offset + length)
        else:
            raise OSError(errno.EOPNOTSUPP, f"powerfs: fallocate mode {mode:#x} is not modelled")

    def fsync(self, fh: int) -> None:
        ino = os.fstat(fh).st_ino
        d = self.dirty.pop(ino, None)
        if d is not None:
            d.sync()
            os.close(d.fd)
        else:
            os.fsync(fh)

    # -- the power cut
    def cut(self, p: float, seed: int) -> None:
        """Keep each unsynced page/size and each logged namespace operation with probability
        ``p``, undo the other operations (newest first): BACKING is then what a disk would
        hold after the power loss."""
        rng = random.Random(seed)
        for d in self.dirty.values():
            d.sync(lambda: rng.random() < p)
        self.dirty.clear()
        for dirs, undo, finish in reversed(self.log):  # newest first
            try:
                if rng.random() < p:
                    if finish:
                        finish()
                else:
                    undo()
            except OSError:
                pass  # what it would undo has gone with an earlier-undone directory
        for g in os.listdir(self.grave):  # victims whose name could not come back
            self._remove(os.path.join(self.grave, g))
        self.log.clear()


def serve(backing: str, mountpoint: str, p: float, seed: int, debug: bool = False) -> None:
    """Mount the model with mfusepy (foreground) until unmounted or cut."""
    import mfusepy as fuse

    model = Model(backing)

    class PowerFS(fuse.Operations):
        use_ns = True

        def getattr(self, path, fh=None):
            if path == CTL:
                return {"st_mode": stat.S_IFREG | 0o200, "st_nlink": 1, "st_size": 0}
            st = os.lstat(model.real(path))
            attrs = {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_ino",
                                                 "st_atime_ns", "st_mtime_ns", "st_ctime_ns")}
            for k in ("st_atime", "st_mtime", "st_ctime"):
                attrs[k] = attrs.pop(k + "_ns")
            attrs["st_size"] = model.size_of(st)
            attrs["st_blocks"] = (attrs["st_size"] + 511) // 512
            return attrs

        def readdir(self, path, fh):
            names = os.listdir(model.real(path))
            return [".", ".."] + [n for n in names if not (path == "/" and n == GRAVE)]

        def access(self, path, amode):
            return 0

        def readlink(self, path):
            return os.readlink(model.real(path))

        def chmod(self, path, mode):
            os.chmod(model.real(path), mode)
            return 0

        def chown(self, path, uid, gid):
            os.lchown(model.real(path), uid, gid)
            return 0

        def utimens(self, path, times=None):
            os.utime(model.real(path), ns=times, follow_symlinks=False)
            return 0

        def statfs(self, path):
            sv = os.statvfs(model.root)
            return {k: getattr(sv, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                                                "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

        def create(self, path, mode, fi=None):
            return model.create(path, mode)

        def open(self, path, flags):
            if path == CTL:
                return 0
            return model.open(path, flags)

        def mkdir(self, path, mode):
            model.mkdir(path, mode)
            return 0

        def symlink(self, target, source):
            model.symlink(source, target)
            return 0

        def link(self, target, source):
            model.link(source, target)
            return 0

        def unlink(self, path):
            model.unlink(path)
            return 0

        def rmdir(self, path):
            model.rmdir(path)
            return 0

        def rename(self, old, new):
            model.rename(old, new)
            return 0

        def read(self, path, size, offset, fh):
            return model.read(fh, size, offset)

        def write(self, path, data, offset, fh):
            if path == CTL:
                words = bytes(data).split()
                model.cut(float(words[1]) if len(words) > 1 else p, int(words[2]) if len(words) > 2 else seed)
                os._exit(0)
            return model.write(fh, bytes(data), offset)

        def truncate(self, path, length, fh=None):
            if path == CTL:
                return 0
            model.truncate(path, length, fh)
            return 0

        def fallocate(self, path, mode, offset, size, fh):
            model.fallocate(fh, mode, offset, size)
            return 0

        def flush(self, path, fh):
            return 0  # close() does not sync

        def fsync(self, path, datasync, fh):
            model.fsync(fh)
            return 0

        def fsyncdir(self, path, datasync, fh):
            model.fsyncdir(path)
            return 0

        def release(self, path, fh):
            if path != CTL:
                model.release(fh)
            return 0

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING)
    fuse.FUSE(PowerFS(), mountpoint, foreground=True, nothreads=True, debug=debug, big_writes=True,
              max_write=1 << 20, attr_timeout=0, entry_timeout=0, negative_timeout=0, default_permissions=True,
              fsname="powerfs")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("backing")
    ap.add_argument("mountpoint")
    ap.add_argument("--seed", type=int, default=0, help="seed of a cut that names none")
    ap.add_argument("--keep", type=float, default=0.0, help="p: probability that an unsynced write survives a cut")
    ap.add_argument("--debug", action="store_true")
    a = ap.parse_args(argv)
    serve(a.backing, a.mountpoint, a.keep, a.seed, a.debug)


if __name__ == "__main__":
    sys.exit(main())
