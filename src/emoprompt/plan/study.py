"""The study plan: every job the workflow can run, decided from the configuration.

The Snakefile's rules are glue over a :class:`Study`: which (model, strategy) pairs run,
each job's input files and parameters, every output path, what is refused and why. It
needs no Snakemake process, so tests import it (``tests/test_plan.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from emoprompt.data.download import source_kind
from emoprompt.evaluation.strategies import BASELINE_MODEL, STRATEGIES, strategies_for
from emoprompt.infra.errors import UserError
from emoprompt.models.catalogue import (
    Catalogue,
    CatalogueError,
    EmbeddedEntry,
    FinetunedEntry,
    ServedEntry,
)
from emoprompt.plan.config import merged_config
from emoprompt.plan.families import (  # noqa: F401 - the plan's paths, from one place
    SENSITIVITY_OUTPUTS,
    VALIDATION_SAMPLE,
    VARIANT_FILES,
    FamilyPlan,
    pattern,
)
from emoprompt.prompting.prompt_file import file_family

#: The prompt file of each prompt family (the files the user edits).
PROMPT_FILES = {
    "zero_shot": "prompts/zero_shot.yaml",
    "few_shot": "prompts/few_shot.yaml",
    "finetuned": "prompts/finetuned.yaml",
    # the zero/few-shot families as plain text, for base models (prompt_format: text)
    "zero_shot_text": "prompts/zero_shot_text.yaml",
    "few_shot_text": "prompts/few_shot_text.yaml",
}
TRAIN = "data/processed/train.tsv"
VALIDATION = "data/processed/validation.tsv"
TEST = "data/processed/test.tsv"
SAMPLE = "data/processed/test_sample.tsv"


class StudyError(UserError, ValueError):
    """The configuration asks for something the workflow cannot run."""


class Study(FamilyPlan):
    """The jobs, inputs, parameters and outputs of one configuration.

    ``config`` is the merged configuration with its defaults filled
    (:func:`emoprompt.plan.config.check_config`); ``root`` the workflow's folder, where
    prompt files are read when their settings decide a job (the grid's few-shot seed).
    """

    def __init__(self, config: Mapping[str, Any], root: str | Path = "."):
        self.config = config
        self.root = Path(root)
        try:
            self.catalogue = Catalogue(config["model_catalogue"])
        except CatalogueError as exc:
            raise StudyError(str(exc)) from None
        missing = [m for m in config["models"] if m not in self.catalogue]
        if missing:
            raise StudyError(
                f"config 'models' names {', '.join(missing)}, not in model_catalogue "
                f"(known: {', '.join(self.catalogue.names())})"
            )
        absent = [line for m in config["models"] for line in self.catalogue.missing(m)]
        if absent:
            raise StudyError("\n".join(dict.fromkeys(absent)))

    @classmethod
    def from_files(cls, root: str | Path = ".", **overrides: Any) -> Study:
        """The study of ``root``'s config.yaml with ``overrides`` as ``--config`` gives."""
        return cls(merged_config(root, overrides), root)

    # --- data ----------------------------------------------------------------------
    def raw_data_path(self) -> str:
        """Where the raw data goes (a zip, or a folder when the source is a folder)."""
        if source_kind(self.config["data_source"]) == "folder":
            return "data/raw/emoeval_data"
        return "data/raw/emoeval_data.zip"

    def local_source(self) -> list[str]:
        """A local data source is an input, so that editing it re-runs the data steps."""
        source = self.config["data_source"]
        return [] if source_kind(source) == "url" else [source]

    def data_outputs(self) -> list[str]:
        return [TRAIN, VALIDATION, TEST, "data/processed/split_ids.json", SAMPLE,
                "results/data/class_distribution.tsv"]  # fmt: skip

    def sample_settings(self) -> dict[str, Any]:
        """The evaluation sample's settings (part of each MLflow run's key)."""
        c = self.config
        return {"size": c["sample_size"], "scheme": c["sample_scheme"],
                "seed": c["sample_seed"], "split": c["evaluation_split"]}  # fmt: skip

    # --- models --------------------------------------------------------------------
    def entry(self, model: str) -> dict[str, Any]:
        """The one serialised entry a job of ``model`` gets."""
        return self.catalogue.resolved(model)

    def model_files(self, model: str) -> list[str]:
        return self.catalogue.input_files(model)

    def gguf_source(self, model: str) -> dict[str, str]:
        entry = self.catalogue[model]
        if not isinstance(entry, EmbeddedEntry):
            raise StudyError(f"model {model} is not an embedded model")
        return entry.gguf_source()

    def is_finetuned(self, model: str) -> bool:
        return isinstance(self.catalogue[model], FinetunedEntry)

    def model_pattern(self) -> str:
        return pattern(self.catalogue.names())

    def trainable_pattern(self) -> str:
        """Models that can be fine-tuned: entries that load in process, not fine-tuned."""
        names = [n for n, e in self.catalogue.entries.items() if e.in_process]
        return pattern([n for n in names if not self.is_finetuned(n)])

    def embedded_pattern(self) -> str:
        """Models that convert_model converts (so that it never claims an adapter folder)."""
        return pattern(self.catalogue.of_type(EmbeddedEntry))

    def model_families(self) -> dict[str, str]:
        """A fine-tuned model counts with its base in the paired comparisons."""
        return {n: self.catalogue[n].base for n in self.catalogue.of_type(FinetunedEntry)}

    # --- strategies ----------------------------------------------------------------
    def llm_strategies(self) -> list[str]:
        return [name for name, s in STRATEGIES.items() if s.family is not None]

    def strategies_of(self, model: str) -> list[str]:
        """The configured strategies that fit ``model``: its prompt format, and none of
        the methods its source cannot run."""
        entry = self.catalogue[model]
        return strategies_for(
            entry.prompt_format, self.config["strategies"], refused=entry.refused_methods()
        )

    def refused_strategies(self, model: str) -> list[str]:
        """Configured strategies of ``model``'s prompt format its source cannot run."""
        fitting = strategies_for(self.catalogue[model].prompt_format, self.config["strategies"])
        return [n for n in fitting if n not in self.strategies_of(model)]

    def prediction_pairs(self) -> list[tuple[str, str]]:
        """(model, strategy) pairs to run: every strategy that fits each model."""
        pairs = [(m, s) for m in self.config["models"] for s in self.strategies_of(m)]
        if "baseline_tfidf" in self.config["strategies"]:
            pairs.append((BASELINE_MODEL, "baseline_tfidf"))
        return pairs

    def studied_models(self) -> list[str]:
        studied = {model for model, _ in self.prediction_pairs()}
        return [m for m in self.config["models"] if m in studied]

    def families(self) -> list[str]:
        """The prompt files' families the configured strategies use (the plain-text
        files of the zero/few-shot families too, where a base model runs them)."""
        families = {STRATEGIES[name].family for name in self.config["strategies"]} - {None}
        families |= {
            self.prompt_family(model, strategy)
            for model in self.config["models"]
            for strategy in self.strategies_of(model)
            if STRATEGIES[strategy].family is not None
        }
        return sorted(families)

    def prompt_family(self, model: str, strategy: str) -> str:
        """The prompt file ``model`` reads for ``strategy``'s family (PROMPT_FILES key)."""
        family = STRATEGIES[strategy].family
        return file_family(family, self.catalogue[model].prompt_format)

    def inspect_prompt(self, model: str) -> str:
        """The zero-shot prompt file an inspection page renders for ``model``."""
        return PROMPT_FILES[file_family("zero_shot", self.catalogue[model].prompt_format)]

    def warnings(self) -> list[str]:
        """What runs differently from what was asked, said once when the workflow starts."""
        lines = []
        for model in self.config["models"]:
            entry, refused = self.catalogue[model], self.refused_strategies(model)
            scored = [r for r in refused if STRATEGIES[r].method == "label_likelihood"]
            if isinstance(entry, ServedEntry) and entry.api == "chat" and scored:
                lines.append(
                    f"model_catalogue: {model} uses a chat API (api: chat), which returns "
                    f"no log-probabilities of given answers: {', '.join(scored)} not run for it"
                )
        return lines

    # --- jobs: inputs and parameters ------------------------------------------------
    def predict_inputs(self, model: str, strategy: str, sample: str = SAMPLE) -> dict[str, Any]:
        family = self.prompt_family(model, strategy)
        return {"train": TRAIN, "sample": sample, "prompt": PROMPT_FILES[family],
                "model": self.model_files(model)}  # fmt: skip

    def probe_inputs(self, model: str, sample: str = SAMPLE) -> dict[str, Any]:
        return {"train": TRAIN, "validation": VALIDATION, "sample": sample,
                "model": self.model_files(model)}  # fmt: skip

    def finetune_inputs(self, model: str) -> dict[str, Any]:
        return {"train": TRAIN, "validation": VALIDATION, "test": TEST,
                "finetuned_prompt": PROMPT_FILES["finetuned"],
                "zero_shot_prompt": PROMPT_FILES["zero_shot"],
                "model": self.model_files(model)}  # fmt: skip

    def predict_settings(self, model: str, strategy: str) -> dict[str, Any]:
        """What the strategy needs from config (so that a change re-runs exactly the jobs)."""
        c, method = self.config, STRATEGIES[strategy].method
        settings = {
            "decoding": c["decoding"] if method == "generate" else {},
            "scoring": c["scoring"] if method == "label_likelihood" else {},
            "fallback_label": c["fallback_label"],
            "engine": c["engine"],
            "sample_seed": c["sample_seed"],
        }
        if isinstance(self.catalogue[model], ServedEntry):  # only theirs: others unchanged
            settings["request_cache"] = c["request_cache"]
        return settings

    def probe_settings(self) -> dict[str, Any]:
        c = self.config
        return {"probe": c["probe"], "engine": c["engine"], "sample_seed": c["sample_seed"]}

    def trained_adapters(self) -> dict[str, str]:
        """Adapter folder of each fine-tuned model in `models` that runs a strategy (for
        the track rule): an adapter no strategy evaluates is not trained."""
        return {
            m: self.catalogue.adapter_folder(m)
            for m in self.studied_models()
            if self.is_finetuned(m)
        }

    # --- outputs -------------------------------------------------------------------
    def prediction_files(self, ext: str) -> list[str]:
        return [f"results/predictions/{m}/{s}.{ext}" for m, s in self.prediction_pairs()]

    def prediction_outputs(self) -> list[str]:
        return [
            f"results/predictions/{m}/{s}.{ext}"
            for m, s in self.prediction_pairs()
            for ext in ("tsv", "json")
        ]

    def inspect_outputs(self) -> list[str]:
        """A model's inspection page, for each studied model that runs in process (a
        served model's insides are on its server)."""
        return [
            f"results/inspect/{m}.md"
            for m in self.studied_models()
            if not isinstance(self.catalogue[m], ServedEntry)
        ]

    def metrics_outputs(self) -> list[str]:
        return [f"results/metrics/{m}/{s}.json" for m, s in self.prediction_pairs()]

    def figure_outputs(self) -> list[str]:
        return [f"results/figures/confusion_{m}_{s}.png" for m, s in self.prediction_pairs()]

    def tracked_pairs(self) -> list[list[str]]:
        """(model, strategy) of each run, in the order of the track rule's input lists."""
        return [[m, s] for m, s in self.prediction_pairs()]

    def track_inputs(self) -> dict[str, list[str]]:
        return {
            "predictions": self.prediction_files("tsv"),
            "metadata": self.prediction_files("json"),
            "metrics": self.metrics_outputs(),
            "figures": self.figure_outputs(),
            "adapters": list(self.trained_adapters().values()),
            "family_records": self.variant_files("record"),
            "family_validation": self.variant_files("validation"),
            "family_test": self.variant_files("test"),
            "family_choices": self.variant_files("choice"),
            "samples": [SAMPLE, TRAIN] + ([VALIDATION_SAMPLE] if self.family_pairs() else []),
        }

    def comparison_baseline(self) -> str | None:
        """The baseline's run name, model/strategy, when it is part of the study."""
        if "baseline_tfidf" in self.config["strategies"]:
            return f"{BASELINE_MODEL}/baseline_tfidf"
        return None

    def table_models(self) -> list[str]:
        """The order of the models in the results table: as configured, the baseline last."""
        return [*self.config["models"], BASELINE_MODEL]

    def aggregate_model_pattern(self) -> str:
        """Models the aggregation rules accept: the catalogue's and the baseline."""
        return pattern([*self.catalogue.names(), BASELINE_MODEL])

    def aggregate_strategy_pattern(self) -> str:
        """Strategies the aggregation rules accept: all of them, the baseline's included."""
        return pattern(list(STRATEGIES))

    def aggregate_outputs(self) -> list[str]:
        return [
            "results/results_table.md",
            "results/results_table.csv",
            "results/comparisons.md",
            "results/comparisons.csv",
            "results/figures/macro_f1_intervals.png",
            "results/figures/macro_f1_differences.png",
            *self.metrics_outputs(),
            *self.figure_outputs(),
            *self.sensitivity_outputs(),
            "results/mlflow_runs.tsv",
        ]
