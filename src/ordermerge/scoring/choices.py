"""Multiple-choice accuracy by log-likelihood, as lm-eval-harness scores MC tasks.

Each choice is scored as the answer turn that fine-tuning trains on (``encode_example``): the sum of
the log-probabilities of its tokens, end of turn included, given the prompt. ``acc`` picks the
likeliest choice; ``acc_norm`` divides by the choice's length in characters first, so long choices
are not penalised for having more tokens (lm-eval-harness's acc_norm).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from ordermerge.batching import collate, token_losses
from ordermerge.data.formatting import encode_example

NO_TRUNCATION = 10**9  # cutting a choice short would score a different answer


@torch.no_grad()
def choice_logprobs(
    model, tokenizer, records: list[dict], system_prompt: str | None, batch_size: int
) -> list[list[float]]:
    """Summed log-probability of every choice of every record: ``out[i][c]``."""
    pairs = [(i, c) for i, r in enumerate(records) for c in range(len(r["choices"]))]
    examples = [
        encode_example(tokenizer, records[i]["prompt"], records[i]["choices"][c], system_prompt, NO_TRUNCATION)
        for i, c in pairs
    ]
    # Length-sorted batches: little padding, and padding never changes a score (masked, unscored).
    order = sorted(range(len(pairs)), key=lambda k: len(examples[k]["input_ids"]))
    out = [[0.0] * len(r["choices"]) for r in records]
    device = next(model.parameters()).device
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc="choices", unit="batch"):
        idx = order[start : start + batch_size]
        batch = collate([examples[k] for k in idx], tokenizer.pad_token_id)
        losses, _ = token_losses(model, {name: t.to(device) for name, t in batch.items()})
        for row, logprob in zip(idx, (-losses.double().sum(1)).tolist()):
            i, c = pairs[row]
            out[i][c] = logprob
    return out


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda k: values[k])  # ties: the first choice, deterministically


def mc_predictions(choices: list[str], logprobs: list[float]) -> tuple[int, int]:
    """The choice picked by raw log-likelihood and by log-likelihood per character."""
    per_char = [lp / max(1, len(text)) for lp, text in zip(logprobs, choices)]
    return argmax(logprobs), argmax(per_char)


def mc_rows(records: list[dict], logprobs: list[list[float]]) -> list[dict]:
    """One row per record: its choice scores, both predictions and whether each is right."""
    rows = []
    for r, lps in zip(records, logprobs):
        pred, pred_norm = mc_predictions(r["choices"], lps)
        rows.append(
            {
                "sample_id": r["sample_id"],
                "label": r["label"],
                "logprobs": lps,
                "pred": pred,
                "pred_norm": pred_norm,
                "correct": pred == r["label"],
                "correct_norm": pred_norm == r["label"],
            }
        )
    return rows
