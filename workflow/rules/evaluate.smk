rule evaluate_single:
    input:
        model=P.partial("checkpoint", epoch=EPOCHS),
        val=P.partial("split", split="val"),
        test=P.partial("split", split="test"),
    output:
        **P.eval_outputs("eval_single"),
    log:
        paths.job_log("evaluate_single"),
    benchmark:
        paths.job_benchmark("evaluate_single")
    conda:
        "../../envs/ordermerge.yaml"
    threads: rule_threads("evaluate_single")
    resources:
        **rule_resources("evaluate_single", mem_mb=4000, runtime=60),
    params:
        task_spec=lambda w: as_json(config["tasks"][w.task]),
        eval_cfg=as_json(config["eval"]),
        identity=lambda w: as_json(
            {
                "model": w.model,
                "task": w.task,
                "scheme": w.scheme,
                "kind": "single",
                "method": "single",
                "run": int(w.run),
                "seed": None,
                "epoch": EPOCHS,
            }
        ),
    shell:
        eval_shell("{input.model}")


use rule evaluate_single as evaluate_merged with:
    input:
        model=P.partial("merged", epoch=MERGE_EPOCH),
        val=P.partial("split", split="val"),
        test=P.partial("split", split="test"),
    output:
        **P.eval_outputs("eval_merged"),
    log:
        paths.job_log("evaluate_merged"),
    benchmark:
        paths.job_benchmark("evaluate_merged")
    threads: rule_threads("evaluate_merged")
    resources:
        **rule_resources("evaluate_merged", mem_mb=4000, runtime=60),
    params:
        task_spec=lambda w: as_json(config["tasks"][w.task]),
        eval_cfg=as_json(config["eval"]),
        identity=lambda w: as_json(
            {
                "model": w.model,
                "task": w.task,
                "scheme": w.scheme,
                "kind": "merged",
                "method": w.method,
                "run": None,
                "seed": int(w.mseed),
                "epoch": MERGE_EPOCH,
            }
        ),
