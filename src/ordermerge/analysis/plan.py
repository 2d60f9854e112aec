"""Which figures and tables a config asks for, and which artefacts each one reads (no torch, no pandas).

The analysis is cut into families, one Snakemake rule and one ``ordermerge analyze --family`` each:

- ``fig1``: Fig. 1 per (model, task, scheme) and ``imbalance.csv`` (the position-effect statistics);
- ``fig3``: Fig. 3 per cell and ``fig3_rho.csv`` (its per-segment numbers);
- ``fig4``: Fig. 4 per cell, only when every epoch is scored (``losses.epochs: all``, > 1 epoch);
- ``tables``: Table 1, ``metrics.csv``, Table 2 (≥ 2 models), Table 4 (both schemes);
- ``ksweep``: ``ksweep.csv``/``.md`` and a figure per cell (``ksweep.enabled``);
- ``table3``: the multi-task merge table (``multitask.tasks``).

:class:`Plan` is the one statement of these conditions and of each family's inputs and outputs: the
rules declare what it lists and the analysis reads and writes exactly that (paths from paths.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ordermerge.merging.registry import merge_variants
from ordermerge.merging.subsets import sweep_plan
from ordermerge.paths import EVAL_FILES, Paths

FAMILIES = ("fig1", "fig3", "fig4", "tables", "ksweep", "table3")
COMPARISONS = {"table2": "model", "table4": "scheme"}  # table name -> what Table 1's rows are compared by
# The config sections each family reads: its rule passes only these, so that a change elsewhere (a merge
# seed added, the K-sweep switched on) re-runs only the families it concerns.
_CELLS = ("models", "tasks", "schemes", "runs", "train")
FAMILY_KEYS = {
    "fig1": (*_CELLS, "analysis", "seed"),
    "fig3": (*_CELLS, "analysis", "seed", "merge"),
    "fig4": (*_CELLS, "losses", "merge"),
    "tables": (*_CELLS, "merge", "ksweep", "multitask", "seed"),
    "ksweep": (*_CELLS, "merge", "ksweep", "seed"),
    "table3": (*_CELLS, "merge", "multitask"),
}


@dataclass(frozen=True, eq=False)
class Plan:
    """The analysis a validated config asks for, over the results tree at ``results``."""

    cfg: dict
    results: str

    @property
    def paths(self) -> Paths:
        return Paths(str(self.results))

    # --- what the config asks for --------------------------------------------------------------

    def cells(self) -> list[dict]:
        """Every (model, task, scheme) as wildcards, in the config's order."""
        c = self.cfg
        return [{"model": m, "task": t, "scheme": s} for m in c["models"] for t in c["tasks"] for s in c["schemes"]]

    def loss_epochs(self) -> list[int]:
        """The epochs whose per-sample losses are scored: every epoch with ``losses.epochs: all``."""
        epochs = self.cfg["train"]["epochs"]
        return list(range(1, epochs + 1)) if self.cfg["losses"]["epochs"] == "all" else [epochs]

    def comparisons(self) -> dict[str, str]:
        """Table 2 compares models (≥ 2 configured), Table 4 the two order schemes (both configured)."""
        wanted = {"table2": len(self.cfg["models"]) > 1, "table4": set(self.cfg["schemes"]) == {"shuffle", "fixbatch"}}
        return {name: by for name, by in COMPARISONS.items() if wanted[name]}

    def families(self) -> list[str]:
        """The families this config produces, in FAMILIES order."""
        on = {"fig4": len(self.loss_epochs()) > 1, "ksweep": bool(self.cfg["ksweep"]["enabled"]),
              "table3": bool(self.cfg["multitask"]["tasks"])}
        return [f for f in FAMILIES if on.get(f, True)]

    # --- the artefacts the analysis reads --------------------------------------------------------

    def orders(self, cell: dict) -> list[str]:
        return [self.paths.of("order", **cell, run=k) for k in range(self.cfg["runs"])]

    def run_losses(self, cell: dict, epoch: int) -> list[str]:
        return [self.paths.of("run_losses", **cell, run=k, epoch=epoch) for k in range(self.cfg["runs"])]

    def merged_losses(self, cell: dict, epoch: int) -> dict[str, str]:
        """Per-sample losses of each merge method at one epoch (first merge seed): Fig. 3 and 4."""
        seed = self.cfg["merge"]["seeds"][0]
        return {m: self.paths.of("merged_losses", **cell, method=m, mseed=seed, epoch=epoch)
                for m in self.cfg["merge"]["methods"]}

    def evaluations(self) -> list[tuple[tuple[str, str, str, str], str]]:
        """((model, task, scheme, method), stem) of every single-run and merged evaluation, method
        "single" for the runs; merge_variants says which seeds were built. Sorted by path, the order a
        glob of the tree used to give."""
        out = []
        for cell in self.cells():
            key = (cell["model"], cell["task"], cell["scheme"])
            out += [((*key, "single"), self.paths.of("eval_single", **cell, run=k)) for k in range(self.cfg["runs"])]
            out += [((*key, m), self.paths.of("eval_merged", **cell, method=m, mseed=s))
                    for m, s in merge_variants(self.cfg["merge"]["methods"], self.cfg["merge"]["seeds"])]
        return sorted(out, key=lambda item: item[1].split("/"))

    def ksweep_subsets(self) -> list[tuple[dict, int, int, tuple[int, ...], str, str]]:
        """(cell, size, subset index, runs merged, method, evaluation stem) of every K-sweep merge."""
        ks = self.cfg["ksweep"]
        if not ks["enabled"]:
            return []
        plan = sweep_plan(self.cfg["runs"], ks["sizes"], ks["subsets"], self.cfg["seed"])
        return [(cell, size, i, runs, m, self.paths.of("ksweep_merged", **cell, size=size, subset=i, method=m))
                for cell in self.cells() for size, subsets in plan.items()
                for i, runs in enumerate(subsets) for m in ks["methods"]]

    def multitask_evaluations(self) -> list[tuple[str, str, str, int, str]]:
        """(model, task evaluated on, method, merge seed, stem) of every multi-task merge's evaluation."""
        mt = self.cfg["multitask"]
        return [(model, task, m, s, self.paths.of("eval_multitask", model=model, task=task, method=m, mseed=s))
                for model in self.cfg["models"] for task in mt["tasks"]
                for m, s in merge_variants(mt["methods"], mt["seeds"])]

    def _ksweep_files(self) -> list[str]:
        kinds = ("val_losses", "metrics") if self.cfg["ksweep"]["exact_match"] else ("val_losses",)
        return [stem + EVAL_FILES[k] for *_, stem in self.ksweep_subsets() for k in kinds]

    def _single_metrics(self) -> list[str]:
        return [stem + EVAL_FILES["metrics"] for (*_, method), stem in self.evaluations() if method == "single"]

    def inputs(self, family: str) -> list[str]:
        """The files one family reads."""
        final = self.cfg["train"]["epochs"]
        if family in ("fig1", "fig3"):
            return [f for cell in self.cells() for f in [
                *self.orders(cell), *self.run_losses(cell, final),
                *(self.merged_losses(cell, final).values() if family == "fig3" else [])]]
        if family == "fig4":
            return [f for cell in self.cells() for e in self.loss_epochs()
                    for f in [*self.run_losses(cell, e), *self.merged_losses(cell, e).values()]]
        multitask = [stem + EVAL_FILES["metrics"] for *_, stem in self.multitask_evaluations()]
        if family == "tables":
            evals = [stem + EVAL_FILES[k] for _, stem in self.evaluations() for k in ("metrics", "val_losses")]
            return evals + self._ksweep_files() + multitask
        if family == "ksweep":
            return self._single_metrics() + self._ksweep_files()
        if family == "table3":
            return self._single_metrics() + multitask
        raise ValueError(f"no analysis family {family!r}; known: {', '.join(FAMILIES)}")

    # --- what it writes ----------------------------------------------------------------------------

    def figure(self, kind: str, cell: dict) -> str:
        """One figure of one cell, e.g. ``figure("fig1", cell)`` -> figures/fig1_<model>_<task>_<scheme>.png."""
        return self.paths.of("figure", name=f"{kind}_{cell['model']}_{cell['task']}_{cell['scheme']}")

    def table(self, name: str, ext: str = "csv") -> str:
        return self.paths.of("table", name=name, ext=ext)

    def outputs(self, family: str) -> list[str]:
        """The files one family writes (every one of them: the rules declare this list)."""
        figures = [self.figure(family, cell) for cell in self.cells()]
        if family == "fig1":
            return [self.table("imbalance"), *figures]
        if family == "fig3":
            return [self.table("fig3_rho"), *figures]
        if family == "fig4":
            return figures
        if family == "tables":
            named = ["table1", *self.comparisons()]
            return [self.table("metrics"), *(self.table(n, ext) for n in named for ext in ("csv", "md"))]
        if family in ("ksweep", "table3"):
            return [self.table(family, ext) for ext in ("csv", "md")] + (figures if family == "ksweep" else [])
        raise ValueError(f"no analysis family {family!r}; known: {', '.join(FAMILIES)}")

    def family_config(self, family: str) -> dict:
        """The config sections one family reads (FAMILY_KEYS), for ``ordermerge analyze --family``."""
        return {k: self.cfg[k] for k in FAMILY_KEYS[family]}

    def targets(self) -> list[str]:
        """Every file of every family the config asks for (the workflow's final targets)."""
        return [f for family in self.families() for f in self.outputs(family)]
