localrules:
    analyze,


def analysis_inputs(w):
    files = []
    for m in MODELS:
        for t in TASKS:
            for s in SCHEMES:
                files += single_eval_files(m, t, s) + merged_eval_files(m, t, s) + loss_files(m, t, s)
                files += merged_loss_files(m, t, s)
                files += [f"{R}/{m}/{t}/{s}/orders/run{k}.npy" for k in range(K)]
                files += ksweep_eval_files(m, t, s)
        if MT["tasks"]:
            files += multitask_eval_files(m)
    return files


rule analyze:
    input:
        analysis_inputs,
    output:
        tables=report(
            [f"{R}/tables/{n}.csv" for n in table_names()],
            caption="../report/tables.rst",
            category="Tables",
        ),
        markdown=[f"{R}/tables/{n}.md" for n in table_names() if n not in ("imbalance", "metrics")],
        figures=report(
            [f"{R}/figures/{f}.png" for f in figure_names()],
            caption="../report/figures.rst",
            category="Figures",
        ),
        ksweep=report(
            ksweep_targets(),
            caption="../report/ksweep.rst",
            category="K-sweep",
        ),
        table3=report(
            multitask_targets(),
            caption="../report/table3.rst",
            category="Multi-task merge",
        ),
    params:
        cfg=as_json(config),
    log:
        "logs/analyze.log",
    shell:
        "ordermerge analyze --config-json {params.cfg:q} --results-dir {R} --out-dir {R} > {log} 2>&1"
