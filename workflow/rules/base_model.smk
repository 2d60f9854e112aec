import shlex


def remote_code_args(model):
    """--trust-remote-code only when the config says so, always with the reviewed revision it requires
    (a string, quoted here: "" for the default, as before, so no existing base model is re-run)."""
    args = ["--trust-remote-code"] if model["trust_remote_code"] else []
    args += ["--revision", model["revision"]] if model["revision"] else []
    return " ".join(map(shlex.quote, args))


rule base_model:
    output:
        directory(R + "/{model}/base"),
    params:
        source=lambda w: config["models"][w.model]["source"],
        dtype=lambda w: config["models"][w.model]["dtype"],
        remote=lambda w: remote_code_args(config["models"][w.model]),
    log:
        "logs/base_model/{model}.log",
    threads: rule_threads("base_model")
    resources:
        **rule_resources("base_model", mem_mb=4000, runtime=30),
    shell:
        "ordermerge base-model --source {params.source:q} --dtype {params.dtype} {params.remote} "
        "--out {output} > {log} 2>&1"
