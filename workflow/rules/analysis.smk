localrules:
    analyze,


rule analyze:
    input:
        analysis_inputs,
    output:
        tables=report(
            [P.of("table", name=n, ext="csv") for n in plan.table_names(config)],
            caption="../report/tables.rst",
            category="Tables",
        ),
        markdown=[P.of("table", name=n, ext="md") for n in plan.markdown_tables(config)],
        figures=report(
            [P.of("figure", name=f) for f in plan.figure_names(config)],
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
        # The whole config less what the analysis never reads (it reads most of it: cheap and local, so any
        # other key's change redoes the tables and figures; docs/reruns.md). Its files: the declared inputs
        # and outputs above, which src/ordermerge/plan.py and paths.py spell for both sides.
        cfg=as_json(
            {
                **without(config, "resources", "threads_per_job", "results_dir"),
                "train": without(config["train"], "report_to"),
            }
        ),
        # the results dir, as the answer's path spells it (paths.py: {results}/answer.rst)
        results=lambda w, output: str(Path(output.answer).parent),
    shell:
        "ordermerge analyze --config-json {params.cfg:q} --results-dir {params.results} --out-dir {params.results} > {log} 2>&1"
