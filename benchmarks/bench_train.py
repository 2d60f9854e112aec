"""Training throughput of ordermerge's loop vs a plain transformers.Trainer, and the batched
per-sample loss pass vs a batch-1 loop, measured in the same process on the same model and data.

    python benchmarks/bench_train.py [--model DIR] [--data train.jsonl] [--steps 6] [--batch-size 8]

Default model: the SmolLM2 base at results/smollm2-135m/base with the default task's train split
(config.yaml's first task, its spec and batch size), else a tiny offline Llama with synthetic
records. Both trainers see the same batches in the same order (fp32, fused AdamW, linear decay,
clip 1.0); tokens/s = non-pad tokens / optimizer-step seconds,
skipping the first (warm-up) step. Prints each figure and the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SMOLLM = ROOT / "results" / "smollm2-135m"


def default_task() -> tuple[str, dict, int]:
    """The default run's first task (name, spec) and batch size: config.yaml is the one place they live."""
    from ordermerge.config import load_config

    cfg = load_config(ROOT / "config.yaml")
    task, spec = next(iter(cfg["tasks"].items()))
    return task, spec, cfg["train"]["batch_size"]


def tiny_setup(tmp: Path, n: int) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import build_tiny_base, write_train

    return build_tiny_base(tmp / "base"), write_train(tmp / "train.jsonl", n)


def distinct_repeats(records: list[dict], need: int) -> list[dict]:
    """Repeat a small split to fill the steps; repeats get a distinct id AND prompt (the loader refuses
    duplicate prompts/ids), at the cost of a few extra prompt tokens."""
    out = []
    for i in range(need):
        r, copy = dict(records[i % len(records)]), i // len(records)
        r["sample_id"] = f"{r['sample_id']}-{i}"
        if copy:
            r["prompt"] = f"{r['prompt']} (repeat {copy})"
        out.append(r)
    return out


def bench_ordermerge(base: Path, data: Path, spec: dict, cfg: dict, steps: int, tmp: Path) -> tuple[float, int]:
    import pandas as pd

    from ordermerge.data.orders import save_order
    from ordermerge.train.loop import fine_tune

    save_order(np.arange(steps * cfg["batch_size"])[None, :], tmp / "order.npy")
    out = tmp / ("om-packed" if cfg.get("packing") else "om")
    fine_tune(base, data, tmp / "order.npy", out, spec, cfg, seed=0, run_name="bench", progress=False)
    log = pd.read_csv(out / "steps.csv").iloc[1:]
    return float(log["tokens"].sum() / log["seconds"].sum()), int(log["tokens"].sum())


def bench_trainer(base: Path, examples: list[dict], pad_id: int, cfg: dict, steps: int, tmp: Path) -> float:
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from ordermerge.batching import collate

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    class InOrder(Trainer):  # the same batches as ordermerge, not a shuffle
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset or self.train_dataset)

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    args = TrainingArguments(
        output_dir=str(tmp / "hf"),
        per_device_train_batch_size=cfg["batch_size"],
        max_steps=steps,
        learning_rate=cfg["lr"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = InOrder(
        model=model,
        args=args,
        train_dataset=examples,
        callbacks=[StepTimer()],
        data_collator=lambda batch: collate(batch, pad_id),
    )
    trainer.train()
    tokens = [
        sum(len(e["input_ids"]) for e in examples[i : i + cfg["batch_size"]])
        for i in range(0, steps * cfg["batch_size"], cfg["batch_size"])
    ]
    return sum(tokens[1:]) / sum(times[1:])


def bench_losses(
    base: Path, records: list[dict], spec: dict, batch_size: int, repeats: int
) -> tuple[float, float, float]:
    from ordermerge.data.formatting import encode_example
    from ordermerge.scoring.losses import load_model, per_sample_losses

    model, tok = load_model(base)
    encoded = [
        encode_example(tok, r["prompt"], r["response"], spec.get("system_prompt"), spec["max_length"]) for r in records
    ]

    def batch_one() -> list[float]:
        out = []
        with torch.no_grad():
            for e in encoded:
                logits = model(torch.tensor([e["input_ids"]])).logits[0, :-1].float()
                out.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor(e["labels"][1:]))))
        return out

    def timed(fn) -> tuple[float, object]:
        best, result = float("inf"), None
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = fn()
            best = min(best, time.perf_counter() - t0)
        return best, result

    t_batched, rows = timed(lambda: per_sample_losses(model, tok, records, spec, batch_size))
    t_ref, ref = timed(batch_one)
    max_diff = max(abs(r["loss"] - x) for r, x in zip(rows, ref))
    return t_batched, t_ref, max_diff


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="HF model dir or 'tiny' (default: SmolLM2 base if built, else tiny)")
    p.add_argument("--data", type=Path, help="train.jsonl (default: the model's task split or synthetic)")
    task, spec, batch = default_task()
    p.add_argument("--task-spec", type=json.loads, default=spec, help="default: config.yaml's first task")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=batch, help="default: config.yaml's train.batch_size")
    p.add_argument("--loss-batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="loss-pass timings: best of N")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from transformers import AutoTokenizer

    from ordermerge.data.formatting import encode_example
    from ordermerge.data.prepare import read_jsonl

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    need = a.steps * a.batch_size
    if a.model is None and (SMOLLM / "base" / "model.safetensors").exists():
        a.model = SMOLLM / "base"
        split = SMOLLM / task / "data" / "train.jsonl"
        a.data = a.data or (split if split.exists() else None)
    if a.model in (None, Path("tiny")):
        a.model, data = tiny_setup(tmp, need)
        a.data, a.task_spec = a.data or data, {"max_length": 96, "system_prompt": None}
    if a.data is None:
        p.error("--data train.jsonl is needed with --model")
    records = read_jsonl(a.data)
    if need > len(records):  # repeats are made distinct by a short prompt suffix: room for it
        a.task_spec = {**a.task_spec, "max_length": a.task_spec["max_length"] + 8}
    records = distinct_repeats(records, need)
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))

    tok = AutoTokenizer.from_pretrained(a.model)
    examples = [
        encode_example(tok, r["prompt"], r["response"], a.task_spec.get("system_prompt"), a.task_spec["max_length"])
        for r in records
    ]
    cfg = {
        "epochs": 1,
        "batch_size": a.batch_size,
        "micro_batch_size": None,
        "lr": 1e-5,
        "schedule": "linear",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "compute_dtype": "float32",
        "save_dtype": "bfloat16",
    }
    scored = sum(sum(1 for y in e["labels"][1:] if y >= 0) for e in examples) / sum(
        len(e["input_ids"]) for e in examples
    )
    print(
        f"model {a.model}, {a.steps} steps x batch {a.batch_size}, {a.threads} thread(s), "
        f"{scored:.0%} of tokens scored (response)"
    )

    om, tokens = bench_ordermerge(a.model, data, a.task_spec, cfg, a.steps, tmp)
    packed, _ = bench_ordermerge(a.model, data, a.task_spec, {**cfg, "packing": True}, a.steps, tmp)
    hf = bench_trainer(a.model, examples, tok.pad_token_id, cfg, a.steps, tmp)
    print(
        f"train tokens/s  ordermerge padded {om:9.1f}   packed {packed:9.1f}   transformers.Trainer {hf:9.1f}\n"
        f"ratios  padded/Trainer {om / hf:.2f}x   packed/Trainer {packed / hf:.2f}x   packed/padded "
        f"{packed / om:.2f}x   ({tokens} tokens timed per run, first step skipped)"
    )

    t_batched, t_ref, diff = bench_losses(a.model, records, a.task_spec, a.loss_batch_size, a.repeats)
    print(
        f"per-sample losses ({len(records)} samples)  batched(bs={a.loss_batch_size}) {t_batched:.2f}s   "
        f"batch-1 loop {t_ref:.2f}s   ratio {t_ref / t_batched:.2f}x faster   max |diff| {diff:.1e}"
    )


if __name__ == "__main__":
    main()
