"""eval.harness in the analysis: lm-eval's rows for metrics.csv, and how its mirrored tasks agree with
ordermerge's own scores of the same models on the same test samples (tables/harness_agreement)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ordermerge.paths import EVAL_FILES, HARNESS_FILES
from ordermerge.scoring.harness import FILTER, NO_ANSWER, mirror_name

IDS = ["model", "task", "scheme", "kind", "method", "seed", "run", "epoch"]
# Ours -> lm-eval's name for the same metric of a mirrored task (MC: acc; acc_norm is not the same
# quantity: lm-eval adds the prompt's final newline to every choice's log-likelihood before dividing).
SAME_METRIC = {"exact_match": "exact_match", "mc_accuracy": "acc"}
SHOWN = 5  # disagreeing samples listed per model in the markdown


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tidy_harness(stems: list[Path]) -> pd.DataFrame:
    """metrics.csv rows of lm-eval's scores: ``harness`` names the lm-eval task; ``metric`` is lm-eval's,
    with its filter after a comma unless the filter is ``none`` or ours (a mirrored numeric task's)."""
    rows = [r for stem in stems for r in json.loads(Path(f"{stem}{HARNESS_FILES['metrics']}").read_text())["rows"]]
    if not rows:
        return pd.DataFrame(columns=[*IDS, "harness", "metric", "value"])
    df = pd.DataFrame(rows)
    plain = df["filter"].isin(["none", FILTER])
    df["metric"] = df["metric"].where(plain, df["metric"] + "," + df["filter"])
    return df[[*IDS, "harness", "metric", "value"]]


def _agreement(eval_stem: Path, harness_stem: Path) -> tuple[dict, list[dict]]:
    """One model: our task metric and lm-eval's on the mirrored task, and the samples scored differently."""
    ours = json.loads(Path(f"{eval_stem}{EVAL_FILES['metrics']}").read_text())
    metric = ours.get("task_metric") or "exact_match"
    name, lm_metric = mirror_name(ours["task"]), SAME_METRIC[metric]
    lm_rows = [r for r in json.loads(Path(f"{harness_stem}{HARNESS_FILES['metrics']}").read_text())["rows"]
               if r["harness"] == name and r["metric"] == lm_metric]
    mine = {str(r["sample_id"]): r for r in _read_jsonl(Path(f"{eval_stem}{EVAL_FILES['generations']}"))}
    theirs = {str(r["sample_id"]): r for r in _read_jsonl(Path(f"{harness_stem}{HARNESS_FILES['samples']}"))
              if r["harness"] == name}
    other_text = sum(1 for sid, a in mine.items() if "generation" in a and theirs.get(sid, {}).get("cut") != a["generation"])
    differ = []
    for sid in sorted(set(mine) | set(theirs)):
        a, b = mine.get(sid), theirs.get(sid)
        right_a = None if a is None else bool(a["correct"])
        right_b = None if b is None else bool(b.get(lm_metric))
        if right_a != right_b:
            differ.append({"sample_id": sid, "ordermerge_correct": right_a, "lm_eval_correct": right_b,
                           "ordermerge_generation": (a or {}).get("generation"),
                           "lm_eval_generation": (b or {}).get("cut"), "lm_eval_answer": (b or {}).get("answer")})
    row = {**{k: ours.get(k) for k in IDS}, "metric": metric, "ordermerge": ours.get(metric),
           "lm_eval": lm_rows[0]["value"] if lm_rows else None, "n_ordermerge": len(mine),
           "n_lm_eval": lm_rows[0]["n"] if lm_rows else len(theirs), "disagree": len(differ),
           "other_text": other_text if metric == "exact_match" else None}
    return row, differ


def agreement_table(pairs: list[tuple[Path, Path]]) -> tuple[pd.DataFrame, dict[str, list[dict]]]:
    """Per model (its evaluation stem and its harness stem): both scores, n, and the disagreements."""
    rows, differ = [], {}
    for eval_stem, harness_stem in pairs:
        row, d = _agreement(eval_stem, harness_stem)
        rows.append(row)
        if d:
            differ[_label(row)] = d
    return pd.DataFrame(rows).astype({"seed": "Int64", "run": "Int64", "other_text": "Int64"}), differ


def _label(row: dict) -> str:
    which = f"run{row['run']}" if row["kind"] == "single" else f"{row['method']} seed{row['seed']}"
    return f"{row['model']} / {row['task']} / {row['scheme']} / {which}"


def agreement_markdown(table: pd.DataFrame, differ: dict[str, list[dict]]) -> str:
    lines = ["# lm-eval-harness vs ordermerge: the same models, the same test samples", "",
             "lm-eval scores each task mirrored by `ordermerge harness` (the same prompt text, greedy decoding to "
             "the same EOS and max_new_tokens, our answer extraction as its filter); `disagree` counts the samples "
             "that one scores right and the other wrong, `other text` those whose generation, cut where ours stops, "
             "is not ours.", "",
             "| model | metric | ordermerge | lm-eval | n (ours / lm-eval) | disagree | other text |",
             "|---|---|---|---|---|---|---|"]
    for r in table.to_dict("records"):
        fmt = lambda v: "—" if v is None or pd.isna(v) else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {_label(r)} | {r['metric']} | {fmt(r['ordermerge'])} | {fmt(r['lm_eval'])} | "
                     f"{r['n_ordermerge']} / {r['n_lm_eval']} | {r['disagree']} | "
                     f"{'—' if pd.isna(r['other_text']) else r['other_text']} |")
    if not differ:
        lines += ["", "No sample is scored differently."]
    for label, rows in differ.items():
        lines += ["", f"## {label}: {len(rows)} samples scored differently", ""]
        for d in rows[:SHOWN]:
            ours, theirs = d["ordermerge_generation"], d["lm_eval_generation"]
            why = ("scored by log-likelihood" if ours is None and theirs is None else
                   "the same generated text" if ours == theirs else f"generations differ: ours {ours!r}, lm-eval's {theirs!r}")
            lines.append(f"- `{d['sample_id']}`: ours {d['ordermerge_correct']}, lm-eval {d['lm_eval_correct']} "
                         f"(lm-eval's answer {d['lm_eval_answer'] or NO_ANSWER}); {why}")
    return "\n".join(lines) + "\n"
