# Multi-task merge (paper Table 3): each task's single-task fine-tune merged across tasks, evaluated
# on every task (helpers in common.smk).


use rule merge as multitask_merge with:
    input:
        base=P.base,
        models=lambda w: [
            stored(w.model, t, MT_SCHEME, w.precision, MT["run"], EPOCHS)
            for t in MT["tasks"]
        ],
    output:
        directory(P.multitask_merged),
    log:
        paths.job_log("multitask_merge", R),
    benchmark:
        paths.job_benchmark("multitask_merge", R)


rule evaluate_multitask:
    input:
        model=P.multitask_merged,
        val=P.partial("split", split="val"),
        test=P.partial("split", split="test"),
    output:
        **P.eval_outputs("eval_multitask"),
    log:
        paths.job_log("evaluate_multitask", R),
    benchmark:
        paths.job_benchmark("evaluate_multitask", R)
    conda:
        "../../envs/ordermerge.yaml"
    params:
        task_spec=task_spec_json,
        eval_cfg=as_json(without(config["eval"], "harness")),
        identity=lambda w: as_json(
            {
                "model": w.model,
                "task": w.task,
                "scheme": MT_SCHEME,
                "precision": w.precision,
                "kind": "multitask",
                "method": w.method,
                "run": None,
                "seed": int(w.mseed),
                "epoch": EPOCHS,
                "merged": " ".join(f"{t}:run{MT['run']}" for t in MT["tasks"]),
            }
        ),
    shell:
        eval_shell("{input.model}")
