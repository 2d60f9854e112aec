"""lm-eval-harness on an ordermerge model: its own tasks mirrored, and standard harness tasks by name.

``mirror`` writes each configured task as an lm-eval task directory: the prepared test split as local
JSONL (``dataset_path: json``) and a YAML that scores it the way ``evaluate.py`` does.

- Every doc carries ``prompt_text``, the exact string our evaluation decodes from (``prompt_text``:
  the chat template with the task's system prompt, or the plain format), so lm-eval runs with no chat
  template of its own and adds no BOS (``add_bos_token=False``: the string already has any it needs).
- Numeric tasks: ``generate_until``, greedy, ``max_gen_toks`` = eval.max_new_tokens, stopping at the
  tokenizer's EOS as ours does. Ours also stops once a ``#### <number>`` line is complete; lm-eval's
  ``until`` takes literal strings only, so it decodes on and the ``ordermerge`` filter cuts the text at
  that line (greedy decoding makes the prefix the same) and extracts the number with ``extract_number``;
  ``exact_match`` then compares it with the gold answer in the same canonical spelling ("1,000" = "1000",
  "5.0" = "5"), precomputed into the doc as ``target``.
- Text tasks (``answer: text``): ``generate_until`` as above; the filter cuts at our answer line's end
  and takes the answer as ours does (``text.extract_text_answer``), and ``process_results`` scores it
  against the gold aliases with lm-eval's own copy of SQuAD's normalisation and F1
  (``lm_eval/tasks/qasper/metrics.py``): ``exact_match`` and ``f1``, each the best over the aliases.
- Multiple-choice tasks: ``multiple_choice`` over ``continuations``, each the answer turn that
  ``choices.py`` scores (the choice and the end-of-turn marker), acc and acc_norm. acc is our
  mc_accuracy; acc_norm is lm-eval's own: lm-eval moves the prompt's final newline into every
  continuation (the same log-probability added to each choice, so acc is unchanged) and divides by
  the continuation's characters, end-of-turn marker included, so it can differ from mc_accuracy_norm.

Standard task names (gsm8k, arc_easy, ...) go to lm-eval unchanged; they need the network.
Torch-free at import: the config rules and the workflow read its names.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from ordermerge.data.formatting import IGNORE_INDEX, encode_example, extract_number, prompt_text
from ordermerge.data.kinds import kind_of
from ordermerge.scoring.text import extract_text_answer
from ordermerge.storage.atomic import atomic_path, write_json

MIRROR = "mirror"  # in eval.harness: every configured task, mirrored
TASK_PREFIX = "ordermerge_"  # a mirrored task's lm-eval name: ordermerge_<task>
FILTER = "ordermerge"  # the filter pipeline that extracts our answer
NO_ANSWER = "[invalid]"  # a generation without a number: never equal to a target
NO_GOLD = "[no gold]"  # a gold answer without a number: ours scores it wrong, so must lm-eval


# lm-eval's own answer extraction for GSM8K (lm_eval/tasks/gsm8k/gsm8k.yaml), run beside ours on the same
# generations: where they score a sample differently, tables/harness_agreement.md lists it.
STOCK_FILTERS = [
    {
        "name": "strict-match",
        "filter": [{"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"}, {"function": "take_first"}],
    },
    {
        "name": "flexible-extract",
        "filter": [
            {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
            {"function": "take_first"},
        ],
    },
]
STOCK_MATCH = {
    "ignore_case": True,
    "ignore_punctuation": False,
    "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
}


def mirror_name(task: str) -> str:
    return f"{TASK_PREFIX}{task}"


def filter_answers(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval's custom filter (``utils.py`` in the task dir calls it): our answer, numbers in canonical
    spelling; a text task's doc (it has ``targets``) gets its answer line's text."""
    from ordermerge.scoring.evaluate import cut_at_answer

    def answer(r: str, doc: dict) -> str:
        if "targets" in doc:
            return extract_text_answer(cut_at_answer(r, "text"))
        return extract_number(cut_at_answer(r)) or NO_ANSWER

    return [[answer(r, doc) for r in doc_resps] for doc_resps, doc in zip(resps, docs)]


def text_results(doc: dict, results: list[str]) -> dict:
    """A text task's ``process_results``: lm-eval's SQuAD normalisation and F1 (not ours), best over aliases."""
    from lm_eval.tasks.qasper.metrics import f1_abstractive, normalize_answer

    pred = results[0]
    return {
        "exact_match": max(float(normalize_answer(pred) == normalize_answer(g)) for g in doc["targets"]),
        "f1": max(float(f1_abstractive([pred], [g])) for g in doc["targets"]),
    }


def answer_turn(tokenizer, prompt: str, response: str, system_prompt: str | None) -> str:
    """The text of the tokens that ``encode_example`` scores after the prompt: the response and its
    end-of-turn marker, as lm-eval must see the continuation."""
    enc = encode_example(tokenizer, prompt, response, system_prompt, 10**9)
    scored = [t for t, label in zip(enc["input_ids"], enc["labels"]) if label != IGNORE_INDEX]
    return tokenizer.decode(scored, skip_special_tokens=False)


def mirror_docs(tokenizer, records: list[dict], task_spec: dict) -> list[dict]:
    """The JSONL lm-eval reads: each record with its prompt text and, for numeric tasks, the canonical
    gold answer; for text tasks the gold aliases; for MC tasks the scored continuations and the gold index."""
    system_prompt = task_spec.get("system_prompt")
    docs = []
    for r in records:
        doc = {"sample_id": r["sample_id"], "prompt_text": prompt_text(tokenizer, r["prompt"], system_prompt)}
        kind = kind_of(r)
        if kind == "text":
            doc["targets"] = r["answers"]
        elif kind == "choice":
            doc.update(
                choices=r["choices"],
                label=r["label"],
                continuations=[answer_turn(tokenizer, r["prompt"], c, system_prompt) for c in r["choices"]],
            )
        else:
            doc["target"] = extract_number(r["answer"]) or NO_GOLD
        docs.append(doc)
    return docs


class _Function(str):
    """A ``!function module.name`` reference in the task YAML."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def task_config(name: str, data_file: Path, kind: str, eos: str | None, max_new_tokens: int) -> dict:
    """The lm-eval task YAML (as a dict) of one mirrored task of answer kind ``kind`` (``kinds.KINDS``)."""
    cfg = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(data_file.parent / "hf_cache")},
        "test_split": "test",
        "doc_to_text": "prompt_text",  # a field name: the text verbatim, no Jinja (which would drop a final newline)
        "target_delimiter": "",
        "num_fewshot": 0,
        "metadata": {"version": 1.0},
    }
    if kind == "choice":
        return {
            **cfg,
            "output_type": "multiple_choice",
            "doc_to_choice": "continuations",
            "doc_to_target": "label",
            "metric_list": [
                {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")
            ],
        }
    ours = {
        "name": FILTER,
        "filter": [{"function": "custom", "filter_fn": _Function("utils.filter_answers")}, {"function": "take_first"}],
    }
    generate = {
        **cfg,
        "output_type": "generate_until",
        "generation_kwargs": {
            "until": [eos] if eos else [],
            "max_gen_toks": max_new_tokens,
            "do_sample": False,
            "temperature": 0.0,
        },
    }
    if kind == "text":
        return {
            **generate,
            "doc_to_target": "targets",
            "filter_list": [ours],
            "process_results": _Function("utils.text_results"),
            "metric_list": [
                {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("exact_match", "f1")
            ],
        }
    return {
        **generate,
        "doc_to_target": "target",
        "filter_list": [ours, *STOCK_FILTERS],
        # gsm8k's exact_match settings: they leave our canonical answers as they are.
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, **STOCK_MATCH}],
    }


def write_mirror_task(
    task_dir: str | Path, task: str, tokenizer, records: list[dict], task_spec: dict, eval_cfg: dict
) -> str:
    """Write ``task_dir``/{<name>.yaml, <name>.jsonl, utils.py}; returns the lm-eval task name."""
    task_dir, name = Path(task_dir), mirror_name(task)
    task_dir.mkdir(parents=True, exist_ok=True)
    records = records[: eval_cfg.get("n_generate")]  # the samples evaluate scores
    data = task_dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in mirror_docs(tokenizer, records, task_spec)))
    kind = kind_of(records[0]) if records else "numeric"
    cfg = task_config(name, data, kind, tokenizer.eos_token, eval_cfg["max_new_tokens"])
    (task_dir / f"{name}.yaml").write_text(yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True))
    (task_dir / "utils.py").write_text(
        "from ordermerge.scoring.harness import filter_answers, text_results  # noqa: F401\n"
    )
    return name


def _model_args(model_dir: str | Path) -> dict:
    from ordermerge.scoring.losses import default_device

    return {"pretrained": str(model_dir), "dtype": "float32", "device": default_device(), "add_bos_token": False}


def run_harness(
    model_dir: str | Path, tasks: list[str], batch_size: int, include_path: str | Path | None = None
) -> dict:
    """lm-eval's ``simple_evaluate`` on a local model directory, offline unless a standard task needs data."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    standard = [t for t in tasks if not t.startswith(TASK_PREFIX)]
    manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=bool(standard))
    return lm_eval.simple_evaluate(
        model="hf",
        model_args=_model_args(model_dir),
        tasks=list(tasks),
        batch_size=batch_size,
        task_manager=manager,
        log_samples=True,
        apply_chat_template=False,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


def tidy_rows(results: dict, identity: dict) -> list[dict]:
    """One row per (harness task, metric, filter): value, its stderr and n."""
    rows = []
    for name, metrics in results.get("results", {}).items():
        n = results.get("n-samples", {}).get(name, {}).get("effective")
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append(
                {
                    **identity,
                    "harness": name,
                    "metric": metric,
                    "filter": filt,
                    "value": float(value),
                    "stderr": stderr if isinstance(stderr, (int, float)) else None,
                    "n": n,
                }
            )
    return rows


def sample_rows(results: dict) -> list[dict]:
    """Per sample: lm-eval's raw generation (or log-likelihoods), the generation cut where ours stops,
    its filtered answer and its score."""
    from ordermerge.scoring.evaluate import cut_at_answer

    rows = []
    for name, samples in results.get("samples", {}).items():
        for s in samples:
            doc = s["doc"]
            row = {
                "harness": name,
                "sample_id": doc.get("sample_id", s.get("doc_id")),
                "filter": s.get("filter"),
                "target": s.get("target"),
            }
            if "choices" in doc and "continuations" in doc:
                row["logprobs"] = [float(r[0][0]) for r in s["resps"]]
            else:
                row["generation"] = s["resps"][0][0] if s["resps"] and s["resps"][0] else None
                kind = "text" if "targets" in doc else "numeric"
                row["cut"] = None if row["generation"] is None else cut_at_answer(row["generation"], kind)  # as ours
                row["answer"] = s["filtered_resps"][0] if s["filtered_resps"] else None
            row.update({m: s[m] for m in ("exact_match", "f1", "acc", "acc_norm") if m in s})
            rows.append(row)
    return rows


def harness_stage(
    model_dir: str | Path,
    test_path: str | Path | None,
    task_spec: dict,
    eval_cfg: dict,
    identity: dict,
    out_json: str | Path,
    out_samples: str | Path | None = None,
) -> dict:
    """The harness job of one model: what ``eval_cfg["harness"]`` names (default: ``mirror``), the mirror
    being ``identity["task"]``'s test split; writes tidy rows (and per-sample rows) atomically."""
    import tempfile

    harness = list(eval_cfg.get("harness") or [MIRROR])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ordermerge-harness-") as tmp:
        names = [t for t in harness if t != MIRROR]
        if MIRROR in harness:
            from transformers import AutoTokenizer

            from ordermerge.data.prepare import read_jsonl

            if test_path is None:
                raise ValueError("eval.harness names mirror: the task's test split (--test) is needed")
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            names.insert(
                0,
                write_mirror_task(
                    tmp, identity.get("task", "task"), tokenizer, read_jsonl(test_path), task_spec, eval_cfg
                ),
            )
        results = run_harness(model_dir, names, eval_cfg["batch_size"], tmp if MIRROR in harness else None)
    import lm_eval

    out = {
        **identity,
        "model_dir": str(model_dir),
        "lm_eval": getattr(lm_eval, "__version__", None),
        "rows": tidy_rows(results, identity),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if out_samples is not None:
        with atomic_path(out_samples) as path:
            path.write_text("".join(json.dumps(r, default=str) + "\n" for r in sample_rows(results)))
    write_json(out_json, out)
    return out
