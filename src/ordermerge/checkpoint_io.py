"""Reading and writing Hugging Face model directories as safetensors, lazily and atomically.

Never unpickles: ``.bin``/``.pt`` weights are refused with a message that names the fix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import atomic_path

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


class CheckpointError(ValueError):
    """A model directory that cannot be read as safetensors; the message names file and fix."""


class LazyCheckpoint:
    """Tensor names and tensors of an HF safetensors directory, read one tensor at a time (mmap)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a directory; pass a Hugging Face model directory")
        index = self.directory / INDEX_NAME
        single = self.directory / SINGLE_NAME
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif single.exists():
            files = [SINGLE_NAME]
            weight_map = None
        else:
            pickled = [p.name for p in self.directory.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            if pickled:
                raise CheckpointError(
                    f"{self.directory}: only pickled weights ({', '.join(pickled)}); ordermerge never unpickles. "
                    "Convert them once with transformers: from_pretrained(...).save_pretrained(dir, safe_serialization=True)"
                )
            raise CheckpointError(f"{self.directory}: no {SINGLE_NAME} or {INDEX_NAME}; is this a model directory?")
        self._handles = {}
        self._where: dict[str, str] = {}
        for name in files:
            path = self.directory / name
            if not path.exists():
                raise CheckpointError(f"{path}: shard listed in {INDEX_NAME} is missing; re-copy or re-save the model")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: unreadable safetensors ({exc}); the file is truncated or corrupt, re-create it") from exc
            self._handles[name] = handle
            for key in handle.keys():
                self._where[key] = name
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._where))
            if missing:
                raise CheckpointError(f"{self.directory}: {len(missing)} tensors in the index are in no shard (e.g. {missing[0]})")

    def keys(self) -> list[str]:
        return sorted(self._where)

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except KeyError:
            raise CheckpointError(f"{self.directory}: has no tensor {name!r}") from None
        except Exception as exc:
            raise CheckpointError(f"{self.directory}: tensor {name!r} unreadable ({exc}); the file is truncated or corrupt") from exc

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        """Shape and dtype without reading the data."""
        sl = self._handles[self._where[name]].get_slice(name)
        return tuple(sl.get_shape()), sl.get_dtype()


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)


class ShardedWriter:
    """Writes tensors into safetensors shards of at most ``shard_size`` bytes as they fill."""

    def __init__(self, directory: Path, shard_size: int, metadata: dict[str, str] | None = None):
        self.directory = directory
        self.shard_size = shard_size
        self.metadata = metadata or {"format": "pt"}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[dict[str, torch.Tensor] | list[str]] = []
        self._written: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.shard_size:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        name = f"shard-{len(self._written):05d}.safetensors"
        save_file(self._pending, str(self.directory / name), metadata=self.metadata)
        self._written.append((name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending or not self._written:
            self._flush()
        if len(self._written) == 1:
            (self.directory / self._written[0][0]).rename(self.directory / SINGLE_NAME)
            return
        n = len(self._written)
        weight_map = {}
        for i, (old, keys) in enumerate(self._written):
            new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.directory / old).rename(self.directory / new)
            weight_map.update({k: new for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def copy_sidecars(source: Path, target: Path) -> None:
    for name in SIDECAR_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, target / name)


def save_state_dict_dir(state: dict[str, torch.Tensor], out_dir: str | Path, sidecar_source: Path | None,
                        shard_size: int = 5 * 10**9, extra_files: dict[str, str] | None = None) -> None:
    """Atomically write a complete HF directory (weights + base's config/tokenizer + extras)."""
    with atomic_path(out_dir, directory=True) as tmp:
        if sidecar_source is not None:
            copy_sidecars(Path(sidecar_source), tmp)
        writer = ShardedWriter(tmp, shard_size)
        for name in sorted(state):
            writer.add(name, state[name])
        writer.close()
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
