"""Passes over a model's chunks on the engine's thread pool, for methods' whole-tensor statistics."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

import torch
from tqdm import tqdm


def chunks_per_tensor(tasks: list[tuple]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, _, _ in tasks:
        counts[name] = counts.get(name, 0) + 1
    return counts


class TensorSums:
    """Per-tensor sums of per-chunk integer counts, reduced by ``finish`` once a tensor's last chunk is in.

    Integer sums do not depend on the order chunks finish, and memory holds only the tensors in flight.
    """

    def __init__(self, chunks: dict[str, int], finish):
        self._left, self._finish = dict(chunks), finish
        self._sums: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.done: dict[str, object] = {}

    def add(self, name: str, part: torch.Tensor) -> None:
        with self._lock:
            self._sums[name] = self._sums[name].add_(part) if name in self._sums else part
            self._left[name] -= 1
            if not self._left[name]:
                self.done[name] = self._finish(name, self._sums.pop(name))


def gather(pool: ThreadPoolExecutor, fn, tasks: list[tuple], progress: bool, desc: str) -> list:
    """``fn(*task)`` for every task on the pool; results in task order."""
    futures = [pool.submit(fn, *t) for t in tasks]
    for f in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="chunk", disable=not progress):
        f.result()
    return [f.result() for f in futures]


def tensor_totals(pool: ThreadPoolExecutor, fn, tasks: list[tuple], progress: bool, desc: str) -> dict[str, object]:
    """Per tensor: the sum of ``fn(*task)`` over its chunks, added in chunk order (``tasks`` keep a tensor's
    chunks in order), so floating-point totals depend on neither threads nor the order chunks finish.
    A method's whole-tensor quantities (norms, dot products, Gram matrices) come from here."""
    total: dict[str, object] = {}
    for (name, _, _), part in zip(tasks, gather(pool, fn, tasks, progress, desc)):
        total[name] = total[name] + part if name in total else part
    return total
