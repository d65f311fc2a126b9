"""Inference benchmark: the product's strategies against the course notebook's way.

One :class:`Case` is one measurement: a method (``notebook_generate`` or a prompting
strategy), a number of few-shot examples, a batch size, whether the shared prompt
prefix's KV cache is reused, the backend (the engine, or the plain reference backend),
a speed-up the engine does without, and the dtype the model is loaded in. :func:`measure`
runs a case over the benchmark tweets in the calling process (the benchmark runner gives
every case a process of its own, so that peak memory and warm caches belong to that case
alone) and returns its row; :func:`compare` checks a row's predictions against those of
the plain reference backend (:class:`emoprompt.inference.reference.ReferenceBackend`:
one forward pass per prompt and label, transformers' ``generate``);
:func:`harness.tables.render_markdown` writes the tables of ``BENCHMARKS.md``.

The notebook's way is reimplemented as the notebook ran it: a ``text-generation``
pipeline called once per tweet with the chat messages of the zero-shot prompt, greedy,
20 new tokens, the label recovered from the text.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import platform
import resource
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from harness.served import reset_server_cache, served_backend

from emoprompt.bench.gpu_check import notebook_way
from emoprompt.data.sampling import benchmark_sample
from emoprompt.evaluation.predictions import score_columns
from emoprompt.evaluation.runner import run_llm_strategy
from emoprompt.evaluation.strategies import STRATEGIES, Settings
from emoprompt.inference.capabilities import SPEEDUPS
from emoprompt.infra.files import write_json
from emoprompt.labels import LABELS
from emoprompt.prompting.parsing import parse_label
from emoprompt.prompting.prompt_file import PromptFile, file_family, load_prompt_file

log = logging.getLogger(__name__)

NOTEBOOK = "notebook_generate"
BENCH_TWEETS = 100
BENCH_SEED = 0
WARMUP_TWEETS = 4  # fed untimed before a case's timed passes
METHODS = (NOTEBOOK, *(n for n, s in STRATEGIES.items() if s.family in ("zero_shot", "few_shot")))


BACKENDS = ("engine", "reference", "vllm")


class BenchError(ValueError):
    """A benchmark case that cannot run as asked."""


@dataclass(frozen=True)
class Case:
    method: str
    shots: int = 0
    batch_size: int = 16
    prefix_cache: bool = True
    backend: str = "engine"  # or "reference", or "vllm" (a vllm serve the runner started)
    without: str | None = None  # a speed-up the engine does without
    load_dtype: str | None = None  # None: the catalogue entry's; "nf4": 4-bit NF4
    model_name: str | None = None  # another catalogue entry than the run's model

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise BenchError(
                f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}"
            )
        few = self.method.startswith("few_shot")
        if few != (self.shots > 0):
            raise BenchError(
                f"{self.method}: shots must be {'> 0' if few else '0'}, not {self.shots}"
            )
        if self.batch_size < 1:
            raise BenchError(f"batch_size must be at least 1, not {self.batch_size}")
        if self.backend not in BACKENDS:
            raise BenchError(
                f"unknown backend {self.backend!r}; expected one of {', '.join(BACKENDS)}"
            )
        if self.without is not None and self.without not in SPEEDUPS:
            raise BenchError(f"unknown speed-up {self.without!r}; known: {', '.join(SPEEDUPS)}")
        unbatched = self.batch_size == 1 and not self.prefix_cache
        if (self.method == NOTEBOOK or self.backend == "reference") and not unbatched:
            raise BenchError(f"{self.key}: runs one tweet at a time without a cache")

    @property
    def is_reference(self) -> bool:
        """The plain reference backend's run, which every other case of its method (and
        shots) is checked against."""
        return self.backend == "reference" and self.method != NOTEBOOK

    @property
    def reference(self) -> Case:
        """The case whose predictions this one must equal (the notebook's way is checked
        against the reference's zero-shot generation)."""
        method = "zero_shot_generate" if self.method == NOTEBOOK else self.method
        return Case(
            method,
            self.shots,
            batch_size=1,
            prefix_cache=False,
            backend="reference",
            model_name=self.model_name,
        )

    @property
    def expects_equal(self) -> bool:
        """Whether the predictions must equal the reference's (another dtype, or another
        engine's kernels, may differ)."""
        return not self.is_reference and self.load_dtype is None and self.backend != "vllm"

    @property
    def key(self) -> str:
        cache = "cache" if self.prefix_cache else "nocache"
        key = f"{self.method}-{self.shots}shots-b{self.batch_size}-{cache}"
        if self.backend != "engine" and self.method != NOTEBOOK:
            key += f"-{self.backend}"
        if self.without:
            key += f"-without-{self.without}"
        if self.load_dtype:
            key += f"-{self.load_dtype}"
        if self.model_name:
            key += f"-{self.model_name}"
        return key

    @classmethod
    def notebook(cls) -> Case:
        return cls(NOTEBOOK, 0, batch_size=1, prefix_cache=False)


#: The strategy each speed-up is measured on (``make bench`` runs it with and without).
SERVES = {
    "prefix_reuse": ("few_shot_first_token", 10),
    "shared_attention": ("few_shot_first_token", 10),
    "tree_labels": ("zero_shot_label_likelihood", 0),
    "packed_weights": ("zero_shot_generate", 0),
}


def bench_sample(test: pd.DataFrame, n: int = BENCH_TWEETS, seed: int = BENCH_SEED) -> pd.DataFrame:
    """``random.Random(seed).sample`` of ``n`` row positions of the test split, in that order."""
    try:
        return benchmark_sample(test, n, seed)
    except ValueError as exc:
        raise BenchError(str(exc)) from None


def case_prompt(
    case: Case, prompt_dir: str | os.PathLike[str], prompt_format: str = "chat"
) -> PromptFile:
    """The prompt file the case uses, with its number of shots (zero-shot for the
    notebook): the family's plain-text file for a base model (``prompt_format: text``)."""
    family = "zero_shot" if case.method == NOTEBOOK else STRATEGIES[case.method].family
    family = file_family(family, prompt_format)
    prompt = load_prompt_file(Path(prompt_dir) / f"{family}.yaml", family)
    if case.shots:
        prompt = dataclasses.replace(prompt, settings={**prompt.settings, "shots": case.shots})
    return prompt


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _notebook_way(model, tokenizer, prompt: PromptFile, sample: pd.DataFrame, settings: Settings):
    """The course notebook's loop (:func:`emoprompt.bench.gpu_check.notebook_way`), its
    answers parsed as the notebook parses them."""
    texts = notebook_way(
        model, tokenizer, prompt, sample["tweet"], settings.max_new_tokens, progress=True
    )
    labels, label_map = prompt.labels, prompt.label_map
    answers = [parse_label(text, labels, fallback=None) for text in texts]
    return pd.DataFrame(
        {
            "id": sample["id"].tolist(),
            "predicted": [
                label_map[a.label] if a.parsed else settings.fallback_label for a in answers
            ],
            "raw": texts,
        }
    )


def _run_once(case, model, tokenizer, prompt, train, sample, settings) -> tuple[pd.DataFrame, dict]:
    if case.method == NOTEBOOK:
        return _notebook_way(model, tokenizer, prompt, sample, settings), {}
    from emoprompt.inference.backend import new_stats
    from emoprompt.inference.engine import Engine
    from emoprompt.inference.reference import ReferenceBackend

    if case.backend == "vllm":  # ``model`` is the server's backend (see run_case)
        backend = model
        backend.stats = new_stats()
    elif case.backend == "reference":
        backend = ReferenceBackend(model, tokenizer, progress=True)
    else:
        disable = [] if case.prefix_cache else ["prefix_reuse"]
        backend = Engine(
            model,
            tokenizer,
            batch_size=case.batch_size,
            disable=[*disable, *([case.without] if case.without else [])],
            progress=True,
        )
    result = run_llm_strategy(
        STRATEGIES[case.method], backend, tokenizer, prompt, train, sample, settings
    )
    return result.predictions, {**backend.stats, "speedups": backend.describe()["speedups"]}


def default_repeats(case: Case) -> int:
    """Timed passes: 3 for the fast paths (their median), 1 for the slow ones (the
    notebook's way, the unbatched references and batches without the prefix cache),
    whose single pass lasts minutes and so averages the machine's fluctuations out."""
    return 3 if case.prefix_cache and case.backend == "engine" and case.method != NOTEBOOK else 1


def measure(
    case: Case,
    model,
    tokenizer,
    prompt_dir: str | os.PathLike[str],
    train: pd.DataFrame,
    sample: pd.DataFrame,
    settings: Settings | None = None,
    warmup: int = WARMUP_TWEETS,
    repeats: int | None = None,
    prompt_format: str = "chat",
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Run ``case`` over ``sample`` ``repeats`` times, timed, after an untimed warm-up on
    ``warmup`` tweets; return its row (the median pass; without the comparison fields)
    and its predictions. ``repeats`` defaults to :func:`default_repeats`."""
    settings = settings or Settings()
    prompt = case_prompt(case, prompt_dir, prompt_format)
    if warmup:
        _run_once(case, model, tokenizer, prompt, train, sample.iloc[:warmup], settings)
    passes = []
    for _ in range(repeats or default_repeats(case)):
        if case.backend == "vllm":  # each pass computes its prompts anew
            reset_server_cache(model)
        start = time.perf_counter()
        predictions, stats = _run_once(case, model, tokenizer, prompt, train, sample, settings)
        passes.append(time.perf_counter() - start)
    seconds = statistics.median(passes)
    row = {
        **dataclasses.asdict(case),
        "is_reference": case.is_reference,
        "tweets": len(sample),
        "seconds": round(seconds, 3),
        "passes_s": [round(t, 3) for t in passes],
        "tweets_per_s": round(len(sample) / seconds, 3),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "tokens_in": stats.get("tokens_in"),
        "forward_passes": stats.get("forward_passes"),
        "speedups": stats.get("speedups"),
    }
    return row, predictions


def compare(predictions: pd.DataFrame, reference: pd.DataFrame, method: str) -> dict[str, Any]:
    """How a case's predictions agree with its reference's, tweet by tweet.

    Scored methods must pick the same label (their probabilities are reported too, as the
    largest absolute difference); generated answers must be the same text.
    """
    if predictions["id"].tolist() != reference["id"].tolist():
        raise BenchError("the case and its reference were run on different tweets")
    same = predictions["predicted"].to_numpy() == reference["predicted"].to_numpy()
    out: dict[str, Any] = {}
    generated = method == NOTEBOOK or STRATEGIES[method].method == "generate"
    if generated:
        texts = predictions["raw"].str.strip().to_numpy() == reference["raw"].str.strip().to_numpy()
        same &= texts
        out["same_text"] = int(texts.sum())
    else:
        columns = score_columns(LABELS)
        diff = np.abs(predictions[columns].to_numpy() - reference[columns].to_numpy())
        out["max_abs_prob_diff"] = float(diff.max())
    out["agreeing"] = int(same.sum())
    out["same_predictions"] = bool(same.all())
    return out


# ---------------------------------------------------------------------- the report
def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory = round(pages * size / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }


#: The gauge product: SmolLM2's MLP up-projection for a batch of 1,024 tokens.
GAUGE_SHAPE = (1024, 576, 1536)


def matmul_gflops(seconds: float = 0.5) -> float:
    """This machine's float32 matrix-product speed now, in GFLOP/s, with the torch
    threads as configured: the :data:`GAUGE_SHAPE` product through PyTorch's default
    path, repeated for about ``seconds``. A shared machine's speed changes over minutes
    and days, and batched inference follows it more than the notebook's way does:
    each measurement records this before and after, so that runs can be compared."""
    import torch

    rows, inner, cols = GAUGE_SHAPE
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, inner, generator=gen), torch.randn(cols, inner, generator=gen)
    torch.nn.functional.linear(x, w)
    count, start = 0, time.perf_counter()
    while True:
        torch.nn.functional.linear(x, w)
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return round(count * 2 * rows * inner * cols / elapsed / 1e9, 1)


def vllm_plan(batch_size: int = 16) -> list[Case]:
    """The methods through a vLLM server (``batch_size`` requests in flight), float32
    and bfloat16, each compared with the plain reference's predictions."""
    methods = [
        ("zero_shot_first_token", 0),
        ("few_shot_first_token", 10),
        ("zero_shot_generate", 0),
        ("few_shot_generate", 10),
        ("zero_shot_label_likelihood", 0),
    ]
    cases = [Case(m, k, batch_size, backend="vllm") for m, k in methods]
    cases += [
        Case(m, 0, batch_size, backend="vllm", load_dtype="bfloat16")
        for m in ("zero_shot_first_token", "zero_shot_generate")
    ]
    return cases


def default_plan(
    batch_size: int = 16, vllm: bool = False, nf4: bool = False, window_model: str | None = None
) -> list[Case]:
    """Every measurement of ``make bench``, references first (later cases compare with them).

    The plain reference backend's run of each (method, shots) but the 20-shot one; the
    notebook's way; every fast path at ``batch_size``; each
    speed-up's strategy without it (:data:`SERVES`; for ``prefix_reuse`` also zero-shot);
    the zero-shot methods in bfloat16 (and with ``nf4``, in 4-bit NF4); with ``vllm``,
    :func:`vllm_plan`; with ``window_model`` (a sliding-window model's catalogue entry),
    :func:`window_plan`.
    """
    fast = [
        Case("zero_shot_first_token", 0),
        Case("few_shot_first_token", 10),
        Case("few_shot_first_token", 20),
        Case("zero_shot_generate", 0),
        Case("few_shot_generate", 10),
        Case("zero_shot_label_likelihood", 0),
    ]
    fast = [dataclasses.replace(c, batch_size=batch_size) for c in fast]
    # The 20-shot reference alone would take ten minutes on a 2-core CPU: the 20-shot
    # row measures speed, the 10-shot rows check the few-shot predictions.
    references = [c.reference for c in fast if c.shots != 20]
    without = [Case("zero_shot_first_token", 0, batch_size, prefix_cache=False)]
    for name in SPEEDUPS:  # prefix_reuse: the prefix cache off
        method, shots = SERVES[name]
        if name == "prefix_reuse":
            without.append(Case(method, shots, batch_size, prefix_cache=False))
        else:
            without.append(Case(method, shots, batch_size, without=name))
    dtypes = [
        Case(method, 0, batch_size, load_dtype=dtype)
        for dtype in ("bfloat16", *(["nf4"] if nf4 else []))
        for method in ("zero_shot_first_token", "zero_shot_generate")
    ]
    served = vllm_plan(batch_size) if vllm else []
    window = window_plan(window_model, batch_size) if window_model else []
    return [*references, Case.notebook(), *fast, *without, *dtypes, *served, *window]


def window_plan(model: str, batch_size: int = 16) -> list[Case]:
    """Prefix reuse under a sliding window (``model``, e.g. Gemma 3): zero-shot first
    token against the reference, with and without the prefix cache."""
    fast = Case("zero_shot_first_token", 0, batch_size, model_name=model)
    return [fast.reference, fast, dataclasses.replace(fast, prefix_cache=False)]


def write_predictions(path: str | os.PathLike[str], predictions: pd.DataFrame) -> None:
    write_json(path, predictions.to_dict(orient="list"))


def read_predictions(path: str | os.PathLike[str]) -> pd.DataFrame:
    return pd.DataFrame(json.loads(Path(path).read_text()))


#: What a case's ``load_dtype`` changes in the entry (else its ``dtype``): NF4 loads as
#: the course notebook loads its model.
LOADINGS: dict[str | None, dict[str, str]] = {
    None: {},
    "nf4": {"dtype": "bfloat16", "quantization": "nf4"},
}


def run_case(
    case: Case,
    *,
    entry: Mapping[str, Any],
    model_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    prompt_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    tweets: int = BENCH_TWEETS,
    threads: int | str = "auto",
    settings: Settings | None = None,
    repeats: int | None = None,
    server: str | None = None,
) -> dict[str, Any]:
    """Load the model (or, for a vLLM case, its tokenizer and the ``server`` serving it),
    measure ``case`` and write ``<out_dir>/<key>.json`` (its row) and
    ``<key>.predictions.json``; compare with the reference's predictions when written."""
    from emoprompt.data.splits import read_split
    from emoprompt.infra.runtime import configure_cpu
    from emoprompt.models.loading import load_model

    # The notebook's way runs as a plain script would: default allocator settings.
    count = configure_cpu(threads, os.cpu_count() or 1, keep_memory=case.method != NOTEBOOK)
    entry = {**entry, **LOADINGS.get(case.load_dtype, {"dtype": case.load_dtype})}
    if case.backend == "vllm":
        model, tokenizer, dtype = served_backend(entry, model_dir, server, case.batch_size)
    else:
        loaded = load_model(dict(entry), str(model_dir), device="cpu")
        model, tokenizer = loaded.model, loaded.tokenizer
        dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    train = read_split(Path(data_dir) / "train.tsv")
    sample = bench_sample(read_split(Path(data_dir) / "test.tsv"), tweets)
    log.info("%s: %d tweets, %d threads", case.key, len(sample), count)
    before = matmul_gflops()
    row, predictions = measure(
        *(case, model, tokenizer, prompt_dir, train, sample, settings),
        repeats=repeats,
        prompt_format=entry.get("prompt_format", "chat"),
    )
    row.update(
        matmul_gflops=[before, matmul_gflops()],
        threads=count,
        dtype=dtype,
        model=entry.get("name") or Path(model_dir).name,
        date=datetime.date.today().isoformat(),
    )
    out = Path(out_dir)
    write_predictions(out / f"{case.key}.predictions.json", predictions)
    reference = out / f"{case.reference.key}.predictions.json"
    row["same_predictions"] = None
    if not case.is_reference and reference.exists():
        row.update(compare(predictions, read_predictions(reference), case.method))
        row["expects_equal"] = case.expects_equal
    write_json(out / f"{case.key}.json", row)
    return row


def case_args(case: Case) -> list[str]:
    """The command-line arguments that name ``case`` to ``benchmarks/inference.py``."""
    args = [
        "--method",
        case.method,
        "--shots",
        str(case.shots),
        "--batch-size",
        str(case.batch_size),
    ]
    if not case.prefix_cache:
        args.append("--no-prefix-cache")
    if case.backend != "engine":
        args += ["--backend", case.backend]
    if case.without:
        args += ["--without", case.without]
    if case.load_dtype:
        args += ["--dtype", case.load_dtype]
    if case.model_name:
        args += ["--model-name", case.model_name]
    return args
