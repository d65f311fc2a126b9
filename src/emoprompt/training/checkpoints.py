"""Resumable training: the state of a run, checkpointed atomically, restored on restart.

Every ``checkpoint_minutes`` (and at the end) ``{adapter}.checkpoints/step-N/state.pt``
holds the adapter, optimizer, scheduler and RNG state, the step and loss history; a run
started again resumes from the newest checkpoint whose fingerprint (base model, data,
settings, prompt) matches instead of starting over, and ends with the adapter an
uninterrupted run would have written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emoprompt.infra.files import atomic_path

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
CHECKPOINTS_KEPT = 2


def digest(payload: Any) -> str:
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


@dataclass
class TrainingState:
    """Where a run is: its step, training seconds, loss history and the steps it resumed
    from; with the modules it trains, what a checkpoint holds."""

    fingerprint: str
    step: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)

    def save(self, folder: Path, model: Any, optimizer: Any, scheduler: Any) -> Path:
        from peft import get_peft_model_state_dict

        cuda = next(model.parameters()).device.type == "cuda"
        state = {
            "fingerprint": self.fingerprint,
            "step": self.step,
            "seconds": self.seconds,
            "history": self.history,
            "resumed": self.resumed,
            "adapter": {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if cuda else None,
        }
        return save_checkpoint(folder, self.step, state)

    @classmethod
    def resume(
        cls, folder: Path, fingerprint: str, model: Any, optimizer: Any, scheduler: Any
    ) -> TrainingState:
        """The newest matching checkpoint's state, put back into the modules and RNGs; a
        fresh state (and no stale checkpoints left) when there is none."""
        state = load_checkpoint(folder, fingerprint)
        if state is None:
            if checkpoint_steps(folder):
                shutil.rmtree(folder, ignore_errors=True)
            return cls(fingerprint)
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if next(model.parameters()).device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        step = state["step"]
        return cls(
            fingerprint,
            step=step,
            seconds=state["seconds"],
            history=list(state["history"]),
            resumed=[*state.get("resumed", []), step],
        )
