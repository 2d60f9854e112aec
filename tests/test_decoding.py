"""Greedy decoding stops once a sequence has its answer line (numeric: `#### <n>`; text: the first
non-empty line), and cuts the generation there."""

from __future__ import annotations

import pytest
import torch

from ordermerge.data.formatting import extract_number
from ordermerge.scoring.evaluate import ANSWER_LINE, TEXT_LINE, cut_at_answer, greedy_answers
from ordermerge.scoring.losses import load_model


@pytest.mark.parametrize(
    "text, complete",
    [
        ("The answer is 5.\n#### 5\n", True),
        ("#### 1,234 \nmore", True),
        ("#### 12", False),  # the number may still grow: '#### 120'
        ("#### \n", False),  # no number yet
        ("3 + 4 = 7\nso 7 apples", False),
        ("####-3.5\n", True),
    ],
)
def test_answer_line(text, complete):
    assert (ANSWER_LINE.search(text) is not None) is complete


def test_cut_keeps_the_first_answer_and_what_extraction_reads():
    text = "The answer is 5.\n#### 5\nThe answer is 6.\n#### 6\n"
    assert cut_at_answer(text) == "The answer is 5.\n#### 5"
    assert extract_number(cut_at_answer(text)) == "5"
    assert cut_at_answer("no answer 12 13") == "no answer 12 13"


def _scripted(model, tokenizer, scripts: list[str], width_of: dict):
    """Make ``model`` emit ``scripts[row]`` character by character (the tiny tokenizer is per character),
    then 'x' forever: generate's own loop, stopping criteria and padding stay real."""
    ids = [[tokenizer.convert_tokens_to_ids(c) for c in s] for s in scripts]
    filler = tokenizer.convert_tokens_to_ids("x")
    original = model.forward

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        t = kwargs["attention_mask"].shape[1] - width_of["width"]
        logits = torch.full_like(out.logits[:, -1:, :], -1e4)
        for row in range(logits.shape[0]):
            script = ids[width_of["rows"][row]]
            logits[row, 0, script[t] if t < len(script) else filler] = 0.0
        out.logits = logits
        return out

    model.forward = forward


def test_generation_stops_per_sequence_and_per_batch(tiny_base_f32):
    model, tokenizer = load_model(tiny_base_f32)
    scripts = ["The answer is 5.\n#### 5\nThe answer is 6.\n#### 6\n", "7+3=10\n#### 10\n", "12 12 12 12 12 12"]
    records = [{"prompt": p, "answer": a} for p, a in (("aa", "5"), ("bb", "10"), ("cc", "12"))]
    state = {"width": 0, "rows": [0, 1]}
    original_tokenizer_call = tokenizer.__class__.__call__

    def call(self, texts, **kwargs):  # remember the batch's width and which records it holds
        enc = original_tokenizer_call(self, texts, **kwargs)
        state["width"] = enc["input_ids"].shape[1]
        state["rows"] = [2] if len(texts) == 1 else [0, 1]
        return enc

    tokenizer.__class__.__call__ = call
    try:
        _scripted(model, tokenizer, scripts, state)
        stats: dict = {}
        out = greedy_answers(model, tokenizer, records, None, batch_size=2, max_new_tokens=40, stats=stats)
    finally:
        tokenizer.__class__.__call__ = original_tokenizer_call
    assert out[0] == "The answer is 5.\n#### 5" and out[1] == "7+3=10\n#### 10"
    assert out[2] == ("12 12 12 12 12 12" + "x" * 40)[:40]  # never answers: runs to max_new_tokens
    first_batch = len("The answer is 5.\n#### 5\n")  # stops at the newline that completes row 0's answer
    assert stats["decode_steps"] == first_batch + 40
    # row 1 finished earlier and was padded, not decoded further
    assert stats["generated_tokens"] == first_batch + len("7+3=10\n#### 10\n") + 40


@pytest.mark.parametrize(
    "text, cut",
    [
        ("blue\nThe sky", "blue"),
        ("\n  Paris.\nmore", "\n  Paris."),  # leading blank lines are not the answer's end
        ("The answer is cold", "The answer is cold"),  # no newline yet: EOS or max_new_tokens ends it
        ("\n\n", "\n\n"),
    ],
)
def test_text_answers_end_at_their_line(text, cut):
    assert cut_at_answer(text, "text") == cut
    assert (TEXT_LINE.search(text) is not None) is (cut != text)


def test_text_generation_stops_at_the_end_of_the_answer_line(tiny_base_f32):
    """A text task's sequence stops at the newline after its answer, where a numeric one decodes on
    (no '#### <n>' line comes) to max_new_tokens."""
    model, tokenizer = load_model(tiny_base_f32)
    scripts = ["\nblue\nand more words", "light blue\n"]
    records = [{"prompt": p, "answer": a} for p, a in (("aa", "blue"), ("bb", "light blue"))]
    state = {"width": 0, "rows": [0, 1]}
    original_tokenizer_call = tokenizer.__class__.__call__

    def call(self, texts, **kwargs):
        enc = original_tokenizer_call(self, texts, **kwargs)
        state["width"] = enc["input_ids"].shape[1]
        return enc

    tokenizer.__class__.__call__ = call
    try:
        _scripted(model, tokenizer, scripts, state)
        text_stats: dict = {}
        text = greedy_answers(model, tokenizer, records, None, 2, 30, text_stats, kind="text")
        numeric_stats: dict = {}
        numeric = greedy_answers(model, tokenizer, records, None, 2, 30, numeric_stats)
    finally:
        tokenizer.__class__.__call__ = original_tokenizer_call
    assert text == ["\nblue", "light blue"]
    assert text_stats["decode_steps"] == len("light blue\n")  # the later of the two lines' ends
    assert numeric_stats["decode_steps"] == 30
    assert numeric[0] == ("\nblue\nand more words" + "x" * 30)[:30]
