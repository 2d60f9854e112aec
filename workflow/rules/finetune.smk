def fine_tune_launcher(resources, threads):
    """One process, or one per GPU under torchrun when the job holds several (train.parallel: ddp or fsdp)."""
    gpus = int(resources.get("gpu", 0) or 0)
    if gpus <= 1:
        return f"ordermerge fine-tune --threads {threads}"
    # --standalone: a private rendezvous on a free local port, so jobs sharing a node do not collide
    return (f"torchrun --standalone --nproc-per-node {gpus} -m ordermerge fine-tune "
            f"--threads {max(1, threads // gpus)}")


rule fine_tune:
    input:
        base=R + "/{model}/base",
        train=R + "/{model}/{task}/data/train.jsonl",
        order=RUN_DIR + "/orders/run{run}.npy",
    output:
        checkpoints=[directory(RUN_DIR + f"/runs/run{{run}}/epoch{e}") for e in range(1, EPOCHS + 1)],
        steps=RUN_DIR + "/runs/run{run}/steps.csv",
    params:
        task_spec=lambda w: as_json(config["tasks"][w.task]),
        train_cfg=as_json(config["train"]),
        seed=config["seed"],
        out_dir=lambda w, output: str(Path(output.steps).parent),
        launcher=lambda w, resources, threads: fine_tune_launcher(resources, threads),
    log:
        "logs/fine_tune/{model}_{task}_{scheme}_run{run}.log",
    threads: rule_threads("fine_tune")
    resources:
        **rule_resources("fine_tune", mem_mb=6000, runtime=120),
    shell:
        "{params.launcher} --base {input.base} --train {input.train} --order {input.order} "
        "--out-dir {params.out_dir} --run-name {wildcards.task}-{wildcards.scheme}-run{wildcards.run} "
        "--task-spec {params.task_spec:q} --train-cfg {params.train_cfg:q} --seed {params.seed} "
        "> {log} 2>&1"


rule sample_losses:
    input:
        checkpoint=RUN_DIR + "/runs/run{run}/epoch{epoch}",
        splits=lambda w: [f"{R}/{w.model}/{w.task}/data/{s}.jsonl" for s in config["losses"]["splits"]],
    output:
        RUN_DIR + "/losses/run{run}/epoch{epoch}.csv",
    params:
        splits=lambda w, input: " ".join(
            f"--split {s}={p}" for s, p in zip(config["losses"]["splits"], input.splits)
        ),
        task_spec=lambda w: as_json(config["tasks"][w.task]),
        batch=config["losses"]["batch_size"],
    log:
        "logs/sample_losses/{model}_{task}_{scheme}_run{run}_epoch{epoch}.log",
    threads: rule_threads("sample_losses")
    resources:
        **rule_resources("sample_losses", mem_mb=4000, runtime=30),
    shell:
        "ordermerge sample-losses --model-dir {input.checkpoint} {params.splits} "
        "--task-spec {params.task_spec:q} --batch-size {params.batch} --threads {threads} "
        "--out {output} > {log} 2>&1"


rule sample_losses_merged:
    input:
        checkpoint=RUN_DIR + "/merged/epoch{epoch}/{method}/seed{mseed}",
        splits=lambda w: [f"{R}/{w.model}/{w.task}/data/{s}.jsonl" for s in config["losses"]["splits"]],
    output:
        RUN_DIR + "/losses/merged/{method}/seed{mseed}/epoch{epoch}.csv",
    params:
        splits=lambda w, input: " ".join(
            f"--split {s}={p}" for s, p in zip(config["losses"]["splits"], input.splits)
        ),
        task_spec=lambda w: as_json(config["tasks"][w.task]),
        batch=config["losses"]["batch_size"],
    log:
        "logs/sample_losses/{model}_{task}_{scheme}_{method}_seed{mseed}_epoch{epoch}.log",
    threads: rule_threads("sample_losses_merged")
    resources:
        **rule_resources("sample_losses_merged", mem_mb=4000, runtime=30),
    shell:
        "ordermerge sample-losses --model-dir {input.checkpoint} {params.splits} "
        "--task-spec {params.task_spec:q} --batch-size {params.batch} --threads {threads} "
        "--out {output} > {log} 2>&1"
