"""Reading and writing Hugging Face model directories as safetensors, by byte ranges.

Never unpickles: ``.bin``/``.pt`` weights are refused with a message that names the fix.
Reads go through ``os.preadv`` into the caller's buffers rather than a memory map, so a streaming
merge holds only its buffers, not every page of every input it has touched.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ordermerge.storage.atomic import atomic_path

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files copied from the base next to merged weights so the output loads with from_pretrained.
SIDECAR_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the limit safetensors itself enforces


class CheckpointError(ValueError):
    """A model directory that cannot be read as safetensors; the message names file and fix."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors name, e.g. "BF16"
    file: str
    offset: int  # absolute byte offset of the data in ``file``

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor table of one safetensors file, validated against the file's size."""
    fail = f"{path}: {{}}; the file is truncated or corrupt, re-create or re-copy it"
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(fail.format("shorter than a safetensors header"))
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(fail.format(f"header length {n} does not fit the file's {size} bytes"))
        try:
            table = json.loads(fh.read(n))
            entries = {k: v for k, v in table.items() if k != "__metadata__"}
            spans = []
            infos = {}
            for name, e in entries.items():
                begin, end = (int(x) for x in e["data_offsets"])
                shape = tuple(int(s) for s in e["shape"])
                info = TensorInfo(shape, e["dtype"], path.name, 8 + n + begin)
                if end - begin != info.numel * info.itemsize or any(d < 0 for d in shape):
                    raise ValueError(f"tensor {name!r} has {end - begin} bytes for shape {list(shape)} {e['dtype']}")
                infos[name] = info
                spans.append((begin, end))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(fail.format(f"bad header ({exc})")) from None
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise CheckpointError(fail.format(f"tensor data has a hole or overlap at byte {begin}"))
        covered = end
    if covered != size - 8 - n:
        raise CheckpointError(fail.format(f"the header describes {covered} data bytes, the file holds {size - 8 - n}"))
    return infos


def _pread_into(fd: int, buf: memoryview, offset: int, path) -> None:
    """Fill ``buf`` from ``offset``; ``path()`` names the file, only in the error."""
    while buf:
        got = os.preadv(fd, [buf], offset)
        if got == 0:
            raise CheckpointError(f"{path()}: ended early; it changed while being read, re-run once it is complete")
        buf, offset = buf[got:], offset + got


class LazyCheckpoint:
    """Tensor names and byte ranges of an HF safetensors directory; data is read on request."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._fds: dict[str, int] = {}  # opened on first read, shared by reader threads
        self._lock = threading.Lock()
        # Called as observer(file, byte offset, buffer) after each read: the merge hashes what it reads.
        self.observer = None
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a directory; pass a Hugging Face model directory")
        index = self.directory / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{index}: not a valid index ({exc!r}); re-save the model") from None
        elif (self.directory / SINGLE_NAME).exists():
            files, weight_map = [SINGLE_NAME], None
        else:
            pickled = [p.name for p in self.directory.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            if pickled:
                raise CheckpointError(
                    f"{self.directory}: only pickled weights ({', '.join(pickled)}); ordermerge never unpickles. "
                    "Convert them once with transformers: "
                    "from_pretrained(...).save_pretrained(dir, safe_serialization=True)"
                )
            raise CheckpointError(f"{self.directory}: no {SINGLE_NAME} or {INDEX_NAME}; is this a model directory?")
        self._tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise CheckpointError(f"{path}: shard listed in {INDEX_NAME} is missing; re-copy or re-save the model")
            self._tensors.update(read_header(path))
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._tensors))
            if missing:
                raise CheckpointError(
                    f"{index}: {len(missing)} tensors in the index are in no shard "
                    f"(e.g. {missing[0]}); re-save the model"
                )

    def keys(self) -> list[str]:
        return sorted(self._tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: has no tensor {name!r}") from None

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        """Shape and dtype without reading the data."""
        info = self.info(name)
        return info.shape, info.dtype

    def read_into(self, name: str, start: int, out: np.ndarray) -> None:
        """Fill ``out`` (any contiguous array) with the bytes of elements ``start...`` of ``name``."""
        info = self.info(name)
        fd = self._fds.get(info.file)
        if fd is None:
            with self._lock:  # worker threads read concurrently
                fd = self._fds.get(info.file)
                if fd is None:
                    fd = self._fds[info.file] = os.open(self.directory / info.file, os.O_RDONLY)
        offset = info.offset + start * info.itemsize
        _pread_into(fd, memoryview(out).cast("B"), offset, lambda: self.directory / info.file)
        if self.observer is not None:
            self.observer(info.file, offset, out)

    def get(self, name: str) -> torch.Tensor:
        info = self.info(name)
        t = torch.empty(info.shape, dtype=info.torch_dtype)
        if t.numel():
            self.read_into(name, 0, t.view(-1).view(torch.uint8).numpy())
        return t

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)


def _writeback_starter():
    """``start(fd, offset, nbytes)``: begin writing a just-written byte range to disk without waiting
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so the disk works while the merge computes and
    the final fsync finds little left to write; None where that call does not exist (fsync does it all)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return lambda fd, offset, nbytes: call(
        fd, offset, nbytes, 2
    )  # 2: SYNC_FILE_RANGE_WRITE; errors: fsync reports them


_START_WRITEBACK = _writeback_starter()


class ShardedWriter:
    """Safetensors shards of at most ``shard_size`` bytes, laid out up front and filled by byte range.

    Every tensor's place is known before any data exists, so tensors (or pieces of them) can be
    written in any order and from several threads at once.
    """

    def __init__(self, directory: Path, shard_size: int, tensors: list[tuple[str, tuple[int, ...], str]]):
        shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
        filled = 0
        for entry in tensors:
            nbytes = math.prod(entry[1]) * DTYPES[entry[2]].itemsize
            if shards[-1] and filled + nbytes > shard_size:
                shards.append([])
                filled = 0
            shards[-1].append(entry)
            filled += nbytes
        n = len(shards)
        self.directory = directory
        self.names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.total_bytes = 0
        self._where: dict[str, tuple[int, int, int]] = {}  # name -> (shard, offset, itemsize)
        self._fds = []
        for shard, (fname, entries) in enumerate(zip(self.names, shards)):
            # Widest dtypes first keeps every tensor aligned to its element size, as safetensors does.
            entries = sorted(entries, key=lambda e: (-DTYPES[e[2]].itemsize, e[0]))
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, shape, dtype in entries:
                nbytes = math.prod(shape) * DTYPES[dtype].itemsize
                header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            fd = os.open(directory / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, struct.pack("<Q", len(raw)) + raw, 0)
            os.ftruncate(fd, 8 + len(raw) + offset)
            for name, _shape, dtype in entries:
                self._where[name] = (shard, 8 + len(raw) + header[name]["data_offsets"][0], DTYPES[dtype].itemsize)
            self.total_bytes += offset

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        """Write ``data`` (raw bytes of elements ``start...`` of ``name``)."""
        shard, offset, itemsize = self._where[name]
        buf, offset = memoryview(data).cast("B"), offset + start * itemsize
        first, nbytes = offset, len(buf)
        while buf:
            done = os.pwrite(self._fds[shard], buf, offset)
            buf, offset = buf[done:], offset + done
        if _START_WRITEBACK is not None:
            _START_WRITEBACK(self._fds[shard], first, nbytes)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.numel():
            self.write(name, 0, tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())

    def close(self, sync: bool = True) -> None:
        """Sync the shards to disk and write the index; a no-op once closed."""
        if not self._fds:
            return
        for fd in self._fds:
            if sync:
                os.fsync(fd)  # now, while the caller may still be busy, rather than in a final fsync
            os.close(fd)
        self._fds.clear()
        if len(self.names) > 1:
            weight_map = {name: self.names[shard] for name, (shard, _, _) in self._where.items()}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def copy_sidecars(source: Path, target: Path, dtype: str | None = None) -> None:
    """The base's config, tokenizer and chat template beside new weights; ``dtype`` (e.g. ``float32``): the
    weights' stored dtype, written into config.json where that states another, so from_pretrained (and the
    loaders' dtype check) read the weights as they are stored."""
    for name in SIDECAR_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, target / name)
    config = target / "config.json"
    if dtype is not None and config.exists():
        data = json.loads(config.read_text())
        stated = data.get("dtype", data.get("torch_dtype"))
        if stated is not None and stated != dtype:  # a config that states no dtype is left as it is
            data.pop("torch_dtype", None)
            config.write_text(json.dumps({**data, "dtype": dtype}, indent=2) + "\n")


def save_state_dict_dir(
    state: dict[str, torch.Tensor],
    out_dir: str | Path,
    sidecar_source: Path | None,
    shard_size: int = 5 * 10**9,
    extra_files: dict[str, str] | None = None,
) -> None:
    """Atomically write a complete HF directory (weights + base's config/tokenizer + extras)."""
    with atomic_path(out_dir, directory=True) as tmp:
        if sidecar_source is not None:
            copy_sidecars(Path(sidecar_source), tmp)
        names = sorted(state)
        layout = [(n, tuple(state[n].shape), _DTYPE_NAMES[state[n].dtype]) for n in names]
        writer = ShardedWriter(tmp, shard_size, layout)
        try:
            for name in names:
                writer.add(name, state[name])
        finally:
            writer.close()
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
