"""Fine-tuning a LoRA adapter on the train split, resumably.

The pieces, each testable on its own:

* :func:`label_scheme` / :func:`select_training_set` - which tweets train and with which
  answer: the whole split or a seeded subset (stratified, or class-balanced), never a
  tweet of the evaluation sample;
* :func:`build_examples` - each tweet as ``prompt + answer + end token`` with a loss mask
  that covers the answer and the end token only. The prompt is the one the evaluation
  strategies write (the plain ``### Texto:`` template, or the model's chat template with
  the zero-shot prompt), tokenised as the engine tokenises it;
* :func:`train` - a plain torch loop over a deterministic batch plan, with the loss (and
  the output layer) computed at the answer positions only, a class-weighted loss, tqdm
  progress with ETA, and a checkpoint (adapter, optimizer, scheduler, RNG, step, loss
  history) written atomically every ``checkpoint_minutes``; started again, it resumes
  from the newest checkpoint whose settings match instead of starting over.

The result is a peft adapter folder with ``training_config.json`` (what was trained, on
what, how long, the label set and prompt the evaluation must use), ``loss.tsv`` (step,
loss, lr, seconds), ``train_ids.txt`` and ``loss.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from emoprompt.infra.files import atomic_path, write_json
from emoprompt.labels import LABELS
from emoprompt.prompting.render import (
    PromptFile,
    chat_messages,
    load_prompt_file,
    render_chat,
    render_plain,
)

log = logging.getLogger(__name__)

IGNORE = -100  # label of a position that the loss does not see
TRAINING_CONFIG = "training_config.json"
LOSS_FILE = "loss.tsv"
TRAIN_IDS_FILE = "train_ids.txt"
LOSS_FIGURE = "loss.png"
STATE_FILE = "state.pt"
CHECKPOINTS_KEPT = 2
LABEL_SETS = ("seven", "notebook")
SUBSETS = ("stratified", "balanced")
CLASS_WEIGHTS = ("none", "sqrt", "balanced")
PROMPT_FORMATS = ("plain", "chat")
ALL_LINEAR = "all-linear"
PROGRESS_SECONDS = 60  # a progress line in the log this often


@dataclass
class FinetuneSettings:
    """The ``finetune:`` block of config.yaml (see the schema for each key's meaning)."""

    label_set: str = "seven"
    prompt_format: str = "plain"
    train_size: int | str = "all"
    subset: str = "stratified"
    class_weights: str = "none"
    epochs: float = 1.0
    max_steps: int | None = None
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str | list[str] = ALL_LINEAR
    lora_layers: int | str = "all"  # or N: the adapter on the top N decoder layers only
    batch_size: int = 16
    gradient_accumulation: int = 1
    max_length: int = 96
    seed: int = 0
    quantization: str = "auto"  # auto: nf4 on CUDA with bitsandbytes, else none
    gradient_checkpointing: bool = False
    checkpoint_minutes: float = 2.0
    checkpoint_steps: int | None = None  # also every N steps (tests)
    threads: int | str = "auto"  # torch CPU threads; auto: the job's

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> FinetuneSettings:
        values = dict(values or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown fine-tuning setting(s): {', '.join(unknown)}")
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        for name, allowed in (
            ("label_set", LABEL_SETS),
            ("subset", SUBSETS),
            ("class_weights", CLASS_WEIGHTS),
            ("prompt_format", PROMPT_FORMATS),
            ("quantization", ("auto", "none", "nf4")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"finetune {name} must be one of {', '.join(allowed)}")
        if self.train_size != "all" and (
            not isinstance(self.train_size, int) or self.train_size < 1
        ):
            raise ValueError("finetune train_size must be 'all' or a positive integer")
        if self.lora_layers != "all" and (
            not isinstance(self.lora_layers, int) or self.lora_layers < 1
        ):
            raise ValueError("finetune lora_layers must be 'all' or a positive integer")
        if self.batch_size < 1 or self.gradient_accumulation < 1 or self.max_length < 8:
            raise ValueError(
                "finetune batch_size, gradient_accumulation must be >= 1, max_length >= 8"
            )

    def fingerprint(self) -> dict[str, Any]:
        """What defines the trained adapter (checkpoint timing does not)."""
        values = asdict(self)
        for name in ("checkpoint_minutes", "checkpoint_steps", "threads"):
            values.pop(name)
        return values


# ---------------------------------------------------------------- the training data
def label_scheme(
    label_set: str, notebook_prompt: PromptFile | None = None
) -> tuple[tuple[str, ...], dict[str, str]]:
    """The answer labels and how each maps to one of the seven classes.

    ``seven``: the seven classes themselves. ``notebook``: the published fine-tuned
    model's labels from prompts/finetuned.yaml (six, Neutral standing for Otras).
    """
    if label_set == "seven":
        return LABELS, {label: label for label in LABELS}
    if label_set == "notebook":
        if notebook_prompt is None:
            raise ValueError("label_set 'notebook' needs the fine-tuned prompt file")
        return notebook_prompt.labels, notebook_prompt.label_map
    raise ValueError(f"unknown label set {label_set!r}; expected one of {', '.join(LABELS)}")


def answer_for_class(labels: Sequence[str], label_map: Mapping[str, str]) -> dict[str, str]:
    """Class -> the answer that trains it (classes without a label are not trained)."""
    answers: dict[str, str] = {}
    for label in labels:
        answers.setdefault(label_map[label], label)
    return answers


def _allocate(counts: Mapping[str, int], size: int, balanced: bool) -> dict[str, int]:
    """How many tweets each class contributes to a subset of ``size``.

    Stratified: proportional to the class sizes (largest remainders). Balanced: as equal
    as the classes allow (a class smaller than its share gives all it has, the rest is
    shared among the others).
    """
    total = sum(counts.values())
    if size >= total:
        return dict(counts)
    if balanced:
        take = dict.fromkeys(counts, 0)
        left, open_classes = size, sorted(counts, key=lambda c: counts[c])
        while open_classes and left > 0:
            share = left // len(open_classes)
            smallest = open_classes[0]
            if counts[smallest] <= share:
                take[smallest] = counts[smallest]
                left -= counts[smallest]
                open_classes.pop(0)
                continue
            for c in open_classes:
                take[c] = share
            left -= share * len(open_classes)
            for c in sorted(open_classes)[:left]:  # the remainder, one each, by name
                take[c] += 1
            break
        return take
    exact = {c: n * size / total for c, n in counts.items()}
    take = {c: math.floor(v) for c, v in exact.items()}
    rest = size - sum(take.values())
    for c in sorted(exact, key=lambda c: (-(exact[c] - take[c]), c))[:rest]:
        take[c] += 1
    return take


def select_training_set(
    train: pd.DataFrame,
    *,
    exclude_ids: Sequence[str] = (),
    classes: Sequence[str] = LABELS,
    size: int | str = "all",
    subset: str = "stratified",
    seed: int = 0,
) -> pd.DataFrame:
    """The training tweets: never an id of ``exclude_ids`` (the evaluation sample), only
    classes that have an answer; all of them, or a seeded subset of ``size`` (stratified
    by class, or class-balanced). Rows keep the split's order."""
    excluded = set(map(str, exclude_ids))
    keep = ~train["id"].astype(str).isin(excluded) & train["label"].isin(list(classes))
    dropped_test = int(train["id"].astype(str).isin(excluded).sum())
    if dropped_test:
        log.warning("%d training tweets are in the evaluation sample: left out", dropped_test)
    pool = train[keep]
    if size == "all" or int(size) >= len(pool):
        return pool.reset_index(drop=True)
    counts = pool["label"].value_counts().to_dict()
    take = _allocate(counts, int(size), balanced=subset == "balanced")
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for label in sorted(take):
        rows = np.flatnonzero(pool["label"].to_numpy() == label)
        chosen += rng.choice(rows, size=take[label], replace=False).tolist()
    return pool.iloc[sorted(chosen)].reset_index(drop=True)


def class_weights(labels: Sequence[str], scheme: str = "none") -> dict[str, float]:
    """A loss weight per class: 1, or inversely proportional to its frequency (``balanced``)
    or to the square root of it (``sqrt``); scaled so that the mean over tweets is 1."""
    counts = pd.Series(list(labels)).value_counts().to_dict()
    if scheme == "none" or not counts:
        return dict.fromkeys(counts, 1.0)
    power = {"balanced": 1.0, "sqrt": 0.5}[scheme]
    raw = {c: (1.0 / n) ** power for c, n in counts.items()}
    mean = sum(raw[c] * n for c, n in counts.items()) / sum(counts.values())
    return {c: raw[c] / mean for c in sorted(counts)}


# ---------------------------------------------------------------- prompts and tokens
@dataclass(frozen=True)
class PromptSpec:
    """How a tweet becomes the prompt the evaluation will also write."""

    format: str  # plain | chat
    prompt: PromptFile  # finetuned.yaml (plain) or zero_shot.yaml (chat)
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.prompt.family

    def text(self, tokenizer: Any, tweet: str) -> str:
        if self.format == "plain":
            return render_plain(self.prompt, tweet).text
        return render_chat(tokenizer, chat_messages(self.prompt, tweet), self.template_kwargs).text

    def record(self) -> dict[str, Any]:
        if self.format == "plain":
            return {"template": self.prompt.settings["template"]}
        return {"messages": chat_messages(self.prompt, "{tweet}")}


def bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos]`` where the tokenizer adds one by default (as the engine does), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    default = tokenizer("a")["input_ids"]
    return [bos] if len(default) > len(plain) and default[0] == bos else []


def end_token_id(tokenizer: Any) -> int:
    """The token that ends an answer: the chat template's end of turn, else EOS (the token
    that label-likelihood scoring puts after each label)."""
    marker = "\u2042EMOPROMPT_ANSWER\u2042"
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
                tokenize=False,
            )
        except Exception:  # a template that refuses this chat: use EOS
            text = ""
        if marker in text:
            after = text.split(marker, 1)[1]
            ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
            if ids:
                return int(ids[0])
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-turn or EOS token")
    return int(tokenizer.eos_token_id)


@dataclass(frozen=True)
class Example:
    """One training tweet: its tokens and, per position, the token the loss expects
    (``IGNORE`` on the prompt, the token itself on the answer and end token)."""

    id: str
    label: str  # the class (one of the seven)
    answer: str  # the answer label (may differ from the class: Neutral for Otras)
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_example(
    tokenizer: Any,
    spec: PromptSpec,
    tweet_id: str,
    tweet: str,
    label: str,
    answer: str,
    *,
    max_length: int,
    bos: Sequence[int] = (),
    end_id: int | None = None,
) -> Example:
    """``bos + prompt + answer + end`` with the loss on ``answer + end`` only.

    The answer's tokens are those the tokenizer writes after the prompt (as the engine
    scores them). A prompt too long for ``max_length`` has its tweet shortened (its end
    cut, at a character boundary) until it fits; the answer is never cut.
    """
    end = [] if end_id is None else [end_id]
    text, truncated = tweet, False
    for _ in range(20):
        prompt = spec.text(tokenizer, text)
        prompt_ids = list(bos) + _encode(tokenizer, prompt)
        full_ids = list(bos) + _encode(tokenizer, prompt + answer)
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(f"answer {answer!r} merges with the prompt's last token")
        answer_ids = full_ids[len(prompt_ids) :] + end
        excess = len(prompt_ids) + len(answer_ids) - max_length
        if excess <= 0:
            break
        if len(text) <= 1:
            raise ValueError(f"max_length {max_length} is too short for the prompt alone")
        # Drop a share of characters a little above the share of excess tokens.
        tweet_tokens = max(1, len(_encode(tokenizer, text)))
        cut = max(1, math.ceil(len(text) * min(1.0, (excess + 1) / tweet_tokens)))
        text, truncated = text[: max(1, len(text) - cut)].rstrip() or text[:1], True
    else:
        raise ValueError(f"could not fit tweet {tweet_id} into {max_length} tokens")
    input_ids = prompt_ids + answer_ids
    labels = [IGNORE] * len(prompt_ids) + answer_ids
    return Example(str(tweet_id), label, answer, input_ids, labels, truncated)


def build_examples(
    frame: pd.DataFrame,
    tokenizer: Any,
    spec: PromptSpec,
    answers: Mapping[str, str],
    max_length: int,
) -> list[Example]:
    """Every row of ``frame`` (id, tweet, label) as an :class:`Example`."""
    bos, end_id = bos_prefix(tokenizer), end_token_id(tokenizer)
    examples = [
        build_example(
            tokenizer,
            spec,
            row.id,
            row.tweet,
            row.label,
            answers[row.label],
            max_length=max_length,
            bos=bos,
            end_id=end_id,
        )
        for row in frame.itertuples(index=False)
    ]
    truncated = sum(e.truncated for e in examples)
    if truncated:
        log.info(
            "%d of %d tweets shortened to fit max_length %d", truncated, len(examples), max_length
        )
    return examples


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and loss ``labels``."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        mask[r, :n] = 1
        labels[r, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def plan_batches(
    n: int,
    batch_size: int,
    epochs: float,
    seed: int,
    lengths: Sequence[int] | None = None,
    group: int = 16,
) -> list[list[int]]:
    """The order of training: one seeded permutation per epoch, cut into batches (a
    fractional epoch takes the first part of its permutation). Deterministic, so a
    resumed run continues with exactly the batches it had not done.

    With ``lengths``, each run of ``group`` batches of the permutation is sorted by
    length before it is cut, and those batches are shuffled: batches of similar lengths
    waste less on padding, and the order stays random.
    """
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    whole = math.floor(epochs)
    for _ in range(whole):
        order += torch.randperm(n, generator=generator).tolist()
    part = round((epochs - whole) * n)
    if part:
        order += torch.randperm(n, generator=generator).tolist()[:part]
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    span = batch_size * group
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        cut = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        batches += [cut[j] for j in torch.randperm(len(cut), generator=generator).tolist()]
    return batches


def answer_loss(
    model: Any, batch: Mapping[str, torch.Tensor], weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens (each weighted by its tweet's weight).

    The output layer runs only at the positions that predict an answer token
    (``logits_to_keep`` with a boolean mask), which saves most of a step's cost.
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE  # position t predicts token t+1
    targets = labels[:, 1:][predicts[:, :-1]]
    try:
        logits = model(
            input_ids=ids, attention_mask=mask, logits_to_keep=predicts, use_cache=False
        ).logits
    except TypeError:  # a model without logits_to_keep: all positions, then select
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[predicts]
    logits = logits.reshape(-1, logits.shape[-1]).float()
    losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    if weights is None:
        return losses.mean()
    token_weights = weights[:, None].expand_as(labels)[:, 1:][predicts[:, :-1]]
    return (losses * token_weights).sum() / token_weights.sum()


# ---------------------------------------------------------------- checkpoints
def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def checkpoint_steps(folder: Path) -> list[int]:
    """Steps of the complete checkpoints in ``folder`` (written atomically), ascending."""
    if not folder.is_dir():
        return []
    steps = []
    for path in folder.iterdir():
        name = path.name
        if name.startswith("step-") and name[5:].isdigit() and (path / STATE_FILE).is_file():
            steps.append(int(name[5:]))
    return sorted(steps)


def save_checkpoint(folder: Path, step: int, state: Mapping[str, Any]) -> Path:
    """Write ``folder/step-N/state.pt`` atomically; keep the newest few checkpoints."""
    target = folder / f"step-{step}"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        torch.save(dict(state), tmp / STATE_FILE)
    for old in checkpoint_steps(folder)[:-CHECKPOINTS_KEPT]:
        shutil.rmtree(folder / f"step-{old}", ignore_errors=True)
    return target


def load_checkpoint(folder: Path, fingerprint: str) -> dict[str, Any] | None:
    """The newest checkpoint made with the same fingerprint, or None."""
    for step in reversed(checkpoint_steps(folder)):
        path = folder / f"step-{step}" / STATE_FILE
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unreadable: try the one before
            log.warning("checkpoint %s cannot be read (%s); trying an older one", path, exc)
            continue
        if state.get("fingerprint") != fingerprint:
            log.warning("checkpoint %s was made with other settings or data: not used", path)
            return None
        return state
    return None


# ---------------------------------------------------------------- training
@dataclass
class TrainingJob:
    """Everything one fine-tuning needs (the finetune rule's inputs, params, outputs)."""

    model_name: str
    entry: Mapping[str, Any]  # the base model's catalogue entry
    location: str  # folder or hub id of the base model
    train_path: str
    sample_path: str  # the evaluation sample: its ids never train
    finetuned_prompt_path: str
    zero_shot_prompt_path: str
    settings: Mapping[str, Any]
    out_dir: str
    checkpoint_dir: str | None = None  # default: <out_dir>.checkpoints
    figure_path: str | None = None
    threads: int | None = None
    device: str | None = None


def _device_and_quantization(settings: FinetuneSettings, device: str | None) -> tuple[str, str]:
    from emoprompt.models.loading import _nf4_blocker, default_device

    device = device or default_device()
    if settings.quantization == "none":
        return device, "none"
    blocker = _nf4_blocker(device)
    if blocker is None:
        return device, "nf4"
    if settings.quantization == "nf4":
        raise RuntimeError(f"4-bit QLoRA was asked for but {blocker}")
    return device, "none"


def _load_base(job: TrainingJob, settings: FinetuneSettings):
    from emoprompt.models.loading import load_model

    device, quantization = _device_and_quantization(settings, job.device)
    # Full precision on a CPU; bfloat16 (or NF4 storage) on an accelerator.
    dtype = "float32" if device == "cpu" else "bfloat16"
    spec = {
        **job.entry,
        "name": job.model_name,
        "dtype": dtype,
        "quantization": quantization,
        "allow_fallback": False,
    }
    loaded = load_model(spec, job.location, device=device)
    loaded.tokenizer.padding_side = "right"
    return loaded, quantization


def _lora_model(model: Any, settings: FinetuneSettings, quantized: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.gradient_checkpointing
        )
    elif settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    targets: str | list[str] = settings.target_modules
    layers = None
    if settings.lora_layers != "all":
        # Only the top layers learn: the backward pass stops below them, which roughly
        # halves a step's cost with the top third of the layers.
        count = int(model.config.num_hidden_layers)
        layers = list(range(max(0, count - int(settings.lora_layers)), count))
        if targets == ALL_LINEAR:  # peft takes layers_to_transform with names only
            targets = linear_module_names(model)
    config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=targets,
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def linear_module_names(model: Any) -> list[str]:
    """Names of the linear layers inside the decoder layers (what ``all-linear`` means)."""
    names = set()
    output = model.get_output_embeddings()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not output and ".layers." in name:
            names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise ValueError("no linear layers found in the decoder layers; set target_modules")
    return sorted(names)


def _schedule(total: int, warmup: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        return max(0.0, 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span))))

    return factor


def plot_loss(
    history: Sequence[Mapping[str, float]], path: str | os.PathLike[str], title: str
) -> None:
    """Loss per step and its moving average, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, losses, color="#9ab", linewidth=0.8, label="loss per step")
    window = max(1, len(losses) // 20)
    if len(losses) >= 2 * window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color="#14c", label=f"mean of {window} steps")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy on the answer tokens")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _versions() -> dict[str, str]:
    from emoprompt.evaluation.strategies import library_versions

    versions = library_versions()
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:  # pragma: no cover - peft is a dependency
        pass
    return versions


def train(job: TrainingJob) -> dict[str, Any]:
    """Train (or resume training) the adapter and write its folder; return its record."""
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from emoprompt.data.splits import read_split
    from emoprompt.infra.runtime import configure_cpu

    settings = FinetuneSettings.from_mapping(job.settings)
    started_wall, started_cpu = time.time(), time.process_time()
    threads = job.threads if settings.threads == "auto" else settings.threads
    if threads:  # else torch's default
        configure_cpu(threads, int(threads))
    out_dir = Path(job.out_dir)
    ckpt_dir = Path(job.checkpoint_dir or f"{out_dir}.checkpoints")

    notebook = load_prompt_file(job.finetuned_prompt_path, "finetuned")
    labels, label_map = label_scheme(settings.label_set, notebook)
    answers = answer_for_class(labels, label_map)
    if settings.prompt_format == "plain":
        spec = PromptSpec("plain", notebook)
    else:
        spec = PromptSpec(
            "chat",
            load_prompt_file(job.zero_shot_prompt_path, "zero_shot"),
            dict(job.entry.get("chat_template_kwargs") or {}),
        )

    train_frame, sample = read_split(job.train_path), read_split(job.sample_path)
    chosen = select_training_set(
        train_frame,
        exclude_ids=sample["id"].tolist(),
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

    loaded, quantization = _load_base(job, settings)
    tokenizer = loaded.tokenizer
    examples = build_examples(chosen, tokenizer, spec, answers, settings.max_length)
    weights = torch.tensor([weights_of[e.label] for e in examples], dtype=torch.float32)
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
    fingerprint = _digest(
        {
            "base": job.model_name,
            "location": job.location,
            "settings": settings.fingerprint(),
            "ids": chosen["id"].tolist(),
            "answers": answers,
            "prompt": spec.record(),
        }
    )

    torch.manual_seed(settings.seed)
    model = _lora_model(loaded.model, settings, quantized=quantization == "nf4")
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    warmup = round(settings.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total_steps, warmup))
    autocast = device.type == "cuda" and quantization == "none"
    n_trainable = sum(p.numel() for p in trainable)
    log.info(
        "LoRA r=%d alpha=%d on %s: %d trainable parameters; %d steps of %d x %d tweets "
        "on %s (quantization %s)",
        settings.lora_r,
        settings.lora_alpha,
        settings.target_modules,
        n_trainable,
        total_steps,
        settings.batch_size,
        settings.gradient_accumulation,
        device,
        quantization,
    )

    step, history, seconds, resumed = 0, [], 0.0, []
    state = load_checkpoint(ckpt_dir, fingerprint)
    if state is not None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        step, history, seconds = state["step"], list(state["history"]), state["seconds"]
        resumed = [*state.get("resumed", []), step]
        log.info(
            "resumed from checkpoint step %d of %d (%.0f s of training done)",
            step,
            total_steps,
            seconds,
        )
    elif checkpoint_steps(ckpt_dir):
        shutil.rmtree(ckpt_dir, ignore_errors=True)

    def checkpoint() -> None:
        from peft import get_peft_model_state_dict

        state = {
            "fingerprint": fingerprint,
            "step": step,
            "seconds": seconds,
            "history": history,
            "resumed": resumed,
            "adapter": {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None,
        }
        save_checkpoint(ckpt_dir, step, state)
        left = seconds / step * (total_steps - step) if step else float("nan")
        log.info(
            "checkpoint at step %d/%d (loss %.4f, %.0f s trained, about %.0f s left)",
            step,
            total_steps,
            history[-1]["loss"] if history else float("nan"),
            seconds,
            left,
        )

    model.train()
    last_checkpoint = last_report = time.monotonic()
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=f"fine-tuning {job.model_name}",
        unit="step",
        mininterval=5.0,
        file=sys.stderr,
    )
    pad_id = tokenizer.pad_token_id
    while step < total_steps:
        tick = time.perf_counter()
        first = step * settings.gradient_accumulation
        micro = batches[first : first + settings.gradient_accumulation]
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for rows in micro:
            batch = {
                k: v.to(device) for k, v in collate([examples[i] for i in rows], pad_id).items()
            }
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = answer_loss(model, batch, weights[rows].to(device))
            (loss / len(micro)).backward()
            step_loss += loss.item() / len(micro)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        step += 1
        seconds += time.perf_counter() - tick
        history.append(
            {"step": step, "loss": round(step_loss, 6), "lr": lr, "seconds": round(seconds, 3)}
        )
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", refresh=False)
        if time.monotonic() - last_report >= PROGRESS_SECONDS:  # a plain line for the log
            last_report = time.monotonic()
            recent = [h["loss"] for h in history[-10:]]
            log.info(
                "step %d/%d (%.0f%%): loss %.4f (mean of the last %d), %.0f s, ETA %.0f s",
                step,
                total_steps,
                100 * step / total_steps,
                float(np.mean(recent)),
                len(recent),
                seconds,
                seconds / step * (total_steps - step),
            )
        due = (time.monotonic() - last_checkpoint) >= settings.checkpoint_minutes * 60
        if settings.checkpoint_steps and step % settings.checkpoint_steps == 0:
            due = True
        if due and step < total_steps:
            checkpoint()
            last_checkpoint = time.monotonic()
    bar.close()
    checkpoint()

    record = {
        "base_model": job.model_name,
        "base_location": job.location,
        "adapter": "peft LoRA",
        "prompt_format": spec.format,
        "prompt_family": spec.family,
        **spec.record(),
        "labels": list(labels),
        "label_map": dict(label_map),
        "end_token": tokenizer.convert_ids_to_tokens(end_token_id(tokenizer)),
        "settings": asdict(settings),
        "train_file": job.train_path,
        "train_tweets": len(examples),
        "train_ids_sha256": hashlib.sha256("\n".join(chosen["id"]).encode()).hexdigest(),
        "class_counts": counts,
        "class_weights": weights_of,
        "excluded_sample_tweets": len(sample),
        "truncated_tweets": int(sum(e.truncated for e in examples)),
        "steps": step,
        "examples_seen": min(len(batches), step * settings.gradient_accumulation)
        * settings.batch_size,
        "seconds": round(seconds, 1),
        "wall_seconds_last_run": round(time.time() - started_wall, 1),
        "cpu_seconds_last_run": round(time.process_time() - started_cpu, 1),
        "resumed_from_steps": resumed,
        "final_loss": history[-1]["loss"],
        "final_loss_mean_last_10pct": float(
            np.mean([h["loss"] for h in history[-max(1, len(history) // 10) :]])
        ),
        "device": str(device),
        "quantization": quantization,
        "trainable_parameters": n_trainable,
        "fingerprint": fingerprint,
        "versions": _versions(),
    }
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        # The adapter must load where the base model is, wherever the checkout moved.
        write_json(tmp / TRAINING_CONFIG, record)
        pd.DataFrame(history).to_csv(tmp / LOSS_FILE, sep="\t", index=False, lineterminator="\n")
        (tmp / TRAIN_IDS_FILE).write_text("\n".join(chosen["id"]) + "\n", encoding="utf-8")
        plot_loss(history, tmp / LOSS_FIGURE, f"LoRA fine-tuning of {job.model_name}")
        check = load_file(str(tmp / "adapter_model.safetensors"))
        if not check:
            raise RuntimeError("the saved adapter holds no weights")
    if job.figure_path:
        Path(job.figure_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out_dir / LOSS_FIGURE, job.figure_path)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    log.info(
        "adapter written to %s: %d steps, %.0f s of training, final loss %.4f",
        out_dir,
        step,
        seconds,
        record["final_loss"],
    )
    return record


# ---------------------------------------------------------------- using the adapter
def read_training_config(adapter_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(adapter_dir) / TRAINING_CONFIG
    return json.loads(path.read_text(encoding="utf-8"))


def adapter_prompt(prompt: PromptFile, adapter_dir: str | os.PathLike[str]) -> PromptFile:
    """The prompt a strategy should use with a fine-tuned adapter: the label set (and,
    for the plain format, the template) it was trained with, when the strategy's prompt
    family is the one it was trained on; otherwise ``prompt`` unchanged."""
    record = read_training_config(adapter_dir)
    if record.get("prompt_family") != prompt.family:
        return prompt
    settings = dict(prompt.settings)
    settings["labels"] = list(record["labels"])
    settings["label_map"] = dict(record["label_map"])
    if record.get("template") is not None:
        settings["template"] = record["template"]
    return PromptFile(prompt.family, prompt.path, settings)


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
