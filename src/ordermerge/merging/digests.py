"""The sha256 of a model directory's weight files, computed from the bytes the merge reads anyway.

``merge.json`` records, per input, the sha256 of its ``*.safetensors`` files in name order (each
file's name, then its bytes): :func:`sha256_of_dir`. Reading the inputs a second time for it used to
cost a whole extra pass. A :class:`StreamingDigest` instead takes each piece the merge reads
(:meth:`LazyCheckpoint.read_into` hands it over) and feeds the hash in file order:

- the pieces the merge will read are planned up front (segments); the bytes between them (headers,
  tensors the merge never reads) are read by the digest itself when the hash reaches them;
- a piece that arrives before its turn (another worker's chunk is still in flight) is copied into a
  small buffer shared by all digests of one merge; past that budget it is dropped and re-read from
  the file when its turn comes, so memory stays bounded and the digest is always the same;
- whichever thread delivers the next piece hashes it and then every buffered piece after it; nobody
  ever waits for another thread's piece (``hashlib`` releases the GIL while hashing).

:meth:`StreamingDigest.finish` hashes whatever is left (everything, for a checkpoint the method never
reads, e.g. the base of ``average``) and returns the hex digest: equal to :func:`sha256_of_dir`.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

_READ = 1 << 20  # bytes per read when the digest reads for itself: cache-sized


def sha256_of_dir(directory: Path) -> str:
    """Digest of a model's weight files (names and bytes), for provenance: the reference definition."""
    h = hashlib.sha256()
    buf = bytearray(_READ)
    view = memoryview(buf)
    for path in sorted(Path(directory).glob("*.safetensors")):
        h.update(path.name.encode())
        with open(path, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                h.update(view[:n])
    return h.hexdigest()


class Budget:
    """Bytes of early pieces that the digests of one merge may hold, together."""

    def __init__(self, limit: int):
        self.limit, self.used, self._lock = limit, 0, threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class StreamingDigest:
    """sha256 of one directory's ``*.safetensors`` files, fed by the pieces the merge reads.

    ``planned``: {file name: [(byte offset, length), ...]} of the pieces the merge is expected to
    read (whole pieces, exactly as read); any other byte is read here.
    """

    def __init__(self, directory: str | Path, planned: dict[str, list[tuple[int, int]]], budget: Budget):
        self.directory, self._budget = Path(directory), budget
        self._segments: list[list] = []  # [file, offset, length, expected from the merge]
        self._index: dict[tuple[str, int], int] = {}
        self._files: list[Path] = sorted(self.directory.glob("*.safetensors"))
        for path in self._files:
            self._segments.append([path.name, -1, 0, False])  # the name, hashed before the bytes
            size, at = path.stat().st_size, 0
            for offset, length in sorted(planned.get(path.name, ())):
                if offset < at or offset + length > size or length <= 0:
                    continue  # not a clean piece of this file: read it here instead
                if offset > at:
                    self._segments.append([path.name, at, offset - at, False])
                self._index[(path.name, offset)] = len(self._segments)
                self._segments.append([path.name, offset, length, True])
                at = offset + length
            if at < size:
                self._segments.append([path.name, at, size - at, False])
        self._hash = hashlib.sha256()
        self._next = 0  # the segment the hash needs next
        self._early: dict[int, bytes] = {}  # pieces that came before their turn
        self._busy = self._finishing = False
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._buf: bytearray | None = None

    def deliver(self, file: str, offset: int, data) -> None:
        """A piece the merge has just read (any C-contiguous buffer); called from worker threads."""
        seg = self._index.get((file, offset))
        if seg is None:
            return
        view = memoryview(data).cast("B")
        with self._lock:
            s = self._segments[seg]
            if seg < self._next or not s[3] or seg in self._early or view.nbytes != s[2]:
                return  # hashed already, dropped earlier, a repeat, or not the planned piece
            if self._busy or seg != self._next:
                if self._budget.take(view.nbytes):
                    self._early[seg] = bytes(view)
                else:
                    s[3] = False  # read it from the file when its turn comes
                return
            self._busy, self._next = True, seg + 1  # repeats of this piece are ignored from now on
        self._hash.update(view)
        self._drain(seg + 1)

    def _drain(self, next_: int) -> None:
        """Owner of the hash (``_busy``): hash on from segment ``next_`` while the bytes are at hand."""
        while True:
            with self._lock:
                self._next = next_
                if next_ == len(self._segments):
                    self._busy = False
                    return
                file, offset, length, expected = self._segments[next_]
                data = self._early.pop(next_, None)
                if data is None and expected and not self._finishing:
                    self._busy = False  # its piece is still to come: its deliverer goes on from there
                    return
            if data is not None:
                self._hash.update(data)
                self._budget.give(len(data))
            elif offset < 0:
                self._hash.update(file.encode())
            else:
                self._read_and_hash(file, offset, length)
            next_ += 1

    def _read_and_hash(self, file: str, offset: int, length: int) -> None:
        if self._buf is None:
            self._buf = bytearray(_READ)
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(self.directory / file, os.O_RDONLY)
        view = memoryview(self._buf)
        end = offset + length
        while offset < end:
            n = os.preadv(fd, [view[: min(_READ, end - offset)]], offset)
            if n == 0:
                raise OSError(f"{self.directory / file}: ended early while hashing; it changed during the merge")
            self._hash.update(view[:n])
            offset += n

    def finish(self) -> str:
        """Hash what is left (reading it) and return the hex digest; call once no piece can come."""
        with self._lock:
            self._finishing = True
            if self._busy:
                raise RuntimeError("StreamingDigest.finish while a piece is being hashed")
            self._busy = True
        try:
            self._drain(self._next)
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._buf = None
            for data in self._early.values():
                self._budget.give(len(data))
            self._early.clear()
        return self._hash.hexdigest()
