"""Statistics on synthetic inputs with known answers."""

import numpy as np
import pandas as pd

from ordermerge.analysis.run import imbalance_row
from ordermerge.analysis.stats import binned_means, paired_rho, paired_rho_ci, permutation_p, verdict
from ordermerge.analysis.tables import delta_intervals, table1, table1_markdown


def _runs(k=6, n=120, effect=0.0, seed=0):
    rng = np.random.default_rng(seed)
    difficulty = rng.gamma(2.0, 0.5, n)  # per-sample difficulty, shared by every run
    positions = np.array([rng.permutation(n) for _ in range(k)])
    noise = rng.normal(0, 0.05, (k, n))
    losses = difficulty + effect * (1 - positions / n) + noise  # effect > 0: seen early => higher loss
    return positions, losses


def test_planted_position_effect_is_found_with_the_papers_sign():
    positions, losses = _runs(effect=0.2)
    rho = paired_rho(positions, losses)
    assert rho < -0.5
    assert permutation_p(positions, losses, n_perm=199) <= 0.01
    row = imbalance_row(positions, losses, anchor=0, seed=0)
    assert row["loss_first_decile"] > row["loss_last_decile"]
    assert row["rho_residual_pooled"] < -0.5 and row["p_residual_pooled"] < 1e-6


def test_no_effect_gives_no_significant_correlation():
    positions, losses = _runs(effect=0.0)
    assert abs(paired_rho(positions, losses)) < 0.1
    assert permutation_p(positions, losses, n_perm=199) > 0.05


def test_difficulty_swamps_plain_rho_but_not_paired_rho():
    # a weak effect under large difficulty variance: per-run rho is small, paired rho is not
    positions, losses = _runs(effect=0.1, n=200, seed=1)
    row = imbalance_row(positions, losses, anchor=0, seed=0)
    assert abs(row["rho_mean_over_runs"]) < 0.2
    assert row["rho_paired"] < -0.3


def test_binned_means_with_ci():
    x = np.arange(100.0)
    y = np.repeat([1.0, 2.0, 3.0, 4.0], 25)
    centres, means, half = binned_means(x, y, 4)
    assert np.allclose(means, [1, 2, 3, 4]) and np.allclose(half, 0)
    assert np.allclose(centres, [12, 37, 62, 87])


def test_table1_means_stds_deltas_and_paired_test():
    rows = [
        {
            "model": "m",
            "task": "t",
            "scheme": "shuffle",
            "precision": "fp32",
            "kind": "single",
            "method": "single",
            "run": k,
            "seed": None,
            "epoch": 3,
            "val_loss": v,
            "exact_match": e,
        }
        for k, (v, e) in enumerate([(1.0, 0.1), (1.2, 0.3)])
    ]
    rows += [
        {
            "model": "m",
            "task": "t",
            "scheme": "shuffle",
            "precision": "fp32",
            "kind": "merged",
            "method": "select",
            "run": None,
            "seed": s,
            "epoch": 3,
            "val_loss": v,
            "exact_match": 0.4,
        }
        for s, v in enumerate([0.9, 0.95])
    ]
    ids = [f"s{i}" for i in range(20)]
    single = [pd.DataFrame({"sample_id": ids, "loss": np.linspace(1, 2, 20) + d}) for d in (0.0, 0.2)]
    merged = [pd.DataFrame({"sample_id": ids, "loss": np.linspace(1, 2, 20) - 0.1})]
    t = table1(
        pd.DataFrame(rows),
        ["select"],
        {("m", "t", "shuffle", "fp32", "single"): single, ("m", "t", "shuffle", "fp32", "select"): merged},
    )
    s, m = t[t.method == "single"].iloc[0], t[t.method == "select"].iloc[0]
    assert np.isclose(s.val_loss_mean, 1.1) and np.isclose(s.val_loss_std, np.std([1.0, 1.2], ddof=1))
    assert np.isclose(m.val_loss_delta, 0.925 - 1.1) and np.isclose(m.exact_match_delta, 0.2)
    assert m.p_paired_val_loss < 0.001  # merged is lower on every one of 20 samples


def _eval_frames(n, k, seeds, shift, seed, noise=0.05):
    """Per-sample val losses: a shared difficulty, K single runs, merge seeds ``shift`` lower on average."""
    rng = np.random.default_rng(seed)
    ids = [f"s{i}" for i in range(n)]
    difficulty, tokens = rng.gamma(2.0, 0.5, n), rng.integers(5, 60, n)
    single = [
        pd.DataFrame({"sample_id": ids, "loss": difficulty + rng.normal(0, noise, n), "tokens": tokens})
        for _ in range(k)
    ]
    merged = [
        pd.DataFrame({"sample_id": ids, "loss": difficulty + shift + rng.normal(0, noise, n), "tokens": tokens})
        for _ in range(seeds)
    ]
    return single, merged


def test_delta_interval_contains_a_planted_shift_and_excludes_zero():
    single, merged = _eval_frames(n=200, k=4, seeds=2, shift=-0.05, seed=3)
    ci = delta_intervals(single, merged, "loss", "tokens", True, seed=0, name="x")
    lo, hi = ci["delta_ci"]
    assert lo < -0.05 < hi and hi < 0
    assert ci["beats_best"] is True and ci["delta_best_ci"][1] < 0  # better than every single run
    # deterministic in the seed, different draws for another seed
    assert delta_intervals(single, merged, "loss", "tokens", True, seed=0, name="x")["delta_ci"] == (lo, hi)
    assert delta_intervals(single, merged, "loss", "tokens", True, seed=1, name="x")["delta_ci"] != (lo, hi)


def test_delta_interval_covers_the_true_shift_about_95_percent_of_the_time():
    covered = 0
    for rep in range(30):
        single, merged = _eval_frames(n=80, k=3, seeds=2, shift=0.02, seed=100 + rep)
        lo, hi = delta_intervals(single, merged, "loss", None, True, seed=rep, name="cov")["delta_ci"]
        covered += lo <= 0.02 <= hi
    assert 24 <= covered <= 30  # a 95 % interval: ~28.5 of 30 expected; 24 or fewer would be p < 0.01


def test_no_shift_is_not_a_win_and_the_interval_contains_zero():
    single, merged = _eval_frames(n=150, k=4, seeds=2, shift=0.0, seed=5)
    ci = delta_intervals(single, merged, "loss", "tokens", True, seed=0, name="x")
    assert ci["delta_ci"][0] < 0 < ci["delta_ci"][1]
    # the best of 4 runs is better than their mean: a merge equal to the mean does not beat it
    assert ci["beats_best"] is False and ci["delta_best"] > 0


def test_task_score_interval_and_beats_best_use_higher_is_better():
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(300)]
    single = [pd.DataFrame({"sample_id": ids, "correct": (rng.random(300) < 0.3).astype(float)}) for _ in range(3)]
    merged = [pd.DataFrame({"sample_id": ids, "correct": (rng.random(300) < 0.5).astype(float)}) for _ in range(2)]
    ci = delta_intervals(single, merged, "correct", None, False, seed=0, name="em")
    lo, hi = ci["delta_ci"]
    assert 0 < lo < 0.2 < hi and ci["beats_best"] is True


def test_table1_carries_intervals_and_beats_best_columns():
    single, merged = _eval_frames(n=60, k=2, seeds=2, shift=-0.1, seed=9)
    rows = [
        {
            "model": "m",
            "task": "t",
            "scheme": "shuffle",
            "precision": "fp32",
            "kind": "single",
            "method": "single",
            "run": k,
            "seed": None,
            "epoch": 3,
            "exact_match": 0.2,
            "val_loss": float((f.loss * f.tokens).sum() / f.tokens.sum()),
        }
        for k, f in enumerate(single)
    ]
    rows += [
        {
            "model": "m",
            "task": "t",
            "scheme": "shuffle",
            "precision": "fp32",
            "kind": "merged",
            "method": "select",
            "run": None,
            "seed": s,
            "epoch": 3,
            "exact_match": 0.3,
            "val_loss": float((f.loss * f.tokens).sum() / f.tokens.sum()),
        }
        for s, f in enumerate(merged)
    ]
    key = ("m", "t", "shuffle", "fp32")
    scores = {
        (*key, "single"): [pd.DataFrame({"sample_id": ["a", "b", "c"], "correct": [1.0, 0.0, 0.0]})] * 2,
        (*key, "select"): [pd.DataFrame({"sample_id": ["a", "b", "c"], "correct": [1.0, 1.0, 0.0]})] * 2,
    }
    t = table1(pd.DataFrame(rows), ["select"], {(*key, "single"): single, (*key, "select"): merged}, scores, seed=0)
    m = t[t.method == "select"].iloc[0]
    assert m.val_loss_delta_ci_low <= m.val_loss_delta <= m.val_loss_delta_ci_high < 0
    assert m.val_loss_beats_best_single and m.task_score_beats_best_single
    assert np.isclose(m.task_score_delta_best, 1 / 3)
    md = table1_markdown(t)
    assert "beats best" in md and "**yes**" in md and f"[{m.val_loss_delta_ci_low:+.4f}," in md


def test_paired_rho_interval_and_verdict():
    positions, losses = _runs(effect=0.2)
    lo, hi = paired_rho_ci(positions, losses, seed=0)
    assert lo <= paired_rho(positions, losses) <= hi < 0
    assert verdict(lo, hi).startswith("negative")
    positions, losses = _runs(k=6, n=600, effect=0.0, seed=2)
    lo, hi = paired_rho_ci(positions, losses, seed=0)
    assert -0.1 < lo < 0 < hi < 0.1 and verdict(lo, hi).startswith("no effect")
    positions, losses = _runs(k=2, n=16, effect=0.0, seed=2)
    assert verdict(*paired_rho_ci(positions, losses, seed=0)).startswith("undecided")
    assert verdict(0.05, 0.3).startswith("positive")
    row = imbalance_row(*_runs(effect=0.2), anchor=0, seed=0)
    assert row["rho_paired_ci_low"] <= row["rho_paired"] <= row["rho_paired_ci_high"]
    assert row["rho_residual_ci_low"] <= row["rho_residual_pooled"] <= row["rho_residual_ci_high"] < 0
