"""What a prompt family costs against one prompt.

    python benchmarks/family.py          # what `make bench-family` runs

For each first-token strategy of the default families, three jobs, each in its own
process, timed from start to files written (the model's load included): the prompt
file's own prompt on the evaluation sample (the single-prompt ``predict`` job), the
default family (every variant scored on the validation sample and the evaluation
sample: the ``predict_family`` job), and the same family with prefix reuse off (each
prompt fed whole). Needs the prepared splits, the two samples and the converted model
(``make bench-family`` makes them). Writes ``results/bench/family/family.json`` and the
table between the family markers of ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

from harness.measure import machine_info
from harness.tables import job_arguments, publish

from emoprompt.plan import Study

ROOT = Path(__file__).resolve().parents[1]
MARKERS = ("<!-- bench-family:start -->", "<!-- bench-family:end -->")
STRATEGIES = ("zero_shot_first_token", "few_shot_first_token")
CASES = ("one prompt", "family", "family, no prefix reuse")


def job(args: argparse.Namespace, strategy: str, case: str, out: Path) -> dict:
    """The keyword arguments of the job a case runs."""
    study = Study.from_files(ROOT)
    entry = {**study.entry(args.model), "location": str(args.workdir / "data/models" / args.model)}
    processed = args.workdir / "data" / "processed"
    settings = study.family_settings(args.model, strategy)
    if case.endswith("no prefix reuse"):
        settings["engine"] = {**settings["engine"], "disable": ["prefix_reuse"]}
    common = {
        "model_name": args.model,
        "entry": entry,
        "strategy_name": strategy,
        "prompt_path": str(ROOT / study.predict_inputs(args.model, strategy)["prompt"]),
        "train_path": str(processed / "train.tsv"),
        "sample_path": str(processed / "test_sample.tsv"),
        "settings": settings,
        "job_threads": args.threads,
    }
    name = f"{strategy}-{case.replace(' ', '_').replace(',', '')}"
    if case == "one prompt":
        return {
            **common,
            "tsv_out": str(out / f"{name}.tsv"),
            "json_out": str(out / f"{name}.json"),
        }
    return {
        **common,
        "validation_path": str(processed / "validation_sample.tsv"),
        "validation_out": str(out / f"{name}-validation.tsv"),
        "test_out": str(out / f"{name}-test.tsv"),
        "json_out": str(out / f"{name}.json"),
    }


def run_case(path: str) -> None:
    """In a process of its own: one job, timed, its seconds written beside its record."""
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    start = time.perf_counter()
    if spec["case"] == "one prompt":
        from emoprompt.evaluation.job import run_prediction

        result = run_prediction(**spec["job"])
        prompts, tweets = 1, len(result.predictions)
    else:
        from emoprompt.evaluation.family import run_family

        record = run_family(**spec["job"])
        # each prompt text scores both samples (and the content-free stand-ins)
        prompts, tweets = record["family"]["prompts"], record["variants"][0]["run"]["tweets"]
    seconds = time.perf_counter() - start
    variants = 1 if spec["case"] == "one prompt" else record["family"]["size"]
    Path(spec["result"]).write_text(
        json.dumps(
            {"seconds": seconds, "prompts": prompts, "variants": variants, "tweets": tweets}
        ),
        encoding="utf-8",
    )


def measure(args: argparse.Namespace) -> dict:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for strategy in STRATEGIES:
        for case in CASES:
            spec_path, result_path = out / "case.json", out / "result.json"
            spec = {"case": case, "job": job(args, strategy, case, out), "result": str(result_path)}
            spec_path.write_text(json.dumps(spec), encoding="utf-8")
            print(f"{strategy}: {case}", flush=True)
            subprocess.run(
                [sys.executable, __file__, "--case", str(spec_path)],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            rows.append({"strategy": strategy, "case": case,
                         **json.loads(result_path.read_text(encoding="utf-8"))})  # fmt: skip
    return {"date": datetime.date.today().isoformat(), "machine": machine_info(),
            "model": args.model, "rows": rows}  # fmt: skip


def render(result: dict) -> str:
    machine = result["machine"]
    lines = [
        f"Measured on {result['date']}: {machine['cpu']}, {machine['cores']} cores, "
        f"torch {machine['torch']}, transformers {machine['transformers']}; "
        f"{result['model']} (dequantised from Q4_1 to float32), the default family "
        "(4 instructions x 2 verbalizers, each with 3 calibrations), the workflow's "
        f"samples ({result['rows'][0]['tweets']} test tweets; a family scores the "
        "validation sample and 3 content-free inputs too), `python benchmarks/family.py`. "
        "Each job in its own process, timed from its start to its files written (the "
        "model's load included).",
        "",
        "| strategy | job | prompt texts | variants | tweets scored | seconds | "
        "against one prompt | seconds per prompt text |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for strategy in STRATEGIES:
        rows = [r for r in result["rows"] if r["strategy"] == strategy]
        single = rows[0]["seconds"]
        for row in rows:
            scored = row["prompts"] * row["tweets"]
            lines.append(
                f"| {strategy} | {row['case']} | {row['prompts']} | {row['variants']} | "
                f"{scored:,} | {row['seconds']:.1f} | {row['seconds'] / single:.2f}x | "
                f"{row['seconds'] / row['prompts']:.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    job_arguments(parser, ROOT, "family")
    args = parser.parse_args(argv)
    if args.case:
        run_case(args.case)
        return 0
    result = measure(args)
    publish(result, render(result), args.out / "family.json", args.doc, MARKERS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
