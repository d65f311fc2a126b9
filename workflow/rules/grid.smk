# Study grids (config sample_seeds / fewshot_seeds): the sample, prediction, scoring and
# tracking rules once more, with the seeds in their paths (helpers in common.smk). A
# default single-seed run uses none of these rules.


wildcard_constraints:
    sample_seed=r"-?\d+",
    fewshot_seed=r"-?\d+|none",


use rule sample as sample_grid with:
    output:
        sample=GRID_SAMPLE,
        distribution="results/grid/sample_seed={sample_seed}/class_distribution.tsv",
    log:
        "logs/grid/sample_seed={sample_seed}/sample.log",
    params:
        seed=grid_sample_seed,


use rule predict as predict_grid with:
    input:
        unpack(grid_predict_inputs),
    output:
        tsv="results/grid/sample_seed={sample_seed}/fewshot_seed={fewshot_seed}/predictions/{model}/{strategy}.tsv",
        json="results/grid/sample_seed={sample_seed}/fewshot_seed={fewshot_seed}/predictions/{model}/{strategy}.json",
    log:
        "logs/grid/sample_seed={sample_seed}/fewshot_seed={fewshot_seed}/predict/{model}/{strategy}.log",
    benchmark:
        "results/benchmarks/grid/sample_seed={sample_seed}/fewshot_seed={fewshot_seed}/predict/{model}/{strategy}.tsv"
    params:
        settings=grid_predict_settings,


use rule baseline as baseline_grid with:
    input:
        train="data/processed/train.tsv",
        sample=GRID_SAMPLE,
    output:
        tsv="results/grid/sample_seed={sample_seed}/fewshot_seed=none/predictions/baseline/baseline_tfidf.tsv",
        json="results/grid/sample_seed={sample_seed}/fewshot_seed=none/predictions/baseline/baseline_tfidf.json",
    log:
        "logs/grid/sample_seed={sample_seed}/fewshot_seed=none/predict/baseline/baseline_tfidf.log",
    benchmark:
        "results/benchmarks/grid/sample_seed={sample_seed}/fewshot_seed=none/predict/baseline/baseline_tfidf.tsv"
    params:
        seed=grid_sample_seed,


use rule metrics as metrics_grid with:
    input:
        tsv="results/grid/sample_seed={sample_seed}/fewshot_seed={fewshot_seed}/predictions/{model}/{strategy}.tsv",
        json="results/grid/sample_seed={sample_seed}/fewshot_seed={fewshot_seed}/predictions/{model}/{strategy}.json",
    output:
        metrics="results/grid/sample_seed={sample_seed}/fewshot_seed={fewshot_seed}/metrics/{model}/{strategy}.json",
        figure="results/grid/sample_seed={sample_seed}/fewshot_seed={fewshot_seed}/figures/confusion_{model}_{strategy}.png",
    log:
        "logs/grid/sample_seed={sample_seed}/fewshot_seed={fewshot_seed}/metrics/{model}/{strategy}.log",


rule grid_table:
    input:
        metrics=grid_metrics_outputs(),
    output:
        md=report(
            "results/grid_table.md",
            caption="../report/grid_table.rst",
            category="Study grid",
            labels={"table": "grid (Markdown)"},
        ),
        csv=report(
            "results/grid_table.csv",
            caption="../report/grid_table.rst",
            category="Study grid",
            labels={"table": "grid (CSV)"},
        ),
        figure=report(
            "results/figures/strategies_by_model.png",
            caption="../report/strategies_by_model.rst",
            category="Study grid",
            labels={"table": "strategies by model"},
        ),
    log:
        "logs/grid/grid_table.log",
    conda:
        "../envs/report.yaml"
    params:
        models=table_models,
    script:
        "../scripts/grid_table.py"


use rule track as track_grid with:
    input:
        unpack(grid_track_inputs),
    output:
        runs="results/grid/mlflow_runs.tsv",
    log:
        "logs/grid/track.log",
    params:
        pairs=grid_tracked_pairs,
        samples=grid_tracked_samples,
