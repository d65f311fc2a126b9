"""Which of the engine's speed-ups a model may use, decided once when an engine is built.

Each speed-up changes how a forward pass computes, never what it computes - where it
has been proven to. The speed-ups, by name (:data:`SPEEDUPS`):

* ``prefix_reuse`` - the prompt prefix that many prompts share is encoded once and each
  batch feeds only its rows' own tokens on top of its KV cache. Left-padded rows after a
  shared prefix have pad gaps in the middle (``[prefix | pads | suffix]``): masks and
  positions make that exact for full attention, but a sliding window counts cache slots,
  not real tokens, so a padded row would see fewer real tokens than it does alone. Under
  a window (:func:`attention_window`) a prompt therefore reuses a prefix only when its
  whole row - prefix, padding, suffix and every token fed after it - fits the window,
  where windowed attention sees what full attention sees; the planner decides that per
  prompt, so every batch that reuses a prefix fits (:mod:`emoprompt.inference.planning`).
* ``shared_attention`` - rows that continue one cached prefix share one copy of it and
  attend to it all at once (:mod:`emoprompt.inference.attention`).
* ``tree_labels`` - label likelihoods score all labels of a batch in one extra pass, the
  labels laid side by side under a 4D attention mask (a tree of continuations).
* ``packed_weights`` - float32 linear layers on a CPU compute through oneDNN with
  weights packed once (:mod:`emoprompt.inference.packed_linear`).

A model gets the speed-ups that :data:`PROVEN` lists for its :class:`ModelKey`
(architecture, attention implementation, device, dtype, quantisation, adapter) on the
library versions of :data:`PROVEN_VERSIONS`: the rows the conformance matrix
(:mod:`emoprompt.bench.conformance`, run by the tests) has checked against the plain
reference backend. Anything else runs the engine's safe path - batched, left-padded,
whole prompts, plain modules - and the log says so. What was decided goes into every
prediction record and MLflow run (:meth:`Capabilities.record`), so two runs that
computed differently are never taken for one. ``packed_weights`` is also checked once
per model, on a short input, before use.

Each speed-up also earned its place in ``make bench`` (at least 10% on the strategy it
serves, against the same engine without it). Three that did not were removed with
their code on 2026-12-02: forcing grouped-query SDPA with a mask (4% on ten-shot
scoring), running the last decoder layer for the last position only (1% on zero-shot
scoring) and computing only the label tokens' columns of the LM head (none).
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from emoprompt.inference.agreement import logits_agree
from emoprompt.inference.attention import IMPLEMENTATION as SHARED_PREFIX_ATTENTION
from emoprompt.inference.attention import register as register_attention
from emoprompt.inference.packed_linear import PackedLinears
from emoprompt.inference.tokens import TokenizerRules

log = logging.getLogger(__name__)

SPEEDUPS = ("prefix_reuse", "shared_attention", "tree_labels", "packed_weights")
_ALL = frozenset(SPEEDUPS)
# Full attention everywhere: every speed-up. A sliding window: prefix reuse for the rows
# that fit the window (the planner's condition), no shared-prefix attention (it does not
# apply windows) and no label tree (its 4D mask bypasses the window).
_WINDOWED = _ALL - {"shared_attention", "tree_labels"}
# bfloat16: oneDNN packing is for float32 weights.
_BF16 = _ALL - {"packed_weights"}

#: The torch and transformers releases (major.minor) the table was proven on.
PROVEN_VERSIONS = {"torch": "2.13", "transformers": "5.24"}


@dataclass(frozen=True)
class ModelKey:
    """What decides how a model may be computed."""

    architecture: str  # config.model_type, "+sliding" when a layer attends through a window
    attention: str  # the attention implementation (sdpa, eager, ...)
    device: str  # cpu, cuda, mps
    dtype: str
    quantization: str = "none"  # none, 4bit, 8bit
    adapter: str = "none"  # none, or "lora" for an unmerged peft adapter

    def __str__(self) -> str:
        parts = [self.architecture, self.attention, self.device, self.dtype]
        parts += [p for p in (self.quantization, self.adapter) if p != "none"]
        return "/".join(parts)


def _rows(
    speedups: frozenset[str],
    architectures: Iterable[str],
    dtype: str,
    adapter: str = "none",
    attention: str = "sdpa",
    quantization: str = "none",
) -> dict[ModelKey, frozenset[str]]:
    return {
        ModelKey(a, attention, "cpu", dtype, quantization, adapter): speedups for a in architectures
    }


_FULL = ("llama", "mistral", "qwen2", "gpt_neox")
_SLIDING = ("mistral+sliding", "qwen2+sliding", "gemma3_text+sliding")

#: What the conformance matrix has proven, per model key: the speed-ups each may use.
PROVEN: dict[ModelKey, frozenset[str]] = {
    **_rows(_ALL, _FULL, "float32"),
    **_rows(_WINDOWED, _SLIDING, "float32"),
    **_rows(_BF16, _FULL, "bfloat16"),
    **_rows(_WINDOWED & _BF16, _SLIDING, "bfloat16"),
    **_rows(_ALL, ("llama",), "float32", adapter="lora"),
    **_rows(_BF16, ("llama",), "bfloat16", adapter="lora"),
    **_rows(_ALL, ("llama",), "float32", attention="eager"),
    **_rows(_BF16, ("llama",), "bfloat16", attention="eager"),
    # 4-bit NF4, bfloat16 compute, through bitsandbytes' own CPU code (0.50.2): the NF4
    # rows of the matrix; on CUDA nothing is proven yet, so NF4 there runs the safe path.
    **_rows(_BF16, ("llama",), "bfloat16", quantization="4bit"),
}


def base_model(model: Any) -> Any:
    """The transformers model inside a peft wrapper (``model`` itself otherwise)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) and hasattr(model, "peft_config") else model


def is_sliding(config: Any) -> bool:
    """Whether any layer of the model attends through a sliding or chunked window."""
    layer_types = getattr(config, "layer_types", None) or []
    if layer_types:
        return any("sliding" in str(t) or "chunked" in str(t) for t in layer_types)
    if getattr(config, "use_sliding_window", True) is False:
        return False
    return getattr(config, "sliding_window", None) is not None


def attention_window(model: Any) -> int | None:
    """The narrowest window (in cache slots) through which any layer of ``model``
    attends: a sliding window or an attention chunk; None for full attention."""
    config = base_model(model).config
    if not is_sliding(config):
        return None
    sizes = [getattr(config, key, None) for key in ("sliding_window", "attention_chunk_size")]
    sizes = [int(size) for size in sizes if size]
    return min(sizes) if sizes else 0  # a window of unknown size: nothing fits it


def attention_of(model: Any) -> str:
    """The model's attention implementation (the shared-prefix one counts as SDPA, which
    it runs on)."""
    attn = getattr(base_model(model).config, "_attn_implementation", None) or "eager"
    return "sdpa" if attn == SHARED_PREFIX_ATTENTION else attn


def model_key(model: Any) -> ModelKey:
    """The :class:`ModelKey` of a loaded model."""
    inner = base_model(model)
    config = inner.config
    architecture = str(getattr(config, "model_type", type(inner).__name__))
    if is_sliding(config):
        architecture += "+sliding"
    parameter = next(model.parameters())
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    quantization = "none"
    if getattr(inner, "is_loaded_in_4bit", False):
        quantization = "4bit"
    elif getattr(inner, "is_loaded_in_8bit", False):
        quantization = "8bit"
    return ModelKey(
        architecture=architecture,
        attention=attention_of(model),
        device=parameter.device.type,
        dtype=str(dtype).removeprefix("torch."),
        quantization=quantization,
        adapter="lora" if inner is not model else "none",
    )


def library_versions_proven() -> str | None:
    """Why the running torch/transformers are outside :data:`PROVEN_VERSIONS` (None if not)."""
    import transformers

    running = {"torch": torch.__version__, "transformers": transformers.__version__}
    off = [
        f"{name} {version} (proven: {PROVEN_VERSIONS[name]}.x)"
        for name, version in running.items()
        if ".".join(version.split("+")[0].split(".")[:2]) != PROVEN_VERSIONS[name]
    ]
    return ", ".join(off) or None


def proven_speedups(key: ModelKey) -> tuple[frozenset[str], str | None]:
    """The speed-ups proven for ``key``, and why there are none (None when some are)."""
    versions = library_versions_proven()
    if versions:
        return frozenset(), f"the conformance matrix has not run on {versions}"
    if key not in PROVEN:
        return frozenset(), f"the conformance matrix has not proven {key}"
    return PROVEN[key], None


def check_names(names: Iterable[str], what: str) -> frozenset[str]:
    """``names`` as a set, or a clear error naming the unknown ones."""
    names = frozenset(names)
    unknown = sorted(names - _ALL)
    if unknown:
        raise ValueError(f"{what}: unknown speed-up(s) {unknown}; known: {', '.join(SPEEDUPS)}")
    return names


@dataclass
class Capabilities:
    """What one engine may do with its model (see the module docstring)."""

    key: ModelKey
    speedups: frozenset[str]  # in use
    cache_arg: str  # "cache" (transformers 5) or the older "past_key_values"
    keeps_logits: bool  # the forward takes logits_to_keep
    packed: PackedLinears | None = None  # set with packed_weights
    notes: list[str] = field(default_factory=list)  # why speed-ups are off

    def uses(self, name: str) -> bool:
        return name in self.speedups

    def record(self) -> dict[str, Any]:
        """JSON-safe: the model key, the speed-ups in use and why others are off."""
        return {
            "model_key": str(self.key),
            "speedups": sorted(self.speedups, key=SPEEDUPS.index),
            "notes": list(self.notes),
        }


# Per model, whether a way of computing agrees with the plain forward pass (agrees()):
# checked once, for every engine built on the model.
_AGREEMENT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# The short input on which a speed-up is checked against the plain forward pass.
AGREEMENT_TEXT = "Hola, ¿qué tal estás hoy?"


def agrees(
    model: Any, rules: TokenizerRules, name: str, check: Callable[[torch.Tensor], bool]
) -> bool:
    """``check(input_ids)`` on a short input, once per model and ``name``."""
    results = _AGREEMENT.setdefault(model, {})
    if name not in results:
        ids = rules.encode_prompt(AGREEMENT_TEXT)
        device = next(model.parameters()).device
        results[name] = check(torch.tensor([ids], device=device))
    return results[name]


def detect(
    model: Any,
    rules: TokenizerRules,
    *,
    speedups: str | Iterable[str] = "auto",
    disable: Iterable[str] = (),
) -> Capabilities:
    """Decide the speed-ups for ``model``.

    ``speedups``: ``"auto"`` (those :data:`PROVEN` for its key), ``"none"`` (the safe
    path) or the names to use, proven or not (for the conformance matrix); ``disable``
    names speed-ups not to use. Registers the shared-prefix attention on the model
    where that is used."""
    key = model_key(model)
    inner = base_model(model)
    params = set(inspect.signature(inner.forward).parameters)
    caps = Capabilities(
        key=key,
        speedups=frozenset(),
        cache_arg="cache" if "cache" in params else "past_key_values",
        keeps_logits="logits_to_keep" in params,
    )
    wanted = _wanted(caps, speedups) - check_names(disable, "engine.disable")
    # Each speed-up needs the hooks it works through; those missing drop it.
    if key.attention != "sdpa" or key.device != "cpu" or "prefix_reuse" not in wanted:
        wanted.discard("shared_attention")
    if key.attention not in ("sdpa", "eager"):
        wanted.discard("tree_labels")
    if "shared_attention" in wanted:
        if hasattr(inner, "set_attn_implementation"):
            inner.set_attn_implementation(register_attention())
        else:
            wanted.discard("shared_attention")
    if "packed_weights" in wanted:
        caps.packed = _packed_linears(model, rules, caps)
        if caps.packed is None:
            wanted.discard("packed_weights")
    caps.speedups = frozenset(wanted)
    window = attention_window(model)
    if window is not None and "prefix_reuse" in caps.speedups:
        caps.notes.append(f"prefix_reuse: rows that fit the {window}-token window only")
    log.info(
        "%s: speed-ups %s%s",
        key,
        ", ".join(sorted(caps.speedups, key=SPEEDUPS.index)) or "none (safe path)",
        "".join(f"; {note}" for note in caps.notes),
    )
    return caps


def _wanted(caps: Capabilities, speedups: str | Iterable[str]) -> set[str]:
    if speedups == "none":
        caps.notes.append("speed-ups turned off")
        return set()
    if speedups != "auto":
        return set(check_names(speedups, "speedups"))
    proven, why = proven_speedups(caps.key)
    if why:
        caps.notes.append(f"{why}: safe path")
        log.warning("%s; the engine runs its safe path", why)
    return set(proven)


def _packed_linears(model, rules, caps: Capabilities) -> PackedLinears | None:
    if caps.key.device != "cpu" or caps.key.dtype != "float32":
        caps.notes.append("packed_weights: float32 on a CPU only")
        return None
    head = base_model(model).get_output_embeddings()  # the LM head stays plain
    packed = PackedLinears.of(model, exclude=[head] if head is not None else [])
    if packed is None:
        caps.notes.append("packed_weights: not available (oneDNN ops or memory)")
        return None
    if not agrees(
        model, rules, "packed weights", lambda ids: logits_agree(model, ids, packed.active)
    ):
        caps.notes.append("packed_weights: changes this model's logits")
        log.warning("oneDNN-packed linear layers change this model's logits; not used")
        return None
    log.info(
        "%d linear layers run through oneDNN with packed weights (%.0f MiB)",
        len(packed.modules),
        packed.nbytes / 2**20,
    )
    return packed
