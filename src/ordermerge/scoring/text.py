"""Word and phrase answers (``answer: text``): SQuAD's normalisation, exact match and token F1, and the
answer a model's generation gives.

``normalize_answer`` and ``token_f1`` are the official SQuAD v1.1 evaluation script's, which lm-eval
copies for its QA tasks (``lm_eval/tasks/qasper/metrics.py``): lower-case, drop punctuation, drop the
articles a/an/the, collapse whitespace; F1 over the bag of normalised tokens. With several gold aliases a
prediction scores its best alias (SQuAD's ``metric_max_over_ground_truths``).

The answer is the first non-empty line of the generation (decoding stops at its end, ``evaluate.py``), with a
leading "The answer is" / "Answer:" removed: a model may phrase its line that way whether or not its
training targets do, and a gold answer read from a response goes through the same function.
Torch-free: prepare-data and the harness mirror use it too.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
_PREFIX = re.compile(r"^(?:the\s+)?(?:final\s+|correct\s+)?answer\s*(?:is\s*:?|:)\s*", re.IGNORECASE)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1: lower text and remove punctuation, articles and extra whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD v1.1's F1 of the normalised tokens (0 when either side has none)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match_text(prediction: str, golds: list[str]) -> bool:
    """Right when the normalised prediction equals some normalised gold alias."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(g) for g in golds)


def best_f1(prediction: str, golds: list[str]) -> float:
    return max((token_f1(prediction, g) for g in golds), default=0.0)


def extract_text_answer(text: str) -> str:
    """The answer a generation gives: its first non-empty line, without an "The answer is" style prefix."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return _PREFIX.sub("", line, count=1).strip()
