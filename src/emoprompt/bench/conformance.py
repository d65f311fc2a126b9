"""The conformance matrix: the engine against the plain reference backend.

Tiny seeded random models of several architectures (:data:`ARCHITECTURES`: Llama,
Mistral and Qwen2 with and without a sliding window, Gemma 3 with local and global
layers, GPT-NeoX without grouped-query attention, Llama under an unmerged LoRA adapter)
score the project's own prompts (zero-shot and few-shot, two shared prefixes, tweets of
mixed lengths; all longer than the 8-token windows, and on either side of Gemma 3's
:data:`MIXED_WINDOW`-token one, where a zero-shot batch mixes rows that fit the window,
and so reuse their prefix, with rows that do not) with every method - first
token, label likelihood plain, length-normalised and calibrated, greedy generation -
through the engine at batch 1 and 16, prefix reuse asked for and not, in float32 and
bfloat16, and through :class:`~emoprompt.inference.reference.ReferenceBackend`.

Pass marks (:func:`passes`): float32 - largest label-probability difference at most
:data:`FLOAT32_ATOL` and the same generated text; bfloat16 - the largest difference at
most :data:`BFLOAT16_ATOL` and the same label on every prompt whose reference puts its
top two labels more than twice that apart (closer ones may swap by rounding alone: the
engine's plain batched path does so against the reference on a tie of 0.0008). The tests run the
matrix with the speed-ups the capability table grants (``speedups="auto"``) and check
every row; ``python -m emoprompt.bench.conformance`` writes ``docs/conformance.md``,
with the rows of every speed-up forced on beside them: what the table leaves out, and
why.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emoprompt.evaluation.runner import CONTENT_FREE, calibrated, softmax
from emoprompt.inference.backend import Backend
from emoprompt.inference.capabilities import SPEEDUPS
from emoprompt.inference.engine import Engine
from emoprompt.inference.reference import ReferenceBackend
from emoprompt.prompting.prompt_file import PromptFile, load_prompt_file
from emoprompt.prompting.render import PromptParts, render

log = logging.getLogger(__name__)

FLOAT32_ATOL = 1e-4
BFLOAT16_ATOL = 0.05
WINDOW = 8
# Between the lengths of the matrix's prompts (zero-shot 149 to 180 tokens with SmolLM2's
# tokenizer, few-shot 252 to 283): some zero-shot rows fit it, the others do not.
MIXED_WINDOW = 172
MAX_NEW_TOKENS = 10
TWEETS = (
    "ok",
    "Tengo miedo",
    "¡Por fin ganamos la final! 😭🎉 Qué día, no me lo creo todavía",
    "Qué asco de política, estoy harto de todo esto y de todos los que nos mienten cada día",
    "No puedo creer que haya pasado esto... ¿en serio? #Sorpresa",
    "Hoy se nos fue un grande. Descansa en paz, maestro.",
    "Me da rabia que nadie haga nada mientras la ciudad se inunda otra vez",
    "Votad. Pase lo que pase, votad.",
)
SHOTS = (
    ("Qué alegría verte de nuevo por aquí", "Alegría"),
    ("Esto es indignante, exijo una explicación", "Ira"),
    ("Otro lunes más, a trabajar", "Otras"),
)


@dataclass(frozen=True)
class Architecture:
    """A tiny random model of one architecture: ``model_type`` and its configuration."""

    name: str
    model_type: str
    config: dict[str, Any] = field(default_factory=dict)
    adapter: bool = False  # an unmerged, randomly initialised LoRA adapter on top
    attention: str = "sdpa"


_GQA = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
ARCHITECTURES = (
    Architecture("llama", "llama", _GQA),
    Architecture("llama, eager attention", "llama", _GQA, attention="eager"),
    Architecture("llama + unmerged LoRA", "llama", _GQA, adapter=True),
    Architecture("mistral", "mistral", {**_GQA, "sliding_window": None}),
    Architecture("mistral, sliding window", "mistral", {**_GQA, "sliding_window": WINDOW}),
    Architecture("qwen2", "qwen2", _GQA),
    Architecture(
        "qwen2, sliding window",
        "qwen2",
        {**_GQA, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 0},
    ),
    Architecture(
        "gemma3, local and global layers",
        "gemma3_text",
        {
            **_GQA,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    Architecture(
        "gemma3, window across the prompts",
        "gemma3_text",
        {
            **_GQA,
            "sliding_window": MIXED_WINDOW,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    Architecture("gpt_neox, no grouped-query attention", "gpt_neox", {"num_attention_heads": 4}),
)
DTYPES = ("float32", "bfloat16")
#: 4-bit NF4 with bfloat16 compute, loaded as the course notebook loads its model
#: (``models.loading``), on the architectures listed; bitsandbytes' CPU code needs layers
#: at least 64 wide.
NF4 = "nf4"
NF4_ARCHITECTURES = ("llama",)
NF4_WIDTHS = {"hidden_size": 64, "intermediate_size": 128, "head_dim": 16}
# (batch size, prefix reuse asked for)
PATHS = ((1, False), (1, True), (16, False), (16, True))
METHODS = ("first_token", "likelihood", "likelihood_normalized", "likelihood_calibrated", "greedy")


def tiny_model(
    arch: Architecture,
    tokenizer: Any,
    dtype: str,
    device: str = "cpu",
    widths: dict[str, int] | None = None,
) -> Any:
    """A seeded random 2-layer model of ``arch`` for ``tokenizer`` (``widths`` override
    its sizes).

    Weights are drawn with std 0.2 (ten times the usual), so that outputs depend clearly
    on positions and context and wrong attention shows above the tolerances."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "initializer_range": 0.2,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": False,
        **arch.config,
        **(widths or {}),
    }
    config = AutoConfig.for_model(arch.model_type, **settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=arch.attention)
    if arch.adapter:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
            init_lora_weights=False,
        )
        model = get_peft_model(model, lora)
    return model.to(device=device, dtype=getattr(torch, dtype)).eval()


def matrix_prompts(tokenizer: Any, prompt_dir: str | Path) -> tuple[list[PromptParts], PromptFile]:
    """The zero-shot and few-shot prompts of :data:`TWEETS` (the project's prompt files)."""
    zero, few = _prompt_files(prompt_dir)
    prompts = [render(zero, tweet, tokenizer) for tweet in TWEETS]
    prompts += [render(few, tweet, tokenizer, shots=SHOTS) for tweet in TWEETS]
    return prompts, zero


def _prompt_files(prompt_dir: str | Path) -> tuple[PromptFile, PromptFile]:
    folder = Path(prompt_dir)
    return (
        load_prompt_file(folder / "zero_shot.yaml", "zero_shot"),
        load_prompt_file(folder / "few_shot.yaml", "few_shot"),
    )


def outputs(backend: Backend, tokenizer: Any, prompt_dir: str | Path) -> dict[str, Any]:
    """Every method's output on the matrix's prompts: probabilities over the labels (and
    log-likelihoods) per scored method, texts for greedy generation; a method that
    raised has its exception instead (a speed-up forced where it does not apply)."""
    prompts, zero = matrix_prompts(tokenizer, prompt_dir)
    labels = zero.labels
    out: dict[str, Any] = {}

    def attempt(method: str, compute) -> None:
        try:
            out[method] = compute()
        except Exception as exc:  # reported as the row's failure
            out[method] = exc

    attempt("first_token", lambda: backend.first_token_probs(prompts, labels))
    for method, normalize in (("likelihood", False), ("likelihood_normalized", True)):
        attempt(
            f"{method}_logprobs",
            lambda n=normalize: backend.label_logprobs(prompts, labels, normalize=n),
        )
        logprobs = out[f"{method}_logprobs"]
        out[method] = logprobs if isinstance(logprobs, Exception) else softmax(logprobs)
    attempt("likelihood_calibrated", lambda: _calibrated(backend, tokenizer, prompt_dir, out))
    attempt(
        "greedy", lambda: [g.text for g in backend.generate(prompts, max_new_tokens=MAX_NEW_TOKENS)]
    )
    return out


def _calibrated(backend: Backend, tokenizer: Any, prompt_dir, out) -> np.ndarray:
    """Each half of the prompts calibrated by the content-free prompts of its own file."""
    if isinstance(out["likelihood"], Exception):
        raise out["likelihood"]
    half, parts = len(TWEETS), []
    for k, prompt in enumerate(_prompt_files(prompt_dir)):
        shots = SHOTS if prompt.family == "few_shot" else ()
        free = [render(prompt, text, tokenizer, shots=shots) for text in CONTENT_FREE]
        rows = out["likelihood"][k * half : (k + 1) * half]
        parts.append(calibrated(backend, rows, free, prompt.labels, normalize=False)[0])
    return np.concatenate(parts)


def compare(engine_out: dict[str, Any], reference_out: dict[str, Any]) -> dict[str, dict]:
    """Per method: the largest probability (and log-likelihood) difference, how many
    prompts got the same label, and for generation how many the same text."""
    rows: dict[str, dict] = {}
    for method in METHODS:
        got, want = engine_out[method], reference_out[method]
        if isinstance(got, Exception):
            rows[method] = {"error": f"{type(got).__name__}: {got}"[:200], "prompts": len(want)}
        elif method == "greedy":
            same = sum(a == b for a, b in zip(got, want, strict=True))
            rows[method] = {"same_text": same, "prompts": len(want)}
        else:
            ordered = np.sort(want, axis=1)
            decisive = ordered[:, -1] - ordered[:, -2] > 2 * BFLOAT16_ATOL
            same = got.argmax(1) == want.argmax(1)
            rows[method] = {
                "max_prob_diff": float(np.abs(got - want).max()),
                "same_label": int(same.sum()),
                "prompts": len(want),
                "decisive": int(decisive.sum()),
                "decisive_same": int((same & decisive).sum()),
            }
            logprobs = engine_out.get(f"{method}_logprobs")
            if logprobs is not None:
                diff = np.abs(logprobs - reference_out[f"{method}_logprobs"])
                rows[method]["max_logprob_diff"] = float(diff.max())
    return rows


def passes(row: dict[str, Any]) -> bool:
    """Whether a matrix row meets its dtype's pass mark (see the module docstring)."""
    if "error" in row:
        return False
    if row["method"] == "greedy":
        return row["dtype"] != "float32" or row["same_text"] == row["prompts"]
    if row["dtype"] == "float32":
        return row["max_prob_diff"] <= FLOAT32_ATOL
    return row["decisive_same"] == row["decisive"] and row["max_prob_diff"] <= BFLOAT16_ATOL


def _row(arch: Architecture, engine: Engine, dtype: str, device: str, method: str, result):
    row = {
        "architecture": arch.name,
        "model_key": str(engine.capabilities.key),
        "dtype": dtype,
        "device": device,
        "batch": engine.batch_size,
        "speedups": sorted(engine.capabilities.speedups, key=SPEEDUPS.index),
        "method": method,
        **result,
    }
    row["passed"] = passes(row)
    return row


def _engine(model, tokenizer, batch: int, speedups, disable=()) -> Engine:
    return Engine(
        model, tokenizer, batch_size=batch, speedups=speedups, disable=disable, progress=False
    )


def run_matrix(
    tokenizer: Any,
    prompt_dir: str | Path,
    *,
    architectures: Sequence[Architecture] = ARCHITECTURES,
    dtypes: Iterable[str] | None = None,
    device: str = "cpu",
    additions: bool = False,
) -> list[dict[str, Any]]:
    """Every (architecture, dtype, path, method) row: the engine with the speed-ups the
    capability table grants against the reference. ``additions``: instead, for each
    speed-up the table leaves out, the table's set plus that one (batch 16, prefix
    reuse asked for), row by row (``added`` names it)."""
    rows = []
    for arch in architectures:
        for dtype in matrix_dtypes(device) if dtypes is None else dtypes:
            if dtype == NF4 and arch.name not in NF4_ARCHITECTURES:
                continue
            model, twin = _models(arch, tokenizer, dtype, device)
            reference = outputs(ReferenceBackend(twin, tokenizer), tokenizer, prompt_dir)
            for label, engine in _engines(model, tokenizer, additions):
                got = outputs(engine, tokenizer, prompt_dir)
                for method, result in compare(got, reference).items():
                    row = _row(arch, engine, dtype, device, method, result)
                    row.update(label)
                    rows.append(row)
            del model
    return rows


def nf4_available(device: str = "cpu") -> bool:
    """Whether NF4 rows can run here (bitsandbytes, and CUDA or its CPU code)."""
    from emoprompt.models.loading import nf4_blocker

    return nf4_blocker(device) is None


def matrix_dtypes(device: str = "cpu") -> tuple[str, ...]:
    """The dtypes of the matrix here: NF4 too where bitsandbytes can run it."""
    return (*DTYPES, NF4) if nf4_available(device) else DTYPES


def _models(arch: Architecture, tokenizer: Any, dtype: str, device: str) -> tuple[Any, Any]:
    """The model the engine runs and an identical one for the reference backend."""
    if dtype != NF4:
        model = tiny_model(arch, tokenizer, dtype, device)
        return model, copy.deepcopy(model)
    from emoprompt.models.loading import load_model

    with tempfile.TemporaryDirectory() as folder:
        tiny_model(arch, tokenizer, "float32", widths=NF4_WIDTHS).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        spec = {"dtype": "bfloat16", "quantization": "nf4"}
        first, second = (load_model(spec, folder, device=device) for _ in range(2))
        return first.model, second.model


def _engines(model, tokenizer, additions: bool):
    """(row fields, engine) for each path the matrix runs on ``model``."""
    if not additions:
        for batch, reuse in PATHS:
            engine = _engine(model, tokenizer, batch, "auto", () if reuse else ("prefix_reuse",))
            yield {"prefix_reuse_asked": reuse}, engine
        return
    granted = _engine(model, tokenizer, 16, "auto").capabilities.speedups
    for name in SPEEDUPS:
        if name in granted:
            continue
        wanted = granted | {name} | ({"prefix_reuse"} if name == "shared_attention" else set())
        engine = _engine(model, tokenizer, 16, wanted)
        if name in engine.capabilities.speedups:  # else it does not apply to this model
            yield {"prefix_reuse_asked": True, "added": name}, engine


# ---------------------------------------------------------------------- the document
def _path(row: dict[str, Any]) -> str:
    reuse = "prefix reuse" if "prefix_reuse" in row["speedups"] else "whole prompts"
    return f"batch {row['batch']}, {reuse}"


def _worst(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Per (architecture, dtype, path): the largest difference over the scored methods and
    the generation agreement."""
    table: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = (row["architecture"], row["dtype"], row["batch"], row["prefix_reuse_asked"])
        key += (row.get("added"),)
        cell = table.setdefault(
            key, {"max": 0.0, "labels": [0, 0], "texts": [0, 0], "passed": True, "row": row}
        )
        if "error" in row:
            cell["error"] = row["error"]
        elif row["method"] == "greedy":
            cell["texts"] = [row["same_text"], row["prompts"]]
        else:
            cell["max"] = max(cell["max"], row["max_prob_diff"])
            cell["labels"][0] += row["same_label"]
            cell["labels"][1] += row["prompts"]
        cell["passed"] &= row["passed"]
    return table


def markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per (architecture, dtype, path); with ``added`` rows, per speed-up added."""
    additions = any("added" in row for row in rows)
    first = "speed-up added to the table's" if additions else "path | speed-ups in use"
    lines = [
        f"| architecture | dtype | {first} | max prob. diff | same label | same text | passed |",
        "|---|---|---|---|---:|---:|---:|---|"
        if not additions
        else "|---|---|---|---:|---:|---:|---|",
    ]
    for key, cell in _worst(rows).items():
        arch, dtype, row = key[0], key[1], cell["row"]
        what = (
            row["added"]
            if additions
            else (f"{_path(row)} | {', '.join(row['speedups']) or 'none'}")
        )
        if "error" in cell:
            result = f"fails: {cell['error'][:90]} | | "
        else:
            result = (
                f"{cell['max']:.1e} | {cell['labels'][0]}/{cell['labels'][1]} | "
                f"{cell['texts'][0]}/{cell['texts'][1]}"
            )
        lines.append(
            f"| {arch} | {dtype} | {what} | {result} | {'yes' if cell['passed'] else '**no**'} |"
        )
    return lines


def render_markdown(proven: list[dict[str, Any]], forced: list[dict[str, Any]]) -> str:
    import transformers

    today = datetime.date.today().isoformat()
    head = [
        "# Conformance: the engine against the plain reference",
        "",
        f"Written by `make conformance` on {today} (torch {torch.__version__}, "
        f"transformers {transformers.__version__}, device {proven[0]['device']}); "
        "do not edit by hand.",
        "",
        "Each row runs the project's zero-shot and few-shot prompts (16 prompts, two shared "
        f"prefixes, mixed lengths; all longer than the {WINDOW}-token windows, and on either "
        f"side of the {MIXED_WINDOW}-token one: under a sliding window, *prefix reuse* "
        "applies to the rows that fit the window, and the others are fed whole) "
        "through a tiny seeded random model, with the engine and with the plain reference "
        "backend (one unpadded forward pass per prompt and label, transformers' `generate`). "
        "Methods: first token, label likelihood (plain, length-normalised, calibrated) and "
        f"greedy generation of {MAX_NEW_TOKENS} tokens. *max prob. diff* is the largest "
        "difference of a label probability over the scored methods; *same label* counts "
        "prompts x scored methods, *same text* the generated answers. Pass marks: float32 - "
        f"difference at most {FLOAT32_ATOL:g} and every text the same; bfloat16 - "
        f"difference at most {BFLOAT16_ATOL:g} and the same label on every prompt whose "
        f"reference puts its top two labels more than {2 * BFLOAT16_ATOL:g} apart (closer "
        "ones can swap by rounding alone: the engine's plain batched path swaps one whose "
        "top two are 0.0008 apart); generated text is reported, not required, as bfloat16 "
        "rounding differs between batched and single passes.",
        "",
        "## With the speed-ups the capability table grants",
        "",
        "This is what the engine runs (`engine: {speedups: auto}`); `make test` checks every row.",
        "",
        *markdown_table(proven),
        "",
        "## Each speed-up the table leaves out, added",
        "",
        "Batch 16, prefix reuse asked for: the table's speed-ups for the architecture and "
        "dtype plus one more (speed-ups that do not apply to a model are not listed). "
        "The rows marked **no** are why the table leaves them out: with a sliding window, "
        "the shared-prefix attention does not apply the window and the label tree's 4D "
        "mask does not fit the windowed layers' masks. (Prefix reuse itself is granted "
        "under a window to the rows that fit it; `make test` shows that without that "
        "condition the rows beyond the window fail.)",
        "",
        *markdown_table(forced),
        "",
    ]
    return "\n".join(head)


def main(argv: Sequence[str] | None = None) -> int:
    from emoprompt.models.loading import prepare_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="a model folder with a tokenizer")
    parser.add_argument("--prompts", default="prompts", help="the prompt files' folder")
    parser.add_argument("--out", default="docs/conformance.md")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    logging.basicConfig(level=logging.WARNING)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(args.tokenizer))
    proven = run_matrix(tokenizer, args.prompts, device=args.device)
    forced = run_matrix(tokenizer, args.prompts, device=args.device, additions=True)
    Path(args.out).write_text(render_markdown(proven, forced), encoding="utf-8")
    failed = [r for r in proven if not r["passed"]]
    for row in failed:
        log.error("failed: %s", row)
    print(f"{args.out}: {len(proven)} rows, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
