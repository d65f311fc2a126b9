"""A model's files: a damaged or missing one is named with its catalogue entry before
anything loads; a local entry whose folder is absent is refused when the workflow starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, run_snakemake

from emoprompt.models.files import ModelFilesError
from emoprompt.models.loading import load_model
from emoprompt.plan import Study, StudyError, merged_config

ENTRY = {"name": "mine", "source": "local", "prompt_format": "chat", "dtype": "float32"}


@pytest.fixture
def model_copy(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    return folder


def load_error(folder: Path) -> str:
    with pytest.raises(ModelFilesError) as caught:
        load_model({**ENTRY, "path": str(folder)}, str(folder), device="cpu")
    return str(caught.value)


def test_a_weights_file_cut_to_half_is_named_with_its_entry(model_copy):
    weights = model_copy / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(size // 2)
    message = load_error(model_copy)
    assert message.startswith(f"model_catalogue: mine: {weights}: truncated: {size // 2} bytes")
    assert "fetch or convert the model again" in message


def test_a_weights_file_that_is_not_one_and_a_missing_config_are_named(model_copy):
    weights = model_copy / "model.safetensors"
    weights.write_bytes((20).to_bytes(8, "little") + b"<html>not found</ht>" + b"\0" * 64)
    assert f"{weights}: not a safetensors file" in load_error(model_copy)
    (model_copy / "config.json").unlink()
    assert f"mine: {model_copy}: no config.json" in load_error(model_copy)


def test_a_missing_shard_named_by_the_index_is_named(model_copy):
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "model-00002-of-00002.safetensors: missing" in load_error(model_copy)


def test_a_local_entry_without_its_folder_is_refused_when_the_workflow_starts(
    tmp_path, workflow_dir
):
    entry = {"source": "local", "path": str(tmp_path / "nowhere"), "prompt_format": "chat"}
    config = merged_config(REPO, {"models": ["mine"], "model_catalogue": {"mine": entry}})
    with pytest.raises(StudyError, match=r"mine: path '.*nowhere' is not a folder"):
        Study(config, REPO)
    extra = workflow_dir / "local.json"
    extra.write_text(json.dumps({"models": ["mine"], "model_catalogue": {"mine": entry}}))
    result = run_snakemake(workflow_dir, "-n", "--configfile", str(extra), check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "model_catalogue: mine: path" in output
    assert "MissingInputException" not in output and "Traceback" not in output
