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
    params:
        task_spec=task_spec_json,
        eval_cfg=as_json(without(config["eval"], "harness")),
        identity=eval_identity,
    shell:
        eval_shell("{input.model}")


# `use rule ... with:` replaces whole sections: the merged rules restate their input for its model (and their
# output, log and benchmark, named per rule); params and shell are the single rules'.
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
    params:
        task_spec=task_spec_json,
        eval_cfg=as_json(config["eval"]),
        identity=eval_identity,
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
