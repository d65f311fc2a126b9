"""Inference benchmark: the product's strategies against the course notebook's way.

One :class:`Case` is one measurement: a method (``notebook_generate`` or a prompting
strategy), a number of few-shot examples, a batch size and whether the shared prompt
prefix's KV cache is reused. :func:`measure` runs a case over the benchmark tweets in
the calling process (the benchmark runner gives every case a process of its own, so
that peak memory and warm caches belong to that case alone) and returns its row;
:func:`compare` checks a row's predictions against those of the reference path, the
same method unbatched (batch size 1) and uncached; :func:`render_markdown` writes the
tables of ``BENCHMARKS.md``.

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
import random
import resource
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from emoprompt.evaluation.strategies import STRATEGIES, Settings, run_llm_strategy, score_columns
from emoprompt.infra.files import write_json
from emoprompt.labels import LABELS
from emoprompt.prompting.parsing import parse_label
from emoprompt.prompting.render import PromptFile, chat_messages, load_prompt_file

log = logging.getLogger(__name__)

NOTEBOOK = "notebook_generate"
BENCH_TWEETS = 100
BENCH_SEED = 0
WARMUP_TWEETS = 4  # fed untimed before a case's timed passes
METHODS = (NOTEBOOK, *(n for n, s in STRATEGIES.items() if s.family in ("zero_shot", "few_shot")))


class BenchError(ValueError):
    """A benchmark case that cannot run as asked."""


@dataclass(frozen=True)
class Case:
    method: str
    shots: int = 0
    batch_size: int = 16
    prefix_cache: bool = True

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
        if self.method == NOTEBOOK and (self.batch_size != 1 or self.prefix_cache):
            raise BenchError(f"{NOTEBOOK} runs one tweet at a time without a cache")

    @property
    def is_reference(self) -> bool:
        """The unbatched, uncached path every other case of its method is checked against."""
        return self.method != NOTEBOOK and self.batch_size == 1 and not self.prefix_cache

    @property
    def reference(self) -> Case:
        """The case whose predictions this one must equal (the notebook's way is checked
        against the engine's unbatched, uncached zero-shot generation)."""
        method = "zero_shot_generate" if self.method == NOTEBOOK else self.method
        return Case(method, self.shots, batch_size=1, prefix_cache=False)

    @property
    def key(self) -> str:
        cache = "cache" if self.prefix_cache else "nocache"
        return f"{self.method}-{self.shots}shots-b{self.batch_size}-{cache}"

    @classmethod
    def notebook(cls) -> Case:
        return cls(NOTEBOOK, 0, batch_size=1, prefix_cache=False)


def bench_sample(test: pd.DataFrame, n: int = BENCH_TWEETS, seed: int = BENCH_SEED) -> pd.DataFrame:
    """``random.Random(seed).sample`` of ``n`` row positions of the test split, in that order."""
    if not 0 < n <= len(test):
        raise BenchError(f"cannot sample {n} tweets from a split of {len(test)}")
    rows = random.Random(seed).sample(range(len(test)), n)
    return test.iloc[rows].reset_index(drop=True)


def case_prompt(case: Case, prompt_dir: str | os.PathLike[str]) -> PromptFile:
    """The prompt file the case uses, with its number of shots (zero-shot for the notebook)."""
    family = "zero_shot" if case.method == NOTEBOOK else STRATEGIES[case.method].family
    prompt = load_prompt_file(Path(prompt_dir) / f"{family}.yaml", family)
    if case.shots:
        prompt = dataclasses.replace(prompt, settings={**prompt.settings, "shots": case.shots})
    return prompt


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _notebook_way(model, tokenizer, prompt: PromptFile, sample: pd.DataFrame, settings: Settings):
    """The course notebook's loop: one pipeline call per tweet, greedy, chat messages in."""
    from tqdm.auto import tqdm
    from transformers import pipeline

    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    texts = []
    for tweet in tqdm(sample["tweet"], desc="notebook's way", unit="tweet"):
        out = pipe(
            chat_messages(prompt, tweet, ()),
            max_new_tokens=settings.max_new_tokens,
            do_sample=False,
        )
        texts.append(out[0]["generated_text"][-1]["content"])
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
    from emoprompt.inference.engine import Engine

    engine = Engine(
        model,
        tokenizer,
        batch_size=case.batch_size,
        reuse_prefix=case.prefix_cache,
        # The reference computes with PyTorch's own linear layers, so that the fast
        # paths' agreement with it covers the packed weights too.
        packed_weights=not case.is_reference,
        progress=True,
    )
    result = run_llm_strategy(
        STRATEGIES[case.method], engine, tokenizer, prompt, train, sample, settings
    )
    return result.predictions, dict(engine.stats)


def default_repeats(case: Case) -> int:
    """Timed passes: 3 for the fast paths (their median), 1 for the slow ones (the
    notebook's way, the unbatched references and batches without the prefix cache),
    whose single pass lasts minutes and so averages the machine's fluctuations out."""
    return 3 if case.prefix_cache and case.method != NOTEBOOK else 1


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
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Run ``case`` over ``sample`` ``repeats`` times, timed, after an untimed warm-up on
    ``warmup`` tweets; return its row (the median pass; without the comparison fields)
    and its predictions. ``repeats`` defaults to :func:`default_repeats`."""
    settings = settings or Settings()
    prompt = case_prompt(case, prompt_dir)
    if warmup:
        _run_once(case, model, tokenizer, prompt, train, sample.iloc[:warmup], settings)
    passes = []
    for _ in range(repeats or default_repeats(case)):
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


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill ``ratio_vs_notebook`` from the notebook row's tweets/s (None without one)."""
    base = next((r["tweets_per_s"] for r in rows if r["method"] == NOTEBOOK), None)
    for r in rows:
        r["ratio_vs_notebook"] = round(r["tweets_per_s"] / base, 2) if base else None
    return rows


def _find(rows, method, shots=None, batch_size=None, prefix_cache=True):
    for r in rows:
        if (
            r["method"] == method
            and (shots is None or r["shots"] == shots)
            and (batch_size is None or r["batch_size"] == batch_size)
            and r["prefix_cache"] == prefix_cache
        ):
            return r
    return None


def targets(rows: Sequence[Mapping[str, Any]], batch_size: int) -> list[tuple[str, Any, bool]]:
    """The goals the engine is held to, each with the measured figure and whether it holds."""
    out: list[tuple[str, Any, bool]] = []

    def ratio(method, shots, goal):
        r = _find(rows, method, shots, batch_size)
        if r and r.get("ratio_vs_notebook") is not None:
            label = f"{method}, {shots} shots: at least {goal}x the notebook's way"
            out.append((label, f"{r['ratio_vs_notebook']:.2f}x", r["ratio_vs_notebook"] >= goal))

    ratio("zero_shot_first_token", 0, 15)
    ratio("few_shot_first_token", 10, 10)
    ratio("zero_shot_generate", 0, 3)
    ratio("few_shot_generate", 10, 3)
    ratio("zero_shot_label_likelihood", 0, 5)
    r = _find(rows, "zero_shot_label_likelihood", 0, batch_size)
    if r:
        mib = r["peak_rss_mib"]
        out.append(
            ("zero_shot_label_likelihood: peak memory under 2 GiB", f"{mib:.0f} MiB", mib < 2048)
        )
    zero = _find(rows, "zero_shot_first_token", 0, batch_size)
    twenty = _find(rows, "few_shot_first_token", 20, batch_size)
    if zero and twenty:
        share = twenty["tweets_per_s"] / zero["tweets_per_s"]
        out.append(
            ("20-shot first token at least half the zero-shot rate", f"{share:.2f}", share >= 0.5)
        )
    checked = [r for r in rows if r.get("same_predictions") is not None]
    if checked:
        same = sum(bool(r["same_predictions"]) for r in checked)
        out.append(
            (
                "predictions equal the unbatched, uncached path's",
                f"{same} of {len(checked)} cases",
                same == len(checked),
            )
        )
    return out


def _cell(value, fmt="{}"):
    return "" if value is None else fmt.format(value)


def _agreement(r) -> str:
    if r.get("same_predictions") is None:
        return "(reference)" if r.get("is_reference") else ""
    text = "yes" if r["same_predictions"] else "**no**"
    return f"{text} ({r['agreeing']}/{r['tweets']})"


def render_markdown(rows: list[dict[str, Any]], info: Mapping[str, Any]) -> str:
    """The tables of BENCHMARKS.md from the benchmark's rows."""
    batch = info.get("batch_size", 16)
    lines = [
        "| method | shots | batch | prefix cache | tweets/s | vs notebook | peak RSS (MiB) | "
        "same predictions as the unbatched, uncached path |",
        "|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['shots']} | {r['batch_size']} | "
            f"{'yes' if r['prefix_cache'] else 'no'} | {r['tweets_per_s']:.2f} | "
            f"{_cell(r.get('ratio_vs_notebook'), '{:.1f}x')} | {r['peak_rss_mib']:.0f} | "
            f"{_agreement(r)} |"
        )
    table = "\n".join(lines)

    shots = sorted(
        {
            r["shots"]
            for r in rows
            if r["method"].endswith("first_token") and r["batch_size"] == batch
        }
    )
    zero = _find(rows, "zero_shot_first_token", 0, batch)
    scaling = [
        "| shots | prompt tokens fed (mean per tweet) | tweets/s, cache | tweets/s, no cache "
        "| share of the zero-shot rate |",
        "|---:|---:|---:|---:|---:|",
    ]
    for k in shots:
        method = "zero_shot_first_token" if k == 0 else "few_shot_first_token"
        fast = _find(rows, method, k, batch)
        slow = _find(rows, method, k, 1, prefix_cache=False)
        if not fast:
            continue
        fed = slow["tokens_in"] / slow["tweets"] if slow and slow.get("tokens_in") else None
        share = fast["tweets_per_s"] / zero["tweets_per_s"] if zero else None
        scaling.append(
            f"| {k} | {_cell(fed, '{:.0f}')} | {fast['tweets_per_s']:.2f} | "
            f"{_cell(slow and slow['tweets_per_s'], '{:.2f}')} | {_cell(share, '{:.2f}')} |"
        )

    batches = [
        "| method | shots | batch | tweets/s | peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in sorted(
        (r for r in rows if r["prefix_cache"] and r["method"].endswith("first_token")),
        key=lambda r: (r["shots"], r["batch_size"]),
    ):
        batches.append(
            f"| {r['method']} | {r['shots']} | {r['batch_size']} | {r['tweets_per_s']:.2f} | "
            f"{r['peak_rss_mib']:.0f} |"
        )

    goals = ["| goal | measured | met |", "|---|---:|---|"]
    for label, value, ok in targets(rows, batch):
        goals.append(f"| {label} | {value} | {'yes' if ok else '**no**'} |")

    return "\n\n".join(
        [
            "### All measurements\n\n" + table,
            "### Goals\n\n" + "\n".join(goals),
            "### Cost against the number of shots (first token, batch "
            f"{batch})\n\n" + "\n".join(scaling),
            "### Batch size (first token, prefix cache reused)\n\n" + "\n".join(batches),
        ]
    )


MARKERS = ("<!-- bench:start -->", "<!-- bench:end -->")


def describe_run(rows: Sequence[Mapping[str, Any]], info: Mapping[str, Any], day: str) -> str:
    """The sentence that says what the tables were measured on."""
    first = rows[0] if rows else {}
    return (
        f"Measured {day} by `make bench` on {info['cpu']}, {info['cores']} cores, "
        f"{info['memory_gib']} GiB; Python {info['python']}, torch {info['torch']}, "
        f"transformers {info['transformers']}. Model {first.get('model')}, "
        f"{first.get('dtype')}, {first.get('threads')} torch threads; {first.get('tweets')} "
        f"test tweets (`random.Random({BENCH_SEED}).sample` of the test split's rows). One "
        f"process per measurement, after an untimed {WARMUP_TWEETS}-tweet warm-up; tweets/s "
        "is the median of 3 timed passes for the fast paths, one pass for the slow ones (the "
        "notebook's way, the references, batches without the prefix cache)." + _machine_speed(rows)
    )


def _machine_speed(rows: Sequence[Mapping[str, Any]]) -> str:
    speeds = [v for r in rows for v in r.get("matmul_gflops") or ()]
    if not speeds:
        return ""
    rows_, inner, cols = GAUGE_SHAPE
    return (
        f" The machine's float32 matrix-product speed ({rows_:,} x {inner} by {inner} x "
        f"{cols:,}, PyTorch's default path), taken before and after each measurement, ranged "
        f"from {min(speeds):.0f} to {max(speeds):.0f} GFLOP/s in this run "
        "(`matmul_gflops` of each row)."
    )


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between the markers replaced by ``block`` (the markers are
    appended when missing); everything outside them is kept."""
    start, end = MARKERS
    if start not in text or end not in text:
        text = f"{text.rstrip()}\n\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{block}\n{end}{rest.split(end, 1)[1]}"


# ---------------------------------------------------------------------- running cases
def default_plan(batch_size: int = 16) -> list[Case]:
    """Every measurement of ``make bench``, references first (later cases compare with them).

    References (batch 1, no cache) of each scored (method, shots) and of both generated
    methods; the notebook's way; every fast path at ``batch_size`` with the prefix cache;
    batched without the cache (what batching alone buys); and batch sizes 1, 4 and 32.
    """
    fast = [
        Case("zero_shot_first_token", 0),
        Case("few_shot_first_token", 5),
        Case("few_shot_first_token", 10),
        Case("few_shot_first_token", 20),
        Case("zero_shot_generate", 0),
        Case("few_shot_generate", 10),
        Case("zero_shot_label_likelihood", 0),
    ]
    fast = [dataclasses.replace(c, batch_size=batch_size) for c in fast]
    references = [c.reference for c in fast]
    extra = [
        Case("zero_shot_first_token", 0, batch_size, prefix_cache=False),
        Case("few_shot_first_token", 10, batch_size, prefix_cache=False),
        *(
            Case(method, shots, size)
            for method, shots in (("zero_shot_first_token", 0), ("few_shot_first_token", 10))
            for size in (1, 4, 32)
            if size != batch_size
        ),
    ]
    return [*references, Case.notebook(), *fast, *extra]


def write_predictions(path: str | os.PathLike[str], predictions: pd.DataFrame) -> None:
    write_json(path, predictions.to_dict(orient="list"))


def read_predictions(path: str | os.PathLike[str]) -> pd.DataFrame:
    return pd.DataFrame(json.loads(Path(path).read_text()))


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
) -> dict[str, Any]:
    """Load the model, measure ``case`` and write ``<out_dir>/<key>.json`` (its row) and
    ``<key>.predictions.json``; compare with the reference's predictions when written."""
    from emoprompt.data.splits import read_split
    from emoprompt.infra.runtime import configure_cpu
    from emoprompt.models.loading import load_model

    # The notebook's way runs as a plain script would: default allocator settings.
    count = configure_cpu(threads, os.cpu_count() or 1, keep_memory=case.method != NOTEBOOK)
    loaded = load_model(dict(entry), str(model_dir), device="cpu")
    train = read_split(Path(data_dir) / "train.tsv")
    sample = bench_sample(read_split(Path(data_dir) / "test.tsv"), tweets)
    log.info("%s: %d tweets, %d threads", case.key, len(sample), count)
    before = matmul_gflops()
    row, predictions = measure(
        case, loaded.model, loaded.tokenizer, prompt_dir, train, sample, settings, repeats=repeats
    )
    row.update(
        matmul_gflops=[before, matmul_gflops()],
        threads=count,
        dtype=str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        model=entry.get("name") or Path(model_dir).name,
        date=datetime.date.today().isoformat(),
    )
    out = Path(out_dir)
    write_predictions(out / f"{case.key}.predictions.json", predictions)
    reference = out / f"{case.reference.key}.predictions.json"
    row["same_predictions"] = None
    if not case.is_reference and reference.exists():
        row.update(compare(predictions, read_predictions(reference), case.method))
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
    return args if case.prefix_cache else [*args, "--no-prefix-cache"]
