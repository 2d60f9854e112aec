rule fine_tune:
    input:
        base=P.base,
        train=P.partial("split", split="train"),
        order=P.order,
    output:
        checkpoints=[
            directory(P.partial("checkpoint", epoch=e)) for e in range(1, EPOCHS + 1)
        ],
        steps=P.steps,
    log:
        paths.job_log("fine_tune", R),
    benchmark:
        paths.job_benchmark("fine_tune", R)
    conda:
        "../../envs/ordermerge.yaml"
    params:
        task_spec=task_spec_json,
        train_cfg=as_json(without(config["train"], "report_to")),
        seed=config["seed"],
        out_dir=lambda w, output: str(Path(output.steps).parent),
        launcher=lambda w, resources, threads: fine_tune_launcher(resources, threads),
        # The run's identity for train.report_to's trackers, whether or not any is on: which trackers get
        # the numbers cannot change a checkpoint, so train.report_to reaches the job through the environment
        # (REPORT_TO_ENV, set in common.smk) and turning one on reruns nothing. Tracker files are side outputs.
        tracker=lambda w: (
            f" --tracker-group {w.model}/{w.task}/{w.scheme} --tracker-run run{w.run} --tracker-dir "
            + shlex.quote(
                P.of(
                    "tensorboard",
                    model=w.model,
                    task=w.task,
                    scheme=w.scheme,
                    run=w.run,
                )
            )
        ),
    shell:
        "{params.launcher} --base {input.base} --train {input.train} --order {input.order} "
        "--out-dir {params.out_dir} --run-name {wildcards.task}-{wildcards.scheme}-run{wildcards.run} "
        "--task-spec {params.task_spec:q} --train-cfg {params.train_cfg:q} --seed {params.seed}"
        "{params.tracker} > {log} 2>&1"


# A narrower stored precision of a checkpoint (precisions: bf16, ...): rounded from the saved fp32 one, with
# what rounding lost against the base (round.json). The precision that train.save_dtype stores needs none.
rule round_checkpoint:
    input:
        checkpoint=P.checkpoint,
        base=P.base,
    output:
        directory(P.rounded),
    log:
        paths.job_log("round", R),
    benchmark:
        paths.job_benchmark("round", R)
    conda:
        "../../envs/ordermerge.yaml"
    params:
        seed=rounding_seed,
    shell:
        "ordermerge round --model-dir {input.checkpoint} --base {input.base} --precision {wildcards.precision} "
        "--seed {params.seed} --threads {threads} --out {output} > {log} 2>&1"


rule sample_losses:
    input:
        checkpoint=stored_checkpoint,
        splits=loss_split_files,
    output:
        P.run_losses,
    log:
        paths.job_log("sample_losses", R),
    benchmark:
        paths.job_benchmark("sample_losses", R)
    conda:
        "../../envs/ordermerge.yaml"
    params:
        splits=lambda w, input: " ".join(
            f"--split {s}={p}"
            for s, p in zip(config["losses"]["splits"], input.splits)
        ),
        task_spec=task_spec_json,
        batch=config["losses"]["batch_size"],
    shell:
        gpu_slots_shell(
            "ordermerge sample-losses --model-dir {input.checkpoint} {params.splits} "
            "--task-spec {params.task_spec:q} --batch-size {params.batch} --threads {threads} "
            "--out {output} > {log} 2>&1"
        )


use rule sample_losses as sample_losses_merged with:
    input:
        checkpoint=P.merged,
        splits=loss_split_files,
    output:
        P.merged_losses,
    log:
        paths.job_log("sample_losses_merged", R),
    benchmark:
        paths.job_benchmark("sample_losses_merged", R)
