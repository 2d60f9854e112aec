# Paths, targets and config validation. No torch here: every job re-parses this file.
import json
import os
import shlex
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from ordermerge.config import ConfigError, load_schema, validate_config  # noqa: E402
from ordermerge import (
    paths,
    plan,
)  # noqa: E402  (no torch: paths, table and figure names)
from ordermerge import resources as job_resources  # noqa: E402  (no torch)
from ordermerge.merging import (
    registry,
)  # noqa: E402  (no torch: names, parameters, flags)
from ordermerge.merging.subsets import sweep_plan  # noqa: E402
from ordermerge.seeding import derive_seed  # noqa: E402
from ordermerge.storage import precisions  # noqa: E402  (no torch: names and dtypes)
from ordermerge.train.tracking import REPORT_TO_ENV  # noqa: E402  (no torch)

try:
    config.update(validate_config(config))
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None

R = config["results_dir"]
K = config["runs"]
EPOCHS = config["train"]["epochs"]
MERGE_EPOCH = config["merge"]["epoch"] or EPOCHS
MODELS = list(config["models"])
TASKS = list(config["tasks"])
SCHEMES = config["schemes"]
# stored forms of every fine-tune; the first is the headline
PRECISIONS = config["precisions"]
SAVE_DTYPE = config["train"]["save_dtype"]
ORDER_SEED = config["seed"] if config["order_seed"] is None else config["order_seed"]
LOSS_METHODS = (
    config["losses"]["methods"] or config["merge"]["methods"]
)  # Fig. 3/4's merges
P = paths.Paths(R)  # every artefact path: src/ordermerge/paths.py
HARNESS = config["eval"]["harness"]  # lm-eval on every evaluated model; [] = off


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)),
    task="|".join(map(re.escape, TASKS)),
    scheme="shuffle|fixbatch",
    run=r"\d+",
    epoch=r"\d+",
    method=registry.key_pattern(),
    mseed=r"\d+",
    precision="|".join(map(re.escape, precisions.PRECISIONS)),


def as_json(obj):
    """A config slice for a shell argument (quote it with :q in the rule)."""
    return json.dumps(obj, sort_keys=True)


def without(section, *keys):
    """A config section less the keys its rule's command does not read: they stay out of its params, so
    changing them reruns nothing (docs/reruns.md)."""
    return {k: v for k, v in section.items() if k not in keys}


# What the commands after prepare_data read of a task's entry: the splits hold its samples, so the other keys
# (source, sizes, pool, fields) reach those commands through prepare_data's new files, not their params.
MODEL_TASK_KEYS = ("max_length", "system_prompt")


def task_spec_json(w):
    """Params: the task's entry as the model commands read it (fine-tune, evaluate, harness, sample-losses,
    a merge that chooses on held-out data)."""
    return as_json({k: config["tasks"][w.task].get(k) for k in MODEL_TASK_KEYS})


# train.report_to reaches fine_tune jobs through the environment, not their params: trackers cannot change
# a checkpoint (local jobs inherit it; cluster jobs re-parse this file, which sets it again).
os.environ[REPORT_TO_ENV] = ",".join(config["train"]["report_to"])


# Whether any configured merge (the K runs', the K-sweep's) chooses on held-out data.
HELDOUT_NEEDED = any(
    registry.needs_data(m)
    for m in config["merge"]["methods"]
    + (config["ksweep"]["methods"] if config["ksweep"]["enabled"] else [])
)


def merge_variants():
    """(method, seed) pairs to build: a method that draws nothing at random is built for the first seed only."""
    return registry.merge_variants(config["merge"]["methods"], config["merge"]["seeds"])


def eval_files(stem, **wildcards):
    """The metrics JSON and per-sample validation losses of one evaluation (what the analysis reads)."""
    outputs = P.eval_outputs(stem)
    return [outputs[kind].format(**wildcards) for kind in ("metrics", "val_losses")]


def stored(model, task, scheme, precision, run, epoch):
    """Run ``run``'s checkpoint of ``epoch`` in ``precision``: as fine_tune saved it, or its rounded twin."""
    template = (
        "checkpoint" if precisions.is_saved_form(precision, SAVE_DTYPE) else "rounded"
    )
    return P.of(
        template,
        model=model,
        task=task,
        scheme=scheme,
        precision=precision,
        run=run,
        epoch=epoch,
    )


def stored_checkpoint(w, epoch=None):
    """Input function: the checkpoint of w.run at ``epoch`` (default w.epoch) in w.precision."""
    return stored(
        w.model,
        w.task,
        w.scheme,
        w.precision,
        w.run,
        w.epoch if epoch is None else epoch,
    )


def rounding_seed(w):
    """Stochastic rounding's seed, one per checkpoint; 0 for a deterministic rounding (it reads none)."""
    if not precisions.get(w.precision).random:
        return 0
    return derive_seed(
        config["seed"], "round", w.model, w.task, w.scheme, w.run, w.epoch
    ) % (2**31)


def single_eval_files(model, task, scheme, precision):
    return [
        f
        for k in range(K)
        for f in eval_files(
            "eval_single",
            model=model,
            task=task,
            scheme=scheme,
            precision=precision,
            run=k,
        )
    ]


def merged_eval_files(model, task, scheme, precision):
    w = {"model": model, "task": task, "scheme": scheme, "precision": precision}
    return [
        f
        for m, s in merge_variants()
        for f in eval_files("eval_merged", **w, method=m, mseed=s)
    ]


def eval_identity(w):
    """What an evaluation records about its model (evaluate and harness rules): single run w.run, or the
    merge w.method with seed w.mseed (the merged rules' wildcards)."""
    merged = hasattr(w, "method")
    return as_json(
        {
            "model": w.model,
            "task": w.task,
            "scheme": w.scheme,
            "precision": w.precision,
            "kind": "merged" if merged else "single",
            "method": w.method if merged else "single",
            "run": None if merged else int(w.run),
            "seed": int(w.mseed) if merged else None,
            "epoch": MERGE_EPOCH if merged else EPOCHS,
        }
    )


def loss_split_files(w):
    """The splits whose per-sample losses are scored (losses.splits), of w's model and task."""
    return [
        P.of("split", model=w.model, task=w.task, split=s)
        for s in config["losses"]["splits"]
    ]


def harness_files(model, task, scheme, precision):
    """lm-eval's metrics of every single and merged model (eval.harness; none when it is [])."""
    if not HARNESS:
        return []
    w = {"model": model, "task": task, "scheme": scheme, "precision": precision}
    stems = [("harness_single", {"run": k}) for k in range(K)]
    stems += [
        ("harness_merged", {"method": m, "mseed": s}) for m, s in merge_variants()
    ]
    return [
        P.eval_outputs(stem, paths.HARNESS_FILES)["metrics"].format(**w, **more)
        for stem, more in stems
    ]


def loss_epochs():
    return plan.loss_epochs(config)


def loss_files(model, task, scheme, precision):
    w = {"model": model, "task": task, "scheme": scheme, "precision": precision}
    return [
        P.of("run_losses", **w, run=k, epoch=e) for k in range(K) for e in loss_epochs()
    ]


def merged_loss_files(model, task, scheme, precision):
    """Per-sample losses of each merge method (first merge seed) at every scored epoch: Fig. 3 and 4."""
    seed = config["merge"]["seeds"][0]
    w = {"model": model, "task": task, "scheme": scheme, "precision": precision}
    return [
        P.of("merged_losses", **w, method=method, mseed=seed, epoch=e)
        for method in LOSS_METHODS
        for e in loss_epochs()
    ]


# Precisions rounded from the saved checkpoints: the storage-loss figure and table compare them with it.
ROUNDED = plan.rounded(config)


def rounding_files(model, task, scheme):
    """Every rounded final checkpoint: the storage-loss figure reads their round.json."""
    return [
        stored(model, task, scheme, p, k, EPOCHS) for p in ROUNDED for k in range(K)
    ]


def analysis_targets():
    """The tables and figures the analysis writes (src/ordermerge/plan.py: the analysis decides by it too)."""
    tables = [P.of("table", name=n, ext="csv") for n in plan.table_names(config)]
    return [*tables, *(P.of("figure", name=f) for f in plan.figure_names(config))]


# --- helpers of the stage rules (rules and functions live apart: the rule files hold rules only) ---


def remote_code_args(model):
    """--trust-remote-code only when the config says so, always with the reviewed revision it requires
    (a string, quoted here: "" for the default, as before, so no existing base model is re-run).
    """
    args = ["--trust-remote-code"] if model["trust_remote_code"] else []
    args += ["--revision", model["revision"]] if model["revision"] else []
    return " ".join(map(shlex.quote, args))


# --- GPU slots: several GPUs on one machine, each GPU job on its own (src/ordermerge/gpu_slots/) ---
# A job holding g >= 1 GPUs (resources.<rule>.gpus) runs behind `python -m ordermerge.gpu_slots --gpus g --`.
# The launcher decides at run time, so the workflow never asks which executor runs it: on a workstation it
# claims g free GPUs (flock, freed by the kernel when the job ends, kill -9 included) and sets
# CUDA_VISIBLE_DEVICES, so `--resources gpu=N` (profiles/local) runs N GPU jobs at once on N different cards;
# inside a SLURM job (SLURM_JOB_ID), whose GPUs the scheduler chose, it runs the command unchanged.


def gpu_slots_prefix(gpus):
    """`python -m ordermerge.gpu_slots --gpus <g> -- ` for a job holding g >= 1 GPUs, else ''."""
    gpus = int(gpus or 0)
    return f"python -m ordermerge.gpu_slots --gpus {gpus} -- " if gpus >= 1 else ""


class _GpuSlotsField:
    """`{GPU_SLOTS:{resources.gpu}u}` in a shell command formats as the job's gpu_slots_prefix (the
    nested field is the job's GPU count; 'u': never shell-quoted)."""

    def __format__(self, spec):
        return gpu_slots_prefix(spec.rstrip("u") or 0)


GPU_SLOTS = _GpuSlotsField()
GPU_SLOTS_FIELD = "{GPU_SLOTS:{resources.gpu}u}"
# Only a config that gives a GPU to some job puts the launcher field into the shared shell strings below, and
# every other config keeps their exact text, since Snakemake reruns a job whose shell text changed.
GPU_CONFIG = any(
    int(spec.get("gpus", 0) or 0) >= 1 for spec in config["resources"].values()
)


def gpu_slots_shell(cmd):
    """A rule's shell command, behind the slot launcher when the job holds GPUs (decided per job)."""
    return f"{GPU_SLOTS_FIELD}{cmd}" if GPU_CONFIG else cmd


def eval_shell(model_dir):
    return gpu_slots_shell(
        f"ordermerge evaluate --model-dir {model_dir} --val {{input.val}} --test {{input.test}} "
        "--task-spec {params.task_spec:q} --eval-cfg {params.eval_cfg:q} --identity {params.identity:q} "
        "--threads {threads} --out {output.metrics} --generations {output.generations} "
        "--val-losses {output.val_losses} > {log} 2>&1"
    )


def harness_shell(model_dir):
    return gpu_slots_shell(
        f"ordermerge harness --model-dir {model_dir} --test {{input.test}} "
        "--task-spec {params.task_spec:q} --eval-cfg {params.eval_cfg:q} --identity {params.identity:q} "
        "--threads {threads} --out {output.metrics} --samples {output.samples} > {log} 2>&1"
    )


def fine_tune_launcher(resources, threads):
    """One process, or one per GPU under torchrun when the job holds several (train.parallel: ddp or fsdp),
    behind the GPU slot launcher (gpu_slots_prefix)."""
    gpus = int(resources.get("gpu", 0) or 0)
    slots = gpu_slots_prefix(gpus)
    if gpus <= 1:
        return f"{slots}ordermerge fine-tune --threads {threads}"
    # --standalone: a private rendezvous on a free local port, so jobs sharing a node do not collide
    return (
        f"{slots}torchrun --standalone --nproc-per-node {gpus} -m ordermerge fine-tune "
        f"--threads {max(1, threads // gpus)}"
    )


def merge_inputs(w):
    return [
        stored(w.model, w.task, w.scheme, w.precision, k, w.epoch) for k in range(K)
    ]


def merge_flags(w):
    """CLI flags of a method key (registry.cli_flags); a method that chooses on data also gets the task's
    held-out split (heldout_input) and spec (registry.needs_data). A function of the wildcards alone: Snakemake
    leaves params computed from a job's input out of its params trigger, so a merge parameter's change
    (merge.scale, ...) would not rerun the merges that read it."""
    flags = registry.cli_flags(w.method, config["merge"])
    if registry.needs_data(w.method):
        heldout = P.of("split", model=w.model, task=w.task, split="heldout")
        flags += f" --data {heldout} --task-spec {shlex.quote(task_spec_json(w))}"
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


def ksweep_eval_files(model, task, scheme, precision):
    kinds = ("val_losses", "metrics") if KSWEEP["exact_match"] else ("val_losses",)
    outputs = P.eval_outputs("ksweep_merged")
    return [
        outputs[kind].format(
            model=model,
            task=task,
            scheme=scheme,
            precision=precision,
            size=n,
            subset=i,
            method=method,
        )
        for n, subsets in KSWEEP_PLAN.items()
        for i in range(len(subsets))
        for method in KSWEEP["methods"]
        for kind in kinds
    ]


def ksweep_targets():
    if not KSWEEP["enabled"]:
        return []
    figures = [P.of("figure", name=f) for f in plan.ksweep_figure_names(config)]
    tables = [P.of("table", name="ksweep", ext=ext) for ext in ("csv", "md")]
    return [*tables, *figures]


# Validation loss only (per-sample, token-weighted in the analysis) unless ksweep.exact_match: then the
# full evaluation, greedy decoding included (~1 min per model on 2 CPU cores at the default size).
KSWEEP_LOSS_SHELL = gpu_slots_shell(
    "ordermerge sample-losses --model-dir {input.model} --split val={input.val} --task-spec {params.task_spec:q} "
    "--batch-size {params.batch} --threads {threads} --out {output.val_losses} > {log} 2>&1"
)

# Multi-task merge (paper Table 3): each task's single-task fine-tune (run multitask.run of the first
# scheme, final epoch) merged across tasks with `ordermerge merge`, then evaluated on every task.

MT = config["multitask"]
MT_SCHEME = SCHEMES[0]


def multitask_eval_files(model, precision):
    return [
        f
        for t in MT["tasks"]
        for m, s in registry.merge_variants(MT["methods"], MT["seeds"])
        for f in eval_files(
            "eval_multitask",
            model=model,
            task=t,
            precision=precision,
            method=m,
            mseed=s,
        )
    ]


def multitask_targets():
    return (
        [P.of("table", name="table3", ext=ext) for ext in ("csv", "md")]
        if MT["tasks"]
        else []
    )


def analysis_inputs(w):
    files = []
    for m in MODELS:
        for t in TASKS:
            for s in SCHEMES:
                files += [
                    P.of("order", model=m, task=t, scheme=s, run=k) for k in range(K)
                ]
                files += rounding_files(m, t, s)
                # the storage tables compare every stored model's task vector (analysis/storage.py)
                files += [
                    P.of(
                        "merged",
                        model=m,
                        task=t,
                        scheme=s,
                        precision=p,
                        epoch=MERGE_EPOCH,
                        method=meth,
                        mseed=seed,
                    )
                    for p in PRECISIONS
                    for meth, seed in merge_variants()
                ] * bool(ROUNDED)
                for p in PRECISIONS:
                    files += single_eval_files(m, t, s, p)
                    files += merged_eval_files(m, t, s, p)
                    files += harness_files(m, t, s, p)
                    files += loss_files(m, t, s, p)
                    files += merged_loss_files(m, t, s, p)
                    files += ksweep_eval_files(m, t, s, p)
        if MT["tasks"]:
            files += [f for p in PRECISIONS for f in multitask_eval_files(m, p)]
    return files


# Job resources. The rules state none: their built-in numbers (mem_mb, runtime; sized for the laptop default)
# are the workflow profile's `set-resources` (profiles/default/config.yaml, which Snakemake loads for every
# run), and the config's threads_per_job, `resources.default`, then `resources.<rule>` win over them
# (apply_config_resources, below; keys: workflow/schemas/config.schema.yaml). runtime is minutes for the first
# attempt: with the profile's `retries`, attempt n asks for n times as long, and a timed-out fine-tune
# restarts from its last complete epoch. The SLURM executor maps gpu to --gpus, mem_mb to --mem, runtime to -t
# and threads to --cpus-per-task; a local run counts gpu against `--resources gpu=N` (profiles/local) and
# gives each GPU job its own card (GPU slots, above). Cheap rules run on the submit host.
localrules:
    prepare_data,
    orders,


def check_data_before_any_job():
    """Before the first job: can every task whose splits are not prepared yet be scored (its answer kind,
    set or inferred, reads its gold answers) and does it have enough samples within max_length?
    (`ordermerge check-data`, the model source's tokenizer alone: seconds.) Otherwise the run would build
    the base model and only then fail in prepare_data."""
    import subprocess

    for model, spec in config["models"].items():
        built = Path(P.of("base", model=model))
        source = (
            ["--source", str(built)]
            if built.exists()
            else ["--source", spec["source"], *shlex.split(remote_code_args(spec))]
        )
        for task, tspec in config["tasks"].items():
            if Path(P.of("split", model=model, task=task, split="train")).exists():
                continue
            cmd = [
                sys.executable,
                "-m",
                "ordermerge.cli",
                "check-data",
                *source,
                "--task",
                task,
                "--spec",
                as_json(tspec),
                "--seed",
                str(config["seed"]),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise WorkflowError(
                    f"models.{model} / tasks.{task}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
                )
            # An answer kind inferred from the data (docs/own-data.md) is said before the first job.
            lines = proc.stdout.strip().splitlines()
            summary = (
                json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
            )
            if summary.get("answer_from", "").startswith("inferred"):
                print(
                    f"tasks.{task}: answer: {summary['answer']} ({summary['answer_from']})",
                    file=sys.stderr,
                )


onstart:
    check_data_before_any_job()


def apply_config_resources():
    """Set every job rule's threads and the resources the config names (ordermerge.resources), once, after
    all rules are defined (the end of the Snakefile).

    Snakemake documents no Snakefile API that sets a rule's resources after its definition: its documented
    routes are a rule's own `threads:`/`resources:` (which would repeat the rule's name in ~15 rules) and the
    command line's, or a profile's, `--set-threads`/`--set-resources` (which cannot read the config). So this
    assigns `rule.resources[name]` on the rules `workflow.get_rule` returns: a mapping that Snakemake has kept
    since version 3 (a Resources object since 9), whose `_cores` entry is the rule's threads. What it sets
    is what the dry run prints per job (tests/test_configs_dryrun.py), so a change of that API fails there.
    The config wins over --set-resources/--set-threads too: change a rule's numbers in the config.
    """
    for name in job_resources.job_rules(load_schema()):
        job_rule = workflow.get_rule(name)
        job_rule.resources["_cores"] = job_resources.job_threads(config, name)
        for resource, value in job_resources.job_resources(config, name).items():
            job_rule.resources[resource] = value
