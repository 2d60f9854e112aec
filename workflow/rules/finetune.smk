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
        paths.job_log("fine_tune"),
    benchmark:
        paths.job_benchmark("fine_tune")
    conda:
        "../../envs/ordermerge.yaml"
    threads: rule_threads("fine_tune")
    resources:
        **rule_resources("fine_tune", mem_mb=6000, runtime=120),
    params:
        task_spec=lambda w: as_json(config["tasks"][w.task]),
        train_cfg=as_json(config["train"]),
        seed=config["seed"],
        out_dir=lambda w, output: str(Path(output.steps).parent),
        launcher=lambda w, resources, threads: fine_tune_launcher(resources, threads),
        # train.report_to: the run's identity; tracker files are side outputs, like the log
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
            if config["train"]["report_to"]
            else ""
        ),
    shell:
        "{params.launcher} --base {input.base} --train {input.train} --order {input.order} "
        "--out-dir {params.out_dir} --run-name {wildcards.task}-{wildcards.scheme}-run{wildcards.run} "
        "--task-spec {params.task_spec:q} --train-cfg {params.train_cfg:q} --seed {params.seed}"
        "{params.tracker} > {log} 2>&1"


rule sample_losses:
    input:
        checkpoint=P.checkpoint,
        splits=lambda w: [
            P.of("split", model=w.model, task=w.task, split=s)
            for s in config["losses"]["splits"]
        ],
    output:
        P.run_losses,
    log:
        paths.job_log("sample_losses"),
    benchmark:
        paths.job_benchmark("sample_losses")
    conda:
        "../../envs/ordermerge.yaml"
    threads: rule_threads("sample_losses")
    resources:
        **rule_resources("sample_losses", mem_mb=4000, runtime=30),
    params:
        splits=lambda w, input: " ".join(
            f"--split {s}={p}"
            for s, p in zip(config["losses"]["splits"], input.splits)
        ),
        task_spec=lambda w: as_json(config["tasks"][w.task]),
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
        splits=lambda w: [
            P.of("split", model=w.model, task=w.task, split=s)
            for s in config["losses"]["splits"]
        ],
    output:
        P.merged_losses,
    log:
        paths.job_log("sample_losses_merged"),
    benchmark:
        paths.job_benchmark("sample_losses_merged")
    threads: rule_threads("sample_losses_merged")
    resources:
        **rule_resources("sample_losses_merged", mem_mb=4000, runtime=30),
