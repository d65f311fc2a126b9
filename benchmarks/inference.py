"""Measure one inference case: one process, one method, the benchmark's 100 tweets.

    python benchmarks/inference.py --method zero_shot_first_token --shots 0 --batch-size 16

Writes ``<out>/<case>.json`` (the measurement) and ``<case>.predictions.json``; when the
case's reference (the plain reference backend on the same method and shots) has been
measured into the same folder, the row says whether the predictions agree with it.
``benchmarks/run.py`` (``make bench``) runs every case this way and writes the summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml
from harness.measure import BACKENDS, BENCH_TWEETS, METHODS, Case, run_case

from emoprompt.evaluation.job import settings_from_config
from emoprompt.inference.capabilities import SPEEDUPS

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-prefix-cache", action="store_true")
    parser.add_argument("--backend", default="engine", choices=BACKENDS)
    parser.add_argument("--server", help="vllm cases: the API address of the vllm serve")
    parser.add_argument("--without", choices=SPEEDUPS, help="a speed-up the engine does without")
    parser.add_argument("--dtype", help="load the model in this dtype (default: the catalogue's)")
    parser.add_argument("--tweets", type=int, default=BENCH_TWEETS)
    parser.add_argument("--repeats", type=int, help="timed passes (default: 3 fast, 1 slow)")
    parser.add_argument("--threads", default="auto", help='torch threads ("auto": every core)')
    parser.add_argument("--config", default=str(ROOT / "config.yaml"))
    parser.add_argument("--model", default="smollm2-135m-instruct", help="catalogue entry")
    parser.add_argument(
        "--model-name", help="a case of another catalogue entry than the run's (--model)"
    )
    parser.add_argument("--model-dir", help="its converted folder (default data/models/<model>)")
    parser.add_argument("--data-dir", default=str(ROOT / "data" / "processed"))
    parser.add_argument("--prompts", default=str(ROOT / "prompts"))
    parser.add_argument("--out", default=str(ROOT / "results" / "bench" / "cases"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    config = yaml.safe_load(Path(args.config).read_text())
    model = args.model_name or args.model
    entry = {**config["model_catalogue"][model], "name": model}
    case = Case(
        args.method,
        args.shots,
        args.batch_size,
        not args.no_prefix_cache,
        backend=args.backend,
        without=args.without,
        load_dtype=args.dtype,
        model_name=args.model_name,
    )
    row = run_case(
        case,
        entry=entry,
        model_dir=args.model_dir or ROOT / "data" / "models" / model,
        data_dir=args.data_dir,
        prompt_dir=args.prompts,
        out_dir=args.out,
        tweets=args.tweets,
        threads=args.threads,
        settings=settings_from_config(config),
        repeats=args.repeats,
        server=args.server,
    )
    print(json.dumps(row, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
