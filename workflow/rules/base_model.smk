rule base_model:
    output:
        directory(P.base),
    log:
        paths.job_log("base_model", R),
    benchmark:
        paths.job_benchmark("base_model", R)
    conda:
        "../../envs/ordermerge.yaml"
    params:
        source=lambda w: config["models"][w.model]["source"],
        dtype=lambda w: config["models"][w.model]["dtype"],
        remote=lambda w: remote_code_args(config["models"][w.model]),
    shell:
        "ordermerge base-model --source {params.source:q} --dtype {params.dtype} {params.remote} "
        "--out {output} > {log} 2>&1"
