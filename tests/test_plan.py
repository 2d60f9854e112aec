"""plan.py: the tables and figures a config's analysis makes, the one list the analyze rule declares and the
analysis writes (no torch)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import SMOKE
from ordermerge import plan
from ordermerge.config import validate_config


def smoke(**changes) -> dict:
    return validate_config({**yaml.safe_load(SMOKE.read_text()), **changes})


def test_smoke_config_names_every_table_and_figure_it_makes():
    cfg = smoke()
    assert plan.table_names(cfg) == [
        "table1",
        "imbalance",
        "metrics",
        "fig3_rho",
        "storage",
        "updates",
        "harness_agreement",
    ]
    assert plan.markdown_tables(cfg) == ["table1", "storage", "updates", "harness_agreement"]
    group = "smollm2-135m_gsm_shuffle"
    assert plan.figure_names(cfg) == [
        f"{kind}_{group}_{p}" for kind in ("fig1", "fig3", "fig4") for p in ("fp32", "bf16")
    ] + [f"storage_{group}"]
    assert plan.ksweep_figure_names(cfg) == []


def test_what_the_config_turns_on_or_off():
    one = smoke(precisions=["fp32"], losses={"splits": ["train"], "epochs": "final"}, eval={"harness": []})
    assert plan.table_names(one) == ["table1", "imbalance", "metrics", "fig3_rho"]
    assert [n.split("_")[0] for n in plan.figure_names(one)] == ["fig1", "fig3"]  # no Fig. 4, no storage figure
    both = smoke(
        schemes=["shuffle", "fixbatch"], models={"a": {"source": "smollm2-gguf"}, "b": {"source": "smollm2-gguf"}}
    )
    assert {"table2", "table4"} <= set(plan.table_names(both))
    assert plan.loss_epochs(one) == [2] and plan.loss_epochs(smoke()) == [1, 2]
    assert plan.rounded(smoke()) == ["bf16"] and plan.rounded(one) == []
    sweep = smoke(ksweep={"enabled": True})
    assert plan.ksweep_figure_names(sweep) == [f"ksweep_smollm2-135m_gsm_shuffle_{p}" for p in ("fp32", "bf16")]


def test_the_analysis_loads_the_k_sweep_and_multitask_files_paths_py_spells(tmp_path):
    """load_ksweep / load_multitask read exactly the evaluation files the rules declare (Paths.eval_outputs)."""
    import json

    from ordermerge.analysis.subsets import load_ksweep, load_multitask
    from ordermerge.paths import Paths

    cfg = smoke(
        precisions=["fp32"],
        ksweep={"enabled": True, "methods": ["average"], "exact_match": True},
        tasks={
            "gsm": {"source": "gsm_symbolic", "max_length": 120, "n_train": 8, "n_val": 4, "n_test": 4},
            "asdiv": {"source": "asdiv", "max_length": 120, "n_train": 8, "n_val": 4, "n_test": 4},
        },
        multitask={"tasks": ["gsm", "asdiv"], "methods": ["average"], "seeds": [0]},
    )
    p = Paths(str(tmp_path))
    metrics = {"exact_match": 0.5, "val_loss": 1.0, "model": "smollm2-135m", "kind": "multitask"}
    for task in cfg["tasks"]:
        w = {"model": "smollm2-135m", "task": task, "scheme": "shuffle", "precision": "fp32"}
        ks = {k: f.format(**w, size=2, subset=0, method="average") for k, f in p.eval_outputs("ksweep_merged").items()}
        mt = p.eval_outputs("eval_multitask")["metrics"].format(**w, method="average", mseed=0)
        for path, text in (
            (ks["metrics"], json.dumps({"exact_match": 0.25})),
            (mt, json.dumps(metrics)),
            (ks["val_losses"], "split,row,loss,tokens\nval,0,2.0,1\nval,1,4.0,3\n"),
        ):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
    sweep = load_ksweep(tmp_path, cfg)
    assert list(sweep["exact_match"]) == [0.25, 0.25] and list(sweep["val_loss"]) == [3.5, 3.5]
    assert list(load_multitask(tmp_path, cfg)["exact_match"]) == [0.5, 0.5]


def synthetic_results(root: Path, cfg: dict) -> None:
    """Every file the analysis of ``cfg`` reads (one model, task and scheme; no harness, K-sweep or Table 3),
    with made-up numbers, at the paths paths.py spells."""
    import json

    import numpy as np
    import torch

    from ordermerge.merging.registry import merge_variants
    from ordermerge.paths import EVAL_FILES, Paths

    p, n, k_runs = Paths(str(root)), 8, cfg["runs"]
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(n)]

    def weights(directory, tensor):
        from safetensors.torch import save_file

        Path(directory).mkdir(parents=True, exist_ok=True)
        save_file({"w": tensor}, str(Path(directory) / "model.safetensors"))

    def write(path, text):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)

    def losses_csv(split):
        return "sample_id,split,row,loss,tokens\n" + "".join(
            f"{s},{split},{i},{rng.uniform(0.5, 2):.4f},{i + 3}\n" for i, s in enumerate(ids)
        )

    def evaluation(stem, identity):
        write(
            stem + EVAL_FILES["metrics"],
            json.dumps(
                {**identity, "val_loss": float(rng.uniform(1, 2)), "exact_match": 0.5, "task_metric": "exact_match"}
            ),
        )
        write(
            stem + EVAL_FILES["generations"],
            "".join(json.dumps({"sample_id": s, "correct": i % 2 == 0}) + "\n" for i, s in enumerate(ids)),
        )
        write(stem + EVAL_FILES["val_losses"], losses_csv("val"))

    for w in plan.groups(cfg):
        for k in range(k_runs):
            order = p.of("order", model=w["model"], task=w["task"], scheme=w["scheme"], run=k)
            Path(order).parent.mkdir(parents=True, exist_ok=True)
            np.save(order, np.stack([rng.permutation(n) for _ in range(cfg["train"]["epochs"])]), allow_pickle=False)
            evaluation(
                p.of("eval_single", **w, run=k),
                {**w, "kind": "single", "method": "single", "run": k, "seed": None, "epoch": cfg["train"]["epochs"]},
            )
            for e in plan.loss_epochs(cfg):
                write(p.of("run_losses", **w, run=k, epoch=e), losses_csv("train"))
        for m, s in merge_variants(cfg["merge"]["methods"], cfg["merge"]["seeds"]):
            evaluation(
                p.of("eval_merged", **w, method=m, mseed=s),
                {**w, "kind": "merged", "method": m, "run": None, "seed": s, "epoch": cfg["train"]["epochs"]},
            )
        for m in cfg["merge"]["methods"]:
            for e in plan.loss_epochs(cfg):
                write(
                    p.of("merged_losses", **w, method=m, mseed=cfg["merge"]["seeds"][0], epoch=e), losses_csv("train")
                )
        # tiny weights for the update table (analysis/storage.py): the base, each stored run, each merge
        epochs, seed0 = cfg["train"]["epochs"], cfg["merge"]["seeds"][0]
        weights(p.of("base", model=w["model"]), torch.zeros(6, dtype=torch.bfloat16))
        for k in range(k_runs):
            update = torch.tensor(rng.normal(0, 1e-3, 6), dtype=torch.float32)
            weights(p.of("checkpoint", **w, run=k, epoch=epochs), update)
            if w["precision"] in plan.rounded(cfg):
                weights(p.of("rounded", **w, run=k, epoch=epochs), update.to(torch.bfloat16))
        for m in cfg["merge"]["methods"]:
            weights(
                p.of("merged", **w, epoch=epochs, method=m, mseed=seed0),
                torch.tensor(
                    rng.normal(0, 1e-3, 6), dtype=torch.float32 if w["precision"] == "fp32" else torch.bfloat16
                ),
            )
        if w["precision"] in plan.rounded(cfg):
            for k in range(k_runs):
                rounded = p.of("rounded", **w, run=k, epoch=cfg["train"]["epochs"])
                write(
                    Path(rounded) / "round.json",
                    json.dumps(
                        {
                            "elements": 100,
                            "changed_fp32": 50,
                            "zero_fraction": 0.6,
                            "erased_fraction": 0.1,
                            "relative_norm_lost": 0.05,
                        }
                    ),
                )


def test_the_analysis_writes_exactly_the_planned_tables_and_figures(tmp_path):
    """analyze on a synthetic tree: the files it writes are plan's tables and figures, at Paths' places."""
    from ordermerge.analysis.run import analyze
    from ordermerge.paths import Paths

    cfg = smoke(eval={"harness": []}, merge={"methods": ["average", "select"], "seeds": [0, 1]})
    synthetic_results(tmp_path, cfg)
    analyze(cfg, tmp_path, tmp_path)
    p = Paths(str(tmp_path))
    planned = {p.of("table", name=n, ext="csv") for n in plan.table_names(cfg)}
    planned |= {p.of("table", name=n, ext="md") for n in plan.markdown_tables(cfg)}
    planned |= {p.of("figure", name=n) for n in plan.figure_names(cfg)}
    made = {
        str(f)
        for example in (p.of("table", name="x", ext="csv"), p.of("figure", name="x"))
        for f in Path(example).parent.glob("*")
    }
    assert made == planned
    assert Path(p.answer).exists()
    updates = pd.read_csv(p.of("table", name="updates", ext="csv"))
    ref = updates[(updates["precision"] == "fp32") & (updates["method"] == "average")].iloc[0]
    assert ref.norm_ratio == pytest.approx(1.0) and ref.cosine == pytest.approx(1.0)  # the reference itself
    assert len(updates) == 2 * (cfg["runs"] + 2)  # per precision: each run and each merge
