"""One fine-tuning job: a LoRA adapter trained on the train split, resumably.

:func:`train` runs the steps in order, each in the module that owns it:

1. the settings (:mod:`~emoprompt.training.settings`) and the training tweets, their
   answers and loss weights (:mod:`~emoprompt.training.dataset`), never a tweet of the
   validation or test split;
2. the base model (:mod:`emoprompt.models.loading`), the examples tokenised as the
   engine tokenises them, the batch plan, and the run's fingerprint;
3. the LoRA adapter (:mod:`~emoprompt.training.lora`), optimizer and schedule, resumed
   from the newest matching checkpoint (:mod:`~emoprompt.training.checkpoints`);
4. the loop (:mod:`~emoprompt.training.loop`): the loss (and the output layer) at the
   answer positions only, class-weighted, tqdm progress with ETA, a checkpoint written
   atomically every ``checkpoint_minutes``;
5. the adapter folder (:mod:`emoprompt.models.adapter`) with ``training_config.json``
   (what was trained, on what, how long, the label set and prompt the evaluation must
   use), ``loss.tsv``, ``train_ids.txt`` and ``loss.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from emoprompt.data.splits import read_split
from emoprompt.inference.tokens import TokenizerRules
from emoprompt.infra.provenance import library_versions
from emoprompt.infra.runtime import configure_cpu
from emoprompt.labels import LABELS
from emoprompt.models.adapter import copy_loss_figure, write_adapter
from emoprompt.models.spec import ModelSpec
from emoprompt.prompting.prompt_file import load_prompt_file
from emoprompt.training.checkpoints import TrainingState, digest
from emoprompt.training.dataset import (
    PromptSpec,
    answer_first_tokens,
    answer_for_class,
    build_examples,
    class_weights,
    label_scheme,
    plan_batches,
    select_training_set,
)
from emoprompt.training.frozen import frozen_plan, frozen_states
from emoprompt.training.loop import Optimisation, Plan, first_answer_tokens, run_steps
from emoprompt.training.lora import lora_model
from emoprompt.training.settings import FinetuneSettings

log = logging.getLogger(__name__)

VALIDATION_PREDICTIONS = "validation_predictions.tsv"


@dataclass
class TrainingJob:
    """Everything one fine-tuning needs (the finetune rule's inputs, params, outputs)."""

    model_name: str
    entry: Mapping[str, Any]  # the base model's serialised catalogue entry
    train_path: str
    held_out_paths: Sequence[str]  # the validation and test splits: their ids never train
    finetuned_prompt_path: str
    zero_shot_prompt_path: str
    settings: Mapping[str, Any]
    out_dir: str
    checkpoint_dir: str | None = None  # default: <out_dir>.checkpoints
    figure_path: str | None = None
    threads: int | None = None
    device: str | None = None
    validation_path: str | None = None  # scored with the finished adapter (first token)

    @property
    def location(self) -> str:
        """The folder or hub id of the base model."""
        return ModelSpec.of(self.entry).location


@dataclass
class TrainingData:
    """Step 1: what trains, with which answer and weight."""

    spec: PromptSpec
    labels: tuple[str, ...]
    label_map: dict[str, str]
    answers: dict[str, str]
    chosen: pd.DataFrame  # the training tweets
    counts: dict[str, int]  # per class
    weights_of: dict[str, float]  # loss weight per class
    excluded: int  # held-out tweets (validation, test) found in train and left out


def prepare_data(job: TrainingJob, settings: FinetuneSettings) -> TrainingData:
    notebook = load_prompt_file(job.finetuned_prompt_path, "finetuned")
    labels, label_map = label_scheme(settings.label_set, notebook)
    answers = answer_for_class(labels, label_map)
    if settings.prompt_format == "plain":
        spec = PromptSpec("plain", notebook)
    else:
        zero_shot = load_prompt_file(job.zero_shot_prompt_path, "zero_shot")
        spec = PromptSpec("chat", zero_shot, ModelSpec.of(job.entry).chat_template_kwargs)
    train_frame = read_split(job.train_path)
    held_out = {i for path in job.held_out_paths for i in read_split(path)["id"]}
    chosen = select_training_set(
        train_frame,
        exclude_ids=sorted(held_out),
        classes=list(answers),
        size=settings.train_size,
        subset=settings.subset,
        seed=settings.seed,
    )
    untrained = sorted(set(train_frame["label"]) - set(answers))
    if untrained:
        log.info("classes without an answer label are not trained: %s", ", ".join(untrained))
    counts = chosen["label"].value_counts().reindex(LABELS).dropna().astype(int).to_dict()
    weights_of = class_weights(chosen["label"].tolist(), settings.class_weights)
    log.info(
        "training tweets: %d of %d (%s); class counts %s; loss weights %s",
        len(chosen),
        len(train_frame),
        settings.subset if settings.train_size != "all" else "all",
        counts,
        {c: round(w, 3) for c, w in weights_of.items()},
    )
    return TrainingData(
        spec,
        labels,
        dict(label_map),
        answers,
        chosen,
        counts,
        weights_of,
        int(train_frame["id"].isin(held_out).sum()),
    )


def _device_and_quantization(settings: FinetuneSettings, device: str | None) -> tuple[str, str]:
    from emoprompt.models.loading import default_device, nf4_blocker

    device = device or default_device()
    if settings.quantization == "none":
        return device, "none"
    if settings.quantization == "auto" and not device.startswith("cuda"):
        return device, "none"  # auto: QLoRA on CUDA; a CPU trains in full precision
    blocker = nf4_blocker(device)
    if blocker is None:
        return device, "nf4"
    if settings.quantization == "nf4":
        raise RuntimeError(f"4-bit QLoRA was asked for but {blocker}")
    return device, "none"


def _load_base(job: TrainingJob, settings: FinetuneSettings):
    from emoprompt.models.loading import load_model

    device, quantization = _device_and_quantization(settings, job.device)
    # Full precision on a CPU; bfloat16 (or NF4 storage) on an accelerator.
    spec = ModelSpec.of(job.entry, job.model_name).replace(
        dtype="float32" if device == "cpu" else "bfloat16",
        quantization=quantization,
        allow_fallback=False,
    )
    loaded = load_model(spec, job.location, device=device)
    loaded.tokenizer.padding_side = "right"
    return loaded, quantization


def plan_training(
    job: TrainingJob, settings: FinetuneSettings, data: TrainingData, tokenizer: Any
) -> tuple[Plan, str]:
    """Step 2: the examples, their loss weights and order, and the run's fingerprint."""
    examples = build_examples(data.chosen, tokenizer, data.spec, data.answers, settings.max_length)
    weights = torch.tensor([data.weights_of[e.label] for e in examples], dtype=torch.float32)
    batches = plan_batches(
        len(examples),
        settings.batch_size,
        settings.epochs,
        settings.seed,
        lengths=[len(e.input_ids) for e in examples],
    )
    total_steps = math.ceil(len(batches) / settings.gradient_accumulation)
    if settings.max_steps is not None:
        total_steps = min(total_steps, settings.max_steps)
    if total_steps < 1:
        raise ValueError("nothing to train: no batches (check train_size, epochs, max_steps)")
    fingerprint = digest(
        {
            "base": job.model_name,
            "location": job.location,
            "settings": settings.fingerprint(),
            "ids": data.chosen["id"].tolist(),
            "answers": data.answers,
            "prompt": data.spec.record(),
        }
    )
    return Plan(examples, weights, batches, total_steps, tokenizer.pad_token_id), fingerprint


def train(job: TrainingJob) -> dict[str, Any]:
    """Train (or resume training) the adapter and write its folder; return its record."""
    settings = FinetuneSettings.from_mapping(job.settings)
    started = (time.time(), time.process_time())
    threads = job.threads if settings.threads == "auto" else settings.threads
    if threads:  # else torch's default
        configure_cpu(threads, int(threads))
    out_dir = Path(job.out_dir)
    ckpt_dir = Path(job.checkpoint_dir or f"{out_dir}.checkpoints")
    data = prepare_data(job, settings)
    loaded, quantization = _load_base(job, settings)
    plan, fingerprint = plan_training(job, settings, data, loaded.tokenizer)

    torch.manual_seed(settings.seed)
    model = lora_model(loaded.model, settings, quantized=quantization == "nf4")
    opt = Optimisation.of(model, settings, plan.total_steps, quantization)
    if settings.loss == "labels":
        answers = list(data.answers.values())
        first_of = answer_first_tokens(loaded.tokenizer, data.spec, answers)
        opt.candidates = first_answer_tokens(plan.examples, answers, first_of)
    frozen = compute_frozen(opt, plan, settings, quantization, job.model_name)
    log.info(
        "LoRA r=%d alpha=%d on %s: %d trainable parameters; %d steps of %d x %d tweets "
        "on %s (quantization %s)",
        settings.lora_r,
        settings.lora_alpha,
        settings.target_modules,
        sum(p.numel() for p in opt.trainable),
        plan.total_steps,
        settings.batch_size,
        settings.gradient_accumulation,
        opt.device,
        quantization,
    )
    state = TrainingState.resume(ckpt_dir, fingerprint, model, opt.optimizer, opt.scheduler)
    if state.resumed:
        log.info(
            "resumed from checkpoint step %d of %d (%.0f s of training done)",
            state.step,
            plan.total_steps,
            state.seconds,
        )
    run_steps(opt, state, plan, settings, ckpt_dir, f"fine-tuning {job.model_name}")

    end_token = loaded.tokenizer.convert_ids_to_tokens(
        TokenizerRules(loaded.tokenizer).answer_end_id()
    )
    record = training_record(job, settings, data, plan, opt, state, quantization, started)
    record["end_token"] = end_token
    record["frozen_states"] = frozen
    record = write_adapter(
        out_dir,
        model,
        record,
        state.history,
        data.chosen["id"].tolist(),
        f"LoRA fine-tuning of {job.model_name}",
        # the finished folder is scored on validation as the evaluation will load it
        validate=partial(validate_adapter, job, settings) if job.validation_path else None,
    )
    if job.figure_path:
        copy_loss_figure(out_dir, job.figure_path)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    log.info(
        "adapter written to %s: %d steps, %.0f s of training, final loss %.4f",
        out_dir,
        state.step,
        state.seconds,
        record["final_loss"],
    )
    return record


def compute_frozen(
    opt: Optimisation, plan: Plan, settings: FinetuneSettings, quantization: str, name: str
) -> dict[str, Any]:
    """The frozen bottom layers' output for every training tweet, where the speed-up is
    on (:mod:`~emoprompt.training.frozen`); what was done, for the record. It is computed
    again on a resumed run, in the same fixed batches, so the states are the same."""
    depth, why = frozen_plan(
        opt.model,
        settings.frozen_states,
        opt.device.type,
        quantization,
        settings.gradient_checkpointing,
    )
    if not depth:
        log.info("frozen states off: %s", why)
        return {"layers": 0, "why_not": why}
    tick = time.perf_counter()
    opt.frozen = frozen_states(
        opt.model,
        plan.examples,
        plan.pad_id,
        depth,
        autocast=opt.autocast,
        batch_size=settings.batch_size,
        desc=f"frozen layers of {name}",
    )
    opt.frozen_depth = depth
    seconds = time.perf_counter() - tick
    log.info(
        "the %d frozen bottom layers computed once for %d tweets in %.1f s; each step runs "
        "the layers above",
        depth,
        len(plan.examples),
        seconds,
    )
    return {"layers": depth, "seconds": round(seconds, 1)}


def validate_adapter(job: TrainingJob, settings: FinetuneSettings, folder: Path) -> dict[str, Any]:
    """Score the adapter in ``folder`` on the validation split with the strategy that
    evaluates it (``finetuned_first_token``, or ``zero_shot_first_token`` for the chat
    format), loaded as a ``source: finetuned`` catalogue entry is; the predictions stay
    in the folder beside the score."""
    from emoprompt.evaluation.job import run_prediction
    from emoprompt.evaluation.metrics import validation_summary

    chat = settings.prompt_format == "chat"
    entry = {
        **job.entry,
        "source": "finetuned",
        "base": job.model_name,
        "prompt_format": "chat" if chat else "plain",
        "adapter": str(folder),
    }
    strategy = "zero_shot_first_token" if chat else "finetuned_first_token"
    result = run_prediction(
        model_name=f"{job.model_name}-ft",
        entry=entry,
        strategy_name=strategy,
        prompt_path=job.zero_shot_prompt_path if chat else job.finetuned_prompt_path,
        train_path=job.train_path,
        sample_path=job.validation_path,
        settings={"engine": {"threads": job.threads or "auto"}},
        job_threads=job.threads or 1,
        tsv_out=str(folder / VALIDATION_PREDICTIONS),
        json_out=str(folder / VALIDATION_PREDICTIONS.replace(".tsv", ".json")),
    )
    frame = result.predictions
    summary = {"strategy": strategy, **validation_summary(frame["gold"], frame["predicted"])}
    log.info(
        "validation (%d tweets, %s): macro F1 %.4f [%.4f, %.4f], accuracy %.4f",
        summary["tweets"],
        strategy,
        summary["f1_macro"]["value"],
        summary["f1_macro"]["low"],
        summary["f1_macro"]["high"],
        summary["accuracy"]["value"],
    )
    return summary


def training_record(
    job: TrainingJob,
    settings: FinetuneSettings,
    data: TrainingData,
    plan: Plan,
    opt: Optimisation,
    state: TrainingState,
    quantization: str,
    started: tuple[float, float],
) -> dict[str, Any]:
    """Step 5: ``training_config.json``, what the adapter is and how it was made."""
    history, step = state.history, state.step
    return {
        "base_model": job.model_name,
        "base_location": job.location,
        "adapter": "peft LoRA",
        "prompt_format": data.spec.format,
        "prompt_family": data.spec.family,
        **data.spec.record(),
        "labels": list(data.labels),
        "label_map": data.label_map,
        "end_token": None,  # the token every answer ends with (train() names it)
        "settings": asdict(settings),
        "train_file": job.train_path,
        "train_tweets": len(plan.examples),
        "train_ids_sha256": hashlib.sha256("\n".join(data.chosen["id"]).encode()).hexdigest(),
        "class_counts": data.counts,
        "class_weights": data.weights_of,
        "held_out_files": list(job.held_out_paths),
        "held_out_tweets_left_out": data.excluded,
        "truncated_tweets": int(sum(e.truncated for e in plan.examples)),
        "steps": step,
        "examples_seen": min(len(plan.batches), step * settings.gradient_accumulation)
        * settings.batch_size,
        "seconds": round(state.seconds, 1),
        "wall_seconds_last_run": round(time.time() - started[0], 1),
        "cpu_seconds_last_run": round(time.process_time() - started[1], 1),
        "resumed_from_steps": state.resumed,
        "final_loss": history[-1]["loss"],
        "final_loss_mean_last_10pct": float(
            np.mean([h["loss"] for h in history[-max(1, len(history) // 10) :]])
        ),
        "device": str(opt.device),
        "quantization": quantization,
        "autocast": "bfloat16" if opt.autocast else "none",
        "trainable_parameters": sum(p.numel() for p in opt.trainable),
        "fingerprint": state.fingerprint,
        "versions": library_versions(extra=("peft",)),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m emoprompt.training.job job.json``: run a :class:`TrainingJob` described in
    a JSON file (the fields of TrainingJob); the log goes to stderr and ``--log``."""
    from emoprompt.infra.logs import setup_logging

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("job", help="JSON file with the TrainingJob fields")
    parser.add_argument("--log", default=None, help="also log to this file")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    job = TrainingJob(**json.loads(Path(args.job).read_text(encoding="utf-8")))
    train(job)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
