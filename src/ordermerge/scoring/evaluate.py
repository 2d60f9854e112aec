"""The evaluate stage: validation loss, and the task's metric by its answer kind (``data/kinds.py``):
exact-match accuracy of the final numeric answer; for text answers exact match after SQuAD's
normalisation and token F1 (``text.py``); for multiple-choice tasks accuracy by log-likelihood (``choices.py``).

Greedy decoding (temperature 0), batched with left padding. Numeric: the answer is the number after the
first complete ``#### <number>`` line (the training format), or else the last number in the generation.
Text: the answer is the first non-empty line. A sequence stops as soon as that line is complete
(``AnswerStop``), and a batch once every sequence has stopped or reached ``max_new_tokens``: a model that
has answered is not decoded further.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from ordermerge.data.formatting import extract_number, prompt_text
from ordermerge.data.kinds import kind_of
from ordermerge.data.prepare import read_jsonl
from ordermerge.scoring.choices import choice_logprobs, mc_rows
from ordermerge.scoring.losses import load_model, per_sample_losses
from ordermerge.scoring.text import best_f1, exact_match_text, extract_text_answer
from ordermerge.storage.atomic import atomic_path, write_json

# A complete answer line: '####', a token with a digit, then whitespace (the number cannot grow any more).
ANSWER_LINE = re.compile(r"####[ \t]*[^\s]*\d[^\s]*(?=\s)")
# A text answer's line: some text, then the newline that ends it (EOS ends it too: generate stops there).
TEXT_LINE = re.compile(r"\S[^\n]*(?=\n)")
COMPLETE = {"numeric": ANSWER_LINE, "text": TEXT_LINE}  # per answer kind: where decoding may stop


def cut_at_answer(text: str, kind: str = "numeric") -> str:
    """The generation up to the end of its first complete answer line (unchanged when it has none)."""
    found = COMPLETE[kind].search(text)
    return text[: found.end()] if found else text


class AnswerStop(StoppingCriteria):
    """Per sequence: done once the generated text holds a complete answer line of the kind
    (numeric: ``#### <number>``; text: a non-empty line and its newline)."""

    def __init__(self, tokenizer, prompt_length: int, kind: str = "numeric"):
        self.tokenizer, self.prompt_length, self.line = tokenizer, prompt_length, COMPLETE[kind]

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([self.line.search(t) is not None for t in texts], device=input_ids.device)


@torch.no_grad()
def greedy_answers(
    model,
    tokenizer,
    records: list[dict],
    system_prompt: str | None,
    batch_size: int,
    max_new_tokens: int,
    stats: dict | None = None,
    stop_at_answer: bool = True,
    kind: str = "numeric",
) -> list[str]:
    """Greedy generations, cut after the answer line; ``stats`` (if given) gets the decoding steps run
    and the tokens generated, to show what early stopping saved (``stop_at_answer=False``: the
    benchmark's reference, decoding to max_new_tokens or EOS; the cut texts are the same)."""
    tokenizer.padding_side = "left"
    prompts = [prompt_text(tokenizer, r["prompt"], system_prompt) for r in records]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    steps = tokens = 0
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch"):
        idx = order[start : start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(model.device)  # the GPU when load_model found one
        width = enc["input_ids"].shape[1]
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList([AnswerStop(tokenizer, width, kind)] if stop_at_answer else []),
        )
        steps += gen.shape[1] - width
        tokens += int((gen[:, width:] != tokenizer.pad_token_id).sum())
        for j, i in enumerate(idx):
            outputs[i] = cut_at_answer(tokenizer.decode(gen[j, width:], skip_special_tokens=True), kind)
    if stats is not None:
        stats.update(decode_steps=steps, generated_tokens=tokens)
    return outputs


def exact_match(prediction: str, answer: str) -> bool:
    predicted = extract_number(prediction)
    gold = extract_number(answer)
    return predicted is not None and gold is not None and predicted == gold


def exact_match_scores(model, tokenizer, test: list[dict], task_spec: dict, eval_cfg: dict) -> tuple[dict, list[dict]]:
    """Numeric tasks: greedy generations, right when the final number matches the gold one."""
    decoding: dict = {}
    generations = greedy_answers(
        model,
        tokenizer,
        test,
        task_spec.get("system_prompt"),
        eval_cfg["batch_size"],
        eval_cfg["max_new_tokens"],
        decoding,
    )
    correct = [exact_match(g, r["answer"]) for g, r in zip(generations, test)]
    rows = [
        {"sample_id": r["sample_id"], "answer": r["answer"], "generation": g, "correct": c}
        for r, g, c in zip(test, generations, correct)
    ]
    return {"task_metric": "exact_match", "exact_match": sum(correct) / max(1, len(correct)), **decoding}, rows


def text_scores(model, tokenizer, test: list[dict], task_spec: dict, eval_cfg: dict) -> tuple[dict, list[dict]]:
    """Text tasks: greedy answer lines, exact match after SQuAD's normalisation and token F1, each the
    best over the record's gold aliases."""
    decoding: dict = {}
    generations = greedy_answers(
        model,
        tokenizer,
        test,
        task_spec.get("system_prompt"),
        eval_cfg["batch_size"],
        eval_cfg["max_new_tokens"],
        decoding,
        kind="text",
    )
    rows = []
    for r, g in zip(test, generations):
        prediction = extract_text_answer(g)
        rows.append(
            {
                "sample_id": r["sample_id"],
                "answer": r["answer"],
                "answers": r["answers"],
                "generation": g,
                "prediction": prediction,
                "correct": exact_match_text(prediction, r["answers"]),
                "f1": best_f1(prediction, r["answers"]),
            }
        )
    n = max(1, len(rows))
    return {
        "task_metric": "exact_match",
        "exact_match": sum(r["correct"] for r in rows) / n,
        "f1": sum(r["f1"] for r in rows) / n,
        **decoding,
    }, rows


def mc_scores(model, tokenizer, test: list[dict], task_spec: dict, eval_cfg: dict) -> tuple[dict, list[dict]]:
    """Multiple-choice tasks: accuracy of the likeliest choice (raw and per character); no generation."""
    rows = mc_rows(
        test, choice_logprobs(model, tokenizer, test, task_spec.get("system_prompt"), eval_cfg["batch_size"])
    )
    n = max(1, len(rows))
    return {
        "task_metric": "mc_accuracy",
        "exact_match": None,
        "mc_accuracy": sum(r["correct"] for r in rows) / n,
        "mc_accuracy_norm": sum(r["correct_norm"] for r in rows) / n,
    }, rows


SCORERS = {"numeric": exact_match_scores, "text": text_scores, "choice": mc_scores}  # by kinds.KINDS


def evaluate_model(
    model_dir: str | Path,
    val_path: str,
    test_path: str,
    task_spec: dict,
    eval_cfg: dict,
    out_json: str | Path,
    out_generations: str | Path,
    identity: dict,
    out_val_losses: str | Path | None = None,
) -> dict:
    t0 = time.perf_counter()
    model, tokenizer = load_model(model_dir)
    model.eval()
    val = read_jsonl(val_path)
    val_rows = per_sample_losses(
        model, tokenizer, val, task_spec, eval_cfg["batch_size"], progress=True, desc="val loss"
    )
    # Token-weighted mean, as a training loss would be computed.
    val_loss = sum(r["loss"] * r["tokens"] for r in val_rows) / sum(r["tokens"] for r in val_rows)
    test = read_jsonl(test_path)[: eval_cfg.get("n_generate")]  # None: all; 0: no task metric
    score = SCORERS[kind_of(test[0])] if test else None
    scores, rows = score(model, tokenizer, test, task_spec, eval_cfg) if test else ({"task_metric": None}, [])
    metrics = {
        **identity,
        "model_dir": str(model_dir),
        "val_loss": val_loss,
        **scores,
        "n_val": len(val),
        "n_test": len(test),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    with atomic_path(out_generations) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    if out_val_losses is not None:  # per-sample val losses: the paired test of Table 1
        import pandas as pd

        with atomic_path(out_val_losses) as tmp:
            pd.DataFrame(val_rows).to_csv(tmp, index=False)
    write_json(out_json, metrics)
    return metrics
