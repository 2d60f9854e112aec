localrules:
    analyze,


def analysis_inputs(w):
    files = []
    for m in MODELS:
        for t in TASKS:
            for s in SCHEMES:
                files += single_eval_files(m, t, s) + merged_eval_files(m, t, s) + loss_files(m, t, s)
                files += [f"{R}/{m}/{t}/{s}/orders/run{k}.npy" for k in range(K)]
    return files


rule analyze:
    input:
        analysis_inputs,
    output:
        table1=R + "/tables/table1.md",
        imbalance=R + "/tables/imbalance.csv",
        figures=[f"{R}/figures/fig1_{m}_{t}_{s}.png" for m in MODELS for t in TASKS for s in SCHEMES],
    params:
        cfg=as_json(config),
    log:
        "logs/analyze.log",
    shell:
        "ordermerge analyze --config-json {params.cfg:q} --results-dir {R} --out-dir {R} > {log} 2>&1"
