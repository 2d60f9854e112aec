"""Greedy decoding with and without stopping at the answer line, same model, prompts and batches.

    python benchmarks/bench_eval.py [--model DIR] [--test test.jsonl] [--n 32] [--max-new-tokens 80]

Default: the default run's base model and its first task's test split (run `make run` or the
workflow's prepare_data first). Prints seconds, decoding steps and generated tokens of each, the
ratio, and whether the extracted answers are identical (they must be: stopping only drops what
follows the first complete '#### <number>' line).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ordermerge.data.formatting import extract_number
from ordermerge.data.prepare import read_jsonl
from ordermerge.scoring.evaluate import cut_at_answer, greedy_answers
from ordermerge.scoring.losses import load_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "results" / "smollm2-135m" / "base")
    ap.add_argument("--test", type=Path)
    ap.add_argument("--system-prompt")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.test is None:
        found = sorted((ROOT / "results" / "smollm2-135m").glob("*/data/test.jsonl"))
        if not found:
            raise SystemExit("no test split found: run the workflow first, or pass --test")
        a.test = found[0]
    model, tokenizer = load_model(a.model)
    model.eval()
    records = read_jsonl(a.test)[: a.n]
    results = {}
    for stop in (False, True):
        stats: dict = {}
        t = time.perf_counter()
        out = greedy_answers(
            model, tokenizer, records, a.system_prompt, a.batch_size, a.max_new_tokens, stats, stop_at_answer=stop
        )
        results[stop] = (time.perf_counter() - t, stats, out)
    (t_full, s_full, full), (t_stop, s_stop, stopped) = results[False], results[True]
    same = [extract_number(cut_at_answer(f)) == extract_number(s) for f, s in zip(full, stopped)]
    print(
        f"model {a.model}, {len(records)} prompts of {a.test}, batch {a.batch_size}, max_new_tokens "
        f"{a.max_new_tokens}, {a.threads} thread(s)"
    )
    print(f"{'decoding':28s} {'seconds':>8s} {'steps':>6s} {'tokens':>7s}")
    print(f"{'to max_new_tokens or EOS':28s} {t_full:8.2f} {s_full['decode_steps']:6d} {s_full['generated_tokens']:7d}")
    print(f"{'stop at the answer line':28s} {t_stop:8.2f} {s_stop['decode_steps']:6d} {s_stop['generated_tokens']:7d}")
    print(f"speed-up {t_full / t_stop:.2f}x; extracted answers identical for {sum(same)}/{len(same)} prompts")


if __name__ == "__main__":
    main()
