"""The evaluate stage: validation loss and exact-match accuracy of the final numeric answer.

Greedy decoding (temperature 0), batched with left padding; the answer is the number after the
last ``####`` (the training format) or else the last number in the generation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .atomic import atomic_path, write_json
from .data import extract_number, prompt_text, read_jsonl
from .losses import load_model, per_sample_losses


@torch.no_grad()
def greedy_answers(model, tokenizer, records: list[dict], system_prompt: str | None, batch_size: int,
                   max_new_tokens: int) -> list[str]:
    tokenizer.padding_side = "left"
    prompts = [prompt_text(tokenizer, r["prompt"], system_prompt) for r in records]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch"):
        idx = order[start:start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for j, i in enumerate(idx):
            outputs[i] = tokenizer.decode(gen[j, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return outputs


def exact_match(prediction: str, answer: str) -> bool:
    predicted = extract_number(prediction)
    gold = extract_number(answer)
    return predicted is not None and gold is not None and predicted == gold


def evaluate_model(model_dir: str | Path, val_path: str, test_path: str, task_spec: dict, eval_cfg: dict,
                   out_json: str | Path, out_generations: str | Path, identity: dict,
                   out_val_losses: str | Path | None = None) -> dict:
    t0 = time.perf_counter()
    model, tokenizer = load_model(model_dir)
    model.eval()
    val = read_jsonl(val_path)
    val_rows = per_sample_losses(model, tokenizer, val, task_spec, eval_cfg["batch_size"], progress=True, desc="val loss")
    # Token-weighted mean, as a training loss would be computed.
    val_loss = sum(r["loss"] * r["tokens"] for r in val_rows) / sum(r["tokens"] for r in val_rows)
    test = read_jsonl(test_path)[: eval_cfg.get("n_generate") or None]
    generations = greedy_answers(model, tokenizer, test, task_spec.get("system_prompt"), eval_cfg["batch_size"],
                                 eval_cfg["max_new_tokens"])
    correct = [exact_match(g, r["answer"]) for g, r in zip(generations, test)]
    metrics = {
        **identity,
        "model_dir": str(model_dir),
        "val_loss": val_loss,
        "exact_match": sum(correct) / max(1, len(correct)),
        "n_val": len(val),
        "n_test": len(test),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    with atomic_path(out_generations) as tmp:
        tmp.write_text("".join(json.dumps({"sample_id": r["sample_id"], "answer": r["answer"], "generation": g,
                                           "correct": c}) + "\n" for r, g, c in zip(test, generations, correct)))
    if out_val_losses is not None:  # per-sample val losses: the paired test of Table 1
        import pandas as pd

        with atomic_path(out_val_losses) as tmp:
            pd.DataFrame(val_rows).to_csv(tmp, index=False)
    write_json(out_json, metrics)
    return metrics
