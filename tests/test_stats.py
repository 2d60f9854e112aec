"""Statistics on synthetic inputs with known answers."""

import numpy as np
import pandas as pd

from ordermerge.analysis.run import imbalance_row
from ordermerge.analysis.stats import binned_means, paired_rho, permutation_p
from ordermerge.analysis.tables import table1


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
    rows = [{"model": "m", "task": "t", "scheme": "shuffle", "kind": "single", "method": "single", "run": k,
             "seed": None, "epoch": 3, "val_loss": v, "exact_match": e} for k, (v, e) in enumerate([(1.0, 0.1), (1.2, 0.3)])]
    rows += [{"model": "m", "task": "t", "scheme": "shuffle", "kind": "merged", "method": "select", "run": None,
              "seed": s, "epoch": 3, "val_loss": v, "exact_match": 0.4} for s, v in enumerate([0.9, 0.95])]
    ids = [f"s{i}" for i in range(20)]
    single = [pd.DataFrame({"sample_id": ids, "loss": np.linspace(1, 2, 20) + d}) for d in (0.0, 0.2)]
    merged = [pd.DataFrame({"sample_id": ids, "loss": np.linspace(1, 2, 20) - 0.1})]
    t = table1(pd.DataFrame(rows), ["select"], {("m", "t", "shuffle", "single"): single,
                                                 ("m", "t", "shuffle", "select"): merged})
    s, m = t[t.method == "single"].iloc[0], t[t.method == "select"].iloc[0]
    assert np.isclose(s.val_loss_mean, 1.1) and np.isclose(s.val_loss_std, np.std([1.0, 1.2], ddof=1))
    assert np.isclose(m.val_loss_delta, 0.925 - 1.1) and np.isclose(m.exact_match_delta, 0.2)
    assert m.p_paired_val_loss < 0.001  # merged is lower on every one of 20 samples
