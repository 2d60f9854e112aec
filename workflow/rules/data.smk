# The task's splits and each run's order. Cheap: on the submit host (localrule), not as cluster jobs.


rule prepare_data:
    input:
        base=P.base,
    output:
        # heldout.jsonl too when every task has n_heldout > 0 (else: prepare_data_heldout below)
        **split_outputs(heldout=not PLAIN_TASKS),
    log:
        P.log("prepare_data"),
    wildcard_constraints:
        task=names_pattern(PLAIN_TASKS or TASKS),
    localrule: True
    conda:
        "../../envs/ordermerge.yaml"
    params:
        spec=lambda w: as_json(config["tasks"][w.task]),
        seed=config["seed"],
        out_dir=lambda w, output: str(Path(output.train).parent),
    shell:
        "ordermerge prepare-data --task {wildcards.task} --spec {params.spec:q} --base {input.base} "
        "--seed {params.seed} --out-dir {params.out_dir} > {log} 2>&1"


# Some tasks with a held-out split, some without: the same command, declaring heldout.jsonl.
if HELDOUT_TASKS and PLAIN_TASKS:

    use rule prepare_data as prepare_data_heldout with:
        output:
            **split_outputs(heldout=True),
        wildcard_constraints:
            task=names_pattern(HELDOUT_TASKS),


rule orders:
    input:
        train=P.partial("split", split="train"),
    output:
        P.order,
    log:
        P.log("orders"),
    localrule: True
    conda:
        "../../envs/ordermerge.yaml"
    params:
        epochs=EPOCHS,
        batch=config["train"]["batch_size"],
        seed=config["seed"],
    shell:
        "ordermerge orders --train {input.train} --task {wildcards.task} --scheme {wildcards.scheme} "
        "--run {wildcards.run} --epochs {params.epochs} --batch-size {params.batch} --seed {params.seed} "
        "--out {output} > {log} 2>&1"
