"""The fine-tuned adapter folder: the only reader and writer of its files.

``data/models/{model}-ft/`` holds the peft LoRA adapter (``adapter_config.json``,
``adapter_model.safetensors``) and beside it:

* ``training_config.json`` - what was trained, on what, how long, and the label set and
  prompt that evaluation must use (:func:`read_training_config`);
* ``loss.tsv`` - step, loss, lr, seconds;
* ``train_ids.txt`` - the ids of the training tweets, one a line;
* ``loss.png`` - the loss curve.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from emoprompt.infra.files import atomic_path, write_json
from emoprompt.prompting.prompt_file import PromptFile

PEFT_CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
TRAINING_CONFIG = "training_config.json"
LOSS_FILE = "loss.tsv"
TRAIN_IDS_FILE = "train_ids.txt"
LOSS_FIGURE = "loss.png"


def is_adapter(folder: str | os.PathLike[str] | None) -> bool:
    return bool(folder) and (Path(folder) / PEFT_CONFIG).is_file()


def write_adapter(
    out_dir: str | os.PathLike[str],
    model: Any,
    record: Mapping[str, Any],
    history: Sequence[Mapping[str, float]],
    train_ids: Sequence[str],
    title: str,
    validate: Callable[[Path], Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write the whole folder atomically: the peft adapter of ``model``, its record, the
    loss history and figure, the training ids; refuse an adapter without weights.

    ``validate``, given the finished folder before it takes its place, scores the adapter
    (on the validation split); its result goes into the record as ``validation``, so an
    adapter never appears without its score. Returns the record as written."""
    from safetensors import safe_open

    record = dict(record)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        write_json(tmp / TRAINING_CONFIG, record)
        pd.DataFrame(history).to_csv(tmp / LOSS_FILE, sep="\t", index=False, lineterminator="\n")
        (tmp / TRAIN_IDS_FILE).write_text("\n".join(train_ids) + "\n", encoding="utf-8")
        plot_loss(history, tmp / LOSS_FIGURE, title)
        with safe_open(str(tmp / WEIGHTS), framework="numpy") as weights:
            empty = not list(weights.keys())
        if empty:
            raise RuntimeError("the saved adapter holds no weights")
        if validate is not None:
            record["validation"] = dict(validate(tmp))
            write_json(tmp / TRAINING_CONFIG, record)
    return record


def copy_loss_figure(adapter_dir: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(adapter_dir) / LOSS_FIGURE, path)


def read_training_config(adapter_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(adapter_dir) / TRAINING_CONFIG
    return json.loads(path.read_text(encoding="utf-8"))


def read_loss_history(adapter_dir: str | os.PathLike[str]) -> list[dict[str, float]]:
    """The rows of ``loss.tsv``: step (int), loss, lr (floats, parsed as written)."""
    with open(Path(adapter_dir) / LOSS_FILE, encoding="utf-8") as handle:
        return [
            {"step": int(row["step"]), "loss": float(row["loss"]), "lr": float(row["lr"])}
            for row in csv.DictReader(handle, delimiter="\t")
        ]


def read_train_ids(adapter_dir: str | os.PathLike[str]) -> list[str]:
    return (Path(adapter_dir) / TRAIN_IDS_FILE).read_text(encoding="utf-8").split()


def weights_path(adapter_dir: str | os.PathLike[str]) -> Path:
    return Path(adapter_dir) / WEIGHTS


def adapter_files(adapter_dir: str | os.PathLike[str]) -> list[Path]:
    """The folder's files (not Snakemake's hidden timestamp file), sorted."""
    return [
        path
        for path in sorted(Path(adapter_dir).iterdir())
        if path.is_file() and not path.name.startswith(".")
    ]


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
