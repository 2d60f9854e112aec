# Paths, targets and config validation. No torch here: every job re-parses this file.
import json
import shlex
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from ordermerge.config import ConfigError, validate_config  # noqa: E402
from ordermerge.merging import registry  # noqa: E402  (no torch: names, parameters, flags)

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
RUN_DIR = R + "/{model}/{task}/{scheme}"


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)),
    task="|".join(map(re.escape, TASKS)),
    scheme="shuffle|fixbatch",
    run=r"\d+",
    epoch=r"\d+",
    method=registry.key_pattern(),
    mseed=r"\d+",


def as_json(obj):
    """A config slice for a shell argument (quote it with :q in the rule)."""
    return json.dumps(obj, sort_keys=True)


# Whether any configured merge (the K runs', the K-sweep's) chooses on held-out data.
HELDOUT_NEEDED = any(
    registry.needs_data(m)
    for m in config["merge"]["methods"] + (config["ksweep"]["methods"] if config["ksweep"]["enabled"] else [])
)


def merge_variants():
    """(method, seed) pairs to build: a method that draws nothing at random is built for the first seed only."""
    return registry.merge_variants(config["merge"]["methods"], config["merge"]["seeds"])


def single_eval_files(model, task, scheme):
    stems = [f"{R}/{model}/{task}/{scheme}/eval/single/run{k}" for k in range(K)]
    return [s + ext for s in stems for ext in (".json", ".val_losses.csv")]


def merged_eval_files(model, task, scheme):
    stems = [f"{R}/{model}/{task}/{scheme}/eval/merged/{m}/seed{s}" for m, s in merge_variants()]
    return [s + ext for s in stems for ext in (".json", ".val_losses.csv")]


def loss_epochs():
    return range(1, EPOCHS + 1) if config["losses"]["epochs"] == "all" else [EPOCHS]


def loss_files(model, task, scheme):
    return [f"{R}/{model}/{task}/{scheme}/losses/run{k}/epoch{e}.csv" for k in range(K) for e in loss_epochs()]


def merged_loss_files(model, task, scheme):
    """Per-sample losses of each merge method (first merge seed) at every scored epoch: Fig. 3 and 4."""
    seed = config["merge"]["seeds"][0]
    return [
        f"{R}/{model}/{task}/{scheme}/losses/merged/{method}/seed{seed}/epoch{e}.csv"
        for method in config["merge"]["methods"]
        for e in loss_epochs()
    ]


def figure_names():
    """Fig. 4 (loss vs epoch) needs more than one scored epoch: losses.epochs = all."""
    names = ["fig1", "fig3"] + (["fig4"] if len(loss_epochs()) > 1 else [])
    return [f"{n}_{m}_{t}_{s}" for n in names for m in MODELS for t in TASKS for s in SCHEMES]


def table_names():
    names = ["table1", "imbalance", "metrics"]
    if len(MODELS) > 1:
        names.append("table2")
    if set(SCHEMES) == {"shuffle", "fixbatch"}:
        names.append("table4")
    return names


def analysis_targets():
    return [f"{R}/tables/{n}.csv" for n in table_names()] + [f"{R}/figures/{f}.png" for f in figure_names()]


# Job resources. Each rule states its built-in needs (sized for the laptop default); the config's
# `resources.default`, then `resources.<rule>`, override them (keys: workflow/schemas/config.schema.yaml).
# runtime is minutes for the first attempt: with the profile's `retries`, attempt n asks for n times
# as long, and a timed-out fine-tune restarts from its last complete epoch. The SLURM executor maps
# gpu to --gpus, mem_mb to --mem, runtime to -t and threads to --cpus-per-task; a local run counts
# gpu against `--resources gpu=N` (profiles/local). Cheap rules run on the submit host.
localrules:
    prepare_data,
    orders,


_RESOURCE_NAMES = {"gpus": "gpu", "gpu_model": "gpu_model", "gres": "gres", "mem_mb": "mem_mb",
                   "partition": "slurm_partition", "account": "slurm_account", "constraint": "constraint",
                   "slurm_extra": "slurm_extra"}


def _resource_overrides(rule):
    return {**config["resources"].get("default", {}), **config["resources"].get(rule, {})}


def rule_resources(rule, mem_mb, runtime, gpus=0):
    """A rule's `resources:` (use as `resources: **rule_resources("fine_tune", mem_mb=..., runtime=...)`)."""
    spec = {"gpus": gpus, "mem_mb": mem_mb, "runtime": runtime, **_resource_overrides(rule)}
    out = {_RESOURCE_NAMES[k]: v for k, v in spec.items() if k in _RESOURCE_NAMES}
    minutes = spec["runtime"]
    out["runtime"] = lambda wildcards, attempt: minutes * attempt
    return out


def rule_threads(rule):
    """A rule's `threads:`: resources.<rule>.cpus, else resources.default.cpus, else threads_per_job."""
    return _resource_overrides(rule).get("cpus", THREADS)
