"""Data orders: which sample the optimizer sees at each position of each epoch.

An order is an int64 array [epochs, n_samples] of row indices into the training split.
- ``shuffle``: a fresh permutation every epoch (the paper's setting).
- ``fixbatch``: the samples are cut into batches once; every epoch permutes only the order of
  those fixed batches (paper Table 4: same sample combinations, different positions).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ordermerge.seeding import numpy_rng
from ordermerge.storage.atomic import atomic_path

SCHEMES = ("shuffle", "fixbatch")


def make_order(n_samples: int, epochs: int, scheme: str, batch_size: int, seed: int, task: str, run: int) -> np.ndarray:
    if n_samples < 1 or epochs < 1:
        raise ValueError(f"need n_samples >= 1 and epochs >= 1, got {n_samples}, {epochs}")
    rng = numpy_rng(seed, "order", task, scheme, run)
    if scheme == "shuffle":
        return np.stack([rng.permutation(n_samples) for _ in range(epochs)]).astype(np.int64)
    if scheme == "fixbatch":
        first = rng.permutation(n_samples)
        n_full = n_samples // batch_size
        full = [first[i * batch_size : (i + 1) * batch_size] for i in range(n_full)]
        # A short remainder batch stays last: anywhere else, cutting the epoch into consecutive
        # batches of batch_size would mix it with its neighbours and change batch contents.
        remainder = first[n_full * batch_size :]
        rows = []
        for _ in range(epochs):
            rows.append(np.concatenate([full[b] for b in rng.permutation(n_full)] + [remainder]))
        return np.stack(rows).astype(np.int64)
    raise ValueError(f"unknown order scheme {scheme!r}; choose one of {SCHEMES}")


def batches_of(order_row: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Consecutive batches of one epoch; the last may be short (no sample is dropped)."""
    return [order_row[i : i + batch_size] for i in range(0, len(order_row), batch_size)]


def first_epoch_positions(order: np.ndarray) -> np.ndarray:
    """positions[i] = where sample i sits in the first epoch (0 = seen first)."""
    positions = np.empty(order.shape[1], dtype=np.int64)
    positions[order[0]] = np.arange(order.shape[1])
    return positions


def save_order(order: np.ndarray, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, order, allow_pickle=False)


def load_order(path: str | Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)
