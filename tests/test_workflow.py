"""The Snakemake workflow: config validation, the DAG, and one real end-to-end smoke run."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from helpers import ROOT, SMOKE, planned_jobs, snakemake


def test_dry_run_plans_every_stage(tmp_path):
    jobs = planned_jobs(snakemake(tmp_path, "-n"))
    # K=2 runs, 2 epochs, merges: average once + select and resample1 for 2 seeds at the final epoch,
    # plus each method's first seed at epoch 1 (Fig. 4), whose per-sample losses are scored (Fig. 3, 4);
    # eval.harness [mirror]: lm-eval on every evaluated model. Everything after fine_tune once per precision
    # (fp32 as saved, bf16 rounded from it: one round per run and scored epoch)
    assert jobs == {
        "all": 1,
        "analyze": 1,
        "base_model": 1,
        "evaluate_merged": 10,
        "evaluate_single": 4,
        "fine_tune": 2,
        "round_checkpoint": 4,
        "merge": 16,
        "orders": 2,
        "prepare_data": 1,
        "sample_losses": 8,
        "sample_losses_merged": 12,
        "harness_single": 4,
        "harness_merged": 10,
        "total": 76,
    }


def test_default_config_dry_run(tmp_path):
    jobs = planned_jobs(snakemake(tmp_path, "-n", configfile=ROOT / "config.yaml"))
    # one training (4 fine-tunes), then per precision (fp32, bf16) 5 merges and their evaluations
    assert jobs["fine_tune"] == 4 and jobs["round_checkpoint"] == 4
    assert jobs["merge"] == 10 and jobs["evaluate_merged"] == 10 and jobs["evaluate_single"] == 8
    assert jobs["sample_losses"] == 8  # final epoch only in the default


def test_bad_config_is_rejected_before_any_job(tmp_path):
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["train"]["lr"] = -1
    cfg["train"]["epoch"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "-n", configfile=bad, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "train.lr" in out and "did you mean 'epochs'" in out
    assert not (tmp_path / "results").exists()


# Valid as a config, impossible as data: (task spec change, what the error must say).
IMPOSSIBLE_DATA = {
    "max_length too short for the splits": ({"max_length": 40}, "fit in max_length 40 tokens"),
    "splits larger than the fitting pool": ({"n_train": 60}, "but train+val+test = 68 are needed"),
}


@pytest.mark.parametrize("case", IMPOSSIBLE_DATA)
def test_impossible_data_fails_before_the_first_job(tmp_path, case):
    """Found with the tokenizer alone before any job, not in prepare_data after the base model is built."""
    change, says = IMPOSSIBLE_DATA[case]
    cfg = yaml.safe_load(SMOKE.read_text())
    task = next(iter(cfg["tasks"]))
    cfg["tasks"][task].update(change)
    bad = tmp_path / "short.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, configfile=bad, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"tasks.{task}: ordermerge check-data: error: task {task}: only " in out
    assert says in out and f"raise tasks.{task}.max_length" in out
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()  # no job ran


def test_unreadable_gold_answers_fail_before_the_first_job(tmp_path):
    """A user's JSONL of word answers: inferred as text and said so; scored as numeric, refused with the
    counts and the key to set, before any job (docs/own-data.md)."""
    words = tmp_path / "words.jsonl"
    words.write_text(
        "".join(
            json.dumps({"question": f"Repeat the word: w{chr(97 + i % 26)}{i}x", "answer": "blue"}) + "\n"
            for i in range(20)
        )
    )
    cfg = yaml.safe_load(SMOKE.read_text())
    spec = {
        "source": "hf",
        "path": "json",
        "data_files": str(words),
        "max_length": 64,
        "n_train": 8,
        "n_val": 4,
        "n_test": 4,
    }
    cfg["tasks"] = {"inferred": spec, "numbers": {**spec, "answer": "numeric"}}  # checked in this (sorted) order
    bad = tmp_path / "words.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, configfile=bad, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "tasks.inferred: answer: text (inferred: 0 of 20 gold answers hold a number; " in out
    assert (
        "tasks.numbers: ordermerge check-data: error: tasks.numbers: 20 of 20 gold answers hold no number "
        "(e.g. 'blue', 'blue', 'blue', ...); set tasks.numbers.answer: text"
    ) in out
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()  # no job ran


# smoke_run: the session fixture in conftest.py (one real run, shared with test_determinism.py).


def test_smoke_run_produces_figures_and_tables(smoke_run):
    results = smoke_run / "results"
    names = [f"{n}_smollm2-135m_gsm_shuffle_{p}" for n in ("fig1", "fig3", "fig4") for p in ("fp32", "bf16")]
    for name in [*names, "storage_smollm2-135m_gsm_shuffle"]:
        fig = results / "figures" / f"{name}.png"
        assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig.stat().st_size > 20_000
    t1 = pd.read_csv(results / "tables" / "table1.csv")
    assert list(dict.fromkeys(t1["precision"])) == ["fp32", "bf16"]  # the headline precision first
    for _, t in t1.groupby("precision"):
        assert list(t["method"]) == ["single", "average", "select", "resample1"]
        assert t.loc[t["method"] == "single", "n"].item() == 2
        assert t.loc[t["method"] == "select", "n"].item() == 2
    assert t1["val_loss_mean"].notna().all() and (t1["val_loss_mean"] > 0).all()
    storage = pd.read_csv(results / "tables" / "storage.csv")
    assert list(storage["precision"]) == ["bf16", "bf16"] and list(storage["run"]) == [0, 1]
    assert (storage["erased_fraction"] > 0).all() and storage["relative_norm_lost"].between(0, 1).all()
    fp32 = t1[(t1["precision"] == "fp32") & (t1["method"] == "single")]["val_loss_mean"].item()
    assert storage["val_loss_saved"].mean() == pytest.approx(fp32)
    imb = pd.read_csv(results / "tables" / "imbalance.csv")
    assert imb["rho_anchor"].between(-1, 1).all() and imb["p_paired_permutation"].between(0, 1).all()
    assert "| single |" in (results / "tables" / "table1.md").read_text()
    assert t1.loc[t1["method"] != "single", "p_paired_val_loss"].between(0, 1).all()
    tidy = pd.read_csv(results / "tables" / "metrics.csv", keep_default_na=False)
    ours, lm_eval = tidy[tidy["harness"] == ""], tidy[tidy["harness"] != ""]
    assert set(ours["metric"]) == {"val_loss", "exact_match"} and len(ours) == 2 * (2 + 5) * 2  # 2 precisions
    assert set(lm_eval["harness"]) == {"ordermerge_gsm"}  # ours, and lm-eval's GSM8K extraction beside it
    assert set(lm_eval["metric"]) == {"exact_match", "exact_match,strict-match", "exact_match,flexible-extract"}
    assert len(lm_eval) == 3 * (2 + 5) * 2
    agree = pd.read_csv(results / "tables" / "harness_agreement.csv")
    assert len(agree) == (2 + 5) * 2 and (agree["n_ordermerge"] == agree["n_lm_eval"]).all()
    assert (agree["disagree"] == 0).all(), (results / "tables" / "harness_agreement.md").read_text()
    assert (agree["ordermerge"] == agree["lm_eval"]).all()


def test_smoke_run_checkpoints_and_merge_provenance(smoke_run):
    base = smoke_run / "results" / "smollm2-135m" / "gsm" / "shuffle"
    meta = json.loads((base / "runs" / "run0" / "epoch2" / "checkpoint.json").read_text())
    twin = json.loads((base / "runs" / "run0" / "bf16" / "epoch2" / "checkpoint.json").read_text())
    # saved in fp32: only what training never moved equals the base; rounded to bf16, far more does
    assert 0 < meta["zero_task_vector_fraction"] < twin["zero_task_vector_fraction"] < 1
    rounding = json.loads((base / "runs" / "run0" / "bf16" / "epoch2" / "round.json").read_text())
    assert rounding["zero_fraction"] == twin["zero_task_vector_fraction"] and rounding["erased"] > 0
    steps = pd.read_csv(base / "runs" / "run0" / "steps.csv")
    assert len(steps) == 4  # 8 samples / batch 4 x 2 epochs
    prov = json.loads((base / "bf16" / "merged" / "epoch2" / "resample1" / "seed1" / "merge.json").read_text())
    assert prov["method"] == "select" and prov["parameters"] == {"resample": 1} and prov["seed"] == 1
    assert len(prov["inputs"]) == 2 and all(len(i["sha256"]) == 64 for i in prov["inputs"])
    assert prov["stats"]["resampled_per_round"][0] > 0
    assert not list(smoke_run.rglob(".tmp-*"))
    assert (smoke_run / "logs" / "fine_tune" / "smollm2-135m_gsm_shuffle_run0.log").exists()


def test_training_followed_the_order_exactly(smoke_run):
    import numpy as np

    base = smoke_run / "results" / "smollm2-135m" / "gsm" / "shuffle"
    order = np.load(base / "orders" / "run1.npy")
    steps = pd.read_csv(base / "runs" / "run1" / "steps.csv")
    seen = [int(i) for s in steps["sample_indices"] for i in str(s).split()]
    assert seen == order.reshape(-1).tolist()


def test_new_merge_seed_reruns_only_merges_and_what_depends_on_them(smoke_run):
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["merge"]["seeds"] = [0, 1, 2]
    cfg["merge"]["methods"] = ["average", "select", "resample1", "resample2"]
    changed = smoke_run / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(snakemake(smoke_run, "-n", configfile=changed))
    assert set(jobs) == {
        "all",
        "analyze",
        "merge",
        "evaluate_merged",
        "sample_losses_merged",
        "harness_merged",
        "total",
    }
    # select and resample1 get seed 2; resample2 gets seeds 0, 1, 2 (+ seed 0 at epoch 1 for Fig. 4); each in
    # both precisions
    assert jobs["merge"] == 12 and jobs["evaluate_merged"] == jobs["harness_merged"] == 10
    assert jobs["sample_losses_merged"] == 4


def test_merge_reruns_alone_without_retraining(smoke_run):
    target = "results/smollm2-135m/gsm/shuffle/bf16/merged/epoch2/select/seed0"
    before = (smoke_run / target / "model.safetensors").read_bytes()
    proc = snakemake(smoke_run, "--forcerun", "merge", "--until", "merge", "-n")
    jobs = planned_jobs(proc)
    assert set(jobs) == {"merge", "total"}
    snakemake(smoke_run, target, "--forcerun", target)
    assert (smoke_run / target / "model.safetensors").read_bytes() == before  # bit-identical merge


def test_methods_that_choose_on_data_get_the_heldout_split(tmp_path):
    """tsv and greedy_soup beside the paper's methods: the soup's merge reads the heldout split, built once."""
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["merge"]["methods"] = ["average", "select", "resample1", "tsv", "greedy_soup"]
    cfg["tasks"]["gsm"]["n_heldout"] = 4
    path = tmp_path / "soup.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "-n", "-p", configfile=path)
    jobs = planned_jobs(proc)
    # + tsv and greedy_soup: one merge each (deterministic) at epoch 2, and at epoch 1 for Fig. 4's losses;
    # each in both precisions
    assert jobs["merge"] == 24 and jobs["evaluate_merged"] == 14 and jobs["sample_losses_merged"] == 20
    text = proc.stdout + proc.stderr
    soup = [line for line in text.splitlines() if "ordermerge merge" in line and "greedy_soup" in line]
    assert soup and all("--data results/smollm2-135m/gsm/data/heldout.jsonl" in line for line in soup)
    assert not [line for line in text.splitlines() if "--method tsv" in line and "--data" in line]


def test_smoke_run_states_its_intervals_and_where_the_time_went(smoke_run):
    results = smoke_run / "results"
    imb = pd.read_csv(results / "tables" / "imbalance.csv").iloc[0]
    assert imb.rho_paired_ci_low <= imb.rho_paired <= imb.rho_paired_ci_high
    assert imb.verdict_paired.split(":")[0] in {"negative", "positive", "no effect", "undecided"}
    t1 = pd.read_csv(results / "tables" / "table1.csv")
    merged = t1[t1["method"] != "single"]
    assert (merged.val_loss_delta_ci_low <= merged.val_loss_delta_ci_high).all()
    assert merged.val_loss_beats_best_single.isin([True, False]).all()
    assert "Δ best [95% CI]" in (results / "tables" / "table1.md").read_text()
    # every job wrote a Snakemake benchmark beside its log; `ordermerge timing` splits them by stage
    logs = sorted((smoke_run / "logs").rglob("*.log"))
    assert logs and all(log.with_name(log.name[:-4] + ".benchmark.tsv").exists() for log in logs)
    from ordermerge.timing import report, stage_table, training_tokens

    stages = stage_table(smoke_run / "logs")
    assert stages.set_index("stage")["jobs"].to_dict() == {
        "base_model": 1,
        "prepare_data": 1,
        "orders": 2,
        "fine_tune": 2,
        "round": 4,
        "sample_losses": 20,
        "merge": 16,
        "evaluate": 14,
        "harness": 14,
        "analyze": 1,
    }
    tokens = training_tokens(results)
    steps = [pd.read_csv(f) for f in sorted(results.rglob("steps.csv"))]
    assert tokens["tokens"] == sum(int(s["tokens"].sum()) for s in steps) > 0
    text = report(results, smoke_run / "logs", wall=100.0, cores=2)
    assert "fine_tune" in text and f"{tokens['tokens']:,} tokens" in text


def test_study_report_gathers_runs_without_recomputing(smoke_run, tmp_path):
    from ordermerge.analysis.study import study_report

    results = smoke_run / "results"
    written = study_report({"a": results, "b": results}, tmp_path / "docs")
    readme = (tmp_path / "docs" / "README.md").read_text()
    imb = pd.read_csv(results / "tables" / "imbalance.csv").iloc[0]
    assert f"{imb.rho_paired:+.3f} [{imb.rho_paired_ci_low:+.3f}, {imb.rho_paired_ci_high:+.3f}]" in readme
    # one Table 1 row per run and precision (4), and one pooled row per precision over the two runs (2)
    assert readme.count("| resample1 |") == 6
    pooled = readme[readme.index("## Pooled over the replicates") :]
    assert pooled.count("| resample1 | 2 |") == 2 and "| 4 |" in pooled  # 2 runs x K = 2 fine-tunes pooled
    assert (tmp_path / "docs" / "a" / "fig1_smollm2-135m_gsm_shuffle_bf16.png").read_bytes() == (
        results / "figures" / "fig1_smollm2-135m_gsm_shuffle_bf16.png"
    ).read_bytes()
    assert all(p.exists() for p in written)


def test_the_report_opens_on_the_runs_answer(smoke_run, tmp_path):
    answer = (smoke_run / "results" / "answer.rst").read_text()
    imb = pd.read_csv(smoke_run / "results" / "tables" / "imbalance.csv").iloc[0]
    assert (
        f"paired ρ = **{imb.rho_paired:+.3f}** [{imb.rho_paired_ci_low:+.3f}, {imb.rho_paired_ci_high:+.3f}]" in answer
    )
    t1 = pd.read_csv(smoke_run / "results" / "tables" / "table1.csv")
    for p in ("fp32", "bf16"):  # one group per model/task/scheme/precision
        assert answer.count(f"**smollm2-135m / gsm / shuffle, stored in {p} (exact_match)**") == 1
    rows = [line.split("|")[1].strip() for line in answer.splitlines() if line.startswith("| ")]
    want = [cell for _, t in t1.groupby("precision", sort=False) for cell in ["method", *t["method"]]]
    assert rows == want  # Table 1's rows in its order: single, then every merge, per precision
    assert "Better than every single run" in answer or "No merge has a lower val loss" in answer
    snakemake(smoke_run, "--report", str(tmp_path / "report.html"))
    html = (tmp_path / "report.html").read_text()
    assert "Does the data order matter, and does merging help?" in html
    assert "Position effect" in html and "Where to look next" in html
