"""What each workflow job asks its executor for: threads and resources from the config.

The rules state no threads or resources. Their built-in numbers (memory and runtime, sized for the laptop
default) live in the workflow profile, profiles/default/config.yaml (`set-resources`), which Snakemake
loads for every run from this repository. The config then says what a site or a model needs: its
`threads_per_job`, `resources.default` and `resources.<rule>` (keys: workflow/schemas/config.schema.yaml)
win over the built-in numbers. The Snakefile applies :func:`job_threads` and :func:`job_resources` to
every job rule once, after the rules are defined (workflow/rules/common.smk, apply_config_resources).

No torch here: every job re-parses the workflow.
"""

from __future__ import annotations

# config key (resources.<rule>.<key>) -> the Snakemake resource the executors read (the SLURM plugin: --gpus,
# --mem, -p, -A, -C, ...). `cpus` becomes the job's threads and `runtime` scales with the attempt.
RESOURCE_NAMES = {
    "gpus": "gpu",
    "gpu_model": "gpu_model",
    "gres": "gres",
    "mem_mb": "mem_mb",
    "partition": "slurm_partition",
    "account": "slurm_account",
    "constraint": "constraint",
    "slurm_extra": "slurm_extra",
}


def job_rules(schema: dict) -> list[str]:
    """The rules that run as jobs and take resources: the config schema's `resources` keys, less `default`."""
    return [name for name in schema["properties"]["resources"]["properties"] if name != "default"]


def overrides(config: dict, rule: str) -> dict:
    """The config's settings for one rule: `resources.default`, then `resources.<rule>` over it."""
    return {**config["resources"].get("default", {}), **config["resources"].get(rule, {})}


def job_threads(config: dict, rule: str) -> int:
    """resources.<rule>.cpus, else resources.default.cpus, else threads_per_job."""
    return overrides(config, rule).get("cpus", config["threads_per_job"])


def scaled_runtime(minutes: int):
    """A runtime resource of ``minutes`` for the first attempt and n times that for attempt n (the profile's
    `retries`; a timed-out fine-tune restarts from its last complete epoch)."""
    return lambda wildcards, attempt: minutes * attempt


def job_resources(config: dict, rule: str) -> dict:
    """The Snakemake resources the config sets for one rule. `gpu` is always there (0 unless configured:
    local runs count it against `--resources gpu=N`, and GPU jobs' shell commands read it); the others only
    where the config names them, so the workflow profile's numbers stand otherwise."""
    spec = {"gpus": 0, **overrides(config, rule)}
    out = {RESOURCE_NAMES[key]: value for key, value in spec.items() if key in RESOURCE_NAMES}
    if "runtime" in spec:
        out["runtime"] = scaled_runtime(spec["runtime"])
    return out
