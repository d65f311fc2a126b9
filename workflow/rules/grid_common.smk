# The Python of study grids (config sample_seeds / fewshot_seeds): the one layout of
# every grid path, the runs of a grid, and the grid rules' inputs and params
# (the rules are in grid.smk).


GRID_SEEDS = "sample_seed={sample_seed}/fewshot_seed={fewshot_seed}"
GRID_SAMPLE = "data/processed/sample_seed={sample_seed}/test_sample.tsv"
NO_SHOTS = "none"  # the few-shot seed of a run that has no shots


def grid_path(root, tail, fewshot_seed="{fewshot_seed}"):
    """``root/sample_seed=.../fewshot_seed=.../tail``: the one layout of every grid file
    (outputs, logs, benchmarks), with the seeds as wildcards or given values."""
    return f"{root}/{GRID_SEEDS.replace('{fewshot_seed}', str(fewshot_seed))}/{tail}"


def grid_enabled():
    return config["sample_seeds"] is not None or config["fewshot_seeds"] is not None


def grid_sample_seeds():
    return [int(seed) for seed in config["sample_seeds"] or [config["sample_seed"]]]


def grid_fewshot_seeds():
    """The few-shot seeds of the grid (default: the seed of the few-shot prompt file)."""
    if config["fewshot_seeds"] is not None:
        return [int(seed) for seed in config["fewshot_seeds"]]
    return [load_prompt_file(PROMPT_FILES["few_shot"], "few_shot").settings.get("seed", 0)]


def grid_runs():
    """(model, strategy, sample seed, few-shot seed) of every run of the grid; a strategy
    without shots runs once per sample seed, with the few-shot seed NO_SHOTS."""
    runs = []
    for model, strategy in prediction_pairs():
        shots = STRATEGIES[strategy].family == "few_shot"
        for sample_seed in grid_sample_seeds():
            for fewshot_seed in grid_fewshot_seeds() if shots else [NO_SHOTS]:
                runs.append((model, strategy, sample_seed, fewshot_seed))
    return runs


def grid_files(kind, name):
    """One path per grid run: kind "predictions", "metrics" or "figures"; name a pattern
    of model and strategy, e.g. "{model}/{strategy}.tsv"."""
    paths = []
    for model, strategy, sample_seed, fewshot_seed in grid_runs():
        folder = grid_path("results/grid", kind, fewshot_seed).replace(
            "{sample_seed}", str(sample_seed)
        )
        paths.append(f"{folder}/{name.format(model=model, strategy=strategy)}")
    return paths


def grid_run_names(wildcards):
    """[row name (model/strategy), sample seed] of each grid run, in grid_files order."""
    return [[f"{m}/{s}", int(sample_seed)] for m, s, sample_seed, _ in grid_runs()]


def grid_sample_seed(wildcards):
    return int(wildcards.sample_seed)


def grid_predict_inputs(wildcards):
    return {**predict_inputs(wildcards), "sample": GRID_SAMPLE.format(**wildcards)}


def grid_predict_settings(wildcards):
    settings = {**predict_settings(wildcards), "sample_seed": int(wildcards.sample_seed)}
    if wildcards.fewshot_seed != NO_SHOTS:
        settings = {**settings, "fewshot_seed": int(wildcards.fewshot_seed)}
    return settings


def grid_probe_inputs(wildcards):
    return {**probe_inputs(wildcards), "sample": GRID_SAMPLE.format(**wildcards)}


def grid_probe_settings(wildcards):
    return {**probe_settings(wildcards), "sample_seed": int(wildcards.sample_seed)}


def grid_metrics_outputs():
    return grid_files("metrics", "{model}/{strategy}.json")


def grid_tracked_pairs(wildcards):
    return [[model, strategy] for model, strategy, _, _ in grid_runs()]


def grid_tracked_samples(wildcards):
    """Each grid run's own seeds (part of its MLflow run's key)."""
    return [
        {"seed": s} if f == NO_SHOTS else {"seed": s, "fewshot_seed": f}
        for _, _, s, f in grid_runs()
    ]


def grid_track_inputs(wildcards):
    return {
        "predictions": grid_files("predictions", "{model}/{strategy}.tsv"),
        "metadata": grid_files("predictions", "{model}/{strategy}.json"),
        "metrics": grid_metrics_outputs(),
        "figures": grid_files("figures", "confusion_{model}_{strategy}.png"),
        "adapters": trained_adapter_list(wildcards),
    }


def grid_outputs():
    return [
        *grid_files("predictions", "{model}/{strategy}.tsv"),
        *grid_files("predictions", "{model}/{strategy}.json"),
        *grid_metrics_outputs(),
        *grid_files("figures", "confusion_{model}_{strategy}.png"),
        "results/grid_table.md",
        "results/grid_table.csv",
        "results/grid_comparisons.md",
        "results/grid_comparisons.csv",
        "results/figures/strategies_by_model.png",
        "results/grid/mlflow_runs.tsv",
    ]
