def merge_inputs(w):
    return [f"{R}/{w.model}/{w.task}/{w.scheme}/runs/run{k}/epoch{w.epoch}" for k in range(K)]


def merge_flags(w, input):
    """CLI flags of a method key (registry.cli_flags); a method that chooses on data also gets the task's
    held-out split and spec (registry.needs_data)."""
    flags = registry.cli_flags(w.method, config["merge"])
    if registry.needs_data(w.method):
        flags += f" --data {input.heldout} --task-spec {shlex.quote(as_json(config['tasks'][w.task]))}"
    return flags


def heldout_input(w):
    """The held-out split, for methods that choose on data only (their inputs stay the same otherwise)."""
    return {"heldout": f"{R}/{w.model}/{w.task}/data/heldout.jsonl"} if registry.needs_data(w.method) else {}


rule merge:
    input:
        unpack(heldout_input),
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
