"""Study grids (config ``sample_seeds`` / ``fewshot_seeds``): the runs of a grid and the
one layout of every grid path, outputs, logs and benchmarks alike."""

from __future__ import annotations

from typing import Any

from emoprompt.evaluation.strategies import STRATEGIES
from emoprompt.plan.study import PROMPT_FILES, Study
from emoprompt.prompting.prompt_file import load_prompt_file

GRID_SEEDS = "sample_seed={sample_seed}/fewshot_seed={fewshot_seed}"
GRID_SAMPLE = "data/processed/sample_seed={sample_seed}/test_sample.tsv"
NO_SHOTS = "none"  # the few-shot seed of a run that has no shots


def grid_path(root: str, tail: str, fewshot_seed: Any = "{fewshot_seed}") -> str:
    """``root/sample_seed=.../fewshot_seed=.../tail``: the one layout of every grid file
    (outputs, logs, benchmarks), with the seeds as wildcards or given values."""
    return f"{root}/{GRID_SEEDS.replace('{fewshot_seed}', str(fewshot_seed))}/{tail}"


class Grid:
    """The grid of a :class:`Study`: every (model, strategy) once per sample seed, and
    few-shot strategies once per (sample seed, few-shot seed)."""

    def __init__(self, study: Study):
        self.study = study
        self.config = study.config

    def enabled(self) -> bool:
        return self.config["sample_seeds"] is not None or self.config["fewshot_seeds"] is not None

    def sample_seeds(self) -> list[int]:
        return [int(seed) for seed in self.config["sample_seeds"] or [self.config["sample_seed"]]]

    def fewshot_seeds(self, model: str | None = None) -> list[int]:
        """The few-shot seeds of the grid (default: the seed of the few-shot prompt file
        ``model`` reads: the plain-text one for a base model)."""
        if self.config["fewshot_seeds"] is not None:
            return [int(seed) for seed in self.config["fewshot_seeds"]]
        family = (
            "few_shot" if model is None else self.study.prompt_family(model, "few_shot_generate")
        )
        prompt = load_prompt_file(self.study.root / PROMPT_FILES[family], family)
        return [prompt.settings.get("seed", 0)]

    def runs(self) -> list[tuple[str, str, int, Any]]:
        """(model, strategy, sample seed, few-shot seed) of every run; a strategy without
        shots runs once per sample seed, with the few-shot seed NO_SHOTS."""
        runs = []
        for model, strategy in self.study.prediction_pairs():
            shots = STRATEGIES[strategy].family == "few_shot"
            for sample_seed in self.sample_seeds():
                for fewshot_seed in self.fewshot_seeds(model) if shots else [NO_SHOTS]:
                    runs.append((model, strategy, sample_seed, fewshot_seed))
        return runs

    def files(self, kind: str, name: str) -> list[str]:
        """One path per run: kind "predictions", "metrics" or "figures"; name a pattern of
        model and strategy, e.g. "{model}/{strategy}.tsv"."""
        paths = []
        for model, strategy, sample_seed, fewshot_seed in self.runs():
            folder = grid_path("results/grid", kind, fewshot_seed)
            folder = folder.replace("{sample_seed}", str(sample_seed))
            paths.append(f"{folder}/{name.format(model=model, strategy=strategy)}")
        return paths

    def run_names(self) -> list[list[Any]]:
        """[row name (model/strategy), sample seed] of each run, in files() order."""
        return [[f"{m}/{s}", int(seed)] for m, s, seed, _ in self.runs()]

    def predict_inputs(self, model: str, strategy: str, sample_seed: Any) -> dict[str, Any]:
        sample = GRID_SAMPLE.format(sample_seed=sample_seed)
        return self.study.predict_inputs(model, strategy, sample)

    def predict_settings(
        self, model: str, strategy: str, sample_seed: Any, fewshot_seed: Any
    ) -> dict[str, Any]:
        settings = {**self.study.predict_settings(model, strategy), "sample_seed": int(sample_seed)}
        if fewshot_seed != NO_SHOTS:
            settings["fewshot_seed"] = int(fewshot_seed)
        return settings

    def probe_inputs(self, model: str, sample_seed: Any) -> dict[str, Any]:
        return self.study.probe_inputs(model, GRID_SAMPLE.format(sample_seed=sample_seed))

    def probe_settings(self, sample_seed: Any) -> dict[str, Any]:
        return {**self.study.probe_settings(), "sample_seed": int(sample_seed)}

    def metrics_outputs(self) -> list[str]:
        return self.files("metrics", "{model}/{strategy}.json")

    def tracked_pairs(self) -> list[list[str]]:
        return [[model, strategy] for model, strategy, _, _ in self.runs()]

    def tracked_samples(self) -> list[dict[str, int]]:
        """Each run's own seeds (part of its MLflow run's key)."""
        return [
            {"seed": s} if f == NO_SHOTS else {"seed": s, "fewshot_seed": f}
            for _, _, s, f in self.runs()
        ]

    def track_inputs(self) -> dict[str, list[str]]:
        return {
            "predictions": self.files("predictions", "{model}/{strategy}.tsv"),
            "metadata": self.files("predictions", "{model}/{strategy}.json"),
            "metrics": self.metrics_outputs(),
            "figures": self.files("figures", "confusion_{model}_{strategy}.png"),
            "adapters": list(self.study.trained_adapters().values()),
        }

    def outputs(self) -> list[str]:
        return [
            *self.files("predictions", "{model}/{strategy}.tsv"),
            *self.files("predictions", "{model}/{strategy}.json"),
            *self.metrics_outputs(),
            *self.files("figures", "confusion_{model}_{strategy}.png"),
            "results/grid_table.md",
            "results/grid_table.csv",
            "results/grid_comparisons.md",
            "results/grid_comparisons.csv",
            "results/figures/strategies_by_model.png",
            "results/grid/mlflow_runs.tsv",
        ]


def all_outputs(study: Study) -> list[str]:
    """Everything `snakemake` builds by default (a study grid's outputs when one is set)."""
    grid = Grid(study)
    if grid.enabled():
        return study.data_outputs() + study.inspect_outputs() + grid.outputs()
    return (
        study.data_outputs()
        + study.prediction_outputs()
        + study.inspect_outputs()
        + study.aggregate_outputs()
    )
