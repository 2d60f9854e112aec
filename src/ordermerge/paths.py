"""Where every artefact lives: the one place that spells a path (no torch; the Snakefile imports it).

Each template names its Snakemake wildcards in braces; ``{results}`` is the config's ``results_dir``.
:class:`Paths` fills in ``results`` and gives the rules their patterns (``Paths(R).checkpoint``)
and everyone else concrete paths (``Paths(R).checkpoint.format(model=..., ...)`` or :meth:`Paths.of`).
"""

from __future__ import annotations

from dataclasses import dataclass

RUN = "{results}/{model}/{task}/{scheme}"  # one model x task x order scheme: its K runs and their merges
# One stored precision of the K runs (storage/precisions.py): everything made from their checkpoints in it.
STORED = RUN + "/{precision}"

TEMPLATES = {
    "base": "{results}/{model}/base",
    "split": "{results}/{model}/{task}/data/{split}.jsonl",  # train | val | test | heldout
    "order": RUN + "/orders/run{run}.npy",
    "checkpoint": RUN + "/runs/run{run}/epoch{epoch}",  # as fine_tune saved it (train.save_dtype)
    "rounded": RUN + "/runs/run{run}/{precision}/epoch{epoch}",  # a narrower precision's twin (+ round.json)
    "steps": RUN + "/runs/run{run}/steps.csv",
    # train.report_to: tensorboard (a side output, never declared): --logdir its scheme dir overlays the K runs
    "tensorboard": "{results}/tensorboard/{model}/{task}/{scheme}/run{run}",
    "run_losses": STORED + "/losses/run{run}/epoch{epoch}.csv",
    "merged": STORED + "/merged/epoch{epoch}/{method}/seed{mseed}",
    "merged_losses": STORED + "/losses/merged/{method}/seed{mseed}/epoch{epoch}.csv",
    # evaluation stems: + .json (metrics), .generations.jsonl, .val_losses.csv
    "eval_single": STORED + "/eval/single/run{run}",
    "eval_merged": STORED + "/eval/merged/{method}/seed{mseed}",
    # lm-eval-harness stems (eval.harness): + .json (tidy rows), .samples.jsonl (lm-eval's per-sample results)
    "harness_single": STORED + "/harness/single/run{run}",
    "harness_merged": STORED + "/harness/merged/{method}/seed{mseed}",
    "ksweep_merged": STORED + "/ksweep/size{size}/subset{subset}/{method}",
    "multitask_merged": "{results}/{model}/multitask/{precision}/merged/{method}/seed{mseed}",
    "eval_multitask": "{results}/{model}/multitask/{precision}/eval/{task}/{method}/seed{mseed}",
    "table": "{results}/tables/{name}.{ext}",
    "figure": "{results}/figures/{name}.png",
    "answer": "{results}/answer.rst",  # the report's landing page: the run's answer (analysis/answer.py)
    "timing": "{results}/timing.txt",  # `ordermerge timing` of a study run (Makefile), copied by study-report
}
EVAL_FILES = {"metrics": ".json", "generations": ".generations.jsonl", "val_losses": ".val_losses.csv"}
HARNESS_FILES = {"metrics": ".json", "samples": ".samples.jsonl"}

# Per job: its log and its Snakemake benchmark (wall s, CPU s, peak RSS), under logs/<stage>/ — the
# stage is what `ordermerge timing` splits the run's time by. Rules sharing a stage share a directory.
JOBS = {
    "base_model": ("base_model", "{model}"),
    "prepare_data": ("prepare_data", "{model}_{task}"),
    "orders": ("orders", "{model}_{task}_{scheme}_run{run}"),
    "fine_tune": ("fine_tune", "{model}_{task}_{scheme}_run{run}"),
    "sample_losses": ("sample_losses", "{model}_{task}_{scheme}_{precision}_run{run}_epoch{epoch}"),
    "sample_losses_merged": ("sample_losses", "{model}_{task}_{scheme}_{precision}_{method}_seed{mseed}_epoch{epoch}"),
    "round": ("round", "{model}_{task}_{scheme}_run{run}_{precision}_epoch{epoch}"),
    "merge": ("merge", "{model}_{task}_{scheme}_{precision}_epoch{epoch}_{method}_seed{mseed}"),
    "evaluate_single": ("evaluate", "{model}_{task}_{scheme}_{precision}_single_run{run}"),
    "evaluate_merged": ("evaluate", "{model}_{task}_{scheme}_{precision}_{method}_seed{mseed}"),
    "harness_single": ("harness", "{model}_{task}_{scheme}_{precision}_single_run{run}"),
    "harness_merged": ("harness", "{model}_{task}_{scheme}_{precision}_{method}_seed{mseed}"),
    "ksweep_merge": ("ksweep_merge", "{model}_{task}_{scheme}_{precision}_size{size}_subset{subset}_{method}"),
    "ksweep_evaluate": ("ksweep_evaluate", "{model}_{task}_{scheme}_{precision}_size{size}_subset{subset}_{method}"),
    "multitask_merge": ("multitask_merge", "{model}_{precision}_{method}_seed{mseed}"),
    "evaluate_multitask": ("evaluate_multitask", "{model}_{task}_{precision}_{method}_seed{mseed}"),
    "analyze": (".", "analyze"),
}
LOGS = "logs"
BENCHMARK_SUFFIX = ".benchmark.tsv"
DEFAULT_RESULTS = "results"


def logs_dir(results: str = DEFAULT_RESULTS) -> str:
    """Where a results dir's job logs and benchmarks go: ``logs/`` for the default ``results``, else
    ``logs/<results_dir>/``, so two configs with different results dirs never share a log or a timing."""
    rel = str(results).strip("/").replace("..", "_")
    return LOGS if rel == DEFAULT_RESULTS else f"{LOGS}/{rel}"


def job_log(rule: str, results: str = DEFAULT_RESULTS) -> str:
    stage, name = JOBS[rule]
    return f"{logs_dir(results)}/{stage}/{name}.log".replace("/./", "/")


def job_benchmark(rule: str, results: str = DEFAULT_RESULTS) -> str:
    stage, name = JOBS[rule]
    return f"{logs_dir(results)}/{stage}/{name}{BENCHMARK_SUFFIX}".replace("/./", "/")


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

    def eval_outputs(self, stem: str, files: dict[str, str] = EVAL_FILES) -> dict[str, str]:
        """The files an evaluation writes (``EVAL_FILES``; ``HARNESS_FILES`` for a harness stem), from its
        stem (a pattern or a concrete path)."""
        return {kind: getattr(self, stem) + ext for kind, ext in files.items()}
