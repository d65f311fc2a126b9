"""The parts of serving a model that need no server: the command line, its environment,
finding vLLM, and which strategies a served model runs."""

from __future__ import annotations

import pytest

from emoprompt.evaluation.strategies import strategies_for
from emoprompt.inference.serve import find_vllm, vllm_command, vllm_environment


def test_the_command_serves_the_folder_under_its_catalogue_name_with_an_adapter():
    cmd = vllm_command(
        "python",
        "data/models/m",
        served_model_name="m",
        port=8123,
        dtype="float32",
        max_model_len=2048,
        lora_modules={"m-ft": "data/models/m-ft"},
        extra=["--max-num-seqs", "4"],
    )
    module = "vllm.entrypoints.openai.api_server"
    assert cmd[:5] == ["python", "-m", module, "--model", "data/models/m"]
    text = " ".join(cmd)
    for part in (
        "--served-model-name m",
        "--port 8123",
        "--host 127.0.0.1",
        "--dtype float32",
        "--max-model-len 2048",
        "--enable-prefix-caching",
        "--enable-lora",
        "--lora-modules m-ft=data/models/m-ft",
    ):
        assert part in text
    assert cmd[-2:] == ["--max-num-seqs", "4"]


def test_the_cpu_build_gets_a_cpu_list_and_a_cache_size_unless_set():
    env = vllm_environment(threads=2, kv_cache_gib=1, base={})
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"  # this version refuses "all"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    own = vllm_environment(threads=2, base={"VLLM_CPU_OMP_THREADS_BIND": "3"})
    assert own["VLLM_CPU_OMP_THREADS_BIND"] == "3"


def test_a_half_made_environment_is_not_taken_for_vllm(tmp_path, monkeypatch):
    monkeypatch.delenv("EMOPROMPT_VLLM", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text("")
    assert find_vllm(tmp_path) is None  # `make vllm-setup` did not finish
    (tmp_path / ".emoprompt-installed").write_text("")
    assert find_vllm(tmp_path) == str(tmp_path / "bin" / "python")
    monkeypatch.setenv("EMOPROMPT_VLLM", "/opt/vllm/bin/python")
    assert find_vllm(tmp_path) == "/opt/vllm/bin/python"


@pytest.mark.parametrize("served", [None, "completions", "chat"])
def test_a_served_model_runs_every_chat_strategy_its_api_can_answer(served):
    names = [
        "zero_shot_generate",
        "few_shot_first_token",
        "zero_shot_label_likelihood",
        "linear_probe",
        "finetuned_first_token",
    ]
    expected = {
        None: [
            "zero_shot_generate",
            "few_shot_first_token",
            "zero_shot_label_likelihood",
            "linear_probe",
        ],
        "completions": ["zero_shot_generate", "few_shot_first_token", "zero_shot_label_likelihood"],
        "chat": ["zero_shot_generate", "few_shot_first_token"],
    }[served]
    assert strategies_for("chat", names, served=served) == expected
    with pytest.raises(ValueError, match="served must be one of"):
        strategies_for("chat", names, served="grpc")
