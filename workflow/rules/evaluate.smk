def _eval_shell(model_dir):
    return (
        "ordermerge evaluate --model-dir " + model_dir + " --val {input.val} --test {input.test} "
        "--task-spec {params.task_spec:q} --eval-cfg {params.eval_cfg:q} --identity {params.identity:q} "
        "--threads {threads} --out {output.metrics} --generations {output.generations} "
        "--val-losses {output.val_losses} > {log} 2>&1"
    )


rule evaluate_single:
    input:
        model=RUN_DIR + f"/runs/run{{run}}/epoch{EPOCHS}",
        val=R + "/{model}/{task}/data/val.jsonl",
        test=R + "/{model}/{task}/data/test.jsonl",
    output:
        metrics=RUN_DIR + "/eval/single/run{run}.json",
        generations=RUN_DIR + "/eval/single/run{run}.generations.jsonl",
        val_losses=RUN_DIR + "/eval/single/run{run}.val_losses.csv",
    params:
        task_spec=lambda w: as_json(config["tasks"][w.task]),
        eval_cfg=as_json(config["eval"]),
        identity=lambda w: as_json(
            {"model": w.model, "task": w.task, "scheme": w.scheme, "kind": "single", "method": "single",
             "run": int(w.run), "seed": None, "epoch": EPOCHS}
        ),
    log:
        "logs/evaluate/{model}_{task}_{scheme}_single_run{run}.log",
    threads: rule_threads("evaluate_single")
    resources:
        **rule_resources("evaluate_single", mem_mb=4000, runtime=60),
    shell:
        _eval_shell("{input.model}")


rule evaluate_merged:
    input:
        model=RUN_DIR + f"/merged/epoch{MERGE_EPOCH}/{{method}}/seed{{mseed}}",
        val=R + "/{model}/{task}/data/val.jsonl",
        test=R + "/{model}/{task}/data/test.jsonl",
    output:
        metrics=RUN_DIR + "/eval/merged/{method}/seed{mseed}.json",
        generations=RUN_DIR + "/eval/merged/{method}/seed{mseed}.generations.jsonl",
        val_losses=RUN_DIR + "/eval/merged/{method}/seed{mseed}.val_losses.csv",
    params:
        task_spec=lambda w: as_json(config["tasks"][w.task]),
        eval_cfg=as_json(config["eval"]),
        identity=lambda w: as_json(
            {"model": w.model, "task": w.task, "scheme": w.scheme, "kind": "merged", "method": w.method,
             "run": None, "seed": int(w.mseed), "epoch": MERGE_EPOCH}
        ),
    log:
        "logs/evaluate/{model}_{task}_{scheme}_{method}_seed{mseed}.log",
    threads: rule_threads("evaluate_merged")
    resources:
        **rule_resources("evaluate_merged", mem_mb=4000, runtime=60),
    shell:
        _eval_shell("{input.model}")
