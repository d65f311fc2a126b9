from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/predict.smk"
include: "workflow/rules/variants.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/grid.smk"


onstart:
    # SIGTERM or SIGINT to Snakemake stops the running jobs too (emoprompt.infra.signals).
    stop_jobs_on_termination()


rule all:
    default_target: True
    input:
        all_outputs(STUDY),
