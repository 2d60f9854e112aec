"""plan.py: the tables and figures a config's analysis makes, the one list the analyze rule declares and the
analysis writes (no torch)."""

from __future__ import annotations

import yaml

from helpers import SMOKE
from ordermerge import plan
from ordermerge.config import validate_config


def smoke(**changes) -> dict:
    return validate_config({**yaml.safe_load(SMOKE.read_text()), **changes})


def test_smoke_config_names_every_table_and_figure_it_makes():
    cfg = smoke()
    assert plan.table_names(cfg) == ["table1", "imbalance", "metrics", "fig3_rho", "storage", "harness_agreement"]
    assert plan.markdown_tables(cfg) == ["table1", "storage", "harness_agreement"]
    group = "smollm2-135m_gsm_shuffle"
    assert plan.figure_names(cfg) == [f"{kind}_{group}_{p}" for kind in ("fig1", "fig3", "fig4")
                                      for p in ("fp32", "bf16")] + [f"storage_{group}"]
    assert plan.ksweep_figure_names(cfg) == []


def test_what_the_config_turns_on_or_off():
    one = smoke(precisions=["fp32"], losses={"splits": ["train"], "epochs": "final"}, eval={"harness": []})
    assert plan.table_names(one) == ["table1", "imbalance", "metrics", "fig3_rho"]
    assert [n.split("_")[0] for n in plan.figure_names(one)] == ["fig1", "fig3"]  # no Fig. 4, no storage figure
    both = smoke(schemes=["shuffle", "fixbatch"], models={"a": {"source": "smollm2-gguf"},
                                                          "b": {"source": "smollm2-gguf"}})
    assert {"table2", "table4"} <= set(plan.table_names(both))
    assert plan.loss_epochs(one) == [2] and plan.loss_epochs(smoke()) == [1, 2]
    assert plan.rounded(smoke()) == ["bf16"] and plan.rounded(one) == []
    sweep = smoke(ksweep={"enabled": True})
    assert plan.ksweep_figure_names(sweep) == [f"ksweep_smollm2-135m_gsm_shuffle_{p}" for p in ("fp32", "bf16")]
