# Study grids (config sample_seeds / fewshot_seeds): the sample, prediction, scoring and
# tracking rules once more, with the seeds in their paths (emoprompt.plan.grid). A
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
        seed=lambda w: int(w.sample_seed),


use rule predict as predict_grid with:
    input:
        unpack(lambda w: GRID.predict_inputs(w.model, w.strategy, w.sample_seed)),
    output:
        tsv=grid_path("results/grid", "predictions/{model}/{strategy}.tsv"),
        json=grid_path("results/grid", "predictions/{model}/{strategy}.json"),
    log:
        grid_path("logs/grid", "predict/{model}/{strategy}.log"),
    benchmark:
        grid_path("results/benchmarks/grid", "predict/{model}/{strategy}.tsv")
    params:
        settings=lambda w: GRID.predict_settings(w.model, w.strategy, w.sample_seed, w.fewshot_seed),


use rule baseline as baseline_grid with:
    input:
        train="data/processed/train.tsv",
        sample=GRID_SAMPLE,
    output:
        tsv=grid_path("results/grid", "predictions/baseline/baseline_tfidf.tsv", NO_SHOTS),
        json=grid_path("results/grid", "predictions/baseline/baseline_tfidf.json", NO_SHOTS),
    log:
        grid_path("logs/grid", "predict/baseline/baseline_tfidf.log", NO_SHOTS),
    benchmark:
        grid_path("results/benchmarks/grid", "predict/baseline/baseline_tfidf.tsv", NO_SHOTS)
    params:
        seed=lambda w: int(w.sample_seed),


use rule probe as probe_grid with:
    input:
        unpack(lambda w: GRID.probe_inputs(w.model, w.sample_seed)),
    output:
        tsv=grid_path("results/grid", "predictions/{model}/linear_probe.tsv", NO_SHOTS),
        json=grid_path("results/grid", "predictions/{model}/linear_probe.json", NO_SHOTS),
    log:
        grid_path("logs/grid", "predict/{model}/linear_probe.log", NO_SHOTS),
    benchmark:
        grid_path("results/benchmarks/grid", "predict/{model}/linear_probe.tsv", NO_SHOTS)
    params:
        settings=lambda w: GRID.probe_settings(w.sample_seed),


use rule metrics as metrics_grid with:
    input:
        tsv=grid_path("results/grid", "predictions/{model}/{strategy}.tsv"),
        json=grid_path("results/grid", "predictions/{model}/{strategy}.json"),
    output:
        metrics=grid_path("results/grid", "metrics/{model}/{strategy}.json"),
        figure=grid_path("results/grid", "figures/confusion_{model}_{strategy}.png"),
    log:
        grid_path("logs/grid", "metrics/{model}/{strategy}.log"),


rule grid_table:
    input:
        metrics=GRID.metrics_outputs(),
        predictions=GRID.files("predictions", "{model}/{strategy}.tsv"),
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
        comparisons_md=report(
            "results/grid_comparisons.md",
            caption="../report/grid_comparisons.rst",
            category="Study grid",
            labels={"table": "pooled paired comparisons (Markdown)"},
        ),
        comparisons_csv="results/grid_comparisons.csv",
    log:
        "logs/grid/grid_table.log",
    conda:
        "../envs/report.yaml"
    params:
        models=STUDY.table_models(),
        runs=GRID.run_names(),
        baseline=STUDY.comparison_baseline(),
        statistics=config["statistics"],
    script:
        "../scripts/grid_table.py"


use rule track as track_grid with:
    input:
        unpack(lambda w: GRID.track_inputs()),
    output:
        runs="results/grid/mlflow_runs.tsv",
    log:
        "logs/grid/track.log",
    params:
        pairs=GRID.tracked_pairs(),
        samples=GRID.tracked_samples(),
        families=[],  # a grid runs each strategy's own prompt
