"""A cache of the weight digests that ``merge.json`` records, keyed by the files' identity and stat.

Hashing the K inputs is the largest part of a merge after reading them (sha256 runs at ~1 GB/s per
core: 2.4 CPU s for 8 SmolLM2-135M checkpoints, 4x the time to read them), and a workflow merges the
same K runs many times (every method, resample count and merge seed). So the first merge of a
checkpoint hashes it from the bytes it reads (digests.py) and stores the digest here; later merges
of the unchanged files take it from here and hash nothing.

"Unchanged" is decided as git's index and rsync decide it, only stricter: the key covers, for every
``*.safetensors`` file of the directory in name order, its name, device, inode, size, modification
time and status-change time in nanoseconds, and the directory's resolved path. Any write to a file
changes its ctime (which no user call can set back), a replaced file has a new inode, so a changed
checkpoint misses the cache and is hashed again. A digest is stored only when the stats did not
change while the merge read the files.

Where: ``$ORDERMERGE_CACHE_DIR/digests`` (default ``$XDG_CACHE_HOME/ordermerge``, else
``~/.cache/ordermerge``); ``ORDERMERGE_CACHE_DIR=off`` turns it off. Entries are 64-byte files,
written atomically (several jobs may merge at once); deleting the directory only costs re-hashing.
The cache never changes a merge's output: merge.json records the same digest either way.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

ENV = "ORDERMERGE_CACHE_DIR"
OFF = "off"
_HEX = re.compile(r"[0-9a-f]{64}")


def cache_dir(env: dict[str, str] | None = None) -> Path | None:
    """The digest cache directory, or None when turned off."""
    env = os.environ if env is None else env
    root = env.get(ENV)
    if root == OFF:
        return None
    if not root:
        root = str(Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ordermerge")
    return Path(root) / "digests"


def stat_key(directory: str | Path) -> str:
    """The identity and stat of a directory's weight files, as one hex key (module docstring)."""
    directory = Path(directory).resolve()
    h = hashlib.sha256(str(directory).encode())
    for path in sorted(directory.glob("*.safetensors")):
        st = path.stat()
        h.update(f"\0{path.name}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}".encode())
    return h.hexdigest()


def _entry(root: Path, key: str) -> Path:
    return root / key[:2] / key


def lookup(key: str, root: Path | None) -> str | None:
    """The digest stored under ``key``, or None (no cache, no entry, or an unreadable one)."""
    if root is None:
        return None
    try:
        value = _entry(root, key).read_text().strip()
    except OSError:
        return None
    return value if _HEX.fullmatch(value) else None


def store(key: str, digest: str, root: Path | None) -> None:
    """Store ``digest`` under ``key``, atomically; a cache that cannot be written is skipped silently
    (it only saves time)."""
    if root is None or not _HEX.fullmatch(digest):
        return
    path = _entry(root, key)
    tmp = path.with_name(f".tmp-{key}-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(digest + "\n")
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
