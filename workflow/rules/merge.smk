def merge_inputs(w):
    return [f"{R}/{w.model}/{w.task}/{w.scheme}/runs/run{k}/epoch{w.epoch}" for k in range(K)]


def merge_flags(w):
    """CLI flags of a method key; the baselines take their parameters from config merge.*."""
    m = config["merge"]
    if w.method.startswith("resample"):
        return f"--method select --resample {w.method[len('resample'):]}"
    if w.method == "task_arithmetic":
        return f"--method task_arithmetic --scale {m['scale']}"
    if w.method == "ties":
        return f"--method ties --density {m['density']} --scale {m['scale']}"
    if w.method == "dare":
        return f"--method dare --drop-rate {m['drop_rate']} --scale {m['scale']}"
    return f"--method {w.method}"  # average, select, model_stock


rule merge:
    input:
        base=R + "/{model}/base",
        models=merge_inputs,
    output:
        directory(RUN_DIR + "/merged/epoch{epoch}/{method}/seed{mseed}"),
    params:
        flags=merge_flags,
    log:
        "logs/merge/{model}_{task}_{scheme}_epoch{epoch}_{method}_seed{mseed}.log",
    threads: rule_threads("merge")
    resources:
        **rule_resources("merge", mem_mb=4000, runtime=30),
    shell:
        "ordermerge merge --base {input.base} {params.flags} --seed {wildcards.mseed} "
        "--threads {threads} --force --out {output} {input.models} > {log} 2>&1"
