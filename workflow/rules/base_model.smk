rule base_model:
    output:
        directory(R + "/{model}/base"),
    params:
        source=lambda w: config["models"][w.model]["source"],
        dtype=lambda w: config["models"][w.model]["dtype"],
        remote=lambda w: "--trust-remote-code" if config["models"][w.model]["trust_remote_code"] else "",
    log:
        "logs/base_model/{model}.log",
    threads: rule_threads("base_model")
    resources:
        **rule_resources("base_model", mem_mb=4000, runtime=30),
    shell:
        "ordermerge base-model --source {params.source:q} --dtype {params.dtype} {params.remote} "
        "--out {output} > {log} 2>&1"
