"""One module per merge method; ``ordermerge.merging.methods.<name>`` defines ``Merger``.

The engine (:mod:`ordermerge.merging.engine`) streams every tensor through a :class:`MergeMethod`
and knows nothing of any particular method: its name, parameters and flags live in the registry
(:mod:`ordermerge.merging.registry`), and the method reads its parameters from ``ctx.params``
(checked, defaults filled in). The hooks, each with a do-nothing default
(docs/adding-a-merge-method.md walks through one method):

- ``check(ctx)``: refuse inputs the method cannot merge (before anything is written);
- ``prepare(ctx, pool, tasks, progress)``: passes before the merge, over the same chunks (whole-tensor
  statistics such as TIES thresholds), or model-level choices (greedy soup scores candidate soups on
  ``ctx.data`` and narrows ``ctx.models`` / ``ctx.probs``);
- ``chunk_size(info)``: elements per task of a float tensor (``CHUNK``; ``info.numel`` for methods that
  need whole tensors, e.g. an SVD: the engine then reads the K full tensors of that one name);
- ``merge_chunk(ctx, name, start, count)``: the output bits of one chunk and its statistics;
- ``summary(ctx, tasks, results)``: (stats, per_tensor, extra) for ``merge.json``: ``stats`` is the
  method's headline (the CLI prints each of its keys), ``per_tensor`` its per-tensor record, ``extra``
  further top-level keys.

Non-float tensors never reach a method: the engine copies them from the first input.
"""

from __future__ import annotations

import importlib


class MergeMethod:
    """Defaults shared by every method; subclasses override what they need."""

    def check(self, ctx) -> None:
        pass

    def prepare(self, ctx, pool, tasks: list[tuple], progress: bool) -> None:
        pass

    def chunk_size(self, info) -> int:
        from ordermerge.merging.bits import CHUNK

        return CHUNK

    def merge_chunk(self, ctx, name: str, start: int, count: int):
        raise NotImplementedError

    def summary(self, ctx, tasks: list[tuple], results: list) -> tuple[dict, dict, dict]:
        """(what goes into ``stats`` after ``elements``, ``per_tensor``, further top-level keys)."""
        return {}, {}, {}


def load(name: str) -> MergeMethod:
    """The implementation of registry method ``name``."""
    return importlib.import_module(f"{__name__}.{name}").Merger()


def require_uniform_weights(ctx, why: str) -> None:
    """Refuses non-uniform ``--weights`` for a method that weighs its inputs by itself (``why`` says how)."""
    if ctx.weights is not None and len(set(ctx.weights)) > 1:
        raise ValueError(f"{why}; drop --weights")


class TaskVectorMethod(MergeMethod):
    """Task-vector baselines: per-tensor statistics from ``prepare`` and kept counts per chunk."""

    def summary(self, ctx, tasks, results):
        from ordermerge.merging.task_vectors import KeptCounts

        stats, _, extra = super().summary(ctx, tasks, results)
        kept: dict[str, KeptCounts] = {}
        for (name, _, _), counts in zip(tasks, results):
            if counts is not None:
                kept[name] = kept[name] + counts if name in kept else counts
        per_tensor = {name: dict(ctx.tensor_stats.get(name, {})) for name in sorted({*kept, *ctx.tensor_stats})}
        for name, counts in kept.items():
            per_tensor[name]["kept_fraction"] = counts.fractions()
        if kept:  # ties and dare: the share of each task vector that entered the merge
            extra["kept_fraction"] = sum(
                kept.values(), KeptCounts.zero(len(next(iter(kept.values())).kept))
            ).fractions()
        return stats, per_tensor, extra
