"""lm-eval-harness on ordermerge models (scoring/harness.py), offline on the tiny Llama: the mirrored
task loads in lm-eval, lm-eval's per-sample exact match (numeric and text, with text F1) and MC accuracy
equal ours on the same model,
standard task names reach lm-eval unchanged, and the CLI refuses to write into its input."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch

from ordermerge.cli import main
from ordermerge.data.formatting import extract_number, prompt_text
from ordermerge.scoring import harness
from ordermerge.scoring.choices import choice_logprobs, mc_rows
from ordermerge.scoring.evaluate import cut_at_answer, exact_match, greedy_answers
from ordermerge.scoring.losses import load_model
from ordermerge.scoring.text import best_f1, exact_match_text, extract_text_answer

SPEC = {"max_length": 96, "system_prompt": "Solve."}
EVAL = {"batch_size": 4, "max_new_tokens": 16, "harness": ["mirror"]}


@pytest.fixture(scope="module")
def peaky(tiny_base_f32, tmp_path_factory):
    """The tiny Llama with its weights scaled up and digits and '#' favoured: greedy decoding writes
    varied text with numbers in it (the untouched model writes only newlines), and choices differ in score."""
    out = tmp_path_factory.mktemp("peaky") / "model"
    shutil.copytree(tiny_base_f32, out)
    model, tokenizer = load_model(out)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(20)
        emb = model.get_input_embeddings().weight
        for ch in "0123456789#":
            emb[tokenizer.convert_tokens_to_ids(ch)] *= 3
    model.save_pretrained(out)
    return out


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("test: no network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_filter_extracts_our_answer_in_our_spelling():
    texts = ["so 1,000 in all\n#### 1,000\nand then 7", "#### 5.0", "3 + 4 = 7.", "no number", "####-0.50 x"]
    got = [a for [a] in harness.filter_answers([[t] for t in texts], [{}] * len(texts))]
    assert got == ["1000", "5", "7", harness.NO_ANSWER, "-0.5"]
    assert [g == harness.NO_ANSWER or exact_match(t, g) for t, g in zip(texts, got)] == [True] * 5


def test_mirror_task_loads_in_lm_eval(peaky, tmp_path):
    from lm_eval.tasks import TaskManager

    model, tokenizer = load_model(peaky)
    records = [{"sample_id": f"s{i}", "prompt": f"What is {i} plus 1?", "answer": "#### 1,000"} for i in range(3)]
    name = harness.write_mirror_task(tmp_path, "gsm", tokenizer, records, SPEC, EVAL)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    assert name in manager.all_tasks
    task = manager.load([name])["tasks"][name]
    docs = list(task.test_docs())
    assert [task.doc_to_text(d) for d in docs] == [prompt_text(tokenizer, r["prompt"], "Solve.") for r in records]
    assert [task.doc_to_target(d) for d in docs] == ["1000"] * 3


def test_lm_eval_exact_match_equals_ours_per_sample(peaky, tmp_path, no_network):
    model, tokenizer = load_model(peaky)
    records = [
        {"sample_id": f"s{i}", "prompt": f"What is {i} plus {3 * i + 1}?" + " ok" * (i % 3), "answer": ""}
        for i in range(8)
    ]
    ours = greedy_answers(model, tokenizer, records, SPEC["system_prompt"], 4, EVAL["max_new_tokens"])
    for i, (r, g) in enumerate(zip(records, ours)):  # half right (our own answer), half wrong
        r["answer"] = f"#### {extract_number(g)}" if i % 2 == 0 and extract_number(g) else "#### 123456789"
    right = [exact_match(g, r["answer"]) for g, r in zip(ours, records)]
    assert 0 < sum(right) < len(right)
    out = harness.harness_stage(
        peaky,
        write_jsonl(tmp_path / "test.jsonl", records),
        SPEC,
        EVAL,
        {"model": "tiny", "task": "gsm"},
        tmp_path / "m.json",
        tmp_path / "s.jsonl",
    )
    samples = {s["sample_id"]: s for s in read_jsonl(tmp_path / "s.jsonl") if s["filter"] == harness.FILTER}
    for r, g, ok in zip(records, ours, right):
        s = samples[r["sample_id"]]
        assert cut_at_answer(s["generation"]) == s["cut"] == g  # same prompt, same greedy text
        assert s["answer"] == (extract_number(s["cut"]) or harness.NO_ANSWER)
        assert bool(s["exact_match"]) == ok
    row, *stock = out["rows"]  # ours, then lm-eval's GSM8K filters on the same generations
    assert (row["harness"], row["metric"], row["filter"], row["n"]) == (
        "ordermerge_gsm",
        "exact_match",
        "ordermerge",
        8,
    )
    assert [r["filter"] for r in stock] == ["strict-match", "flexible-extract"]
    assert row["value"] == pytest.approx(sum(right) / len(right))
    assert json.loads((tmp_path / "m.json").read_text())["rows"] == out["rows"]


def test_lm_eval_text_exact_match_and_f1_equal_ours_per_sample(peaky, tmp_path, no_network):
    """A text task (answer: text): lm-eval decodes the same line, our filter takes the same answer, and its
    own copy of SQuAD's normalisation and F1 (process_results) scores it as ours does, alias by alias."""
    model, tokenizer = load_model(peaky)
    records = [
        {"sample_id": f"t{i}", "prompt": f"Name colour {i}." + " ok" * (i % 3), "response": "x"} for i in range(8)
    ]
    ours = greedy_answers(model, tokenizer, records, SPEC["system_prompt"], 4, EVAL["max_new_tokens"], kind="text")
    for i, (r, g) in enumerate(zip(records, ours)):  # right: our own answer among the aliases; else a partial one
        words = extract_text_answer(g).split()
        r["answers"] = ["zzz", extract_text_answer(g)] if i % 2 == 0 else ["zzz " + (words[0] if words else "q")]
        r["answer"] = r["answers"][0]
    right = [exact_match_text(extract_text_answer(g), r["answers"]) for g, r in zip(ours, records)]
    assert 0 < sum(right) < len(right)
    ident = {
        "model": "tiny",
        "task": "words",
        "scheme": "shuffle",
        "kind": "single",
        "method": "single",
        "seed": None,
        "run": 0,
        "epoch": 1,
    }
    out = harness.harness_stage(
        peaky,
        write_jsonl(tmp_path / "test.jsonl", records),
        SPEC,
        EVAL,
        ident,
        tmp_path / "m.json",
        tmp_path / "m.samples.jsonl",
    )
    samples = {s["sample_id"]: s for s in read_jsonl(tmp_path / "m.samples.jsonl")}
    assert {s["filter"] for s in samples.values()} == {harness.FILTER}  # no GSM8K extraction for words
    for r, g, ok in zip(records, ours, right):
        s = samples[r["sample_id"]]
        assert s["cut"] == g and s["answer"] == extract_text_answer(g)
        assert (bool(s["exact_match"]), s["f1"]) == (ok, pytest.approx(best_f1(extract_text_answer(g), r["answers"])))
    values = {row["metric"]: row["value"] for row in out["rows"]}
    assert values["exact_match"] == pytest.approx(sum(right) / len(right))
    assert values["f1"] == pytest.approx(sum(s["f1"] for s in samples.values()) / len(samples))
    assert 0 < values["f1"] < 1
    # the agreement table (analysis/harness.py) of the two: the same score, no sample scored differently
    from ordermerge.analysis.harness import agreement_table
    from ordermerge.scoring.evaluate import text_scores

    metrics, rows = text_scores(model, tokenizer, records, SPEC, EVAL)
    (tmp_path / "e.json").write_text(json.dumps({**ident, **metrics}))
    write_jsonl(tmp_path / "e.generations.jsonl", rows)
    table, differ = agreement_table([(tmp_path / "e", tmp_path / "m")])
    [row] = table.to_dict("records")
    assert (row["metric"], row["ordermerge"], row["lm_eval"]) == (
        "exact_match",
        metrics["exact_match"],
        pytest.approx(values["exact_match"]),
    )
    assert (row["disagree"], row["other_text"], differ) == (0, 0, {})


def test_lm_eval_mc_accuracy_equals_ours(peaky, tmp_path, no_network):
    model, tokenizer = load_model(peaky)
    records = []
    for i in range(6):
        choices = [f"choice {i}", "no", "a longer one " + "x" * i, "yes"][: 2 + i % 3]
        records.append(
            {
                "sample_id": f"mc{i}",
                "prompt": f"Question {i}: which?",
                "choices": choices,
                "label": i % len(choices),
                "answer": choices[i % len(choices)],
            }
        )
    ours = mc_rows(records, choice_logprobs(model, tokenizer, records, SPEC["system_prompt"], 4))
    out = harness.harness_stage(
        peaky,
        write_jsonl(tmp_path / "test.jsonl", records),
        SPEC,
        EVAL,
        {"model": "tiny", "task": "mc"},
        tmp_path / "m.json",
        tmp_path / "s.jsonl",
    )
    samples = {s["sample_id"]: s for s in read_jsonl(tmp_path / "s.jsonl")}
    for o in ours:
        s = samples[o["sample_id"]]
        assert bool(s["acc"]) == o["correct"]
        # lm-eval moves the prompt's final newline into every continuation: one constant per sample.
        shift = [a - b for a, b in zip(s["logprobs"], o["logprobs"])]
        assert max(shift) - min(shift) == pytest.approx(0, abs=1e-3)
    acc = {r["metric"]: r["value"] for r in out["rows"]}
    assert acc["acc"] == pytest.approx(sum(o["correct"] for o in ours) / len(ours))


def test_standard_task_names_reach_lm_eval_unchanged(peaky, tmp_path, monkeypatch):
    import lm_eval
    import lm_eval.tasks

    seen = {}
    # lm-eval's own task index (~30 s to build): only its arguments matter here.
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kwargs: seen.setdefault("manager", kwargs))

    def fake(**kwargs):
        seen.update(kwargs)
        return {
            "results": {"gsm8k": {"alias": "gsm8k", "exact_match,flexible-extract": 0.25}},
            "n-samples": {"gsm8k": {"effective": 4}},
        }

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake)
    out = harness.harness_stage(
        peaky, None, SPEC, {**EVAL, "harness": ["gsm8k", "arc_easy"]}, {"model": "tiny"}, tmp_path / "m.json"
    )
    assert seen["tasks"] == ["gsm8k", "arc_easy"] and seen["model"] == "hf"
    assert seen["manager"] == {"include_path": None, "include_defaults": True}
    assert seen["model_args"]["pretrained"] == str(peaky)
    assert out["rows"] == [
        {
            "model": "tiny",
            "harness": "gsm8k",
            "metric": "exact_match",
            "filter": "flexible-extract",
            "value": 0.25,
            "stderr": None,
            "n": 4,
        }
    ]


def test_cli_refuses_an_output_inside_its_input(peaky, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["harness", "--model-dir", str(peaky), "--eval-cfg", json.dumps(EVAL), "--out", str(peaky / "m.json")])
    assert exc.value.code == 2 and "--model-dir" in capsys.readouterr().err
    assert not (peaky / "m.json").exists()


def test_agreement_table_counts_and_lists_the_samples_scored_differently(tmp_path):
    from ordermerge.analysis.harness import agreement_markdown, agreement_table, tidy_harness

    ident = {
        "model": "m",
        "task": "gsm",
        "scheme": "shuffle",
        "kind": "single",
        "method": "single",
        "seed": None,
        "run": 0,
        "epoch": 2,
    }
    ours = [
        {"sample_id": "a", "generation": "#### 5", "correct": True},
        {"sample_id": "b", "generation": "7", "correct": False},
    ]
    theirs = [
        {"harness": "ordermerge_gsm", "sample_id": "a", "cut": "#### 5", "answer": "5", "exact_match": 1.0},
        {"harness": "ordermerge_gsm", "sample_id": "b", "cut": "8", "answer": "8", "exact_match": 1.0},
    ]
    (tmp_path / "e.json").write_text(json.dumps({**ident, "task_metric": "exact_match", "exact_match": 0.5}))
    write_jsonl(tmp_path / "e.generations.jsonl", ours)
    rows = [
        {**ident, "harness": "ordermerge_gsm", "metric": "exact_match", "filter": "ordermerge", "value": 1.0, "n": 2},
        {**ident, "harness": "gsm8k", "metric": "exact_match", "filter": "strict-match", "value": 0.0, "n": 9},
    ]
    stock = [{**t, "filter": "strict-match", "answer": "[invalid]", "exact_match": 0.0} for t in theirs]
    rows.append(
        {**ident, "harness": "ordermerge_gsm", "metric": "exact_match", "filter": "strict-match", "value": 0.0, "n": 2}
    )
    (tmp_path / "h.json").write_text(json.dumps({**ident, "rows": rows}))
    write_jsonl(tmp_path / "h.samples.jsonl", [{**t, "filter": "ordermerge"} for t in theirs] + stock)
    table, differ = agreement_table([(tmp_path / "e", tmp_path / "h")])
    [row] = table.to_dict("records")
    assert (row["ordermerge"], row["lm_eval"], row["n_ordermerge"], row["n_lm_eval"]) == (0.5, 1.0, 2, 2)
    assert (row["disagree"], row["other_text"]) == (1, 1)
    assert (row["lm_eval_strict-match"], row["disagree_strict-match"]) == (0.0, 1)
    text = agreement_markdown(table, differ)
    assert "| m / gsm / shuffle / run0 | exact_match | 0.500 | 1.000 | 2 / 2 | 1 | 1 |" in text
    assert "| m / gsm / shuffle / run0 | 0.000 | 1 |" in text
    assert "`b` (ordermerge): gold None; ours '7' (wrong), lm-eval '8' (right); generations differ" in text
    assert "`a` (strict-match): gold None; ours '5' (right), lm-eval '[invalid]' (wrong); the same generation" in text
    tidy = tidy_harness([tmp_path / "h"])
    assert tidy[["harness", "metric"]].values.tolist() == [
        ["ordermerge_gsm", "exact_match"],
        ["gsm8k", "exact_match,strict-match"],
        ["ordermerge_gsm", "exact_match,strict-match"],
    ]
