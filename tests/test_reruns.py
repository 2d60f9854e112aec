"""Reruns only what a setting changes (issue 21): every config key, changed on a finished tree, reruns exactly
the stages src/ordermerge/reruns.py declares (docs/reruns.md is made from that table).

The finished tree is fake and fast, never a real run: the dry run of tests/configs/smoke.yaml plus
tests/configs/reruns.yaml (every stage in the DAG) names every job's outputs; they are made as empty files and
directories, and `snakemake --touch --forceall` records each job's metadata (params, shell text, inputs) as
if it had run. Each key is then changed in a config overlay and `snakemake -n` says which rules it would run
and why. The onstart data check never runs its tokenizer here: the split files exist (common.smk skips them).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, SMOKE, snakemake
from ordermerge import reruns
from ordermerge.config import load_schema

TREE_CONFIG = [SMOKE, ROOT / "tests" / "configs" / "reruns.yaml"]
# Snakemake's reasons for a job (the dry run's `reason:` line of each job): the job reruns for its own sake
# (Snakemake checks these only for a job that no job before it already reruns), or it is new, or it only
# follows a job before it. A new job's "Updated input files" says nothing: it runs anyway.
OWN = (
    "params have changed",
    "code has changed",
    "set of input files has changed",
    "software environment definition has changed",
    "updated input files",
)
NEW = ("missing output files", "output files have to be generated")


def planned(proc) -> dict[str, set[str]]:
    """{"reruns": rules with a job that reruns for its own sake, "new": rules with new jobs, "follows": rules
    whose jobs rerun only because a job before them does} from a dry run's job listing."""
    out = {"reruns": set(), "new": set(), "follows": set()}
    rule = None
    for line in (proc.stdout + proc.stderr).splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            rule = m.group(1)
        elif (m := re.match(r"^\s+reason: (.*)$", line)) and rule not in (None, "all"):
            reasons = [r.split(":")[0].strip().lower() for r in m.group(1).split("; ")]
            kind = (
                "new"
                if any(r.startswith(NEW) for r in reasons)
                else "reruns"
                if any(r.startswith(OWN) for r in reasons)
                else "follows"
            )
            out[kind].add(rule)
    return out


def tree_config() -> dict:
    cfg: dict = {}
    for path in TREE_CONFIG:
        cfg = reruns._merge(cfg, yaml.safe_load(Path(path).read_text()))
    return cfg


def build_finished_tree(work: Path) -> Path:
    """A results tree in ``work`` whose every job Snakemake believes ran with the test config (seconds, not a
    run)."""
    t0 = time.perf_counter()
    dry = snakemake(work, "-n", configfile=TREE_CONFIG)
    outputs = {
        o.strip()
        for line in (dry.stdout + dry.stderr).splitlines()
        if (m := re.match(r"^\s+output: (.*)$", line))
        for o in m.group(1).split(",")
    }
    for out in outputs:
        path = work / out
        if path.suffix:  # every file the workflow writes has an extension; every directory output has none
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        else:
            path.mkdir(parents=True, exist_ok=True)
    snakemake(work, "--touch", "--forceall", "--notemp", configfile=TREE_CONFIG)
    assert planned(snakemake(work, "-n", configfile=TREE_CONFIG)) == {"reruns": set(), "new": set(), "follows": set()}
    print(f"fake finished tree: {len(outputs)} outputs in {time.perf_counter() - t0:.1f} s")
    return work


@pytest.fixture(scope="module")
def finished_tree(tmp_path_factory):
    return build_finished_tree(tmp_path_factory.mktemp("finished"))


def test_table_has_every_config_key():
    """One entry per leaf key of the schema (merge parameters and precisions as the registries inject them)."""
    keys = reruns.leaf_keys(load_schema())
    assert sorted(reruns.TABLE) == sorted(keys), set(keys) ^ set(reruns.TABLE)
    for key, effect in reruns.TABLE.items():
        assert set(effect.reruns) <= set(reruns.RULES), key


def test_doc_is_the_table():
    assert (ROOT / "docs" / "reruns.md").read_text() == reruns.markdown(), (
        "regenerate: PYTHONPATH=src python -m ordermerge.reruns > docs/reruns.md"
    )


def test_overlay_sets_the_first_entry():
    cfg = tree_config()
    assert reruns.overlay("tasks.*.n_test", reruns.Effect(5), cfg) == {"tasks": {"gsm": {"n_test": 5}}}
    assert reruns.overlay("resources.*.cpus", reruns.Effect(2), cfg) == {"resources": {"default": {"cpus": 2}}}
    assert reruns.overlay("train.lora_r", reruns.Effect(8, also={"train": {"method": "lora"}}), cfg) == {
        "train": {"lora_r": 8, "method": "lora"}
    }


def test_planned_reads_the_reasons():
    class Proc:
        stdout = (
            "rule fine_tune:\n    output: a\n    reason: Params have changed since last execution: x: 1\n"
            "rule merge:\n    reason: Missing output files: m; Updated input files: a\n"
            "localrule analyze:\n    reason: Input files updated by another job: m\n"
            "rule merge:\n    reason: Set of input files has changed since last execution\n"
            "localrule all:\n    reason: Input files updated by another job: t\n"
        )
        stderr = ""

    assert planned(Proc) == {"reruns": {"fine_tune", "merge"}, "new": {"merge"}, "follows": {"analyze"}}


@pytest.mark.parametrize("key", list(reruns.TABLE))
def test_key_reruns_what_the_table_says(key, finished_tree, tmp_path):
    effect = reruns.TABLE[key]
    change = tmp_path / "change.yaml"
    change.write_text(yaml.safe_dump(reruns.overlay(key, effect, tree_config())))
    t0 = time.perf_counter()
    proc = snakemake(finished_tree, "-n", configfile=[*TREE_CONFIG, change], check=False)
    seconds = time.perf_counter() - t0
    if effect.refused:
        assert proc.returncode != 0, f"{key}: declared refused, but the change was accepted"
        assert key.split(".")[-1] in proc.stdout + proc.stderr, f"{key}: refused, but not for this key"
        return
    assert proc.returncode == 0, f"{key}: change refused:\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}"
    plan = planned(proc)
    assert plan["reruns"] == set(effect.reruns), (
        f"{key}: reruns {sorted(plan['reruns'])}, declared {sorted(effect.reruns)}"
    )
    assert bool(plan["new"]) == effect.adds, f"{key}: new jobs of {sorted(plan['new'])}, declared adds={effect.adds}"
    assert seconds < 60, f"{key}: the dry run took {seconds:.0f} s"
