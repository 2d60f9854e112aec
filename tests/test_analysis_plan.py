"""analysis/plan.py: which figures and tables a config asks for, what each family reads and writes (the
rules declare exactly this; `ordermerge analyze --family` writes exactly this), and paths.py's logs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from ordermerge.analysis.plan import FAMILIES, FAMILY_KEYS, Plan
from ordermerge.config import load_config
from ordermerge.paths import LOGS, Paths

ROOT = Path(__file__).resolve().parents[1]
SMOKE = load_config(ROOT / "tests" / "configs" / "smoke.yaml")


def plan_of(**changes) -> Plan:
    cfg = copy.deepcopy(SMOKE)
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = cfg
        for p in parents:
            node = node[p]
        node[key] = value
    return Plan(cfg, "results")


def test_smoke_families_and_their_declared_outputs():
    plan = plan_of()
    assert plan.families() == ["fig1", "fig3", "fig4", "tables"]
    fig = "smollm2-135m_gsm_shuffle"
    assert plan.outputs("fig1") == ["results/tables/imbalance.csv", f"results/figures/fig1_{fig}.png"]
    assert plan.outputs("fig3") == ["results/tables/fig3_rho.csv", f"results/figures/fig3_{fig}.png"]
    assert plan.outputs("fig4") == [f"results/figures/fig4_{fig}.png"]
    assert plan.outputs("tables") == ["results/tables/metrics.csv", "results/tables/table1.csv",
                                      "results/tables/table1.md"]
    targets = plan.targets()
    assert len(targets) == len(set(targets))  # no file written by two families


def test_conditions_are_stated_once_fig4_table2_table4_ksweep_table3():
    assert "fig4" not in plan_of(losses__epochs="final").families()
    assert "fig4" not in plan_of(losses__epochs="all", train__epochs=1).families()
    two_models = plan_of(models={**SMOKE["models"], "other": SMOKE["models"]["smollm2-135m"]})
    assert two_models.comparisons() == {"table2": "model"}
    assert "results/tables/table2.md" in two_models.outputs("tables")
    both = plan_of(schemes=["shuffle", "fixbatch"])
    assert both.comparisons() == {"table4": "scheme"} and "results/tables/table4.csv" in both.outputs("tables")
    ks = plan_of(ksweep={**SMOKE["ksweep"], "enabled": True, "methods": ["average"]})
    assert "ksweep" in ks.families()
    assert ks.outputs("ksweep") == ["results/tables/ksweep.csv", "results/tables/ksweep.md",
                                    "results/figures/ksweep_smollm2-135m_gsm_shuffle.png"]


def test_inputs_are_the_planned_artefacts_spelled_by_paths():
    plan, p = plan_of(), Paths("results")
    w = {"model": "smollm2-135m", "task": "gsm", "scheme": "shuffle"}
    assert plan.inputs("fig1") == [p.of("order", **w, run=0), p.of("order", **w, run=1),
                                   p.of("run_losses", **w, run=0, epoch=2), p.of("run_losses", **w, run=1, epoch=2)]
    merged = [p.of("merged_losses", **w, method=m, mseed=0, epoch=2) for m in SMOKE["merge"]["methods"]]
    assert plan.inputs("fig3") == plan.inputs("fig1") + merged
    assert len(plan.inputs("fig4")) == 2 * (2 + len(SMOKE["merge"]["methods"]))  # 2 epochs x (runs + merges)
    # Table 1: every single run and every built merge (average once: deterministic), metrics + losses
    stems = [stem for _, stem in plan.evaluations()]
    assert len(stems) == 2 + 1 + 2 + 2 and p.of("eval_merged", **w, method="average", mseed=0) in stems
    assert plan.inputs("tables") == [s + ext for s in stems for ext in (".json", ".val_losses.csv")]


def test_family_config_holds_what_the_family_reads_and_no_more():
    plan = plan_of()
    assert set(FAMILY_KEYS) == set(FAMILIES)
    assert plan.family_config("fig1") == {k: SMOKE[k] for k in FAMILY_KEYS["fig1"]}
    assert "merge" not in plan.family_config("fig1") and "ksweep" not in plan.family_config("fig3")


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="no analysis family 'fig2'"):
        plan_of().outputs("fig2")


def test_logs_live_under_logs_and_fill_the_given_wildcards():
    assert all(t.startswith("logs/") and t.endswith(".log") for t in LOGS.values())
    assert Paths.log("analysis", family="fig1") == "logs/analysis/fig1.log"
    assert Paths.log("merge") == "logs/merge/{model}_{task}_{scheme}_epoch{epoch}_{method}_seed{mseed}.log"
