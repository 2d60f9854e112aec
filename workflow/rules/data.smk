rule prepare_data:
    input:
        base=P.base,
    output:
        **({"heldout": P.partial("split", split="heldout")} if HELDOUT_NEEDED else {}),
        train=P.partial("split", split="train"),
        val=P.partial("split", split="val"),
        test=P.partial("split", split="test"),
        # the held-out split, when a configured method chooses on data (the config then requires n_heldout >= 1)
    log:
        paths.job_log("prepare_data", R),
    benchmark:
        paths.job_benchmark("prepare_data", R)
    conda:
        "../../envs/ordermerge.yaml"
    params:
        spec=lambda w: as_json(config["tasks"][w.task]),
        seed=config["seed"],
        out_dir=lambda w, output: str(Path(output.train).parent),
    shell:
        "ordermerge prepare-data --task {wildcards.task} --spec {params.spec:q} --base {input.base} "
        "--seed {params.seed} --out-dir {params.out_dir} > {log} 2>&1"


rule orders:
    input:
        train=P.partial("split", split="train"),
    output:
        P.order,
    log:
        paths.job_log("orders", R),
    benchmark:
        paths.job_benchmark("orders", R)
    conda:
        "../../envs/ordermerge.yaml"
    params:
        epochs=EPOCHS,
        batch=config["train"]["batch_size"],
        seed=ORDER_SEED,
    shell:
        "ordermerge orders --train {input.train} --task {wildcards.task} --scheme {wildcards.scheme} "
        "--run {wildcards.run} --epochs {params.epochs} --batch-size {params.batch} --seed {params.seed} "
        "--out {output} > {log} 2>&1"
