# The analysis, one rule per family of figures and tables: analysis/plan.py lists each family's inputs
# and outputs, and `ordermerge analyze --family F` writes exactly those. Cheap: on the submit host.


# Fig. 1 and imbalance.csv: first-epoch position vs final training loss.
rule analysis_fig1:
    input:
        ANALYSIS.inputs("fig1"),
    output:
        report(
            ANALYSIS.outputs("fig1"),
            caption="../report/fig1.rst",
            category="Order effect (Fig. 1)",
        ),
    log:
        P.log("analysis", family="fig1"),
    localrule: True
    conda:
        "../../envs/ordermerge.yaml"
    params:
        family="fig1",
        cfg=as_json(ANALYSIS.family_config("fig1")),
        # the results dir: its tables/ and figures/ hold every output
        results=lambda w, output: str(Path(output[0]).parent.parent),
    shell:
        "ordermerge analyze --family {params.family} --config-json {params.cfg:q} "
        "--results-dir {params.results} --out-dir {params.results} > {log} 2>&1"


# Fig. 3 and fig3_rho.csv: the anchor run's order in segments, single runs vs merges.
use rule analysis_fig1 as analysis_fig3 with:
    input:
        ANALYSIS.inputs("fig3"),
    output:
        report(
            ANALYSIS.outputs("fig3"),
            caption="../report/fig3.rst",
            category="Merges by segment (Fig. 3)",
        ),
    log:
        P.log("analysis", family="fig3"),
    params:
        family="fig3",
        cfg=as_json(ANALYSIS.family_config("fig3")),


# Table 1, metrics.csv, Table 2 (>= 2 models), Table 4 (both schemes).
use rule analysis_fig1 as analysis_tables with:
    input:
        ANALYSIS.inputs("tables"),
    output:
        report(
            ANALYSIS.outputs("tables"),
            caption="../report/tables.rst",
            category="Tables",
        ),
    log:
        P.log("analysis", family="tables"),
    params:
        family="tables",
        cfg=as_json(ANALYSIS.family_config("tables")),


# Fig. 4: loss at each epoch (only when every epoch is scored).
if "fig4" in ANALYSIS.families():

    use rule analysis_fig1 as analysis_fig4 with:
        input:
            ANALYSIS.inputs("fig4"),
        output:
            report(
                ANALYSIS.outputs("fig4"),
                caption="../report/fig4.rst",
                category="Loss per epoch (Fig. 4)",
            ),
        log:
            P.log("analysis", family="fig4"),
        params:
            family="fig4",
            cfg=as_json(ANALYSIS.family_config("fig4")),


# The K-sweep: ksweep.csv/.md and its figures (ksweep.enabled).
if "ksweep" in ANALYSIS.families():

    use rule analysis_fig1 as analysis_ksweep with:
        input:
            ANALYSIS.inputs("ksweep"),
        output:
            report(
                ANALYSIS.outputs("ksweep"),
                caption="../report/ksweep.rst",
                category="K-sweep",
            ),
        log:
            P.log("analysis", family="ksweep"),
        params:
            family="ksweep",
            cfg=as_json(ANALYSIS.family_config("ksweep")),


# Table 3: the multi-task merge (multitask.tasks).
if "table3" in ANALYSIS.families():

    use rule analysis_fig1 as analysis_table3 with:
        input:
            ANALYSIS.inputs("table3"),
        output:
            report(
                ANALYSIS.outputs("table3"),
                caption="../report/table3.rst",
                category="Multi-task merge",
            ),
        log:
            P.log("analysis", family="table3"),
        params:
            family="table3",
            cfg=as_json(ANALYSIS.family_config("table3")),
