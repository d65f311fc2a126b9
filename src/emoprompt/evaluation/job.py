"""One prediction job: load the model, run a strategy over the sample, write its files."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from emoprompt.data.splits import read_split
from emoprompt.evaluation.context import fit_to_context, truncation_record, unmeasured
from emoprompt.evaluation.predictions import Result, write_result
from emoprompt.evaluation.runner import run_baseline, run_llm_strategy
from emoprompt.evaluation.strategies import STRATEGIES, Settings
from emoprompt.infra.errors import UserError
from emoprompt.infra.files import sha256_file
from emoprompt.infra.provenance import git_commit
from emoprompt.infra.runtime import configure_cpu
from emoprompt.models.adapter import adapter_prompt
from emoprompt.models.spec import ModelSpec
from emoprompt.prompting.fewshot import check_calibration
from emoprompt.prompting.fewshot import check_settings as check_few_shot
from emoprompt.prompting.prompt_file import file_family, load_prompt_file
from emoprompt.prompting.variants import load_family

log = logging.getLogger(__name__)


def auto_batch_size(device: str) -> int:
    """Prompts per forward pass: larger on an accelerator, 16 on a CPU (little gain beyond)."""
    return 32 if device.startswith("cuda") else 16


def settings_from_config(settings: Mapping[str, Any]) -> Settings:
    decoding = settings.get("decoding") or {}
    scoring = settings.get("scoring") or {}
    return Settings(
        max_new_tokens=decoding.get("max_new_tokens", 20),
        do_sample=decoding.get("do_sample", False),
        temperature=decoding.get("temperature", 1.0),
        seed=decoding.get("seed", 0),
        fallback_label=settings.get("fallback_label", "Otras"),
        length_normalize=scoring.get("length_normalize", False),
        calibrate=scoring.get("calibrate", False),
    )


def run_prediction(
    *,
    model_name: str,
    entry: Mapping[str, Any],
    strategy_name: str,
    prompt_path: str,
    train_path: str,
    sample_path: str,
    settings: Mapping[str, Any],
    job_threads: int,
    tsv_out: str,
    json_out: str,
    workflow_dir: str | None = None,
) -> Result:
    """Everything a `predict` job does, so the workflow script only unpacks Snakemake.

    ``workflow_dir`` (a folder of the checkout) names the git commit in the record."""
    strategy = STRATEGIES[strategy_name]
    engine_settings = settings.get("engine") or {}
    threads = configure_cpu(engine_settings.get("threads", "auto"), job_threads)
    spec = ModelSpec.of(entry)
    prompt = job_prompt(strategy, prompt_path, settings, spec)
    train, sample = read_split(train_path), read_split(sample_path)
    run_settings = job_settings(settings, spec)
    # Before the model loads: shots it cannot have, prompts longer than its context.
    check_prompt(strategy, prompt, train, sample, run_settings)
    model = JobModel.open(model_name, spec, settings, prompt)
    fitted = model.fit(strategy, prompt, train, sample, run_settings)
    engine, tokenizer, info, batch_size = model.load(engine_settings)
    context = model.context
    log.info(
        "%s / %s: %d tweets on %s, batch %d, %d threads",
        *(model_name, strategy_name, len(sample), engine.device, batch_size, threads),
    )
    result = run_llm_strategy(
        *(strategy, engine, tokenizer, prompt, train, fitted.sample, run_settings),
        truncated=fitted.truncated,
    )
    result.metadata = {
        "model": model_name,
        **{k: v for k, v in info.items() if k != "name"},
        "batch_size": batch_size,
        "threads": threads,
        "engine_stats": dict(engine.stats),
        **truncation_record(fitted, context),
        **result.metadata,
        **_adapter_validation(spec, strategy_name),
        **provenance_record(sample_path, settings, workflow_dir),
    }
    write_result(result, tsv_out, json_out)
    log.info(
        "%s / %s: %.2f tweets/s, %d unparsed",
        model_name,
        strategy_name,
        result.metadata["tweets_per_s"] or 0,
        result.metadata["unparsed"],
    )
    return result


def job_settings(settings: Mapping[str, Any], spec: ModelSpec) -> Settings:
    """The strategy's settings from the job's configuration, with the model's chat
    template arguments."""
    run_settings = settings_from_config(settings)
    run_settings.chat_template_kwargs = dict(spec.chat_template_kwargs)
    return run_settings


def check_prompt(strategy, prompt, train, sample, run_settings: Settings) -> None:
    """A few-shot prompt's shots (and calibration) checked before the model loads."""
    if strategy.family == "few_shot":
        check_few_shot(prompt, train, sample)
        check_calibration(prompt, strategy.method == "label_likelihood" and run_settings.calibrate)


@dataclasses.dataclass
class JobModel:
    """A job's model: its tokenizer and context first (prompts are measured before any
    weights load), then the engine over it (or a server's backend)."""

    name: str
    spec: ModelSpec
    tokenizer: Any
    context: int | None
    remote: tuple[Any, dict[str, Any]] | None = None

    @classmethod
    def open(cls, name: str, spec: ModelSpec, settings: Mapping[str, Any], prompt) -> JobModel:
        """The tokenizer (none for a chat API without one) and the context; a server is
        checked here, before any prompt is built."""
        from emoprompt.models.loading import context_length, load_tokenizer

        location = spec.location
        tokenizer = load_tokenizer(spec, location) if location else None
        check_chat_template(name, spec, tokenizer, prompt)
        if spec.served is not None:
            engine, info, context = _remote(spec, location, tokenizer, settings)
            return cls(name, spec, tokenizer, context, (engine, info))
        return cls(name, spec, tokenizer, context_length(spec, location, tokenizer))

    def fit(self, strategy, prompt, train, sample, run_settings: Settings):
        """Every tweet's prompt measured against the context, cut where it does not fit."""
        if self.tokenizer is None:  # the server's template and tokenizer measure them
            log.info("%s: prompts not measured here; the server refuses any too long", self.name)
            return unmeasured(sample)
        return fit_to_context(
            strategy, prompt, self.tokenizer, train, sample, run_settings, self.context
        )

    def load(self, engine_settings: Mapping[str, Any]):
        """(engine, tokenizer, info, batch size): the model loaded once, or the server's."""
        if self.remote is not None:
            engine, info = self.remote
            return engine, self.tokenizer, info, engine.client.max_concurrency
        from emoprompt.models.loading import load_model

        loaded = load_model(self.spec, self.spec.location)
        engine, batch_size = _engine(loaded, engine_settings)
        return engine, loaded.tokenizer, loaded.info, batch_size


def check_chat_template(model_name: str, spec: ModelSpec, tokenizer, prompt) -> None:
    """Refuse, before the model loads, a chat prompt for a model whose tokenizer has no
    chat template (a base model: its entry wants prompt_format: text)."""
    if tokenizer is None or prompt.format != "chat" or getattr(tokenizer, "chat_template", None):
        return
    raise UserError(
        f"model_catalogue: {model_name} has prompt_format: chat, but its tokenizer "
        f"({spec.location}) has no chat template, so {prompt.path} (a chat prompt) cannot "
        "be written for it; a base model takes prompt_format: text (the plain-text "
        "prompts/zero_shot_text.yaml and few_shot_text.yaml)"
    )


def provenance_record(sample_path: str, settings: Mapping[str, Any], workflow_dir: str | None):
    """The evaluation sample (file, digest, seed) and the workflow's git commit."""
    return {
        "sample": {
            "file": sample_path,
            "sha256": sha256_file(sample_path),
            "seed": settings.get("sample_seed"),
        },
        "git_commit": git_commit(workflow_dir) if workflow_dir else "unknown",
    }


def _adapter_validation(spec: ModelSpec, strategy_name: str) -> dict[str, Any]:
    """A fine-tuned model's validation score, for the strategy it was validated with."""
    if not spec.adapter:
        return {}
    from emoprompt.models.adapter import read_training_config

    validation = read_training_config(spec.adapter).get("validation") or {}
    return {"validation": validation} if validation.get("strategy") == strategy_name else {}


def job_prompt(
    strategy, prompt_path: str, settings: Mapping[str, Any], spec: ModelSpec, family=False
):
    """The strategy's prompt file, with a grid's few-shot seed and a fine-tuned model's
    own label set (and template) applied; with ``family``, its variants checked."""
    load = load_family if family else load_prompt_file
    prompt = load(prompt_path, file_family(strategy.family, spec.prompt_format))
    if settings.get("fewshot_seed") is not None and strategy.family == "few_shot":
        # A study grid's few-shot seed replaces the prompt file's.
        seed = int(settings["fewshot_seed"])
        prompt = dataclasses.replace(prompt, settings={**prompt.settings, "seed": seed})
    if spec.adapter:  # a fine-tuned model answers with the labels it was trained on
        prompt = adapter_prompt(prompt, spec.adapter)
    return prompt


def _remote(spec: ModelSpec, location: str, tokenizer, settings: Mapping[str, Any]):
    """A served model's backend, what the server says about it, and its context: the
    server's ``max_model_len`` where it states one, else the tokenizer model's (None for
    a hosted chat API that states none and has no local tokenizer)."""
    from emoprompt.inference.remote import connect
    from emoprompt.models.loading import context_length, generation_eos

    backend = connect(
        spec,
        tokenizer,
        cache_dir=settings.get("request_cache"),
        generation_eos=generation_eos(location) if location else None,
    )
    served = backend.info.get("max_model_len")
    if served:
        context = int(served)
    else:
        context = context_length(spec, location, tokenizer) if location else None
    info = {"device": "server", "dtype": None, **backend.info}
    return backend, info, context


def _engine(loaded, engine_settings: Mapping[str, Any]):
    """The engine over a loaded model, and its batch size."""
    from emoprompt.inference.engine import Engine  # torch-heavy imports only where a model runs

    device = loaded.info.get("device", "cpu")
    batch_size = engine_settings.get("batch_size", "auto")
    batch_size = auto_batch_size(device) if batch_size == "auto" else int(batch_size)
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        batch_size=batch_size,
        speedups=engine_settings.get("speedups", "auto"),
        disable=engine_settings.get("disable", ()),
    )
    return engine, batch_size


def run_baseline_job(train_path: str, sample_path: str, seed: int, tsv_out: str, json_out: str):
    """The TF-IDF baseline job."""
    result = run_baseline(read_split(train_path), read_split(sample_path), seed=seed)
    write_result(result, tsv_out, json_out)
    log.info("baseline_tfidf: %d tweets", len(result.predictions))
    return result


def run_probe_job(
    *,
    model_name: str,
    entry: Mapping[str, Any],
    train_path: str,
    validation_path: str,
    sample_path: str,
    settings: Mapping[str, Any],
    job_threads: int,
    tsv_out: str,
    json_out: str,
    workflow_dir: str | None = None,
) -> Result:
    """The ``linear_probe`` job: features of the training, validation and sample tweets,
    the probe's settings chosen on validation, predictions for the sample."""
    from emoprompt.evaluation.probe import ProbeSettings, run_probe
    from emoprompt.models.loading import load_model
    from emoprompt.training.dataset import select_training_set

    probe = ProbeSettings.from_mapping(settings.get("probe") or {})  # before the model loads
    threads = configure_cpu((settings.get("engine") or {}).get("threads", "auto"), job_threads)
    validation, sample = read_split(validation_path), read_split(sample_path)
    train = select_training_set(
        read_split(train_path),
        exclude_ids=[*validation["id"], *sample["id"]],
        size=probe.train_size,
        subset=probe.subset,
        seed=probe.seed,
    )
    spec = ModelSpec.of(entry)
    loaded = load_model(spec, spec.location)
    log.info(
        "%s / linear_probe: %d training, %d validation, %d sample tweets, %d threads",
        model_name,
        len(train),
        len(validation),
        len(sample),
        threads,
    )
    result = run_probe(loaded.model, loaded.tokenizer, train, validation, sample, probe)
    result.metadata = {
        "model": model_name,
        **{k: v for k, v in loaded.info.items() if k != "name"},
        "threads": threads,
        **result.metadata,
        **provenance_record(sample_path, settings, workflow_dir),
    }
    write_result(result, tsv_out, json_out)
    log.info(
        "%s / linear_probe: %s; validation macro F1 %.4f",
        model_name,
        result.metadata["description"],
        result.metadata["validation"]["f1_macro"]["value"],
    )
    return result
