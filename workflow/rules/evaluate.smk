rule evaluate_single:
    input:
        model=lambda w: stored_checkpoint(w, EPOCHS),
        val=P.partial("split", split="val"),
        test=P.partial("split", split="test"),
    output:
        **P.eval_outputs("eval_single"),
    log:
        paths.job_log("evaluate_single", R),
    benchmark:
        paths.job_benchmark("evaluate_single", R)
    conda:
        "../../envs/ordermerge.yaml"
    threads: rule_threads("evaluate_single")
    resources:
        **rule_resources("evaluate_single", mem_mb=4000, runtime=60),
    params:
        task_spec=task_spec_json,
        eval_cfg=as_json(without(config["eval"], "harness")),
        identity=single_identity,
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
        paths.job_log("evaluate_merged", R),
    benchmark:
        paths.job_benchmark("evaluate_merged", R)
    threads: rule_threads("evaluate_merged")
    resources:
        **rule_resources("evaluate_merged", mem_mb=4000, runtime=60),
    params:
        task_spec=task_spec_json,
        eval_cfg=as_json(without(config["eval"], "harness")),
        identity=merged_identity,


# lm-eval-harness on the same models (eval.harness): mirrored tasks and/or standard lm-eval tasks.
rule harness_single:
    input:
        model=lambda w: stored_checkpoint(w, EPOCHS),
        test=P.partial("split", split="test"),
    output:
        **P.eval_outputs("harness_single", paths.HARNESS_FILES),
    log:
        paths.job_log("harness_single", R),
    benchmark:
        paths.job_benchmark("harness_single", R)
    conda:
        "../../envs/ordermerge.yaml"
    threads: rule_threads("harness_single")
    resources:
        **rule_resources("harness_single", mem_mb=4000, runtime=60),
    params:
        task_spec=task_spec_json,
        eval_cfg=as_json(config["eval"]),
        identity=single_identity,
    shell:
        harness_shell("{input.model}")


use rule harness_single as harness_merged with:
    input:
        model=P.partial("merged", epoch=MERGE_EPOCH),
        test=P.partial("split", split="test"),
    output:
        **P.eval_outputs("harness_merged", paths.HARNESS_FILES),
    log:
        paths.job_log("harness_merged", R),
    benchmark:
        paths.job_benchmark("harness_merged", R)
    threads: rule_threads("harness_merged")
    resources:
        **rule_resources("harness_merged", mem_mb=4000, runtime=60),
    params:
        task_spec=task_spec_json,
        eval_cfg=as_json(config["eval"]),
        identity=merged_identity,
