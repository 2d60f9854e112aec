# Config validation, the registry-derived constraints and the helpers of the rules. No torch here:
# every job re-parses this file. Where an artefact lives: src/ordermerge/paths.py (P); which figures and
# tables the config asks for and what they read: src/ordermerge/analysis/plan.py (ANALYSIS).
import json
import shlex
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))  # none of these imports torch
from ordermerge.config import ConfigError, validate_config  # noqa: E402
from ordermerge import paths  # noqa: E402
from ordermerge.merging import registry  # noqa: E402
from ordermerge.merging.subsets import sweep_plan  # noqa: E402
from ordermerge.analysis.plan import Plan  # noqa: E402

try:
    config.update(validate_config(config))
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None

R = config["results_dir"]
K = config["runs"]
EPOCHS = config["train"]["epochs"]
MERGE_EPOCH = config["merge"]["epoch"] or EPOCHS
THREADS = config["threads_per_job"]
MODELS = list(config["models"])
TASKS = list(config["tasks"])
SCHEMES = config["schemes"]
P = paths.Paths(R)
ANALYSIS = Plan(config, R)


def names_pattern(names):
    """A wildcard constraint matching exactly these names (models or tasks)."""
    return "|".join(map(re.escape, names))


wildcard_constraints:
    model=names_pattern(MODELS),
    task=names_pattern(TASKS),
    scheme="shuffle|fixbatch",
    run=r"\d+",
    epoch=r"\d+",
    method=registry.key_pattern(),
    mseed=r"\d+",


def as_json(obj):
    """A config slice for a shell argument (quote it with :q in the rule)."""
    return json.dumps(obj, sort_keys=True)


# prepare-data writes heldout.jsonl exactly for the tasks with n_heldout > 0 (the config requires one
# for every task when a configured method chooses on data). Rule prepare_data declares it when every
# task has one; when only some do, those get prepare_data_heldout (the same command).
HELDOUT_TASKS = [t for t in TASKS if config["tasks"][t]["n_heldout"] > 0]
PLAIN_TASKS = [t for t in TASKS if t not in HELDOUT_TASKS]


def split_outputs(heldout):
    """prepare_data's outputs: train, val, test and, with ``heldout``, the held-out split."""
    names = ["train", "val", "test", *(["heldout"] if heldout else [])]
    return {name: P.partial("split", split=name) for name in names}


# --- helpers of the stage rules (rules and functions live apart: the rule files hold rules only) ---


def remote_code_args(model):
    """--trust-remote-code only when the config says so, always with the reviewed revision it requires
    (a string, quoted here: "" for the default, as before, so no existing base model is re-run).
    """
    args = ["--trust-remote-code"] if model["trust_remote_code"] else []
    args += ["--revision", model["revision"]] if model["revision"] else []
    return " ".join(map(shlex.quote, args))


def eval_shell(model_dir):
    return (
        f"ordermerge evaluate --model-dir {model_dir} --val {{input.val}} --test {{input.test}} "
        "--task-spec {params.task_spec:q} --eval-cfg {params.eval_cfg:q} --identity {params.identity:q} "
        "--threads {threads} --out {output.metrics} --generations {output.generations} "
        "--val-losses {output.val_losses} > {log} 2>&1"
    )


def fine_tune_launcher(resources, threads):
    """One process, or one per GPU under torchrun when the job holds several (train.parallel: ddp or fsdp)."""
    gpus = int(resources.get("gpu", 0) or 0)
    if gpus <= 1:
        return f"ordermerge fine-tune --threads {threads}"
    # --standalone: a private rendezvous on a free local port, so jobs sharing a node do not collide
    return (
        f"torchrun --standalone --nproc-per-node {gpus} -m ordermerge fine-tune "
        f"--threads {max(1, threads // gpus)}"
    )


def merge_inputs(w):
    return [
        P.of(
            "checkpoint",
            model=w.model,
            task=w.task,
            scheme=w.scheme,
            run=k,
            epoch=w.epoch,
        )
        for k in range(K)
    ]


def merge_flags(w, input):
    """CLI flags of a method key (registry.cli_flags); a method that chooses on data also gets the task's
    held-out split and spec (registry.needs_data)."""
    flags = registry.cli_flags(w.method, config["merge"])
    if registry.needs_data(w.method):
        flags += f" --data {input.heldout} --task-spec {shlex.quote(as_json(config['tasks'][w.task]))}"
    return flags


def heldout_input(w):
    """The held-out split, for methods that choose on data only (their inputs stay the same otherwise)."""
    return (
        {"heldout": P.of("split", model=w.model, task=w.task, split="heldout")}
        if registry.needs_data(w.method)
        else {}
    )


# K-sweep (beyond the paper): merge random subsets of the K final checkpoints and score each merge.
# The subsets come from ordermerge.merging.subsets.sweep_plan (seeded by (seed, size, index)); the merge is
# the same `ordermerge merge` as rule merge, with the first merge seed.

KSWEEP = config["ksweep"]
KSWEEP_PLAN = (
    sweep_plan(K, KSWEEP["sizes"], KSWEEP["subsets"], config["seed"])
    if KSWEEP["enabled"]
    else {}
)
KSWEEP_SEED = config["merge"]["seeds"][0]


wildcard_constraints:
    size=r"\d+",
    subset=r"\d+",


def ksweep_runs(w):
    return KSWEEP_PLAN[int(w.size)][int(w.subset)]


# Validation loss only (per-sample, token-weighted in the analysis) unless ksweep.exact_match: then the
# full evaluation, greedy decoding included (~1 min per model on 2 CPU cores at the default size).
KSWEEP_LOSS_SHELL = (
    "ordermerge sample-losses --model-dir {input.model} --split val={input.val} --task-spec {params.task_spec:q} "
    "--batch-size {params.batch} --threads {threads} --out {output.val_losses} > {log} 2>&1"
)

# Multi-task merge (paper Table 3): each task's single-task fine-tune (run multitask.run of the first
# scheme, final epoch) merged across tasks with `ordermerge merge`, then evaluated on every task.

MT = config["multitask"]
MT_SCHEME = SCHEMES[0]


# Job resources. Each rule states its built-in needs (sized for the laptop default); the config's
# `resources.default`, then `resources.<rule>`, override them (keys: workflow/schemas/config.schema.yaml).
# runtime is minutes for the first attempt: with the profile's `retries`, attempt n asks for n times
# as long, and a timed-out fine-tune restarts from its last complete epoch. The SLURM executor maps
# gpu to --gpus, mem_mb to --mem, runtime to -t and threads to --cpus-per-task; a local run counts
# gpu against `--resources gpu=N` (profiles/local). Cheap rules run on the submit host (localrules).
# This block stays last and plain Python: tests/test_slurm.py runs it alone.
_RESOURCE_NAMES = {
    "gpus": "gpu",
    "gpu_model": "gpu_model",
    "gres": "gres",
    "mem_mb": "mem_mb",
    "partition": "slurm_partition",
    "account": "slurm_account",
    "constraint": "constraint",
    "slurm_extra": "slurm_extra",
}


def _resource_overrides(rule):
    return {
        **config["resources"].get("default", {}),
        **config["resources"].get(rule, {}),
    }


def rule_resources(rule, mem_mb, runtime, gpus=0):
    """A rule's `resources:` (use as `resources: **rule_resources("fine_tune", mem_mb=..., runtime=...)`)."""
    spec = {
        "gpus": gpus,
        "mem_mb": mem_mb,
        "runtime": runtime,
        **_resource_overrides(rule),
    }
    out = {_RESOURCE_NAMES[k]: v for k, v in spec.items() if k in _RESOURCE_NAMES}
    minutes = spec["runtime"]
    out["runtime"] = lambda wildcards, attempt: minutes * attempt
    return out


def rule_threads(rule):
    """A rule's `threads:`: resources.<rule>.cpus, else resources.default.cpus, else threads_per_job."""
    return _resource_overrides(rule).get("cpus", THREADS)
