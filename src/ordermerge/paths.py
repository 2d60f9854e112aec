"""Where every artefact lives: the one place that spells a path (no torch; the Snakefile imports it).

Each template names its Snakemake wildcards in braces; ``{results}`` is the config's ``results_dir``.
Logs (``LOGS``) live under ``logs/`` in the working directory. Which artefacts a config asks for is
``ordermerge.analysis.plan`` (the analysis) and the rules; where each one lives is only here.
:class:`Paths` fills in ``results`` and gives the rules their patterns (``Paths(R).checkpoint``)
and everyone else concrete paths (``Paths(R).checkpoint.format(model=..., ...)`` or :meth:`Paths.of`).
"""

from __future__ import annotations

from dataclasses import dataclass

RUN = "{results}/{model}/{task}/{scheme}"  # one model x task x order scheme: its K runs and their merges

TEMPLATES = {
    "base": "{results}/{model}/base",
    "split": "{results}/{model}/{task}/data/{split}.jsonl",  # train | val | test | heldout
    "order": RUN + "/orders/run{run}.npy",
    "checkpoint": RUN + "/runs/run{run}/epoch{epoch}",
    "steps": RUN + "/runs/run{run}/steps.csv",
    "run_losses": RUN + "/losses/run{run}/epoch{epoch}.csv",
    "merged": RUN + "/merged/epoch{epoch}/{method}/seed{mseed}",
    "merged_losses": RUN + "/losses/merged/{method}/seed{mseed}/epoch{epoch}.csv",
    # evaluation stems: + .json (metrics), .generations.jsonl, .val_losses.csv
    "eval_single": RUN + "/eval/single/run{run}",
    "eval_merged": RUN + "/eval/merged/{method}/seed{mseed}",
    "ksweep_merged": RUN + "/ksweep/size{size}/subset{subset}/{method}",
    "multitask_merged": "{results}/{model}/multitask/merged/{method}/seed{mseed}",
    "eval_multitask": "{results}/{model}/multitask/eval/{task}/{method}/seed{mseed}",
    "table": "{results}/tables/{name}.{ext}",
    "figure": "{results}/figures/{name}.png",
}
EVAL_FILES = {"metrics": ".json", "generations": ".generations.jsonl", "val_losses": ".val_losses.csv"}

STEP = "{model}_{task}_{scheme}"
# Each rule's log, relative to the working directory (not the results dir): logs/<stage>/<job>.log.
LOGS = {
    "base_model": "logs/base_model/{model}.log",
    "prepare_data": "logs/prepare_data/{model}_{task}.log",
    "orders": f"logs/orders/{STEP}_run{{run}}.log",
    "fine_tune": f"logs/fine_tune/{STEP}_run{{run}}.log",
    "sample_losses": f"logs/sample_losses/{STEP}_run{{run}}_epoch{{epoch}}.log",
    "sample_losses_merged": f"logs/sample_losses/{STEP}_{{method}}_seed{{mseed}}_epoch{{epoch}}.log",
    "merge": f"logs/merge/{STEP}_epoch{{epoch}}_{{method}}_seed{{mseed}}.log",
    "evaluate_single": f"logs/evaluate/{STEP}_single_run{{run}}.log",
    "evaluate_merged": f"logs/evaluate/{STEP}_{{method}}_seed{{mseed}}.log",
    "ksweep_merge": f"logs/ksweep_merge/{STEP}_size{{size}}_subset{{subset}}_{{method}}.log",
    "ksweep_evaluate": f"logs/ksweep_evaluate/{STEP}_size{{size}}_subset{{subset}}_{{method}}.log",
    "multitask_merge": "logs/multitask_merge/{model}_{method}_seed{mseed}.log",
    "evaluate_multitask": "logs/evaluate_multitask/{model}_{task}_{method}_seed{mseed}.log",
    "analysis": "logs/analysis/{family}.log",
}


@dataclass(frozen=True)
class Paths:
    """The templates with ``results`` filled in: Snakemake patterns whose other wildcards stay open."""

    results: str

    def __getattr__(self, name: str) -> str:
        if name not in TEMPLATES:
            raise AttributeError(name)
        return TEMPLATES[name].replace("{results}", self.results)

    def of(self, template: str, /, **wildcards) -> str:
        """A concrete path: every wildcard given."""
        return getattr(self, template).format(**wildcards)

    def partial(self, template: str, /, **wildcards) -> str:
        """A pattern with some wildcards filled and the rest left for Snakemake, e.g. split=train."""
        out = getattr(self, template)
        for key, value in wildcards.items():
            out = out.replace("{" + key + "}", str(value))
        return out

    @staticmethod
    def log(rule: str, /, **wildcards) -> str:
        """A rule's log pattern, with the given wildcards filled (e.g. the analysis family)."""
        out = LOGS[rule]
        for key, value in wildcards.items():
            out = out.replace("{" + key + "}", str(value))
        return out

    def eval_outputs(self, stem: str) -> dict[str, str]:
        """The three files an evaluation writes, from its stem (a pattern or a concrete path)."""
        return {kind: getattr(self, stem) + ext for kind, ext in EVAL_FILES.items()}
