"""The GPU check: the course notebook's model shape on one accelerator, proven and timed.

A randomly initialised model of Llama-3.2-1B's exact configuration
(:data:`emoprompt.bench.llama3.LLAMA_3_2_1B`, about 1.24 B parameters) with Meta's Llama 3
tokenizer and chat template, loaded in bfloat16 and in 4-bit NF4 (bfloat16 compute,
``device_map="auto"``, as the notebook loads its model), and real test tweets. Nothing
comes from a model hub. Two parts, each under its own time limit:

1. **conformance** - the conformance matrix's prompts and methods
   (:mod:`emoprompt.bench.conformance`) through the engine against the plain reference
   backend on the same model: with the speed-ups the capability table grants on this
   device (none is proven on CUDA yet: the safe path) and with each speed-up the CPU rows
   prove forced on, so that a later table can grant on this device what passed here;
2. **timing** - every prompting strategy through the engine (the speed-ups that passed
   part 1) against the notebook's way (a text-generation pipeline per tweet, greedy, 20
   tokens): tweets/s, the ratio, peak memory, the largest batch that fits, and whether
   prefix reuse pays (few-shot first token with and without it).

``bundle`` writes what a GPU machine without internet needs beside the checkout (the
built tokenizer, the tweets, bitsandbytes' wheel); ``run`` runs the parts and writes
``gpu_check.json`` and ``gpu_check.md`` into ``--out``. ``--shape tiny`` runs the same
code on a tiny model of the same architecture: ``make test`` runs it on a CPU.

    python scripts/gpu_check.py bundle --out gpu-check-bundle --splits data/processed
    python scripts/gpu_check.py run --bundle gpu-check-bundle --device cuda --out results/gpu_check
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import logging
import platform
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from emoprompt.bench.gpu_bundle import SHOT_POOL, TWEETS, bundle, open_bundle

log = logging.getLogger(__name__)

SHAPES = ("llama-3.2-1b", "tiny")
#: Each part's time limit in seconds (``--part-seconds`` changes them): the whole check
#: fits a 15-minute device budget with room for a second try.
PART_SECONDS = {"conformance": 180, "timing": 240}
NOTEBOOK_TWEETS = 20  # the notebook's way is timed on the first ones (it is slow)
BATCH = 16
#: The batch sizes tried, in order, for the largest that fits (zero-shot first token).
BATCHES = (16, 32, 64, 128, 256, 512, 1024)
WEIGHTS = ("bfloat16", "nf4")
LOADING = {
    "bfloat16": {"dtype": "bfloat16", "quantization": "none"},
    "nf4": {"dtype": "bfloat16", "quantization": "nf4"},
}
#: The speed-ups part 1 forces on one at a time (the others are CPU-only).
FORCED = ("prefix_reuse", "tree_labels")
STRATEGY_NAMES = (
    "zero_shot_first_token",
    "zero_shot_generate",
    "zero_shot_label_likelihood",
    "few_shot_first_token",
    "few_shot_generate",
    "few_shot_label_likelihood",
)


class PartTimeout(BaseException):
    """A part ran past its time limit. A BaseException, as KeyboardInterrupt is: the
    handlers that record a method's error (``Exception``) must not swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`PartTimeout` in the main thread after ``seconds`` (SIGALRM)."""

    def expired(signum, frame):
        raise PartTimeout(f"stopped after its limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------- models
def save_model(shape: str, tokenizer: Any, folder: Path) -> int:
    """The seeded random model of ``shape`` with the tokenizer, saved (float32); its
    number of parameters."""
    from emoprompt.bench.llama3 import LLAMA_3_2_1B, LLAMA_TINY, random_llama

    config = {**(LLAMA_3_2_1B if shape == "llama-3.2-1b" else LLAMA_TINY)}
    config["vocab_size"] = len(tokenizer)
    model = random_llama(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def load(folder: Path, weights: str, device: str):
    from emoprompt.models.loading import load_model

    return load_model({**LOADING[weights], "name": f"random {weights}"}, str(folder), device)


def peak_memory_mib(device: str) -> float:
    """Peak memory since the last reset: allocated on CUDA, the process's RSS on a CPU."""
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


# --------------------------------------------------------------------------- part 1
def conformance_part(
    rows: list, model: Any, twin: Any, tokenizer: Any, prompts: Path, weights: str
) -> None:
    """The matrix's methods through the engine (batch 16: the speed-ups granted here,
    then each of :data:`FORCED` on top) against the reference on ``twin``, a row each
    appended to ``rows`` as it is measured (a part stopped by its limit keeps them)."""
    from emoprompt.bench.conformance import compare, outputs, passes
    from emoprompt.inference.engine import Engine
    from emoprompt.inference.reference import ReferenceBackend

    reference = outputs(ReferenceBackend(twin, tokenizer, progress=False), tokenizer, prompts)
    granted = Engine(model, tokenizer, batch_size=BATCH, progress=False).capabilities.speedups
    for added in (None, *FORCED):
        if added in granted:
            continue
        speedups = "auto" if added is None else sorted(granted | {added})
        engine = Engine(model, tokenizer, batch_size=BATCH, speedups=speedups, progress=False)
        got = outputs(engine, tokenizer, prompts)
        for method, result in compare(got, reference).items():
            dtype = "bfloat16"  # NF4 computes in bfloat16: the bfloat16 pass mark
            row = {"weights": weights, "added": added, "method": method, "dtype": dtype,
                   "speedups": sorted(engine.capabilities.speedups),
                   "model_key": str(engine.capabilities.key), **result}  # fmt: skip
            row["passed"] = passes(row)
            rows.append(row)


def passed_speedups(rows: Sequence[dict[str, Any]], weights: str) -> list[str]:
    """The speed-ups part 1 proved for ``weights``: those granted here, where all their
    rows passed, and each forced one whose rows all passed."""
    mine = [r for r in rows if r["weights"] == weights]
    passed: set[str] = set()
    for added in (None, *FORCED):
        group = [r for r in mine if r["added"] == added]
        if group and all(r["passed"] for r in group):
            passed |= set(group[0]["speedups"])
    return sorted(passed)


# --------------------------------------------------------------------------- part 2
def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, run: Callable[[], Any]) -> tuple[Any, float, float]:
    """``run()``, its seconds and the peak memory it reached."""
    reset_peak(device)
    _sync(device)
    start = time.perf_counter()
    out = run()
    _sync(device)
    return out, time.perf_counter() - start, peak_memory_mib(device)


def notebook_way(
    model, tokenizer, prompt, tweets, max_new_tokens: int = 20, progress: bool = False
) -> list[str]:
    """The course notebook's loop: one text-generation pipeline call per tweet, greedy,
    chat messages in; the answers' texts (``make bench`` measures the same loop)."""
    from tqdm.auto import tqdm
    from transformers import pipeline

    from emoprompt.prompting.render import chat_messages

    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    texts = []
    for tweet in tqdm(tweets, desc="notebook's way", unit="tweet", disable=not progress):
        out = pipe(chat_messages(prompt, tweet, ()), max_new_tokens=max_new_tokens, do_sample=False)
        texts.append(out[0]["generated_text"][-1]["content"])
    return texts


def timing_part(
    rows, model, tokenizer, sample, train, prompts: Path, weights: str, device: str,
    speedups: list[str], notebook_tweets: int, batches: Sequence[int],
) -> None:  # fmt: skip
    """A row each, appended to ``rows`` as it is measured: the notebook's way, each
    strategy, few-shot first token without prefix reuse, and the batch sizes tried."""
    from emoprompt.evaluation.runner import run_llm_strategy
    from emoprompt.evaluation.strategies import STRATEGIES, Settings
    from emoprompt.inference.engine import Engine
    from emoprompt.prompting.prompt_file import load_prompt_file

    zero = load_prompt_file(prompts / "zero_shot.yaml", "zero_shot")
    few = load_prompt_file(prompts / "few_shot.yaml", "few_shot")
    settings = Settings()
    head = sample["tweet"].tolist()[:notebook_tweets]
    _, seconds, peak = timed(device, lambda: notebook_way(model, tokenizer, zero, head))
    notebook = len(head) / seconds
    rows.append({"weights": weights, "case": "notebook's way (zero-shot generation)",
                 "tweets": len(head), "tweets_per_s": notebook, "peak_mib": peak})  # fmt: skip

    def strategy(name: str, batch: int, used: list[str], label: str | None = None) -> None:
        engine = Engine(model, tokenizer, batch_size=batch, speedups=used, progress=False)
        prompt = few if name.startswith("few_shot") else zero
        run = lambda: run_llm_strategy(  # noqa: E731
            STRATEGIES[name], engine, tokenizer, prompt, train, sample, settings
        )
        _, seconds, peak = timed(device, run)
        rate = len(sample) / seconds
        rows.append({"weights": weights, "case": label or name, "batch": batch,
                     "speedups": sorted(engine.capabilities.speedups), "tweets": len(sample),
                     "tweets_per_s": rate, "vs_notebook": rate / notebook,
                     "peak_mib": peak})  # fmt: skip

    for name in STRATEGY_NAMES:
        strategy(name, BATCH, speedups)
    if "prefix_reuse" in speedups:
        without = [s for s in speedups if s != "prefix_reuse"]
        strategy("few_shot_first_token", BATCH, without, "few_shot_first_token, no prefix reuse")
    for batch in batches:  # the largest batch that fits
        try:
            strategy(
                "zero_shot_first_token", batch, speedups, f"zero_shot_first_token, batch {batch}"
            )
        except Exception as exc:  # torch.OutOfMemoryError and the like: the limit
            rows.append({"weights": weights, "case": f"batch {batch}", "error": repr(exc)[:200]})
            _free(device)
            break


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- run
def versions(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "device": device, "date": datetime.date.today().isoformat()}  # fmt: skip
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        info["gpu"] = None
        info["cpu"] = platform.processor() or platform.machine()
    return info


#: What the check imports beyond torch and transformers (bitsandbytes: for NF4 only).
NEEDS = ("numpy", "pandas", "pydantic", "yaml", "tqdm")


def missing_modules(names: Sequence[str] | None = None) -> list[str]:
    """The modules among ``names`` (default :data:`NEEDS`) this Python cannot import."""
    import importlib.util

    return [name for name in names or NEEDS if importlib.util.find_spec(name) is None]


def run(
    bundle_dir: Path,
    out: Path,
    *,
    device: str = "cuda",
    shape: str = "llama-3.2-1b",
    prompts: Path = Path("prompts"),
    tweets: int | None = None,
    notebook_tweets: int = NOTEBOOK_TWEETS,
    batches: Sequence[int] = BATCHES,
    part_seconds: dict[str, float] | None = None,
    weights: Sequence[str] = WEIGHTS,
) -> dict[str, Any]:
    """Run both parts in every weights and write ``gpu_check.json`` and ``.md``."""
    missing = missing_modules()
    if missing:  # before anything loads: say what the machine lacks
        raise SystemExit(
            f"the GPU check needs {', '.join(missing)} (pip install {' '.join(missing)}, "
            "or wheels for this Python carried in the bundle)"
        )
    from emoprompt.infra.files import atomic_open, write_json

    limits = {**PART_SECONDS, **(part_seconds or {})}
    tokenizer, sample, train = open_bundle(bundle_dir)
    if tweets:
        sample = sample.iloc[:tweets].reset_index(drop=True)
    report: dict[str, Any] = {"versions": versions(device), "shape": shape,
                              "tweets": len(sample), "limits_s": limits, "conformance": [],
                              "timing": [], "notes": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        report["parameters"] = save_model(shape, tokenizer, Path(folder))
        for kind in weights:
            _check_weights(
                report, Path(folder), kind, device, tokenizer, (sample, train), prompts, limits,
                notebook_tweets, batches,
            )  # fmt: skip
            _free(device)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gpu_check.json", report)
    with atomic_open(out / "gpu_check.md") as handle:
        handle.write(markdown(report))
    return report


def _check_weights(
    report, folder, kind, device, tokenizer, tweets, prompts, limits, notebook_tweets, batches
) -> None:
    """Both parts on the model loaded in ``kind`` weights (twice: the engine's and the
    reference's copies)."""
    try:
        model, twin = (load(folder, kind, device).model for _ in range(2))
    except Exception as exc:  # bitsandbytes missing, no CUDA...: said, not hidden
        report["notes"].append(f"{kind}: could not load ({exc!r})"[:300])
        return
    _part(report, "conformance", kind, limits["conformance"],
          functools.partial(conformance_part, report["conformance"], model, twin, tokenizer,
                            prompts, kind))  # fmt: skip
    del twin
    _free(device)
    used = passed_speedups(report["conformance"], kind)
    _part(report, "timing", kind, limits["timing"], functools.partial(
        timing_part, report["timing"], model, tokenizer, *tweets, prompts, kind, device, used,
        notebook_tweets, batches))  # fmt: skip


def _part(report: dict, name: str, kind: str, seconds: float, work: Callable[[], None]) -> None:
    """``work()`` (which appends its rows to ``report[name]``) under its time limit; a
    stop is noted, the rows measured until then stay."""
    start = time.perf_counter()
    try:
        with time_limit(seconds):
            work()
    except PartTimeout as exc:
        report["notes"].append(f"{kind} {name}: {exc}")
    log.info("%s %s done in %.0f s", kind, name, time.perf_counter() - start)


# --------------------------------------------------------------------------- report
def markdown(report: dict[str, Any]) -> str:
    v = report["versions"]
    where = v.get("gpu") or f"CPU ({v.get('cpu')})"
    lines = [
        f"# GPU check: {report['shape']} (random weights) on {where}",
        "",
        f"{v['date']}; torch {v['torch']}, transformers {v['transformers']}, CUDA "
        f"{v['cuda']}, bitsandbytes {v['bitsandbytes']}; {report.get('parameters', 0):,} "
        f"parameters; {report['tweets']} test tweets.",
        "",
        "## Conformance: the engine against the plain reference on the same model",
        "",
        "| weights | speed-ups | method | max prob. diff | same label | same text | passed |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in report["conformance"]:
        what = ", ".join(r["speedups"]) or "none (safe path)"
        if r.get("added"):
            what += f" ({r['added']} forced)"
        if "error" in r:
            cells = f"fails: {r['error'][:80]} | | "
        elif r["method"] == "greedy":
            cells = f" | | {r['same_text']}/{r['prompts']}"
        else:
            cells = f"{r['max_prob_diff']:.1e} | {r['same_label']}/{r['prompts']} | "
        lines.append(f"| {r['weights']} | {what} | {r['method']} | {cells} | "
                     f"{'yes' if r['passed'] else '**no**'} |")  # fmt: skip
    lines += [
        "",
        "## Speed: every strategy against the notebook's way on the same device",
        "",
        "| weights | case | batch | speed-ups | tweets/s | vs notebook | peak memory (MiB) |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in report["timing"]:
        if "error" in r:
            lines.append(f"| {r['weights']} | {r['case']}: does not fit ({r['error'][:60]}) "
                         "| | | | | |")  # fmt: skip
            continue
        ratio = f"{r['vs_notebook']:.1f}x" if "vs_notebook" in r else "1.0x"
        lines.append(
            f"| {r['weights']} | {r['case']} | {r.get('batch', 1)} | "
            f"{', '.join(r.get('speedups', [])) or 'none'} | {r['tweets_per_s']:.2f} | "
            f"{ratio} | {r['peak_mib']:,.0f} |"
        )
    if report["notes"]:
        lines += ["", "## Notes", "", *[f"- {note}" for note in report["notes"]]]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("bundle", help="write what the GPU machine needs")
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--splits", type=Path, default=Path("data/processed"))
    make.add_argument("--tweets", type=int, default=TWEETS)
    make.add_argument("--shots", type=int, default=SHOT_POOL)
    make.add_argument("--no-wheels", action="store_true")
    check = sub.add_parser("run", help="run the check and write its JSON and table")
    check.add_argument("--bundle", type=Path, required=True)
    check.add_argument("--out", type=Path, required=True)
    check.add_argument("--device", default="cuda")
    check.add_argument("--shape", choices=SHAPES, default="llama-3.2-1b")
    check.add_argument("--prompts", type=Path, default=Path("prompts"))
    check.add_argument("--tweets", type=int)
    check.add_argument("--notebook-tweets", type=int, default=NOTEBOOK_TWEETS)
    check.add_argument("--batches", type=int, nargs="*", default=list(BATCHES))
    check.add_argument("--weights", nargs="*", choices=WEIGHTS, default=list(WEIGHTS))
    check.add_argument("--part-seconds", type=json.loads, default={}, help='e.g. {"timing": 300}')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "bundle":
        bundle(args.out, args.splits, args.tweets, args.shots, wheels=not args.no_wheels)
        return 0
    report = run(
        args.bundle, args.out, device=args.device, shape=args.shape, prompts=args.prompts,
        tweets=args.tweets, notebook_tweets=args.notebook_tweets, batches=args.batches,
        part_seconds=args.part_seconds, weights=args.weights,
    )  # fmt: skip
    failed = [r for r in report["conformance"] if not r["passed"] and r["added"] is None]
    print((args.out / "gpu_check.md").read_text(encoding="utf-8"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
