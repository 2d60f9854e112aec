"""The prepare-data stage proper and the prepared files: seeded disjoint splits written as JSONL, and
``read_jsonl``/``refuse_over_long``, the checks every consumer of a prepared split runs."""

from __future__ import annotations

import json
from pathlib import Path

from ordermerge.data import kinds
from ordermerge.data.formatting import encode_example
from ordermerge.data.sources import load_records
from ordermerge.seeding import numpy_rng
from ordermerge.storage.atomic import atomic_path


class DataError(ValueError):
    """A dataset file or record that cannot be used as it is; the message names the file and the fix."""


SPLITS = ("train", "val", "test", "heldout")


def split_records(records: list[dict], sizes: dict[str, int], seed: int, task: str) -> dict[str, list[dict]]:
    """Disjoint train/val/test (and, if ``sizes`` names it, heldout) splits of the requested sizes, cut
    in that order from one seeded permutation: a heldout split changes none of the other three."""
    names = [*SPLITS[:3], *(["heldout"] if "heldout" in sizes else [])]
    need = sum(sizes[name] for name in names)
    if len(records) < need:
        raise DataError(
            f"task {task}: only {len(records)} usable samples but {'+'.join(names)} = {need}; "
            "lower the split sizes or raise max_length"
        )
    perm = numpy_rng(seed, "split", task).permutation(len(records))
    out, start = {}, 0
    for name in names:
        out[name] = [records[i] for i in sorted(perm[start : start + sizes[name]])]
        start += sizes[name]
    return out


def _fitting_pool(task: str, spec: dict, tokenizer, seed: int) -> tuple[list[dict], list[dict], dict[str, int]]:
    """The task's pool, the samples of it within ``max_length`` tokens, and the split sizes asked for."""
    sizes = {k: spec[f"n_{k}"] for k in ("train", "val", "test")}
    try:
        pool = load_records(task, spec, spec.get("pool_size", 4 * sum(sizes.values())), seed)
    except kinds.AnswerError as exc:  # an unclear or unreadable answer kind: the same clean refusal
        raise DataError(str(exc)) from None
    if spec.get("n_heldout", 0) > 0:
        sizes["heldout"] = spec["n_heldout"]
    fitting = []
    for r in pool:
        # An MC sample is scored with every choice: the longest (in characters) must fit too.
        response = max([r["response"], *r.get("choices", [])], key=len)
        enc = encode_example(tokenizer, r["prompt"], response, spec.get("system_prompt"), 10**9)
        if enc["length"] <= spec["max_length"]:
            fitting.append(r)
    return pool, fitting, sizes


def check_task(task: str, spec: dict, tokenizer, seed: int) -> dict:
    """Can the task's answers be scored (``kinds.check``: refused with the counts and the key to set), and
    does it have enough samples within max_length for its splits? The workflow asks before its
    first job (``onstart`` in common.smk, with the source's tokenizer alone), so that a config that would
    only fail in prepare-data, after the base model is built, fails at once with the counts and the fix."""
    pool, fitting, sizes = _fitting_pool(task, spec, tokenizer, seed)
    need = sum(sizes.values())
    if len(fitting) < need:
        raise DataError(
            f"task {task}: only {len(fitting)} of the {len(pool)} samples in the pool fit in max_length "
            f"{spec['max_length']} tokens, but {'+'.join(sizes)} = {need} are needed; raise tasks.{task}.max_length, "
            f"raise tasks.{task}.pool_size (where the source generates its samples), or lower the split sizes"
        )
    return {
        "task": task,
        "pool": len(pool),
        "fitting_max_length": len(fitting),
        "needed": need,
        **kinds.describe(task, spec, pool),
    }


def prepare_task(task: str, spec: dict, tokenizer, seed: int, out_dir: str | Path) -> dict:
    """Load, filter by token length, split and write ``{train,val,test}.jsonl``, and ``heldout.jsonl``
    when ``n_heldout`` > 0 (data for choices such as greedy soup's, scored on no table); returns a summary.

    The default pool (4x train+val+test) leaves out heldout, so adding it keeps the other files' bytes."""
    pool, fitting, sizes = _fitting_pool(task, spec, tokenizer, seed)
    splits = split_records(fitting, sizes, seed, task)
    out_dir = Path(out_dir)
    for name, rows in splits.items():
        with atomic_path(out_dir / f"{name}.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return {
        "task": task,
        "pool": len(pool),
        "fitting_max_length": len(fitting),
        **{k: len(v) for k, v in splits.items()},
        **kinds.describe(task, spec, pool),
    }


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
                raise DataError(
                    f"{path}:{n}: sample {r.get('sample_id')!r} has an empty response "
                    f"(nothing to learn or score): {fix}"
                )
            sid = r.get("sample_id")
            if sid is not None and sid in first_line:
                raise DataError(
                    f"{path}:{n}: duplicate sample_id {sid!r} (first on line {first_line[sid]}); "
                    f"losses and pairings are keyed by it: {fix}"
                )
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
            raise DataError(
                f"{where} is {e['length']} tokens, over max_length {max_length}; prepare-data drops "
                "such samples, so re-run it with this max_length, or raise tasks.<task>.max_length"
            )
