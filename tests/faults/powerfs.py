"""A FUSE file system that forgets what was never fsynced: power loss for tests.

    python tests/faults/powerfs.py BACKING MOUNTPOINT

A flat directory (no subdirectories). What processes see is held in memory,
as a page cache would hold it; BACKING holds only what a real disk would
keep through a power cut:

- a file's content as of its last ``fsync``/``fdatasync`` (``ino/<N>``);
- the directory's entries as of its last ``fsync`` of the directory
  (``dir.json``): a file created, renamed or unlinked since then comes back
  the old way, as on a disk whose directory block was never written.

Nothing else ever reaches BACKING, so killing this process (SIGKILL) *is*
the power cut: everything not yet synced is gone. Mount it again on the same
BACKING and the files read back as a disk would after the lights come on.
The tests then lazy-unmount the dead mount (the kernel's caches of the old
mount go with it) and start a new instance.

SQLite's part of the bargain (see os_unix.c): ``fsync`` of the WAL at every
commit with ``synchronous=FULL`` (not with NORMAL: only at checkpoints), and
one ``fsync`` of the directory the first time a newly created WAL or journal
is synced. That is all this file system relies on.

Once mounted (the kernel's INIT answered), it prints ``ready`` on stdout.
``stats`` on stdin answers one JSON line: fsync counts and how many bytes
and entries are not yet durable (what a cut now would drop). SIGTERM
unmounts cleanly (unsynced data is lost then, too: a shutdown here is just
another power cut for whatever was never synced).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import sys
import threading
import time
from typing import Any

try:
    from fuse import FUSE, FuseOSError, Operations  # fusepy; needs libfuse.so.2
except (ImportError, OSError) as e:  # fusepy raises OSError when libfuse is missing
    print(f"powerfs: cannot load fusepy/libfuse.so.2 ({e}); pip install fusepy, apt-get install libfuse2",
          file=sys.stderr)
    sys.exit(3)

BLOCK = 4096


class Node:
    __slots__ = ("ino", "data", "mode", "atime", "mtime", "ctime", "dirty", "resized", "on_disk")

    def __init__(self, ino: int, data: bytes = b"", mode: int = 0o644, on_disk: bool = False) -> None:
        now = time.time()
        self.ino = ino
        self.data = bytearray(data)
        self.mode = mode
        self.atime = self.mtime = self.ctime = now
        self.dirty: set[int] = set()  # blocks written since the last fsync
        self.resized = False  # size changed since the last fsync
        self.on_disk = on_disk  # BACKING/ino/<ino> exists


class PowerFS(Operations):
    # libfuse may pass path=None for an open file that was unlinked
    flag_nullpath_ok = 1
    use_ns = False

    def __init__(self, backing: str) -> None:
        self.backing = os.path.abspath(backing)
        self.inodes = os.path.join(self.backing, "ino")
        os.makedirs(self.inodes, exist_ok=True)
        self.mutex = threading.Lock()
        self.names: dict[str, Node] = {}  # the directory as processes see it
        self.durable_names: dict[str, int] = {}  # the directory as the disk has it
        self.handles: dict[int, Node] = {}
        self.next_fh = 1
        self.counts = {"fsync": 0, "fsyncdir": 0, "writes": 0}
        self._load()

    # -- the "disk" ----------------------------------------------------------

    def _load(self) -> None:
        try:
            with open(os.path.join(self.backing, "dir.json")) as f:
                state = json.load(f)
        except FileNotFoundError:
            state = {"names": {}, "next": 1}
        self.durable_names = dict(state["names"])
        referenced = set(self.durable_names.values())
        on_disk = {int(n) for n in os.listdir(self.inodes)}
        for ino in on_disk - referenced:  # synced, but never linked durably
            os.unlink(self._ino_path(ino))
        self.next_ino = max([state["next"], *on_disk, 0]) + 1
        nodes: dict[int, Node] = {}
        for name, ino in self.durable_names.items():
            if ino not in nodes:
                try:
                    with open(self._ino_path(ino), "rb") as f:
                        nodes[ino] = Node(ino, f.read(), on_disk=True)
                except FileNotFoundError:
                    nodes[ino] = Node(ino)
            self.names[name] = nodes[ino]

    def _ino_path(self, ino: int) -> str:
        return os.path.join(self.inodes, str(ino))

    def _sync_file(self, node: Node) -> None:
        size = len(node.data)
        fd = os.open(self._ino_path(node.ino), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for block in sorted(node.dirty):
                start = block * BLOCK
                if start < size:
                    os.pwrite(fd, bytes(node.data[start : min(start + BLOCK, size)]), start)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        node.dirty.clear()
        node.resized = False
        node.on_disk = True

    def _sync_dir(self) -> None:
        for node in self.names.values():
            if not node.on_disk:  # the entry survives; the content is what was synced: nothing
                open(self._ino_path(node.ino), "wb").close()
                node.on_disk = True
        self.durable_names = {name: node.ino for name, node in self.names.items()}
        tmp = os.path.join(self.backing, "dir.json.tmp")
        with open(tmp, "w") as f:
            json.dump({"names": self.durable_names, "next": self.next_ino}, f)
        os.replace(tmp, os.path.join(self.backing, "dir.json"))

    def unsynced(self) -> dict[str, Any]:
        nodes = {id(n): n for n in [*self.names.values(), *self.handles.values()]}.values()
        dirty = [n for n in nodes if n.dirty or n.resized or not n.on_disk]
        now = {name: node.ino for name, node in self.names.items()}
        return {
            **self.counts,
            "unsynced_files": len(dirty),
            "unsynced_bytes": sum(len(n.dirty) * BLOCK for n in dirty),
            "unsynced_entries": len(set(now.items()) ^ set(self.durable_names.items())),
        }

    # -- plumbing ------------------------------------------------------------

    def __call__(self, op: str, *args: Any) -> Any:
        with self.mutex:
            return super().__call__(op, *args)

    def _name(self, path: str) -> str:
        name = path.lstrip("/")
        if not name or "/" in name:
            raise FuseOSError(errno.ENOENT if "/" in name else errno.EISDIR)
        return name

    def _node(self, path: str | None, fh: int | None = None) -> Node:
        if fh is not None and fh in self.handles:
            return self.handles[fh]
        if path is None:
            raise FuseOSError(errno.EBADF)
        node = self.names.get(self._name(path))
        if node is None:
            raise FuseOSError(errno.ENOENT)
        return node

    def _handle(self, node: Node) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = node
        return fh

    # -- operations ------------------------------------------------------------

    def init(self, path: str) -> None:
        print("ready", flush=True)

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_size": 0}
        node = self._node(path, fh)
        return {
            "st_mode": stat.S_IFREG | node.mode,
            "st_nlink": 1,
            "st_size": len(node.data),
            "st_blocks": (len(node.data) + 511) // 512,
            "st_atime": node.atime,
            "st_mtime": node.mtime,
            "st_ctime": node.ctime,
            "st_uid": os.getuid(),
            "st_gid": os.getgid(),
        }

    def readdir(self, path: str | None, fh: int) -> list[str]:
        return [".", "..", *self.names]

    def opendir(self, path: str) -> int:
        return 0

    def releasedir(self, path: str | None, fh: int) -> int:
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": BLOCK, "f_frsize": BLOCK, "f_blocks": 1 << 20, "f_bfree": 1 << 19,
                "f_bavail": 1 << 19, "f_files": 1 << 16, "f_ffree": 1 << 15, "f_namemax": 255}

    def access(self, path: str, amode: int) -> int:
        if path != "/":
            self._node(path)
        return 0

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        name = self._name(path)
        node = self.names.get(name)
        if node is None:
            node = Node(self.next_ino, mode=stat.S_IMODE(mode))
            self.next_ino += 1
            self.names[name] = node
        return self._handle(node)

    def open(self, path: str, flags: int) -> int:
        return self._handle(self._node(path))

    def release(self, path: str | None, fh: int) -> int:
        self.handles.pop(fh, None)
        return 0

    def flush(self, path: str | None, fh: int) -> int:
        return 0

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        node = self._node(path, fh)
        node.atime = time.time()
        return bytes(node.data[offset : offset + size])

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        node = self._node(path, fh)
        end = offset + len(data)
        if end > len(node.data):
            node.resized = True
            if offset > len(node.data):
                node.dirty.update(range(len(node.data) // BLOCK, offset // BLOCK + 1))
            node.data.extend(bytes(end - len(node.data)))
        node.data[offset:end] = data
        node.dirty.update(range(offset // BLOCK, (end - 1) // BLOCK + 1))
        node.mtime = node.ctime = time.time()
        self.counts["writes"] += 1
        return len(data)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        node = self._node(path, fh)
        old = len(node.data)
        if length < old:
            del node.data[length:]
            if length % BLOCK:
                node.dirty.add(length // BLOCK)
        elif length > old:
            node.data.extend(bytes(length - old))
            node.dirty.update(range(old // BLOCK, (length - 1) // BLOCK + 1))
        node.resized = True
        node.mtime = node.ctime = time.time()
        return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        self.counts["fsync"] += 1
        self._sync_file(self._node(path, fh))
        return 0

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        self.counts["fsyncdir"] += 1
        self._sync_dir()
        return 0

    def unlink(self, path: str) -> int:
        if self.names.pop(self._name(path), None) is None:
            raise FuseOSError(errno.ENOENT)
        return 0

    def rename(self, old: str, new: str) -> int:
        node = self.names.pop(self._name(old), None)
        if node is None:
            raise FuseOSError(errno.ENOENT)
        self.names[self._name(new)] = node
        return 0

    def chmod(self, path: str | None, mode: int) -> int:
        node = self._node(path)
        node.mode = stat.S_IMODE(mode)
        node.ctime = time.time()
        return 0

    def chown(self, path: str | None, uid: int, gid: int) -> int:
        self._node(path)
        return 0

    def utimens(self, path: str | None, times: Any = None) -> int:
        node = self._node(path)
        node.atime, node.mtime = times if times else (time.time(),) * 2
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        raise FuseOSError(errno.EPERM)

    def link(self, target: str, source: str) -> int:
        raise FuseOSError(errno.EPERM)

    def symlink(self, target: str, source: str) -> int:
        raise FuseOSError(errno.EPERM)

    def mknod(self, path: str, mode: int, dev: int) -> int:
        raise FuseOSError(errno.EPERM)


def _control(fs: PowerFS) -> None:
    for line in sys.stdin:
        if line.strip() == "stats":
            with fs.mutex:
                report = fs.unsynced()
            print(json.dumps(report), flush=True)
    # the harness is gone: unmount (libfuse's SIGTERM handler) rather than linger
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    fs = PowerFS(argv[1])
    threading.Thread(target=_control, args=(fs,), daemon=True).start()
    try:
        _mount(fs, argv[2])
    except RuntimeError:  # libfuse has said why on stderr
        print(f"powerfs: cannot mount {argv[2]} (root, or fusermount, is needed)", file=sys.stderr)
        return 4
    return 0


def _mount(fs: PowerFS, mountpoint: str) -> None:
    FUSE(
        fs,
        mountpoint,
        foreground=True,
        nothreads=True,
        fsname="powerfs",
        subtype="powerfs",
        hard_remove=True,
        big_writes=True,
        attr_timeout=0,
        entry_timeout=0,
        negative_timeout=0,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv))
