"""Dtypes by name and the raw stored bits of a tensor: shared by training, scoring and merging."""

from __future__ import annotations

import torch

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def torch_dtype(name: str) -> torch.dtype:
    """``bfloat16`` | ``float16`` | ``float32`` (the names configs use) as a torch dtype."""
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def stored_bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as integers: equality here is equality of what is stored."""
    return t.contiguous().view(_INT_VIEW[t.element_size()])
