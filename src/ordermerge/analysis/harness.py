"""eval.harness in the analysis: lm-eval's rows for metrics.csv, and how its mirrored tasks agree with
ordermerge's own scores of the same models on the same test samples (tables/harness_agreement).

Beside the mirror's own filter (our extraction), lm-eval's GSM8K extraction (strict-match,
flexible-extract) scores a numeric task's generations; every sample that one of them scores differently from
ordermerge is listed with both answers, so each disagreement can be explained. A text task's exact match is
compared the same way (lm-eval normalising with its own copy of SQuAD's ``normalize_answer``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ordermerge.data.formatting import extract_number
from ordermerge.paths import EVAL_FILES, HARNESS_FILES
from ordermerge.scoring.harness import FILTER, NO_ANSWER, STOCK_FILTERS, mirror_name

IDS = ["model", "task", "scheme", "kind", "method", "seed", "run", "epoch"]
# Ours -> lm-eval's name for the same metric of a mirrored task (MC: acc; acc_norm is not the same
# quantity: lm-eval adds the prompt's final newline to every choice's log-likelihood before dividing).
SAME_METRIC = {"exact_match": "exact_match", "mc_accuracy": "acc"}
STOCK = [f["name"] for f in STOCK_FILTERS]
SHOWN = 8  # disagreeing samples listed per model in the markdown


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


def _differences(mine: dict[str, dict], theirs: dict[str, dict], lm_metric: str, filt: str) -> list[dict]:
    """The samples that lm-eval (under filter ``filt``) scores right and ordermerge wrong, or the reverse."""
    out = []
    for sid in sorted(set(mine) | set(theirs)):
        a, b = mine.get(sid) or {}, theirs.get(sid) or {}
        right_a = bool(a["correct"]) if a else None
        right_b = bool(b.get(lm_metric)) if b else None
        if right_a != right_b:
            ours = a.get("generation")
            # a text task's row has its extracted answer; a numeric one's is the generation's number
            answer = a["prediction"] if "prediction" in a else extract_number(ours) if ours is not None else None
            out.append(
                {
                    "sample_id": sid,
                    "filter": filt,
                    "ordermerge_correct": right_a,
                    "lm_eval_correct": right_b,
                    "gold": a.get("answer"),
                    "ordermerge_answer": answer,
                    "lm_eval_answer": b.get("answer"),
                    "ordermerge_generation": ours,
                    "lm_eval_generation": b.get("cut"),
                }
            )
    return out


def _agreement(eval_stem: Path, harness_stem: Path) -> tuple[dict, list[dict]]:
    """One model: our task metric, lm-eval's on the mirrored task (and under lm-eval's GSM8K filters),
    and the samples scored differently."""
    ours = json.loads(Path(f"{eval_stem}{EVAL_FILES['metrics']}").read_text())
    metric = ours.get("task_metric") or "exact_match"
    name, lm_metric = mirror_name(ours["task"]), SAME_METRIC[metric]
    main = FILTER if metric == "exact_match" else "none"
    values = {
        r["filter"]: r
        for r in json.loads(Path(f"{harness_stem}{HARNESS_FILES['metrics']}").read_text())["rows"]
        if r["harness"] == name and r["metric"] == lm_metric
    }
    mine = {str(r["sample_id"]): r for r in _read_jsonl(Path(f"{eval_stem}{EVAL_FILES['generations']}"))}
    by_filter: dict[str, dict[str, dict]] = {}
    for r in _read_jsonl(Path(f"{harness_stem}{HARNESS_FILES['samples']}")):
        if r["harness"] == name:
            by_filter.setdefault(r.get("filter") or "none", {})[str(r["sample_id"])] = r
    theirs = by_filter.get(main, {})
    differ = _differences(mine, theirs, lm_metric, main)
    other_text = sum(
        1 for sid, a in mine.items() if "generation" in a and theirs.get(sid, {}).get("cut") != a["generation"]
    )
    row = {
        **{k: ours.get(k) for k in IDS},
        "metric": metric,
        "ordermerge": ours.get(metric),
        "lm_eval": values[main]["value"] if main in values else None,
        "n_ordermerge": len(mine),
        "n_lm_eval": values[main]["n"] if main in values else len(theirs),
        "disagree": len(differ),
        "other_text": other_text if metric == "exact_match" else None,
    }
    for filt in STOCK:
        if filt in by_filter:
            d = _differences(mine, by_filter[filt], lm_metric, filt)
            row |= {f"lm_eval_{filt}": values.get(filt, {}).get("value"), f"disagree_{filt}": len(d)}
            differ += d
    return row, differ


def agreement_table(pairs: list[tuple[Path, Path]]) -> tuple[pd.DataFrame, dict[str, list[dict]]]:
    """Per model (its evaluation stem and its harness stem): both scores, n, and the disagreements."""
    rows, differ = [], {}
    for eval_stem, harness_stem in pairs:
        row, d = _agreement(eval_stem, harness_stem)
        rows.append(row)
        if d:
            differ[_label(row)] = d
    table = pd.DataFrame(rows)
    ints = [c for c in ("seed", "run", "other_text", *(f"disagree_{f}" for f in STOCK)) if c in table]
    return table.astype({c: "Int64" for c in ints}), differ


def _label(row: dict) -> str:
    which = f"run{row['run']}" if row["kind"] == "single" else f"{row['method']} seed{row['seed']}"
    return f"{row['model']} / {row['task']} / {row['scheme']} / {which}"


def _fmt(v) -> str:
    return "—" if v is None or pd.isna(v) else f"{v:.3f}" if isinstance(v, float) else str(v)


def agreement_markdown(table: pd.DataFrame, differ: dict[str, list[dict]]) -> str:
    lines = [
        "# lm-eval-harness vs ordermerge: the same models, the same test samples",
        "",
        "lm-eval scores each task mirrored by `ordermerge harness` (the same prompt text, greedy decoding to "
        "the same EOS and max_new_tokens, our answer extraction as its filter); `disagree` counts the samples "
        "that one scores right and the other wrong, `other text` those whose generation, cut where ours stops, "
        "is not ours.",
        "",
        "| model | metric | ordermerge | lm-eval | n (ours / lm-eval) | disagree | other text |",
        "|---|---|---|---|---|---|---|",
    ]
    records = table.to_dict("records")
    for r in records:
        lines.append(
            f"| {_label(r)} | {r['metric']} | {_fmt(r['ordermerge'])} | {_fmt(r['lm_eval'])} | "
            f"{r['n_ordermerge']} / {r['n_lm_eval']} | {r['disagree']} | {_fmt(r['other_text'])} |"
        )
    stock = [f for f in STOCK if f"disagree_{f}" in table]
    if stock:
        lines += [
            "",
            "lm-eval's own GSM8K answer extraction (`gsm8k.yaml`: " + ", ".join(stock) + ") on the same "
            "generations, and the samples it scores differently from ordermerge:",
            "",
            "| model | " + " | ".join(f"{f} | disagree" for f in stock) + " |",
            "|---|" + "---|---|" * len(stock),
        ]
        for r in records:
            cells = " | ".join(f"{_fmt(r.get(f'lm_eval_{f}'))} | {_fmt(r.get(f'disagree_{f}'))}" for f in stock)
            lines.append(f"| {_label(r)} | {cells} |")
    if not differ:
        lines += ["", "No sample is scored differently."]
    for label, rows in differ.items():
        lines += ["", f"## {label}: {len(rows)} scored differently", ""]
        for d in rows[:SHOWN]:
            ours, theirs = d["ordermerge_generation"], d["lm_eval_generation"]
            text = (
                "scored by log-likelihood"
                if ours is None and theirs is None
                else "the same generation"
                if ours == theirs
                else f"generations differ: lm-eval's {theirs!r}"
            )
            lines.append(
                f"- `{d['sample_id']}` ({d['filter']}): gold {d['gold']!r}; ours {d['ordermerge_answer']!r} "
                f"({'right' if d['ordermerge_correct'] else 'wrong'}), lm-eval "
                f"{d['lm_eval_answer'] or NO_ANSWER!r} ({'right' if d['lm_eval_correct'] else 'wrong'}); "
                f"{text}; our generation {ours!r}"
            )
        if len(rows) > SHOWN:
            lines.append(f"- ... {len(rows) - SHOWN} more in the per-sample files")
    return "\n".join(lines) + "\n"
