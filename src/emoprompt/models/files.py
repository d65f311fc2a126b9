"""A model folder's files checked before anything loads: present, complete, readable.

A weights file cut short (an interrupted copy or download) otherwise surfaces as a deep
traceback from the safetensors library naming neither the file nor the catalogue entry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from emoprompt.infra.errors import UserError


class ModelFilesError(UserError, OSError):
    """A model folder lacks a file or holds a damaged one; the message names both the
    catalogue entry and the file."""


def entry_prefix(name: str | None) -> str:
    """``model_catalogue: NAME: `` before a message about an entry's model, if named."""
    return f"model_catalogue: {name}: " if name else ""


def _check_safetensors(path: Path) -> str | None:
    """What is wrong with one .safetensors file, or None."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            return f"truncated: {size} bytes, not even the header's length"
        length = int.from_bytes(raw, "little")
        if 8 + length > size:
            return f"truncated: {size} bytes, its header alone needs {8 + length}"
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError):
            return "not a safetensors file: its header is not JSON"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    needed = 8 + length + max(ends, default=0)
    if size < needed:
        return f"truncated: {size} bytes of {needed}"
    return None


def check_model_folder(folder: str | os.PathLike[str], name: str | None = None) -> None:
    """Refuse a local model folder that cannot load: missing, without config.json, a
    shard its index names absent, or a .safetensors file cut short or not one."""
    folder = Path(folder)
    where = entry_prefix(name)
    if not folder.is_dir():
        raise ModelFilesError(f"{where}{folder}: no such folder")
    if not (folder / "config.json").is_file():
        raise ModelFilesError(f"{where}{folder}: no config.json: not a saved model folder")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ModelFilesError(f"{where}{folder / missing[0]}: missing (named by {index.name})")
    for path in sorted(folder.glob("*.safetensors")):
        problem = _check_safetensors(path)
        if problem:
            raise ModelFilesError(
                f"{where}{path}: {problem}; the copy or download was cut short or the file "
                "is damaged: fetch or convert the model again"
            )
