"""K-sweep subsets, the K-sweep and Table 3 builders on synthetic inputs, their config rules, and the
DAG with both enabled (dry run)."""

from __future__ import annotations

import copy
from math import comb
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ordermerge.analysis.subsets import (
    ksweep_markdown,
    ksweep_table,
    plot_ksweep,
    table3,
    table3_markdown,
    tidy_extra,
    token_mean_loss,
)
from ordermerge.config import ConfigError, load_config, validate_config
from ordermerge.merging.registry import merge_variants
from ordermerge.merging.subsets import draw_subsets, sweep_plan, sweep_sizes

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "tests" / "configs" / "smoke.yaml"


# --- subsets -----------------------------------------------------------------------------------


def test_default_sizes_are_even_up_to_k_and_k_itself():
    assert sweep_sizes(4, None) == [2, 4]
    assert sweep_sizes(5, None) == [2, 4, 5]
    assert sweep_sizes(8, [8, 2, 2]) == [2, 8]


@pytest.mark.parametrize("runs,size,count", [(4, 2, 3), (8, 4, 5), (20, 10, 7), (6, 3, 20)])
def test_subsets_are_distinct_sorted_and_of_the_right_size(runs, size, count):
    subsets = draw_subsets(runs, size, count, seed=1234)
    assert len(subsets) == min(count, comb(runs, size))
    assert len(set(subsets)) == len(subsets)
    for s in subsets:
        assert len(s) == size and list(s) == sorted(set(s)) and all(0 <= k < runs for k in s)


def test_subsets_are_deterministic_and_prefix_stable():
    a = draw_subsets(8, 4, 5, seed=7)
    assert a == draw_subsets(8, 4, 5, seed=7)
    assert draw_subsets(8, 4, 3, seed=7) == a[:3]  # more subsets never change the earlier ones
    assert draw_subsets(8, 4, 5, seed=8) != a


def test_asking_for_more_than_exist_gives_every_subset_once():
    assert draw_subsets(4, 4, 3, seed=0) == [(0, 1, 2, 3)]
    assert sorted(draw_subsets(4, 3, 10, seed=0)) == [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)]


def test_subsets_cover_the_runs_uniformly():
    counts = np.zeros(10)
    for seed in range(300):
        for s in draw_subsets(10, 2, 1, seed):
            counts[list(s)] += 1
    assert counts.min() > 0.7 * counts.mean()  # 60 expected per run


def test_bad_size_is_refused():
    with pytest.raises(ValueError, match="1..4"):
        draw_subsets(4, 5, 1, 0)


def test_sweep_plan_and_merge_variants():
    plan = sweep_plan(4, None, 3, 0)
    assert list(plan) == [2, 4] and len(plan[2]) == 3 and plan[4] == [(0, 1, 2, 3)]
    assert merge_variants(["average", "select"], [0, 1]) == [("average", 0), ("select", 0), ("select", 1)]
    # one list for the K-run merges and Table 3 (the multitask copy used to call ties seeded: std 0)
    assert merge_variants(["ties", "dare"], [0, 1]) == [("ties", 0), ("dare", 0), ("dare", 1)]


# --- builders on synthetic inputs with known answers ------------------------------------------------


def _single():
    return pd.DataFrame(
        {
            "model": "m",
            "task": "t",
            "scheme": "shuffle",
            "precision": "fp32",
            "run": [0, 1, 2, 3],
            "val_loss": [1.0, 2.0, 3.0, 4.0],
            "exact_match": [0.1, 0.2, 0.3, 0.4],
        }
    )


def test_ksweep_table_means_stds_and_deltas():
    sweep = pd.DataFrame(
        {
            "model": "m",
            "task": "t",
            "scheme": "shuffle",
            "precision": "fp32",
            "method": ["average"] * 3 + ["select"] * 2,
            "subset_size": [2, 2, 4, 2, 2],
            "val_loss": [2.0, 3.0, 1.5, 2.5, 2.5],
            "exact_match": np.nan,
        }
    )
    t = ksweep_table(sweep, _single()).set_index(["method", "subset_size"])
    assert t.loc[("average", 2), "n_subsets"] == 2
    assert t.loc[("average", 2), "val_loss_mean"] == pytest.approx(2.5)
    assert t.loc[("average", 2), "val_loss_std"] == pytest.approx(np.std([2.0, 3.0], ddof=1))
    assert t.loc[("average", 4), "val_loss_std"] == 0.0  # one subset: no spread
    assert t.loc[("average", 4), "val_loss_delta"] == pytest.approx(1.5 - 2.5)
    assert (t["single_val_loss_mean"] == 2.5).all()
    assert t["exact_match_mean"].isna().all()  # not decoded: NaN, not 0
    md = ksweep_markdown(t.reset_index())
    assert "| m | t | shuffle | fp32 | average | 2 | 2 | 2.5000 ± 0.7071 | 2.5000 | +0.0000 |  |" in md


def test_table3_deltas_against_each_tasks_single_model():
    single = pd.DataFrame(
        {"model": "m", "precision": "fp32", "task": ["a", "b"], "val_loss": [1.0, 2.0], "exact_match": [0.5, 0.25]}
    )
    merged = pd.DataFrame(
        {
            "model": "m",
            "precision": "fp32",
            "task": ["a", "a", "b", "b", "a", "b"],
            "method": ["select", "select", "select", "select", "average", "average"],
            "seed": [0, 1, 0, 1, 0, 0],
            "val_loss": [1.5, 2.5, 2.0, 3.0, 1.25, 2.25],
            "exact_match": [0.25, 0.25, 0.0, 0.5, 0.5, 0.25],
        }
    )
    t = table3(merged, single, ["average", "select"]).set_index(["task", "method"])
    assert t.loc[("a", "single-task"), "val_loss_mean"] == 1.0
    assert t.loc[("a", "select"), "val_loss_mean"] == pytest.approx(2.0)
    assert t.loc[("a", "select"), "val_loss_std"] == pytest.approx(np.sqrt(0.5))
    assert t.loc[("a", "select"), "val_loss_delta"] == pytest.approx(1.0)
    assert t.loc[("b", "select"), "exact_match_delta"] == pytest.approx(0.0)
    assert t.loc[("a", "average"), "n"] == 1 and t.loc[("a", "average"), "val_loss_std"] == 0.0
    # the paper's avg Δ: mean over tasks of each method's Δ
    assert t.loc[("(mean)", "select"), "val_loss_delta"] == pytest.approx((1.0 + 0.5) / 2)
    assert t.loc[("(mean)", "average"), "exact_match_delta"] == pytest.approx((0.0 + 0.0) / 2)
    md = table3_markdown(t.reset_index())
    assert "| m | fp32 | a | select | 2 | 2.0000 ± 0.7071 | +1.0000 | 25.0 ± 0.0 | -25.0 |" in md
    assert "(mean over 2 tasks) | select |" in md


def test_tidy_extra_marks_kind_and_drops_uncomputed_metrics():
    frame = pd.DataFrame(
        {
            "model": "m",
            "task": "t",
            "scheme": "shuffle",
            "precision": "fp32",
            "kind": "ksweep",
            "method": "average",
            "seed": 0,
            "run": None,
            "epoch": 3,
            "subset_size": [2, 4],
            "subset": [0, 0],
            "merged": ["run0 run1", "run0 run1 run2 run3"],
            "val_loss": [1.0, 0.9],
            "exact_match": np.nan,
        }
    )
    tidy = tidy_extra(frame)
    assert set(tidy["metric"]) == {"val_loss"} and len(tidy) == 2 and set(tidy["kind"]) == {"ksweep"}
    assert list(tidy["subset_size"]) == [2, 4]


def test_token_mean_loss_weights_by_tokens_and_keeps_val():
    df = pd.DataFrame({"split": ["val", "val", "train"], "loss": [1.0, 4.0, 100.0], "tokens": [3, 1, 5]})
    assert token_mean_loss(df) == pytest.approx((3 + 4) / 4)


def test_ksweep_figure_is_written(tmp_path):
    sweep = pd.DataFrame(
        {
            "model": "m",
            "task": "t",
            "scheme": "shuffle",
            "precision": "fp32",
            "method": ["average", "average", "select"],
            "subset_size": [2, 4, 2],
            "val_loss": [2.0, 1.5, 2.2],
            "exact_match": [0.2, 0.3, 0.1],
        }
    )
    t = ksweep_table(sweep, _single())
    path = tmp_path / "ksweep.png"
    plot_ksweep(t, _single(), "K-sweep test", path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# --- config rules ----------------------------------------------------------------------------------


def _smoke(**patch):
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg.update(copy.deepcopy(patch))
    return cfg


def test_defaults_are_off():
    cfg = load_config(SMOKE)
    assert cfg["ksweep"]["enabled"] is False and cfg["multitask"]["tasks"] == []


@pytest.mark.parametrize(
    "patch,expected",
    [
        ({"ksweep": {"enabled": True, "sizes": [2, 3]}}, "ksweep.sizes[1]: 3 — larger than runs (K = 2)"),
        ({"ksweep": {"sizes": [1]}}, "ksweep.sizes[0]: 1 — must be >= 2"),
        (
            {"ksweep": {"methods": ["averge"]}},
            "ksweep.methods[0]: 'averge' — unknown merge method (did you mean 'average'?)",
        ),
        ({"ksweep": {"subsets": 0}}, "ksweep.subsets: 0 — must be >= 1"),
        ({"multitask": {"tasks": ["gsm", "asdiv"]}}, "multitask.tasks[1]: 'asdiv' — not a task of this config"),
        ({"multitask": {"tasks": ["gsm"]}}, "multitask.tasks: ['gsm'] — a multi-task merge needs at least 2 tasks"),
        ({"multitask": {"tasks": ["gsm", "gsm"]}}, "multitask.tasks: ['gsm', 'gsm'] — duplicate entries"),
        ({"multitask": {"tasks": "gsm"}}, "multitask.tasks: 'gsm' — wrong type"),
        ({"multitask": {"methods": ["resample9"]}}, "multitask.methods[0]: 'resample9' — resampleN needs n in 1..8"),
        (
            {"tasks": {"multitask": {"source": "asdiv", "n_train": 8, "n_val": 4, "n_test": 4, "max_length": 120}}},
            "tasks.multitask: 'multitask' — reserved",
        ),
    ],
)
def test_bad_sections_give_one_line_naming_key_value_and_fix(patch, expected):
    with pytest.raises(ConfigError) as err:
        validate_config(_smoke(**patch))
    assert any(p.startswith(expected) for p in err.value.problems), err.value.problems


def test_multitask_run_must_exist():
    cfg = _smoke(
        tasks={
            **yaml.safe_load(SMOKE.read_text())["tasks"],
            "asdiv": {"source": "asdiv", "n_train": 8, "n_val": 4, "n_test": 4, "max_length": 120},
        },
        multitask={"tasks": ["gsm", "asdiv"], "run": 2},
    )
    with pytest.raises(ConfigError, match=r"multitask.run: 2 — runs are numbered 0..1"):
        validate_config(cfg)


# --- the DAG with both enabled ------------------------------------------------------------------------


def both_config(path: Path) -> Path:
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["tasks"]["asdiv"] = {
        "source": "asdiv",
        "max_length": 120,
        "n_train": 8,
        "n_val": 4,
        "n_test": 4,
        "system_prompt": cfg["tasks"]["gsm"]["system_prompt"],
    }
    cfg["runs"] = 3
    cfg["ksweep"] = {"enabled": True, "subsets": 2, "methods": ["average", "select"]}
    cfg["multitask"] = {"tasks": ["gsm", "asdiv"], "methods": ["average", "select"], "seeds": [0, 1]}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_dry_run_with_ksweep_and_multitask(tmp_path):
    from helpers import planned_jobs, snakemake

    proc = snakemake(tmp_path, "-n", configfile=both_config(tmp_path / "both.yaml"))
    jobs = planned_jobs(proc)
    # K=3 -> sizes 2 (2 of the 3 possible subsets) and 3 (the one full set): 3 subsets x 2 methods,
    # per task (2 tasks, 1 scheme); multi-task: average once + select x 2 seeds = 3 merges, each
    # evaluated on both tasks. The per-task pipeline doubles (2 tasks); every merge and evaluation is made
    # in each of the 2 default precisions (fp32, bf16) from the same 6 fine-tunes.
    assert jobs["ksweep_merge"] == 24 and jobs["ksweep_evaluate"] == 24
    assert jobs["multitask_merge"] == 6 and jobs["evaluate_multitask"] == 12
    assert jobs["fine_tune"] == 6 and jobs["prepare_data"] == 2 and jobs["analyze"] == 1
    text = proc.stdout + proc.stderr
    assert "results/tables/table3.md" in text and "results/figures/ksweep_smollm2-135m_asdiv_shuffle_bf16.png" in text
    # a K-sweep subset merges exactly its runs' final checkpoints
    plan = sweep_plan(3, None, 2, 7)
    assert plan == {2: draw_subsets(3, 2, 2, 7), 3: [(0, 1, 2)]}


def test_dry_run_with_both_off_plans_no_extra_jobs(tmp_path):
    from helpers import planned_jobs, snakemake

    jobs = planned_jobs(snakemake(tmp_path, "-n"))
    assert not {"ksweep_merge", "ksweep_evaluate", "multitask_merge", "evaluate_multitask"} & set(jobs)


def test_multitask_test_config_plans_both_features(tmp_path):
    from helpers import planned_jobs, snakemake

    jobs = planned_jobs(snakemake(tmp_path, "-n", configfile=ROOT / "tests" / "configs" / "multitask.yaml"))
    # K=2: the K-sweep has one subset (both runs) x 2 methods x 2 tasks; multi-task: average + 2 x select
    # + 2 x resample1 = 5 merges, each evaluated on gsm and asdiv
    assert (jobs["ksweep_merge"], jobs["ksweep_evaluate"]) == (4, 4)
    assert (jobs["multitask_merge"], jobs["evaluate_multitask"]) == (5, 10)
    assert jobs["total"] == 50


# --- a real run: the K-sweep added to the shared smoke run ----------------------------------------------


@pytest.fixture(scope="module")
def smoke_with_ksweep(smoke_run, tmp_path_factory):
    """The smoke run's results, hard-linked (nothing copied; the shared run stays untouched, since
    every output is written to a temp name and renamed), plus the K-sweep: only its jobs and the
    analysis run (~1 min of CPU)."""
    import shutil
    import subprocess

    from helpers import planned_jobs, snakemake

    work = tmp_path_factory.mktemp("smoke_ksweep")
    subprocess.run(["cp", "-al", str(smoke_run / "results"), str(work / "results")], check=True)
    if (smoke_run / ".snakemake").exists():  # metadata is rewritten in place: a real copy (small)
        shutil.copytree(smoke_run / ".snakemake", work / ".snakemake", symlinks=True)
    shutil.rmtree(work / ".snakemake" / "locks", ignore_errors=True)
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["ksweep"] = {"enabled": True, "methods": ["average", "select"]}
    configfile = work / "ksweep.yaml"
    configfile.write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(snakemake(work, "-n", configfile=configfile))
    snakemake(work, configfile=configfile)
    return work, jobs


def test_smoke_ksweep_reuses_the_runs_and_writes_its_figure_and_table(smoke_with_ksweep):
    work, jobs = smoke_with_ksweep
    # K=2: one subset of size 2 (both runs) x 2 methods, in each of the 2 precisions; nothing upstream reruns
    assert jobs == {"ksweep_merge": 4, "ksweep_evaluate": 4, "analyze": 1, "all": 1, "total": 10}
    results = work / "results"
    for precision in ("fp32", "bf16"):
        fig = results / "figures" / f"ksweep_smollm2-135m_gsm_shuffle_{precision}.png"
        assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig.stat().st_size > 20_000
    t = pd.read_csv(results / "tables" / "ksweep.csv")
    assert set(t["method"]) == {"average", "select"} and set(t["subset_size"]) == {2}
    assert set(t["precision"]) == {"fp32", "bf16"}
    assert (t["val_loss_mean"] > 0).all() and t["exact_match_mean"].isna().all()
    assert t["single_val_loss_mean"].notna().all()
    # the size-K average merges the same checkpoints as the main average merge: same val loss, per precision
    main = pd.read_csv(results / "tables" / "table1.csv").set_index(["precision", "method"])
    for precision in ("fp32", "bf16"):
        got = t.set_index(["precision", "method"]).loc[(precision, "average"), "val_loss_mean"]
        assert got == pytest.approx(main.loc[(precision, "average"), "val_loss_mean"], abs=1e-6)
    tidy = pd.read_csv(results / "tables" / "metrics.csv")
    sweep = tidy[tidy["kind"] == "ksweep"]
    assert len(sweep) == 4 and set(sweep["metric"]) == {"val_loss"} and (sweep["merged"] == "run0 run1").all()
    assert "| fp32 | average | 2 | 1 |" in (results / "tables" / "ksweep.md").read_text()


def test_study_config_has_a_small_val_loss_only_ksweep_and_the_default_none(tmp_path):
    from helpers import planned_jobs, snakemake

    default = load_config(ROOT / "config.yaml")
    assert not default["ksweep"]["enabled"] and not default["multitask"]["tasks"]
    jobs = planned_jobs(snakemake(tmp_path, "-n", configfile=[ROOT / "config.yaml", ROOT / "configs" / "study.yaml"]))
    # K=4, sizes 2 (3 subsets), 3 (3 subsets) and 4 (the full set), average and resample1, in each of the 3
    # precisions: 7 x 2 x 3 = 42 merges + 42 val-loss evaluations
    assert (jobs["ksweep_merge"], jobs["ksweep_evaluate"]) == (42, 42)
    assert "multitask_merge" not in jobs


def test_ksweep_table_without_a_decoded_metric():
    """eval.n_generate: 0 scores no test sample: the single runs have no exact_match column, and the table
    says NaN for it instead of failing (the default's K-sweep in the study)."""
    single = _single().drop(columns=["exact_match"])
    sweep = pd.DataFrame(
        {
            "model": "m",
            "task": "t",
            "scheme": "shuffle",
            "precision": "fp32",
            "method": "average",
            "subset_size": [2, 2],
            "val_loss": [2.0, 3.0],
            "exact_match": np.nan,
        }
    )
    t = ksweep_table(sweep, single)
    assert t["single_val_loss_mean"].item() == pytest.approx(2.5) and np.isnan(t["single_exact_match_mean"].item())
