rule merge:
    input:
        unpack(heldout_input),
        base=P.base,
        models=merge_inputs,
    output:
        directory(P.merged),
    log:
        paths.job_log("merge", R),
    benchmark:
        paths.job_benchmark("merge", R)
    conda:
        "../../envs/ordermerge.yaml"
    params:
        flags=merge_flags,
        seed=lambda w: w.mseed,
    shell:
        "ordermerge merge --base {input.base} {params.flags} --seed {params.seed} "
        "--threads {threads} --force --out {output} {input.models} > {log} 2>&1"
