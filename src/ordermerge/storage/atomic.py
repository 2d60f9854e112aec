"""Atomic outputs: write under a temporary name in the same directory, fsync, rename.

A job killed mid-write leaves only a ``.tmp-*`` name behind, never something that looks complete.
The name carries the writer's host and pid, so the next write of the same target removes what a
dead writer on this host left (a killed merge can leave gigabytes).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator


class DiskFullError(OSError):
    """A write ran out of space (or quota); the message names the target and what to do."""


def disk_full(exc: OSError, target: Path) -> DiskFullError:
    free = shutil.disk_usage(target.parent).free if target.parent.exists() else 0
    return DiskFullError(
        exc.errno,
        (
            f"disk full while writing {target} ({exc.strerror or exc}): the partial write was removed and the "
            f"previous {target.name}, if any, is intact. Free space on the filesystem of {target.parent} "
            f"({free / 2**20:.0f} MiB free now) or move results_dir to a larger disk, then rerun"
        ),
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _remove_stale(target: Path, host: str) -> None:
    """Temporaries of ``target`` whose writer (same host, pid gone) was killed."""
    name = re.compile(rf"\.tmp-{re.escape(target.name)}-(.+)\.(\d+)-\w+")
    for p in target.parent.glob(".tmp-*"):
        m = name.fullmatch(p.name)
        if m and m[1] == host and not _alive(int(m[2])):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        elif p.is_dir():
            _fsync_dir(p)


@contextlib.contextmanager
def atomic_path(target: str | Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path (file or directory) that replaces ``target`` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    _remove_stale(target, host)
    prefix = f".tmp-{target.name}-{host}.{os.getpid()}-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes 0700; outputs should read like any other directory
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
        tmp.chmod(0o644)
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.is_dir() and directory:
            shutil.rmtree(target)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as exc:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if (
            isinstance(exc, OSError)
            and exc.errno in (errno.ENOSPC, errno.EDQUOT)
            and not isinstance(exc, DiskFullError)
        ):
            raise disk_full(exc, target) from exc
        raise


def write_json(path: str | Path, obj: object) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
