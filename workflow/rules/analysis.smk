localrules:
    analyze,


rule analyze:
    input:
        analysis_inputs,
    output:
        tables=report(
            [P.of("table", name=n, ext="csv") for n in table_names()],
            caption="../report/tables.rst",
            category="Tables",
        ),
        markdown=[
            P.of("table", name=n, ext="md")
            for n in table_names()
            if n not in ("imbalance", "metrics", "fig3_rho")
        ],
        figures=report(
            [P.of("figure", name=f) for f in figure_names()],
            caption="../report/figures.rst",
            category="Figures",
        ),
        ksweep=report(
            ksweep_targets(),
            caption="../report/ksweep.rst",
            category="K-sweep",
        ),
        answer=P.answer,
        table3=report(
            multitask_targets(),
            caption="../report/table3.rst",
            category="Multi-task merge",
        ),
    log:
        paths.job_log("analyze", R),
    benchmark:
        paths.job_benchmark("analyze", R)
    conda:
        "../../envs/ordermerge.yaml"
    params:
        cfg=as_json(config),
        results=lambda w, output: str(Path(output.tables[0]).parent.parent),
    shell:
        "ordermerge analyze --config-json {params.cfg:q} --results-dir {params.results} --out-dir {params.results} > {log} 2>&1"
