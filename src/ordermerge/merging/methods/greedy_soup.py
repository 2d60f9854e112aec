"""``greedy_soup``: the greedy soup of Wortsman et al. (ICML 2022, "Model soups", Recipe 1).

Rank the K inputs by held-out loss (the token-weighted mean response loss on ``--data``, the task's
``heldout`` split: drawn after train/val/test, so Table 1 never scores the soup on the data that chose
it); start the soup with the best; add each next input only if the uniform soup's held-out loss does
not rise. The output is the uniform average of the chosen inputs, in their input order: the bytes of
``average`` of those inputs. Deterministic (ties in loss are broken by input order).

Each candidate soup is written by the engine itself (``average``) into a temporary directory and
scored like any checkpoint, so what is scored is byte for byte what a soup of those inputs would be.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ordermerge.merging.methods import MergeMethod, require_uniform_weights
from ordermerge.merging.methods.average import Merger as Average


def heldout_loss(model_dir: Path, records: list[dict], task_spec: dict, device) -> float:
    """Token-weighted mean response loss of one checkpoint on the held-out records (fp32)."""
    from ordermerge.scoring.losses import load_model, per_sample_losses

    model, tokenizer = load_model(model_dir, "float32", device)
    rows = per_sample_losses(model, tokenizer, records, task_spec, int(task_spec.get("batch_size", 8)))
    return sum(r["loss"] * r["tokens"] for r in rows) / max(1, sum(r["tokens"] for r in rows))


class Merger(MergeMethod):
    def check(self, ctx):
        require_uniform_weights(ctx, "greedy_soup averages the chosen inputs uniformly (Wortsman et al.)")

    def prepare(self, ctx, pool, tasks, progress):
        from ordermerge.data.prepare import read_jsonl

        threads = torch.get_num_threads()
        torch.set_num_threads(max(threads, pool._max_workers))  # scoring runs one model at a time
        try:
            ctx.soup = self._choose(ctx, read_jsonl(ctx.data), progress)
        finally:
            torch.set_num_threads(threads)
        chosen = sorted(ctx.soup["chosen"])
        ctx.models = [ctx.models[i] for i in chosen]
        ctx.probs = [1.0 / len(chosen)] * len(chosen)

    def _choose(self, ctx, records, progress) -> dict:
        from ordermerge.merging.engine import merge_models

        dirs = [Path(m.directory) for m in ctx.models]
        losses = [heldout_loss(d, records, ctx.task_spec, ctx.device) for d in dirs]
        ranking = sorted(range(len(dirs)), key=lambda i: (losses[i], i))
        chosen, best, candidates = [ranking[0]], losses[ranking[0]], []
        with tempfile.TemporaryDirectory(prefix="greedy-soup-") as tmp:
            for n, i in enumerate(ranking[1:]):
                trial = sorted(chosen + [i])
                out = Path(tmp) / f"soup{n}"
                merge_models(
                    ctx.base.directory,
                    [dirs[j] for j in trial],
                    out,
                    method="average",
                    progress=progress,
                    device=str(ctx.device),
                )
                loss = heldout_loss(out, records, ctx.task_spec, ctx.device)
                accepted = loss <= best
                candidates.append({"ingredients": [str(dirs[j]) for j in trial], "loss": loss, "accepted": accepted})
                if accepted:
                    chosen, best = trial, loss
        return {
            "split": "heldout",
            "data": str(ctx.data),
            "samples": len(records),
            "losses": {str(d): x for d, x in zip(dirs, losses)},
            "ranking": [str(dirs[i]) for i in ranking],
            "candidates": candidates,
            "chosen": chosen,
            "ingredients": [str(dirs[i]) for i in sorted(chosen)],
            "soup_loss": best,
        }

    def merge_chunk(self, ctx, name, start, count):
        return Average().merge_chunk(ctx, name, start, count)

    def summary(self, ctx, tasks, results):
        stats, per_tensor, extra = super().summary(ctx, tasks, results)
        soup = {k: v for k, v in ctx.soup.items() if k != "chosen"}
        return stats, per_tensor, {**extra, "greedy_soup": soup}
