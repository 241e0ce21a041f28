"""A file system that loses what was not fsynced, for power-cut tests.

SIGKILL leaves the page cache alone: every write() a killed process made still
reaches the card. A power cut does not: only what was fsynced survives. This
FUSE file system (through mfusepy, a maintained ctypes binding of libfuse 3)
keeps every file in memory twice: what the programs see, and what a power cut
would leave. ``cut`` throws the first away and keeps the second.

The rules follow POSIX, strictly, as a card with a volatile cache may behave:

* ``write``/``truncate`` change what programs see; nothing is durable yet.
* ``fsync``/``fdatasync`` of a file makes its content and size durable (not
  its name: a file created or renamed is not durable until its directory is).
* ``fsync`` of a directory makes its entries durable: the names it holds and
  which file each one is (create, unlink, rename, mkdir, rmdir).
* At a cut each directory goes back to its durable entries and each file to
  its durable content; a file never fsynced but whose name was comes back
  empty. With ``keep`` > 0, each unsynced page of a file survives with that
  probability instead (the cache wrote some of it back, in any order).

Locks are left to the kernel (no ``lock`` operation: FUSE then keeps POSIX locks
locally, which is all SQLite needs between processes of one machine), and the
mount is not ``direct_io`` so SQLite can map its ``-shm`` file shared.

Run as a daemon with a line protocol on stdin/stdout (``serve``), driven by
:class:`PowerCutMount`: ``cut`` freezes the file system and drops the unsynced
state; ``mount`` serves it again after the harness unmounted it (which also
empties the kernel's page cache of the lost data).
"""

from __future__ import annotations

import errno
import os
import queue
import random
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAGE = 4096


@dataclass(eq=False)
class Node:
    ino: int
    mode: int
    data: bytearray = field(default_factory=bytearray)  # what programs see
    synced: bytearray = field(default_factory=bytearray)  # what a power cut leaves
    dirty: set[int] = field(default_factory=set)  # pages written since the last fsync
    entries: dict[str, Node] = field(default_factory=dict)  # directories: as programs see them
    synced_entries: dict[str, Node] = field(default_factory=dict)  # directories: as a cut leaves them
    mtime_ns: int = field(default_factory=time.time_ns)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def mark(self, start: int, end: int) -> None:
        if end > start:
            self.dirty.update(range(start // PAGE, (end - 1) // PAGE + 1))

    def sync(self) -> None:
        n = len(self.data)
        if not self.dirty and len(self.synced) == n:
            return  # every change marks its pages dirty: nothing changed since the last sync
        if len(self.dirty) * PAGE * 2 > n:
            self.synced = bytearray(self.data)
        else:
            del self.synced[n:]
            self.synced.extend(bytes(n - len(self.synced)))
            for p in self.dirty:
                self.synced[p * PAGE:(p + 1) * PAGE] = self.data[p * PAGE:(p + 1) * PAGE]
        self.dirty.clear()

    def lose_unsynced(self, rng: random.Random, keep: float) -> int:
        """Back to the durable content (plus, with ``keep``, some unsynced pages); bytes lost."""
        lost = 0
        if keep > 0:
            for p in sorted(self.dirty):
                if p * PAGE >= len(self.data) or rng.random() >= keep:
                    lost += PAGE
                    continue
                chunk = self.data[p * PAGE:(p + 1) * PAGE]
                if len(self.synced) < p * PAGE + len(chunk):
                    self.synced.extend(bytes(p * PAGE + len(chunk) - len(self.synced)))
                self.synced[p * PAGE:p * PAGE + len(chunk)] = chunk
        else:
            lost = len(self.dirty) * PAGE
        self.data = bytearray(self.synced)
        self.dirty.clear()
        return lost


class PowerCutFS:
    """The FUSE operations (mfusepy's path API) over the two-state model."""

    use_ns = True

    def __init__(self, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._next_ino = 1
        self.root = self._node(stat.S_IFDIR | 0o755)
        self._fh: dict[int, Node] = {}
        self._next_fh = 1
        self.frozen = False
        self.rng = random.Random(seed)
        self.counters = {"writes": 0, "fsyncs": 0, "dir_fsyncs": 0, "cuts": 0, "bytes_lost": 0,
                         "entries_lost": 0}

    # -- the model ----------------------------------------------------------

    def _node(self, mode: int) -> Node:
        n = Node(self._next_ino, mode)
        self._next_ino += 1
        return n

    def _walk(self, path: str) -> Node:
        node = self.root
        for part in filter(None, path.split("/")):
            if not node.is_dir or part not in node.entries:
                raise OSError(errno.ENOENT, path)
            node = node.entries[part]
        return node

    def _parent(self, path: str) -> tuple[Node, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self._walk(head or "/")
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, path)
        return parent, name

    def _live(self) -> None:
        if self.frozen:  # after the cut and before the remount nothing reaches the card
            raise OSError(errno.EIO, "power is off")

    def cut(self, keep: float = 0.0) -> dict[str, int]:
        """The power goes off: every directory and file back to what was made durable."""
        with self._lock:
            self.frozen = True
            lost_bytes = lost_entries = 0
            seen: set[int] = set()
            stack = [self.root]
            while stack:
                d = stack.pop()
                lost_entries += sum(1 for k, v in d.entries.items() if d.synced_entries.get(k) is not v)
                lost_entries += sum(1 for k in d.synced_entries if k not in d.entries)
                d.entries = dict(d.synced_entries)
                for child in d.entries.values():
                    if child.ino in seen:
                        continue
                    seen.add(child.ino)
                    if child.is_dir:
                        stack.append(child)
                    else:
                        lost_bytes += child.lose_unsynced(self.rng, keep)
            self._fh.clear()
            self.counters["cuts"] += 1
            self.counters["bytes_lost"] += lost_bytes
            self.counters["entries_lost"] += lost_entries
            return {"bytes_lost": lost_bytes, "entries_lost": lost_entries}

    def thaw(self) -> None:
        with self._lock:
            self.frozen = False

    # -- FUSE operations ----------------------------------------------------

    def _attrs(self, n: Node) -> dict[str, Any]:
        size = 4096 if n.is_dir else len(n.data)
        return {"st_mode": n.mode, "st_ino": n.ino, "st_nlink": 2 if n.is_dir else 1, "st_size": size,
                "st_blocks": (size + 511) // 512, "st_blksize": PAGE, "st_uid": os.getuid(),
                "st_gid": os.getgid(), "st_atime": n.mtime_ns, "st_mtime": n.mtime_ns,
                "st_ctime": n.mtime_ns}

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        with self._lock:
            node = self._fh.get(fh) if fh else None
            return self._attrs(node or self._walk(path))

    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        # With our inode numbers (use_ino) an entry needs its st_ino: readdir(3) skips d_ino 0.
        with self._lock:
            d = self._walk(path)
            return [(name, {"st_mode": n.mode, "st_ino": n.ino}, 0)
                    for name, n in [(".", d), ("..", d), *d.entries.items()]]

    def statfs(self, path: str) -> dict[str, int]:
        blocks = 1 << 18  # 1 GiB of 4 KiB blocks: room enough, the card is not what is tested here
        return {"f_bsize": PAGE, "f_frsize": PAGE, "f_blocks": blocks, "f_bfree": blocks // 2,
                "f_bavail": blocks // 2, "f_files": 1 << 16, "f_ffree": 1 << 15, "f_namemax": 255}

    def _open_fh(self, node: Node) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._fh[fh] = node
        return fh

    def create(self, path: str, mode: int, flags: int = 0) -> int:
        with self._lock:
            self._live()
            parent, name = self._parent(path)
            node = parent.entries.get(name)
            if node is None:
                node = parent.entries[name] = self._node(stat.S_IFREG | (mode & 0o7777))
            return self._open_fh(node)

    def open(self, path: str, flags: int) -> int:
        with self._lock:
            node = self._walk(path)
            if flags & os.O_TRUNC and node.data:
                self._live()
                node.mark(0, len(node.data))
                node.data = bytearray()
            return self._open_fh(node)

    def opendir(self, path: str) -> int:
        with self._lock:
            return self._open_fh(self._walk(path))

    def release(self, path: str, fh: int) -> int:
        with self._lock:
            self._fh.pop(fh, None)
        return 0

    releasedir = release

    def flush(self, path: str, fh: int) -> int:
        return 0  # close() is not a sync

    def _file(self, path: str, fh: int | None) -> Node:
        node = self._fh.get(fh) if fh else None
        if node is None:
            if self.frozen:
                raise OSError(errno.EIO, "power is off")
            node = self._walk(path)
        return node

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self._lock:
            return bytes(self._file(path, fh).data[offset:offset + size])

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self._lock:
            if self.frozen:
                # Page-cache writeback of a dead process's shared map arriving after the cut:
                # the card is off, it is lost (and must not land in the restored state).
                return len(data)
            node = self._file(path, fh)
            end = offset + len(data)
            if end > len(node.data):
                node.mark(len(node.data), end)
                node.data.extend(bytes(end - len(node.data)))
            node.data[offset:end] = data
            node.mark(offset, end)
            node.mtime_ns = time.time_ns()
            self.counters["writes"] += 1
            return len(data)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        with self._lock:
            self._live()
            node = self._file(path, fh)
            old = len(node.data)
            if length < old:
                del node.data[length:]
            else:
                node.data.extend(bytes(length - old))
            node.mark(min(old, length), max(old, length) + 1)
            return 0

    def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
        with self._lock:
            self._live()
            node = self._file(path, fh)
            if mode == 0 and offset + size > len(node.data):
                node.mark(len(node.data), offset + size)
                node.data.extend(bytes(offset + size - len(node.data)))
            return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        with self._lock:
            self._live()
            self._file(path, fh).sync()
            self.counters["fsyncs"] += 1
            return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        with self._lock:
            self._live()
            d = self._fh.get(fh) or self._walk(path)
            d.synced_entries = dict(d.entries)
            self.counters["dir_fsyncs"] += 1
            return 0

    def mkdir(self, path: str, mode: int) -> int:
        with self._lock:
            self._live()
            parent, name = self._parent(path)
            if name in parent.entries:
                raise OSError(errno.EEXIST, path)
            parent.entries[name] = self._node(stat.S_IFDIR | (mode & 0o7777))
            return 0

    def unlink(self, path: str) -> int:
        with self._lock:
            self._live()
            parent, name = self._parent(path)
            if name not in parent.entries:
                raise OSError(errno.ENOENT, path)
            del parent.entries[name]
            return 0

    def rmdir(self, path: str) -> int:
        with self._lock:
            self._live()
            parent, name = self._parent(path)
            node = parent.entries.get(name)
            if node is None:
                raise OSError(errno.ENOENT, path)
            if node.entries:
                raise OSError(errno.ENOTEMPTY, path)
            del parent.entries[name]
            return 0

    def rename(self, old: str, new: str) -> int:
        with self._lock:
            self._live()
            op, on = self._parent(old)
            np, nn = self._parent(new)
            if on not in op.entries:
                raise OSError(errno.ENOENT, old)
            np.entries[nn] = op.entries.pop(on)
            return 0

    def chmod(self, path: str, mode: int) -> int:
        with self._lock:
            node = self._walk(path)
            node.mode = (node.mode & ~0o7777) | (mode & 0o7777)
            return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        with self._lock:
            self._walk(path).mtime_ns = times[1] if times else time.time_ns()
            return 0

    def access(self, path: str, amode: int) -> int:
        with self._lock:
            self._walk(path)
            return 0


# -- the daemon ----------------------------------------------------------------


def serve(mountpoint: str, seed: int) -> None:
    """Serve ``mountpoint`` until told to stop; commands on stdin, one answer line each on stdout.

    Each mount is served by a thread of its own, so the daemon answers ``unmounted`` either when
    that thread's FUSE loop ends or when the harness says ``abandon`` (the mount is gone, yet the
    loop sat on in ``fuse_dev_do_read``, seen twice in the t14 power-cut probe): a stuck loop then
    costs a parked thread, never the file system's state nor a hung test.
    """
    import mfusepy

    fs = PowerCutFS(seed)
    out = sys.stdout
    mount_requests: list[str] = []
    down: list[int] = []  # generations whose mount has ended (or was abandoned)
    stall: list[bool] = []  # test hook: do not report the next loop's end (as when it hangs)
    wake = threading.Condition()
    gen = 0

    def say(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    def commands() -> None:
        for line in sys.stdin:
            cmd, *args = line.split()
            if cmd == "cut":
                r = fs.cut(keep=float(args[0]) if args else 0.0)
                say(f"cut {r['bytes_lost']} {r['entries_lost']}")
            elif cmd == "stats":
                say("stats " + " ".join(f"{k}={v}" for k, v in fs.counters.items()))
            elif cmd in ("abandon", "stall"):
                with wake:
                    (down.append(gen) if cmd == "abandon" else stall.append(True))
                    wake.notify()
            elif cmd in ("mount", "quit"):
                with wake:
                    mount_requests.append(cmd)
                    wake.notify()
        with wake:
            mount_requests.append("quit")
            down.append(gen)
            wake.notify()

    def run(g: int) -> None:
        # Single-threaded: the model is simple and the card of one van is not a hot path.
        mfusepy.FUSE(fs, mountpoint, foreground=True, nothreads=True, use_ino=True, fsname="powercut")
        with wake:
            if stall:
                stall.pop()
                return
            down.append(g)
            wake.notify()

    threading.Thread(target=commands, daemon=True).start()
    first = True
    while True:
        if not first:
            with wake:
                wake.wait_for(lambda: mount_requests)
                if mount_requests.pop(0) == "quit":
                    return
        first = False
        with wake:
            gen += 1
        fs.thaw()
        say("mounting")
        threading.Thread(target=run, args=(gen,), daemon=True).start()
        with wake:
            wake.wait_for(lambda: gen in down)
        say("unmounted")


# How long the harness waits for the daemon's ``unmounted`` before it abandons the loop.
UNMOUNT_WAIT_S = 10.0


class PowerCutMount:
    """The harness's handle on a power-cut file system served by a daemon process."""

    def __init__(self, mountpoint: Path, seed: int = 0) -> None:
        self.path = Path(mountpoint)
        self.path.mkdir(parents=True, exist_ok=True)
        self.cuts = 0
        self.bytes_lost = 0
        self.entries_lost = 0
        self.abandoned = 0  # unmounts whose FUSE loop did not end in time (see _await_unmounted)
        self.unmount_wait = UNMOUNT_WAIT_S
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "simulator.powercut", str(self.path), str(seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read_lines, daemon=True).start()
        self._expect("mounting")
        self._wait_mounted()

    def _read_lines(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put("")  # EOF: the daemon is gone

    def _expect(self, word: str, timeout: float = 120.0) -> list[str]:
        """The daemon's next line, which must start with ``word``; a bounded wait, never a hang."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"power-cut daemon silent for {timeout} s, expected {word!r}") from None
        if not line.startswith(word):
            raise RuntimeError(f"power-cut daemon said {line!r}, expected {word!r} (rc {self.proc.poll()})")
        return line.split()[1:]

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _wait_mounted(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the power-cut file system did not mount at {self.path}")
            time.sleep(0.01)

    def cut(self, keep: float = 0.0) -> tuple[int, int]:
        """Power off (unsynced state dropped), unmount (the page cache goes with it), power on."""
        self._send(f"cut {keep}")
        lost_bytes, lost_entries = (int(x) for x in self._expect("cut"))
        self.cuts += 1
        self.bytes_lost += lost_bytes
        self.entries_lost += lost_entries
        self._unmount()
        self._await_unmounted()
        self._send("mount")
        self._expect("mounting")
        self._wait_mounted()
        return lost_bytes, lost_entries

    def _unmount(self) -> None:
        for _ in range(200):
            r = subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True, text=True, check=False)
            if r.returncode == 0:
                return
            time.sleep(0.05)  # busy: a process that held a file is still on its way out
        raise RuntimeError(f"cannot unmount {self.path}: {r.stderr.strip()}")

    def _await_unmounted(self) -> None:
        """The daemon's ``unmounted``, within ``wait`` s; if the mount is gone but its FUSE loop
        did not end (it can sit on in ``fuse_dev_do_read``), tell the daemon to abandon it."""
        try:
            self._expect("unmounted", timeout=self.unmount_wait)
            return
        except RuntimeError:
            if os.path.ismount(self.path):
                raise
        self.abandoned += 1
        self._send("abandon")
        self._expect("unmounted")

    def stall_next_unmount(self) -> None:
        """Test hook: the daemon will not report the next FUSE loop's end, as when it hangs."""
        self._send("stall")

    def stats(self) -> dict[str, int]:
        self._send("stats")
        return {k: int(v) for k, v in (kv.split("=") for kv in self._expect("stats"))}

    def close(self) -> None:
        if self.proc.poll() is None:
            if os.path.ismount(self.path):
                self._unmount()
                self._await_unmounted()
            self._send("quit")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
