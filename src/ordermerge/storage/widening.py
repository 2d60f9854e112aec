"""A base checkpoint read in a wider dtype: fp32 fine-tunes of a bf16 (or fp16) base merge against the base's
values, widened exactly, instead of being refused (one training, several stored precisions:
storage/precisions.py)."""

from __future__ import annotations

import numpy as np
import torch

from ordermerge.storage.checkpoint import LazyCheckpoint, TensorInfo

# Stored dtypes whose every value a wider dtype holds exactly: a base saved in one of them merges with
# fine-tunes saved in the wider one (fp32 fine-tunes of a bf16 base: task vectors against the base's values).
EXACT_WIDENING = {("BF16", "F32"), ("F16", "F32")}


class WidenedCheckpoint:
    """A checkpoint whose floating tensors read as ``dtype`` (safetensors name), each value widened exactly
    (``EXACT_WIDENING``): the base of fp32 fine-tunes when the base itself is stored in bf16. Reads, the
    digest observer and file order are the stored checkpoint's; ``stored_info`` gives its byte ranges."""

    def __init__(self, inner: LazyCheckpoint, dtype: str):
        self.inner, self.dtype, self.directory = inner, dtype, inner.directory

    def widens(self, name: str) -> bool:
        return (self.inner.info(name).dtype, self.dtype) in EXACT_WIDENING

    def keys(self) -> list[str]:
        return self.inner.keys()

    def stored_info(self, name: str) -> TensorInfo:
        return self.inner.info(name)

    def info(self, name: str) -> TensorInfo:
        info = self.inner.info(name)
        return TensorInfo(info.shape, self.dtype, info.file, info.offset) if self.widens(name) else info

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        info = self.info(name)
        return info.shape, info.dtype

    @property
    def observer(self):
        return self.inner.observer

    @observer.setter
    def observer(self, value) -> None:
        self.inner.observer = value

    def read_into(self, name: str, start: int, out: np.ndarray) -> None:
        if not self.widens(name):
            return self.inner.read_into(name, start, out)
        stored, wide = self.inner.info(name), self.info(name)
        count = memoryview(out).nbytes // wide.itemsize
        raw = np.empty(count * stored.itemsize, np.uint8)
        self.inner.read_into(name, start, raw)
        target = torch.frombuffer(memoryview(out).cast("B"), dtype=wide.torch_dtype)
        target.copy_(torch.from_numpy(raw).view(stored.torch_dtype))

    def get(self, name: str) -> torch.Tensor:
        t = self.inner.get(name)
        return t.to(self.info(name).torch_dtype) if self.widens(name) else t

    def close(self) -> None:
        self.inner.close()


def widened_base(base: LazyCheckpoint, models: list[LazyCheckpoint]) -> LazyCheckpoint | WidenedCheckpoint:
    """The base as the fine-tunes store their floats: itself, or exactly widened when every fine-tune stores
    every tensor the base stores in a narrower dtype in one wider dtype (``EXACT_WIDENING``)."""
    names = [
        n for n in base.keys() if base.info(n).torch_dtype.is_floating_point and all(n in m.keys() for m in models)
    ]
    stored = {m.info(n).dtype for m in models for n in names}
    if len(stored) != 1 or not names:
        return base  # mixed dtypes: _check_compatible names the odd tensor
    wide = stored.pop()
    return WidenedCheckpoint(base, wide) if all((base.info(n).dtype, wide) in EXACT_WIDENING for n in names) else base
