import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

# The logic lives in the emoprompt package under src/: importable here even when the
# package is not installed (jobs' scripts do the same through scripts/_bootstrap.py).
SRC = str(Path(workflow.basedir) / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)

from emoprompt.data.download import source_kind  # noqa: E402
from emoprompt.prompting.prompt_file import load_prompt_file  # noqa: E402
from emoprompt.evaluation.strategies import BASELINE_MODEL, STRATEGIES, strategies_for  # noqa: E402
from emoprompt.infra.config_check import config_error_message, config_problems  # noqa: E402
from emoprompt.data.splits import DataError, read_split  # noqa: E402
from emoprompt.prompting.fewshot import check_calibration  # noqa: E402
from emoprompt.prompting.fewshot import check_settings as check_few_shot  # noqa: E402
from emoprompt.prompting.prompt_file import PromptError  # noqa: E402
from emoprompt.infra.signals import stop_jobs_on_termination  # noqa: E402, F401 - onstart

# A bad key or value: a few lines that name it, its source and what is allowed, rather
# than the schema validator's dump of the whole schema.
_problems = config_problems(
    config,
    Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml",
    overrides=workflow.config_settings.config,
    configfiles=workflow.config_settings.configfiles,
)
if _problems:
    raise WorkflowError(config_error_message(_problems))
validate(config, schema="../schemas/config.schema.yaml", set_default=True)


def raw_data_path():
    """Where the raw data goes (a zip, or a folder when the source is a folder)."""
    if source_kind(config["data_source"]) == "folder":
        return "data/raw/emoeval_data"
    return "data/raw/emoeval_data.zip"


def raw_data_output():
    path = raw_data_path()
    return directory(path) if not path.endswith(".zip") else path


def local_source():
    """A local data source is an input, so that editing it re-runs the data steps"""
    if source_kind(config["data_source"]) == "url":
        return []
    return config["data_source"]


def data_outputs():
    return [
        "data/processed/train.tsv",
        "data/processed/validation.tsv",
        "data/processed/test.tsv",
        "data/processed/split_ids.json",
        "data/processed/test_sample.tsv",
        "results/data/class_distribution.tsv",
    ]


missing_models = [m for m in config["models"] if m not in config["model_catalogue"]]
if missing_models:
    raise WorkflowError(
        f"config 'models' names {', '.join(missing_models)}, not in model_catalogue "
        f"(known: {', '.join(config['model_catalogue'])})"
    )

LLM_STRATEGIES = [name for name, s in STRATEGIES.items() if s.family is not None]
PROMPT_FILES = {
    "zero_shot": "prompts/zero_shot.yaml",
    "few_shot": "prompts/few_shot.yaml",
    "finetuned": "prompts/finetuned.yaml",
}


def check_prompt_files():
    """Refuse a malformed prompt file, or few-shot settings that cannot give their shots,
    when the workflow starts (a dry run included); with the prepared splits at hand, the
    shots are checked against them too."""
    families = {STRATEGIES[name].family for name in config["strategies"]} - {None}
    splits = {}
    for name in ("train", "test"):
        path = Path(f"data/processed/{name}.tsv")
        splits[name] = read_split(path) if path.is_file() else None
    for family in sorted(families):
        try:
            prompt = load_prompt_file(PROMPT_FILES[family], family)
            if "system" in prompt.settings and not prompt.settings["system"].strip():
                logger.warning(
                    f"{prompt.path}: 'system' is empty: the model is not told the task "
                    "or the labels"
                )
            if family == "few_shot":
                check_few_shot(prompt, splits["train"], splits["test"])
                calibrated = "few_shot_label_likelihood" in config["strategies"]
                check_calibration(prompt, calibrated and config["scoring"].get("calibrate"))
        except (PromptError, DataError) as exc:
            raise WorkflowError(str(exc)) from None


check_prompt_files()


wildcard_constraints:
    model="|".join(re.escape(name) for name in config["model_catalogue"]) or "^$",
    strategy="|".join(LLM_STRATEGIES),


def model_entry(name):
    return config["model_catalogue"][name]


# --- fine-tuned models (source: finetuned): a base catalogue entry plus a LoRA adapter ---
def is_finetuned(name):
    return model_entry(name)["source"] == "finetuned"


def adapter_folder(name):
    """The adapter of a fine-tuned entry (default: what rule finetune writes for its base)."""
    entry = model_entry(name)
    return entry.get("adapter") or f"data/models/{entry['base']}-ft"


def load_entry(name):
    """The entry load_model gets: a fine-tuned model loads as its base (dtype, quantization)
    with its adapter on top, and has its own prompt format."""
    entry = model_entry(name)
    if not is_finetuned(name):
        return entry
    own = {key: entry[key] for key in ("source", "base", "prompt_format")}
    return {**model_entry(entry["base"]), **own, "adapter": adapter_folder(name)}


for _name, _entry in config["model_catalogue"].items():
    if _entry["source"] == "finetuned":
        _base = _entry.get("base")
        if _base not in config["model_catalogue"] or is_finetuned(_base):
            raise WorkflowError(
                f"model_catalogue: {_name} is fine-tuned from {_base!r}, which must be a "
                "catalogue entry that is not itself fine-tuned"
            )


for _name, _entry in config["model_catalogue"].items():
    if _entry["source"] == "openai":
        _chat = _entry.get("api") == "chat"  # chat turns: no local tokenizer needed
        _needed = ("base_url", "served_model") + (() if _chat else ("tokenizer",))
        _missing = [k for k in _needed if not _entry.get(k)]
        if _missing:
            raise WorkflowError(
                f"model_catalogue: {_name} is served (source: openai) and needs "
                + ", ".join(_missing)
            )
        if _chat and _entry["prompt_format"] != "chat":
            raise WorkflowError(
                f"model_catalogue: {_name}: api: chat sends chat turns and needs "
                "prompt_format: chat (a plain prompt needs api: completions)"
            )
        _refused = [s for s in config["strategies"] if STRATEGIES[s].method == "label_likelihood"]
        if _chat and _name in config["models"] and _refused:
            logger.warning(
                f"model_catalogue: {_name} uses a chat API (api: chat), which returns no "
                f"log-probabilities of given answers: {', '.join(_refused)} not run for it"
            )
        _tok = _entry.get("tokenizer")
        if _tok is None:
            continue
        if _tok not in config["model_catalogue"] or model_entry(_tok)["source"] in (
            "openai",
            "finetuned",
        ):
            raise WorkflowError(
                f"model_catalogue: {_name}: tokenizer {_tok!r} must be a catalogue entry "
                "that loads in process (embedded, local or hub): the model the server serves"
            )


def model_families(wildcards):
    """A fine-tuned model counts with its base in the paired comparisons."""
    return {n: e["base"] for n, e in config["model_catalogue"].items() if is_finetuned(n)}


def trainable_model_pattern():
    """Models that can be fine-tuned (catalogue entries that are not fine-tuned ones)."""
    names = [n for n in config["model_catalogue"] if not is_finetuned(n)]
    return "|".join(re.escape(n) for n in names) or "^$"


def embedded_model_pattern():
    """Models that convert_model converts (so that it never claims an adapter folder)."""
    names = [n for n, e in config["model_catalogue"].items() if e["source"] == "embedded"]
    return "|".join(re.escape(n) for n in names) or "^$"


def finetune_inputs(wildcards):
    return {
        "train": "data/processed/train.tsv",
        "validation": "data/processed/validation.tsv",
        "test": "data/processed/test.tsv",
        "finetuned_prompt": PROMPT_FILES["finetuned"],
        "zero_shot_prompt": PROMPT_FILES["zero_shot"],
        "model": model_files(wildcards),
    }


def finetune_settings(wildcards):
    return config["finetune"]


def trained_adapters():
    """Adapter folder of each fine-tuned model in `models` that runs a strategy (for the
    track rule): an adapter no strategy evaluates is not trained."""
    studied = {model for model, _ in prediction_pairs()}
    return {m: adapter_folder(m) for m in config["models"] if is_finetuned(m) and m in studied}


def trained_adapter_list(wildcards):
    return list(trained_adapters().values())


def trained_adapter_models(wildcards):
    return list(trained_adapters())


# --- end of fine-tuned models ---


def model_params(wildcards):
    return load_entry(wildcards.model)


def prediction_pairs():
    """(model, strategy) pairs to run: every strategy that fits each model's format."""
    pairs = []
    for model in config["models"]:
        entry = model_entry(model)
        served = entry.get("api", "completions") if entry["source"] == "openai" else None
        pairs += [
            (model, s)
            for s in strategies_for(entry["prompt_format"], config["strategies"], served=served)
        ]
    if "baseline_tfidf" in config["strategies"]:
        pairs.append((BASELINE_MODEL, "baseline_tfidf"))
    return pairs


def prediction_outputs():
    return [
        f"results/predictions/{model}/{strategy}.{ext}"
        for model, strategy in prediction_pairs()
        for ext in ("tsv", "json")
    ]


def inspect_outputs():
    """A model's inspection page, for each model that runs a strategy in process (a
    served model's insides are on its server)."""
    studied = {model for model, _ in prediction_pairs()}
    return [
        f"results/inspect/{model}.md"
        for model in config["models"]
        if model in studied and model_entry(model)["source"] != "openai"
    ]


def model_location(wildcards):
    return location_of(wildcards.model)


def location_of(name):
    """Where a model is loaded from: the converted folder, a local folder or a hub id
    (for a fine-tuned model: its base's)."""
    entry = model_entry(name)
    if entry["source"] == "finetuned":
        return location_of(entry["base"])
    if entry["source"] == "openai":  # the tokenizer's: the model itself is on the server
        return location_of(entry["tokenizer"]) if entry.get("tokenizer") else ""
    if entry["source"] == "embedded":
        return f"data/models/{name}"
    if entry["source"] == "local":
        return entry["path"]
    return entry["hub_id"]


def model_files(wildcards):
    return files_of(wildcards.model)


def files_of(name):
    """The model as an input file, where it is one (hub models are fetched by the job);
    a fine-tuned model's are its base's and its adapter folder (trained first)."""
    entry = model_entry(name)
    if entry["source"] == "finetuned":
        return [*files_of(entry["base"]), adapter_folder(name)]
    if entry["source"] == "openai":  # and a LoRA adapter the server serves, if named
        tokenizer = files_of(entry["tokenizer"]) if entry.get("tokenizer") else []
        return [*tokenizer, *([entry["adapter"]] if "adapter" in entry else [])]
    return [] if entry["source"] == "hub" else [location_of(name)]


def predict_inputs(wildcards):
    family = STRATEGIES[wildcards.strategy].family
    return {
        "train": "data/processed/train.tsv",
        "sample": "data/processed/test_sample.tsv",
        "prompt": PROMPT_FILES[family],
        "model": model_files(wildcards),
    }


def probe_inputs(wildcards):
    return {
        "train": "data/processed/train.tsv",
        "validation": "data/processed/validation.tsv",
        "sample": "data/processed/test_sample.tsv",
        "model": model_files(wildcards),
    }


def probe_settings(wildcards):
    return {
        "probe": config["probe"],
        "engine": config["engine"],
        "sample_seed": config["sample_seed"],
    }


def predict_settings(wildcards):
    """What the strategy needs from config (so that a change re-runs exactly the jobs)."""
    method = STRATEGIES[wildcards.strategy].method
    return {
        "decoding": config["decoding"] if method == "generate" else {},
        "scoring": config["scoring"] if method == "label_likelihood" else {},
        "fallback_label": config["fallback_label"],
        "engine": config["engine"],
        "sample_seed": config["sample_seed"],
        **served_settings(wildcards.model),
    }


def served_settings(name):
    """A served model's request cache (only theirs: other jobs' params stay as they were)."""
    if model_entry(name)["source"] != "openai":
        return {}
    return {"request_cache": config["request_cache"]}


def gguf_source(wildcards):
    entry = model_entry(wildcards.model)
    if entry["source"] != "embedded":
        raise WorkflowError(f"model {wildcards.model} is not an embedded model")
    return {"package": entry["gguf_package"], "file": entry["gguf_file"], "dtype": entry["dtype"]}


def all_outputs():
    """Everything `snakemake` builds by default (a study grid's outputs when one is set)."""
    if grid_enabled():
        return data_outputs() + inspect_outputs() + grid_outputs()
    return data_outputs() + prediction_outputs() + inspect_outputs() + aggregate_outputs()


def aggregate_model_pattern():
    """Models the aggregation rules accept: the catalogue's and the baseline."""
    return "|".join(re.escape(name) for name in [*config["model_catalogue"], BASELINE_MODEL])


def aggregate_strategy_pattern():
    """Strategies the aggregation rules accept: all of them, the baseline's included."""
    return "|".join(re.escape(name) for name in STRATEGIES)


def metrics_outputs():
    return [f"results/metrics/{model}/{strategy}.json" for model, strategy in prediction_pairs()]


def figure_outputs():
    return [
        f"results/figures/confusion_{model}_{strategy}.png"
        for model, strategy in prediction_pairs()
    ]


def table_models(wildcards):
    """The order of the models in the results table: as configured, the baseline last."""
    return [*config["models"], BASELINE_MODEL]


def sample_settings(wildcards):
    """The evaluation sample's settings (part of each MLflow run's key)."""
    return {
        "size": config["sample_size"],
        "scheme": config["sample_scheme"],
        "seed": config["sample_seed"],
        "split": config["evaluation_split"],
    }


def tracked_pairs(wildcards):
    """(model, strategy) of each run, in the order of the track rule's input lists."""
    return [[model, strategy] for model, strategy in prediction_pairs()]


def track_inputs(wildcards):
    pairs = prediction_pairs()
    return {
        "predictions": [f"results/predictions/{m}/{s}.tsv" for m, s in pairs],
        "metadata": [f"results/predictions/{m}/{s}.json" for m, s in pairs],
        "metrics": metrics_outputs(),
        "figures": figure_outputs(),
        "adapters": trained_adapter_list(wildcards),
    }


def comparison_predictions():
    """Every run's predictions, in the order of tracked_pairs (the compare rule's input)."""
    return [f"results/predictions/{m}/{s}.tsv" for m, s in prediction_pairs()]


def comparison_baseline(wildcards):
    """The baseline's run name, model/strategy, when it is part of the study."""
    if "baseline_tfidf" in config["strategies"]:
        return f"{BASELINE_MODEL}/baseline_tfidf"
    return None


def aggregate_outputs():
    return [
        "results/results_table.md",
        "results/results_table.csv",
        "results/comparisons.md",
        "results/comparisons.csv",
        "results/figures/macro_f1_intervals.png",
        "results/figures/macro_f1_differences.png",
        *metrics_outputs(),
        *figure_outputs(),
        "results/mlflow_runs.tsv",
    ]


# --- threads ---
def all_cores():
    """Threads of the heavy jobs: every core given with --cores; 1 where none are given
    (a cluster run, where the profile's set-threads decides)."""
    return workflow.resource_settings.cores or 1
