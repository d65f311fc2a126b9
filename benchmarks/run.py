"""Run every inference benchmark case, each in its own process, and write the summary.

    python benchmarks/run.py            # what `make bench` runs

Cases run one after another (references first) through ``benchmarks/inference.py``;
each one's log goes to ``results/bench/logs/``. The rows, with their ratio to the
notebook's way, go to ``results/bench/inference.json`` and the tables to the block
between the markers of ``BENCHMARKS.md`` (the text around it is kept). Arguments after
``--`` go to every ``inference.py`` call (e.g. ``-- --threads 1``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

from harness.measure import case_args, default_plan, machine_info
from harness.tables import add_ratios, describe_run, render_markdown, replace_block

from emoprompt.bench.conformance import nf4_available
from emoprompt.inference.serve import VllmServer, find_vllm, vllm_command, vllm_environment
from emoprompt.infra.files import atomic_open, write_json

ROOT = Path(__file__).resolve().parents[1]
#: The sliding-window model whose prefix reuse ``make bench`` measures (where converted).
WINDOW_MODEL = "gemma-3-270m"


def write_report(rows: list[dict], args: argparse.Namespace) -> None:
    info = {**machine_info(), "batch_size": args.batch_size}
    day = rows[0].get("date") if rows else None
    header = describe_run(rows, info, day or datetime.date.today().isoformat())
    doc = Path(args.doc)
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    with atomic_open(doc) as handle:
        handle.write(replace_block(text, f"{header}\n\n{render_markdown(rows, info)}"))


class Servers:
    """One ``vllm serve`` of the model at a time, in the dtype the vLLM cases ask for."""

    def __init__(self, vllm, folder, name, port, logs) -> None:
        self.vllm, self.folder, self.name, self.port, self.logs = vllm, folder, name, port, logs
        self.server: VllmServer | None = None
        self.dtype: str | None = None

    def running(self, dtype: str) -> str:
        if self.server is None or self.dtype != dtype:
            self.stop()
            command = vllm_command(
                self.vllm,
                str(self.folder),
                served_model_name=self.name,
                port=self.port,
                dtype=dtype,
                max_model_len=4096,
                extra=["--enforce-eager"],
            )
            env = {**vllm_environment(), "VLLM_SERVER_DEV_MODE": "1"}  # /reset_prefix_cache
            log = self.logs / f"vllm-serve-{dtype}.log"
            self.server = VllmServer(command, base_url=self._url(), log_path=log, env=env)
            self.server.start()
            self.dtype = dtype
            print(f"    vllm serve ({dtype}) ready in {self.server.seconds_to_ready:.0f} s")
        return self._url()

    def _url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of the fast paths")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench"))
    parser.add_argument("--doc", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--only", nargs="*", help="run only these methods")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="catalogue entry")
    parser.add_argument("--vllm-port", type=int, default=8765)
    parser.add_argument(
        "--backends", nargs="*", help="run only these backends' cases (engine, reference, vllm)"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: rewrite BENCHMARKS.md's tables from results/bench/inference.json",
    )
    parser.add_argument("rest", nargs="*", help="passed to inference.py (after --)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    if args.report_only:
        write_report(json.loads((out / "inference.json").read_text()), args)
        return 0
    cases_dir, logs = out / "cases", out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for old in cases_dir.glob("*.json"):  # a run compares only with its own references
        old.unlink()
    vllm = find_vllm(ROOT / ".venv-vllm")
    if vllm is None:
        print("vLLM is not installed (make vllm-setup): its cases are left out", flush=True)
    nf4 = nf4_available()
    if not nf4:
        print("bitsandbytes cannot run NF4 here: its cases are left out", flush=True)
    window_model = None
    if (ROOT / "data" / "models" / WINDOW_MODEL).is_dir():
        window_model = WINDOW_MODEL
    else:
        print(f"{WINDOW_MODEL} is not converted (make gemma-setup): its cases are left out")
    plan = [
        c
        for c in default_plan(
            args.batch_size, vllm=vllm is not None, nf4=nf4, window_model=window_model
        )
        if (not args.only or c.method in args.only)
        and (not args.backends or c.backend in args.backends)
    ]
    rows, failed = [], []
    servers = Servers(vllm, ROOT / "data" / "models" / args.model, args.model, args.vllm_port, logs)
    for number, case in enumerate(plan, 1):
        print(f"[{number}/{len(plan)}] {case.key}", flush=True)
        start = time.perf_counter()
        command = [sys.executable, str(ROOT / "benchmarks" / "inference.py"), "--out",
                   str(cases_dir), *args.rest, *case_args(case)]  # fmt: skip
        if case.backend == "vllm":
            command += ["--server", servers.running(case.load_dtype or "float32")]
        else:
            servers.stop()  # nothing else runs beside a case
        with open(logs / f"{case.key}.log", "w") as log:
            done = subprocess.run(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if done.returncode:
            failed.append(case.key)
            print(f"    failed (exit {done.returncode}): see {logs / f'{case.key}.log'}")
            continue
        row = json.loads((cases_dir / f"{case.key}.json").read_text())
        rows.append(row)
        print(
            f"    {row['tweets_per_s']:.2f} tweets/s, peak {row['peak_rss_mib']:.0f} MiB, "
            f"same predictions: {row['same_predictions']} ({time.perf_counter() - start:.0f} s; "
            "machine {:.0f} then {:.0f} GFLOP/s)".format(*row["matmul_gflops"]),
            flush=True,
        )
    servers.stop()
    add_ratios(rows)
    write_json(out / "inference.json", rows)

    write_report(rows, args)
    print(f"wrote {out / 'inference.json'} and {args.doc}")
    if failed:
        print("failed cases: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
