"""What the analysis of a config makes: its tables and figures by name (no torch; the Snakefile imports it).

One place for both sides: common.smk declares these names as the analyze rule's outputs, and the analysis
(analysis/run.py, subsets.py) writes exactly them, deciding by the same functions which ones a config has.
Names become paths through :class:`ordermerge.paths.Paths` (``of("table", name=..., ext=...)``,
``of("figure", name=...)``).
"""

from __future__ import annotations

from ordermerge.scoring.harness import MIRROR
from ordermerge.storage import precisions

# Tables written as CSV only (the tidy ones other tables are computed from); the rest also as Markdown.
CSV_ONLY = ("imbalance", "metrics", "fig3_rho")


def loss_epochs(cfg: dict) -> list[int]:
    """The epochs whose checkpoints are scored per sample (losses.epochs)."""
    epochs = cfg["train"]["epochs"]
    return list(range(1, epochs + 1)) if cfg["losses"]["epochs"] == "all" else [epochs]


def rounded(cfg: dict) -> list[str]:
    """Precisions rounded from the saved checkpoints: the storage-loss table and figure compare them with it."""
    return [p for p in cfg["precisions"] if not precisions.is_saved_form(p, cfg["train"]["save_dtype"])]


def has_fig4(cfg: dict) -> bool:
    """Fig. 4 (loss vs epoch) needs more than one scored epoch: losses.epochs = all."""
    return len(loss_epochs(cfg)) > 1


def has_table2(cfg: dict) -> bool:
    return len(cfg["models"]) > 1


def has_table4(cfg: dict) -> bool:
    return set(cfg["schemes"]) == {"shuffle", "fixbatch"}


def has_harness_agreement(cfg: dict) -> bool:
    return MIRROR in cfg["eval"]["harness"]


def figure_name(kind: str, model: str, task: str, scheme: str, precision: str | None = None) -> str:
    """fig1/fig3/fig4/ksweep of one (model, task, scheme, precision); storage of one (model, task, scheme)."""
    return "_".join([kind, model, task, scheme, *([precision] if precision else [])])


def groups(cfg: dict) -> list[dict]:
    """(model, task, scheme, precision) of every set of K runs, headline precision first within a scheme."""
    return [
        {"model": m, "task": t, "scheme": s, "precision": p}
        for m in cfg["models"]
        for t in cfg["tasks"]
        for s in cfg["schemes"]
        for p in cfg["precisions"]
    ]


def figure_names(cfg: dict) -> list[str]:
    kinds = ["fig1", "fig3", *(["fig4"] if has_fig4(cfg) else [])]
    names = [figure_name(k, **w) for k in kinds for w in groups(cfg)]
    if rounded(cfg):
        names += [figure_name("storage", m, t, s) for m in cfg["models"] for t in cfg["tasks"] for s in cfg["schemes"]]
    return names


def table_names(cfg: dict) -> list[str]:
    names = ["table1", "imbalance", "metrics", "fig3_rho", *(["storage", "updates"] * bool(rounded(cfg)))]
    if has_table2(cfg):
        names.append("table2")
    if has_table4(cfg):
        names.append("table4")
    if has_harness_agreement(cfg):
        names.append("harness_agreement")
    return names


def markdown_tables(cfg: dict) -> list[str]:
    return [n for n in table_names(cfg) if n not in CSV_ONLY]


def ksweep_figure_names(cfg: dict) -> list[str]:
    return [figure_name("ksweep", **w) for w in groups(cfg)] if cfg["ksweep"]["enabled"] else []
