rule prepare_data:
    input:
        base=R + "/{model}/base",
    output:
        train=R + "/{model}/{task}/data/train.jsonl",
        val=R + "/{model}/{task}/data/val.jsonl",
        test=R + "/{model}/{task}/data/test.jsonl",
        # the held-out split, when a configured method chooses on data (the config then requires n_heldout >= 1)
        **({"heldout": R + "/{model}/{task}/data/heldout.jsonl"} if HELDOUT_NEEDED else {}),
    params:
        spec=lambda w: as_json(config["tasks"][w.task]),
        seed=config["seed"],
        out_dir=lambda w, output: str(Path(output.train).parent),
    log:
        "logs/prepare_data/{model}_{task}.log",
    shell:
        "ordermerge prepare-data --task {wildcards.task} --spec {params.spec:q} --base {input.base} "
        "--seed {params.seed} --out-dir {params.out_dir} > {log} 2>&1"


rule orders:
    input:
        train=R + "/{model}/{task}/data/train.jsonl",
    output:
        RUN_DIR + "/orders/run{run}.npy",
    params:
        epochs=EPOCHS,
        batch=config["train"]["batch_size"],
        seed=config["seed"],
    log:
        "logs/orders/{model}_{task}_{scheme}_run{run}.log",
    shell:
        "ordermerge orders --train {input.train} --task {wildcards.task} --scheme {wildcards.scheme} "
        "--run {wildcards.run} --epochs {params.epochs} --batch-size {params.batch} --seed {params.seed} "
        "--out {output} > {log} 2>&1"
