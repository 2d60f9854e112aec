# Paths, targets and config validation. No torch here: every job re-parses this file.
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from ordermerge.config import ConfigError, validate_config  # noqa: E402

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
    method=r"average|select|resample\d",
    mseed=r"\d+",


def as_json(obj):
    """A config slice for a shell argument (quote it with :q in the rule)."""
    return json.dumps(obj, sort_keys=True)


def merge_variants():
    """(method, seed) pairs to build: average is deterministic, so it is built once."""
    seeds = config["merge"]["seeds"]
    out = []
    for method in config["merge"]["methods"]:
        for s in seeds[:1] if method == "average" else seeds:
            out.append((method, s))
    return out


def single_eval_files(model, task, scheme):
    return [f"{R}/{model}/{task}/{scheme}/eval/single/run{k}.json" for k in range(K)]


def merged_eval_files(model, task, scheme):
    return [f"{R}/{model}/{task}/{scheme}/eval/merged/{m}/seed{s}.json" for m, s in merge_variants()]


def loss_epochs():
    return range(1, EPOCHS + 1) if config["losses"]["epochs"] == "all" else [EPOCHS]


def loss_files(model, task, scheme):
    return [f"{R}/{model}/{task}/{scheme}/losses/run{k}/epoch{e}.csv" for k in range(K) for e in loss_epochs()]


def analysis_targets():
    return [f"{R}/tables/table1.md", f"{R}/tables/imbalance.csv"] + [
        f"{R}/figures/fig1_{m}_{t}_{s}.png" for m in MODELS for t in TASKS for s in SCHEMES
    ]
