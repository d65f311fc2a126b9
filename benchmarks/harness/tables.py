"""The benchmark's written result: ratios, the goals, and the tables of BENCHMARKS.md."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.measure import BENCH_SEED, GAUGE_SHAPE, NOTEBOOK, SERVES, WARMUP_TWEETS

from emoprompt.inference.capabilities import SPEEDUPS
from emoprompt.infra.files import atomic_open, write_json

#: A speed-up stays where it makes its strategy at least this much faster.
PAYS = 1.10


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill ``ratio_vs_notebook`` from the notebook row's tweets/s (None without one)."""
    base = next((r["tweets_per_s"] for r in rows if r["method"] == NOTEBOOK), None)
    for r in rows:
        r["ratio_vs_notebook"] = round(r["tweets_per_s"] / base, 2) if base else None
    return rows


def _find(
    rows, method, shots=None, batch_size=None, prefix_cache=True, *, backend="engine", **fields
):
    """The first row of that method, shots, batch size and cache, on ``backend``, without
    a speed-up turned off, in the catalogue's dtype and of the run's model unless
    ``fields`` say otherwise."""
    fields = {"without": None, "load_dtype": None, "model_name": None, **fields}
    for r in rows:
        if (
            r["method"] == method
            and (shots is None or r["shots"] == shots)
            and (batch_size is None or r["batch_size"] == batch_size)
            and r["prefix_cache"] == prefix_cache
            and (r.get("backend", "engine") == backend or method == NOTEBOOK)
            and all(r.get(k) == v for k, v in fields.items())
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
    checked = [
        r for r in rows if r.get("same_predictions") is not None and r.get("expects_equal", True)
    ]
    if checked:
        same = sum(bool(r["same_predictions"]) for r in checked)
        out.append(
            (
                "predictions equal the plain reference backend's (float32 cases)",
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
        "same predictions as the plain reference backend |",
        "|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {_name(r)} | {r['shots']} | {r['batch_size']} | "
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
        "| shots | prompt tokens fed (mean per tweet) | tweets/s, engine | tweets/s, reference "
        "| share of the zero-shot rate |",
        "|---:|---:|---:|---:|---:|",
    ]
    for k in shots:
        method = "zero_shot_first_token" if k == 0 else "few_shot_first_token"
        fast = _find(rows, method, k, batch)
        slow = _find(rows, method, k, 1, prefix_cache=False, backend="reference")
        if not fast:
            continue
        fed = slow["tokens_in"] / slow["tweets"] if slow and slow.get("tokens_in") else None
        share = fast["tweets_per_s"] / zero["tweets_per_s"] if zero else None
        scaling.append(
            f"| {k} | {_cell(fed, '{:.0f}')} | {fast['tweets_per_s']:.2f} | "
            f"{_cell(slow and slow['tweets_per_s'], '{:.2f}')} | {_cell(share, '{:.2f}')} |"
        )

    goals = ["| goal | measured | met |", "|---|---:|---|"]
    for label, value, ok in targets(rows, batch):
        goals.append(f"| {label} | {value} | {'yes' if ok else '**no**'} |")

    return "\n\n".join(
        [
            "### All measurements\n\n" + table,
            "### Goals\n\n" + "\n".join(goals),
            "### What each speed-up buys\n\n" + "\n".join(speedup_table(rows, batch)),
            "### dtype\n\n" + "\n".join(dtype_table(rows, batch)),
            "### Prefix reuse under a sliding window\n\n" + "\n".join(window_table(rows)),
            "### vLLM\n\n" + "\n".join(vllm_table(rows)),
            "### Cost against the number of shots (first token, batch "
            f"{batch})\n\n" + "\n".join(scaling),
        ]
    )


def _name(r: Mapping[str, Any]) -> str:
    name = r["method"]
    if r.get("backend") == "reference":
        name += " (reference backend)"
    if r.get("backend") == "vllm":
        name += " (vLLM server)"
    if r.get("without"):
        name += f", without {r['without']}"
    if r.get("load_dtype"):
        name += f", {r['load_dtype']}"
    if r.get("model_name"):
        name += f", {r['model_name']}"
    return name


def speedup_gains(rows: Sequence[Mapping[str, Any]], batch: int) -> list[dict[str, Any]]:
    """Per speed-up: its strategy's tweets/s with and without it, and whether it pays."""
    out = []
    for name in SPEEDUPS:
        method, shots = SERVES[name]
        with_it = _find(rows, method, shots, batch)
        if name == "prefix_reuse":
            without = _find(rows, method, shots, batch, prefix_cache=False)
        else:
            without = _find(rows, method, shots, batch, without=name)
        if not (with_it and without):
            continue
        gain = with_it["tweets_per_s"] / without["tweets_per_s"]
        out.append(
            {
                "speedup": name,
                "strategy": f"{method}, {shots} shots",
                "with": with_it["tweets_per_s"],
                "without": without["tweets_per_s"],
                "gain": gain,
                "pays": gain >= PAYS,
                "used": name in (with_it.get("speedups") or []),
            }
        )
    return out


def speedup_table(rows: Sequence[Mapping[str, Any]], batch: int) -> list[str]:
    lines = [
        "| speed-up | measured on | tweets/s with | without | with / without | "
        f"pays ({PAYS - 1:.0%} or more) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for g in speedup_gains(rows, batch):
        used = "" if g["used"] else " (not in use for this model)"
        lines.append(
            f"| {g['speedup']}{used} | {g['strategy']} | {g['with']:.2f} | {g['without']:.2f} | "
            f"{g['gain']:.2f}x | {'yes' if g['pays'] else '**no**'} |"
        )
    return lines


def dtype_table(rows: Sequence[Mapping[str, Any]], batch: int) -> list[str]:
    """Per method measured in other weights: the catalogue's dtype, then each other one
    (4-bit NF4 with bfloat16 compute included), with speed, peak memory and agreement."""
    lines = [
        "| method | weights | tweets/s | vs the catalogue's dtype | peak RSS (MiB) | "
        "same predictions as the float32 reference |",
        "|---|---|---:|---:|---:|---|",
    ]
    shown = set()
    others = [
        r
        for r in rows
        if r.get("load_dtype") and r.get("backend") == "engine" and not r.get("model_name")
    ]
    methods = list(dict.fromkeys(r["method"] for r in others))
    for r in sorted(others, key=lambda r: methods.index(r["method"])):
        base = _find(rows, r["method"], r["shots"], batch)
        if base and r["method"] not in shown:
            shown.add(r["method"])
            lines.append(
                f"| {r['method']} | {base.get('dtype')} (the catalogue's) | "
                f"{base['tweets_per_s']:.2f} | 1.00x | {base['peak_rss_mib']:,.0f} | "
                f"{_agreement(base)} |"
            )
        ratio = f"{r['tweets_per_s'] / base['tweets_per_s']:.2f}x" if base else ""
        weights = WEIGHTS.get(r["load_dtype"], r["load_dtype"])
        lines.append(
            f"| {r['method']} | {weights} | {r['tweets_per_s']:.2f} | {ratio} | "
            f"{r['peak_rss_mib']:,.0f} | {_agreement(r)} |"
        )
    return lines


#: How the dtype table names a case's weights.
WEIGHTS = {"nf4": "NF4 (bfloat16 compute)"}


def window_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """A sliding-window model's zero-shot first token with and without prefix reuse (the
    rows that fit its window reuse the prefix), each against its reference backend."""
    found = [
        (r, _find(rows, r["method"], r["shots"], r["batch_size"], False, model_name=name))
        for r in rows
        if (name := r.get("model_name")) and r.get("backend") == "engine" and r["prefix_cache"]
    ]
    if not found:
        return ["No sliding-window model in this run (`make gemma-setup` installs Gemma 3)."]
    lines = [
        "| model | method | tweets/s, prefix reuse | tweets/s, whole prompts | speed-up | "
        "same predictions as the reference (reuse / whole) | largest probability difference |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for r, whole in found:
        gain = f"{r['tweets_per_s'] / whole['tweets_per_s']:.2f}x" if whole else ""
        diff = r.get("max_abs_prob_diff")
        lines.append(
            f"| {r['model_name']} | {r['method']} | {r['tweets_per_s']:.2f} | "
            f"{_cell(whole and whole['tweets_per_s'], '{:.2f}')} | {gain} | "
            f"{_agreement(r)} / {_agreement(whole) if whole else ''} | "
            f"{_cell(diff, '{:.1e}')} |"
        )
    return lines


def vllm_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The vLLM server beside the engine on the same method, shots and dtype, with its
    agreement with the plain reference (float32) backend."""
    served = [r for r in rows if r.get("backend") == "vllm"]
    if not served:
        return ["No vLLM measurement in this run (`make vllm-setup` installs vLLM)."]
    lines = [
        "| method | shots | dtype | tweets/s, vLLM | tweets/s, engine | vLLM / engine | "
        "vs notebook | same label as the reference | largest probability difference "
        "/ same text |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in served:
        dtype = r.get("load_dtype")
        engine = _find(rows, r["method"], r["shots"], r["batch_size"], load_dtype=dtype)
        ratio = f"{r['tweets_per_s'] / engine['tweets_per_s']:.2f}x" if engine else ""
        if "max_abs_prob_diff" in r:
            diff = r["max_abs_prob_diff"]
            detail = f"{diff:.1e}" if diff < 1e-3 else f"{diff:.4f}"
        else:
            detail = _cell(r.get("same_text"), "{} of " + str(r["tweets"]) + " texts")
        agree = _cell(r.get("agreeing"), "{} of " + str(r["tweets"]))
        lines.append(
            f"| {r['method']} | {r['shots']} | {r.get('dtype')} | {r['tweets_per_s']:.2f} | "
            f"{_cell(engine and engine['tweets_per_s'], '{:.2f}')} | {ratio} | "
            f"{_cell(r.get('ratio_vs_notebook'), '{:.1f}x')} | {agree} | {detail} |"
        )
    return lines


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


def replace_block(text: str, block: str, markers: tuple[str, str] = MARKERS) -> str:
    """``text`` with what lies between the ``markers`` replaced by ``block`` (the markers
    are appended when missing); everything outside them is kept."""
    start, end = markers
    if start not in text or end not in text:
        text = f"{text.rstrip()}\n\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{block}\n{end}{rest.split(end, 1)[1]}"


def job_arguments(parser, root, name: str) -> None:
    """The options of a benchmark that times the workflow's jobs (fine-tuning, prompt
    families): the model, where the workflow ran, where results go, the threads."""
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--workdir", type=Path, default=root, help="where the workflow ran")
    parser.add_argument("--out", type=Path, default=root / "results" / "bench" / name)
    parser.add_argument("--doc", type=Path, default=root / "BENCHMARKS.md")
    parser.add_argument("--threads", type=int, default=2)


def publish(result: Mapping[str, Any], text: str, json_path: Path, doc: Path, markers) -> None:
    """The result as JSON, and its table between ``markers`` of BENCHMARKS.md."""
    write_json(json_path, result)
    old = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    with atomic_open(doc) as handle:
        handle.write(replace_block(old, text, markers))
    print(text)


# ---------------------------------------------------------------------- running cases
