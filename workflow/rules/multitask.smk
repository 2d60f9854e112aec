# Multi-task merge (paper Table 3): each task's single-task fine-tune (run multitask.run of the first
# scheme, final epoch) merged across tasks with `ordermerge merge`, then evaluated on every task.

MT = config["multitask"]
MT_SCHEME = SCHEMES[0]
MT_DIR = R + "/{model}/multitask"


def multitask_eval_files(model):
    stems = [f"{R}/{model}/multitask/eval/{t}/{m}/seed{s}" for t in MT["tasks"]
             for m, s in registry.merge_variants(MT["methods"], MT["seeds"])]
    return [s + ext for s in stems for ext in (".json", ".val_losses.csv")]


def multitask_targets():
    return [f"{R}/tables/table3.csv", f"{R}/tables/table3.md"] if MT["tasks"] else []


rule multitask_merge:
    input:
        base=R + "/{model}/base",
        models=lambda w: [f"{R}/{w.model}/{t}/{MT_SCHEME}/runs/run{MT['run']}/epoch{EPOCHS}" for t in MT["tasks"]],
    output:
        directory(MT_DIR + "/merged/{method}/seed{mseed}"),
    params:
        flags=merge_flags,
    log:
        "logs/multitask_merge/{model}_{method}_seed{mseed}.log",
    threads: rule_threads("multitask_merge")
    resources:
        **rule_resources("multitask_merge", mem_mb=4000, runtime=30),
    shell:
        "ordermerge merge --base {input.base} {params.flags} --seed {wildcards.mseed} "
        "--threads {threads} --force --out {output} {input.models} > {log} 2>&1"


rule evaluate_multitask:
    input:
        model=MT_DIR + "/merged/{method}/seed{mseed}",
        val=R + "/{model}/{task}/data/val.jsonl",
        test=R + "/{model}/{task}/data/test.jsonl",
    output:
        metrics=MT_DIR + "/eval/{task}/{method}/seed{mseed}.json",
        generations=MT_DIR + "/eval/{task}/{method}/seed{mseed}.generations.jsonl",
        val_losses=MT_DIR + "/eval/{task}/{method}/seed{mseed}.val_losses.csv",
    params:
        task_spec=lambda w: as_json(config["tasks"][w.task]),
        eval_cfg=as_json(config["eval"]),
        identity=lambda w: as_json(
            {"model": w.model, "task": w.task, "scheme": MT_SCHEME, "kind": "multitask", "method": w.method,
             "run": None, "seed": int(w.mseed), "epoch": EPOCHS,
             "merged": " ".join(f"{t}:run{MT['run']}" for t in MT["tasks"])}
        ),
    log:
        "logs/evaluate_multitask/{model}_{task}_{method}_seed{mseed}.log",
    threads: rule_threads("evaluate_multitask")
    resources:
        **rule_resources("evaluate_multitask", mem_mb=4000, runtime=60),
    shell:
        _eval_shell("{input.model}")
