# ordermerge: fine-tune one base K times in different data orders, merge, and measure.
# A table of contents: every stage lives in workflow/rules/, every computation in src/ordermerge.
from snakemake.utils import min_version

min_version("9.0")


# The default config, unless the command line names its own: `--configfile configs/gpu.yaml` then
# means that config alone, not the default's model and task merged under it.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/base_model.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/ksweep.smk"
include: "workflow/rules/multitask.smk"
include: "workflow/rules/analysis.smk"


# Threads and resources of every job rule: the config's over the workflow profile's built-in numbers
# (profiles/default), set in one place (common.smk).
apply_config_resources()


# `snakemake --report` opens on the run's answer, written by analyze (src/ordermerge/analysis/answer.py),
# once there is one; before that, on what the workflow does.
report:
    str(Path(P.answer).resolve())
    if Path(P.answer).exists()
    else "workflow/report/workflow.rst"


rule all:
    default_target: True
    input:
        analysis_targets(),
        ksweep_targets(),
        multitask_targets(),
