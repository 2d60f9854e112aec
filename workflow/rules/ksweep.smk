# K-sweep (beyond the paper): merge random subsets of the K final checkpoints and score each merge
# (plan, paths and helpers in common.smk).


use rule merge as ksweep_merge with:
    input:
        unpack(heldout_input),
        base=P.base,
        models=lambda w: [
            stored(w.model, w.task, w.scheme, w.precision, k, EPOCHS)
            for k in ksweep_runs(w)
        ],
    output:
        # temp: a subset merge is only read by its evaluation and takes seconds to redo; at gpu.yaml's
        # scale keeping them would add ~20 GB of disk
        temp(directory(P.ksweep_merged)),
    log:
        paths.job_log("ksweep_merge", R),
    benchmark:
        paths.job_benchmark("ksweep_merge", R)
    params:
        flags=merge_flags,
        seed=KSWEEP_SEED,


rule ksweep_evaluate:
    input:
        model=P.ksweep_merged,
        val=P.partial("split", split="val"),
        test=P.partial("split", split="test"),
    output:
        **(
            {
                k: v
                for k, v in P.eval_outputs("ksweep_merged").items()
                if k != "val_losses"
            }
            if KSWEEP["exact_match"]
            else {}
        ),
        val_losses=P.eval_outputs("ksweep_merged")["val_losses"],
    log:
        paths.job_log("ksweep_evaluate", R),
    benchmark:
        paths.job_benchmark("ksweep_evaluate", R)
    conda:
        "../../envs/ordermerge.yaml"
    params:
        task_spec=task_spec_json,
        # the full evaluation's settings only when it runs (ksweep.exact_match): the loss-only command reads
        # eval.batch_size alone
        eval_cfg=(
            as_json(without(config["eval"], "harness"))
            if KSWEEP["exact_match"]
            else ""
        ),
        batch=config["eval"]["batch_size"],
        identity=lambda w: as_json(
            {
                "model": w.model,
                "task": w.task,
                "scheme": w.scheme,
                "precision": w.precision,
                "kind": "ksweep",
                "method": w.method,
                "run": None,
                "seed": KSWEEP_SEED,
                "epoch": EPOCHS,
                "subset_size": int(w.size),
                "subset": int(w.subset),
                "merged": " ".join(f"run{k}" for k in ksweep_runs(w)),
            }
        ),
    shell:
        eval_shell("{input.model}") if KSWEEP["exact_match"] else KSWEEP_LOSS_SHELL
