rule metrics:
    input:
        tsv="results/predictions/{model}/{strategy}.tsv",
        json="results/predictions/{model}/{strategy}.json",
    output:
        metrics="results/metrics/{model}/{strategy}.json",
        figure=report(
            "results/figures/confusion_{model}_{strategy}.png",
            caption="../report/confusion.rst",
            category="Confusion matrices",
            subcategory="{model}",
            labels={"model": "{model}", "strategy": "{strategy}"},
        ),
    log:
        "logs/metrics/{model}/{strategy}.log",
    wildcard_constraints:
        model=STUDY.aggregate_model_pattern(),
        strategy=STUDY.aggregate_strategy_pattern(),
    conda:
        "../envs/report.yaml"
    params:
        statistics=config["statistics"],
    script:
        "../scripts/metrics.py"


rule compare:
    input:
        predictions=STUDY.prediction_files("tsv"),
        metrics=STUDY.metrics_outputs(),
    output:
        md=report(
            "results/comparisons.md",
            caption="../report/comparisons.rst",
            category="Results",
            labels={"table": "paired comparisons (Markdown)"},
        ),
        csv=report(
            "results/comparisons.csv",
            caption="../report/comparisons.rst",
            category="Results",
            labels={"table": "paired comparisons (CSV)"},
        ),
        forest=report(
            "results/figures/macro_f1_intervals.png",
            caption="../report/macro_f1_intervals.rst",
            category="Results",
            labels={"figure": "macro F1 with intervals"},
        ),
        differences=report(
            "results/figures/macro_f1_differences.png",
            caption="../report/macro_f1_differences.rst",
            category="Results",
            labels={"figure": "pairwise differences"},
        ),
    log:
        "logs/compare/compare.log",
    conda:
        "../envs/report.yaml"
    params:
        pairs=STUDY.tracked_pairs(),
        baseline=STUDY.comparison_baseline(),
        families=STUDY.model_families(),
        statistics=config["statistics"],
    script:
        "../scripts/compare.py"


rule results_table:
    input:
        metrics=STUDY.metrics_outputs(),
        comparisons="results/comparisons.csv",
    output:
        md=report(
            "results/results_table.md",
            caption="../report/results_table_md.rst",
            category="Results",
            labels={"table": "results (Markdown)"},
        ),
        csv=report(
            "results/results_table.csv",
            caption="../report/results_table.rst",
            category="Results",
            labels={"table": "results (CSV)"},
        ),
    log:
        "logs/results_table/results_table.log",
    conda:
        "../envs/report.yaml"
    params:
        models=STUDY.table_models(),
        statistics=config["statistics"],
    script:
        "../scripts/results_table.py"


rule track:
    input:
        unpack(lambda w: STUDY.track_inputs()),
    output:
        runs="results/mlflow_runs.tsv",
    log:
        "logs/track/track.log",
    conda:
        "../envs/report.yaml"
    params:
        pairs=STUDY.tracked_pairs(),
        families=STUDY.family_pairs(),
        trained=list(STUDY.trained_adapters()),
        sample=STUDY.sample_settings(),
        experiment=config["mlflow_experiment"],
        timeout=config["mlflow_timeout"],
        retries=config["mlflow_retries"],
    script:
        "../scripts/track.py"
