# K-sweep (beyond the paper): merge random subsets of the K final checkpoints and score each merge.
# The subsets come from ordermerge.merging.subsets.sweep_plan (seeded by (seed, size, index)); the merge is
# the same `ordermerge merge` as rule merge, with the first merge seed.
from ordermerge.merging.subsets import sweep_plan

KSWEEP = config["ksweep"]
KSWEEP_PLAN = sweep_plan(K, KSWEEP["sizes"], KSWEEP["subsets"], config["seed"]) if KSWEEP["enabled"] else {}
KSWEEP_SEED = config["merge"]["seeds"][0]
KSWEEP_DIR = RUN_DIR + "/ksweep/size{size}/subset{subset}"


wildcard_constraints:
    size=r"\d+",
    subset=r"\d+",


def ksweep_runs(w):
    return KSWEEP_PLAN[int(w.size)][int(w.subset)]


def ksweep_eval_files(model, task, scheme):
    exts = (".val_losses.csv", ".json") if KSWEEP["exact_match"] else (".val_losses.csv",)
    return [
        f"{R}/{model}/{task}/{scheme}/ksweep/size{n}/subset{i}/{method}{ext}"
        for n, subsets in KSWEEP_PLAN.items()
        for i in range(len(subsets))
        for method in KSWEEP["methods"]
        for ext in exts
    ]


def ksweep_targets():
    if not KSWEEP["enabled"]:
        return []
    return [f"{R}/tables/ksweep.csv"] + [f"{R}/figures/ksweep_{m}_{t}_{s}.png" for m in MODELS for t in TASKS for s in SCHEMES]


rule ksweep_merge:
    input:
        unpack(heldout_input),
        base=R + "/{model}/base",
        models=lambda w: [f"{R}/{w.model}/{w.task}/{w.scheme}/runs/run{k}/epoch{EPOCHS}" for k in ksweep_runs(w)],
    output:
        # temp: a subset merge is only read by its evaluation and takes seconds to redo; at gpu.yaml's
        # scale keeping them would add ~20 GB of disk
        temp(directory(KSWEEP_DIR + "/{method}")),
    params:
        flags=merge_flags,
        seed=KSWEEP_SEED,
    log:
        "logs/ksweep_merge/{model}_{task}_{scheme}_size{size}_subset{subset}_{method}.log",
    threads: rule_threads("ksweep_merge")
    resources:
        **rule_resources("ksweep_merge", mem_mb=4000, runtime=30),
    shell:
        "ordermerge merge --base {input.base} {params.flags} --seed {params.seed} "
        "--threads {threads} --force --out {output} {input.models} > {log} 2>&1"


# Validation loss only (per-sample, token-weighted in the analysis) unless ksweep.exact_match: then the
# full evaluation, greedy decoding included (~1 min per model on 2 CPU cores at the default size).
_KSWEEP_LOSS_SHELL = (
    "ordermerge sample-losses --model-dir {input.model} --split val={input.val} --task-spec {params.task_spec:q} "
    "--batch-size {params.batch} --threads {threads} --out {output.val_losses} > {log} 2>&1"
)


rule ksweep_evaluate:
    input:
        model=KSWEEP_DIR + "/{method}",
        val=R + "/{model}/{task}/data/val.jsonl",
        test=R + "/{model}/{task}/data/test.jsonl",
    output:
        val_losses=KSWEEP_DIR + "/{method}.val_losses.csv",
        **(
            {"metrics": KSWEEP_DIR + "/{method}.json", "generations": KSWEEP_DIR + "/{method}.generations.jsonl"}
            if KSWEEP["exact_match"]
            else {}
        ),
    params:
        task_spec=lambda w: as_json(config["tasks"][w.task]),
        eval_cfg=as_json(config["eval"]),
        batch=config["eval"]["batch_size"],
        identity=lambda w: as_json(
            {"model": w.model, "task": w.task, "scheme": w.scheme, "kind": "ksweep", "method": w.method,
             "run": None, "seed": KSWEEP_SEED, "epoch": EPOCHS, "subset_size": int(w.size),
             "subset": int(w.subset), "merged": " ".join(f"run{k}" for k in ksweep_runs(w))}
        ),
    log:
        "logs/ksweep_evaluate/{model}_{task}_{scheme}_size{size}_subset{subset}_{method}.log",
    threads: rule_threads("ksweep_evaluate")
    resources:
        **rule_resources("ksweep_evaluate", mem_mb=4000, runtime=30),
    shell:
        _eval_shell("{input.model}") if KSWEEP["exact_match"] else _KSWEEP_LOSS_SHELL
