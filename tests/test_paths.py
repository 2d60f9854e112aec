"""paths.py: the one place that spells an artefact path (the rules, the analysis inputs and these tests read it)."""

from __future__ import annotations

import pytest

from ordermerge.paths import TEMPLATES, Paths


def test_concrete_paths_are_the_layout_the_results_tree_has():
    p = Paths("results")
    w = {"model": "m", "task": "t", "scheme": "shuffle"}
    assert p.of("base", model="m") == "results/m/base"
    assert p.of("split", model="m", task="t", split="heldout") == "results/m/t/data/heldout.jsonl"
    assert p.of("checkpoint", **w, run=1, epoch=3) == "results/m/t/shuffle/runs/run1/epoch3"
    assert p.of("rounded", **w, precision="bf16", run=1, epoch=3) == "results/m/t/shuffle/runs/run1/bf16/epoch3"
    w["precision"] = "fp32"
    assert (
        p.of("merged", **w, epoch=3, method="resample1", mseed=0)
        == "results/m/t/shuffle/fp32/merged/epoch3/resample1/seed0"
    )
    assert (
        p.of("merged_losses", **w, method="select", mseed=1, epoch=2)
        == "results/m/t/shuffle/fp32/losses/merged/select/seed1/epoch2.csv"
    )
    assert p.of("table", name="table1", ext="md") == "results/tables/table1.md"


def test_patterns_keep_open_wildcards_and_partial_fills_some():
    p = Paths("out/dir")
    assert p.checkpoint == "out/dir/{model}/{task}/{scheme}/runs/run{run}/epoch{epoch}"
    assert p.partial("checkpoint", epoch=3) == "out/dir/{model}/{task}/{scheme}/runs/run{run}/epoch3"
    assert p.eval_outputs("eval_merged") == {
        "metrics": "out/dir/{model}/{task}/{scheme}/{precision}/eval/merged/{method}/seed{mseed}.json",
        "generations": "out/dir/{model}/{task}/{scheme}/{precision}/eval/merged/{method}/seed{mseed}.generations.jsonl",
        "val_losses": "out/dir/{model}/{task}/{scheme}/{precision}/eval/merged/{method}/seed{mseed}.val_losses.csv",
    }
    with pytest.raises(AttributeError):
        _ = p.no_such_artefact


def test_every_template_lives_under_the_results_dir():
    assert all(t.startswith("{results}/") for t in TEMPLATES.values())


def test_analysis_reads_the_planned_evaluations_not_whatever_lies_in_the_tree(tmp_path):
    """A stale evaluation of a method no longer configured is not read (a glob used to pick it up)."""
    import json

    from ordermerge.analysis.run import evaluations, load_metrics

    cfg = {
        "models": {"m": {}},
        "tasks": {"t": {}},
        "schemes": ["shuffle"],
        "runs": 2,
        "precisions": ["fp32"],
        "merge": {"methods": ["average", "select"], "seeds": [0, 1]},
    }
    p = Paths(str(tmp_path))
    w = {"model": "m", "task": "t", "scheme": "shuffle", "precision": "fp32"}
    planned = [p.of("eval_single", **w, run=k) for k in range(2)]
    planned += [p.of("eval_merged", **w, method=m, mseed=s) for m, s in (("average", 0), ("select", 0), ("select", 1))]
    stale = p.of("eval_merged", **w, method="ties", mseed=0)
    for stem in [*planned, stale]:
        path = tmp_path / f"{stem}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"stem": stem}))
    assert sorted(str(stem) for _, stem in evaluations(cfg, tmp_path)) == sorted(planned)
    assert sorted(load_metrics(cfg, tmp_path)["stem"]) == sorted(planned)


def test_logs_of_two_results_dirs_never_share_a_file():
    from ordermerge.paths import job_benchmark, job_log

    assert job_log("fine_tune") == "logs/fine_tune/{model}_{task}_{scheme}_run{run}.log"
    assert job_log("fine_tune", "results") == job_log("fine_tune")
    assert (
        job_log("fine_tune", "results-study/linear")
        == "logs/results-study/linear/fine_tune/{model}_{task}_{scheme}_run{run}.log"
    )
    assert job_benchmark("merge", "/abs/out").startswith("logs/abs/out/merge/")
    assert job_log("analyze", "other") == "logs/other/analyze.log"
