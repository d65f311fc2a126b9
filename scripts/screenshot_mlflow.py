"""Screenshot the MLflow UI comparing the study's runs side by side (for the README).

Not part of the tests: it needs Debian's ``chromium`` package and a finished run of the
workflow. It starts ``mlflow server`` on 127.0.0.1 against the project's database, asks
its REST API for the experiment's runs, opens the compare-runs page in headless
Chromium and saves a PNG.

    .venv/bin/python scripts/screenshot_mlflow.py --out docs/images/mlflow_compare.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api(base: str, path: str, payload: dict | None = None) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(
        base + path, data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def wait_ready(base: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"mlflow server at {base} did not answer within {timeout:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default=str(REPO / "results" / "mlflow.db"))
    parser.add_argument("--experiment", default="emoprompt")
    parser.add_argument("--out", default=str(REPO / "docs" / "images" / "mlflow_compare.png"))
    parser.add_argument("--size", default="1600,1000", help="window width,height")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium not found: apt-get install chromium")
    if not Path(args.db).is_file():
        sys.exit(f"{args.db} not found: run the workflow first")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{args.db}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_ready(base)
        experiment = api(
            base,
            "/api/2.0/mlflow/experiments/get-by-name?"
            + urllib.parse.urlencode({"experiment_name": args.experiment}),
        )["experiment"]
        runs = api(
            base,
            "/api/2.0/mlflow/runs/search",
            {"experiment_ids": [experiment["experiment_id"]], "max_results": 50},
        ).get("runs", [])
        run_ids = [run["info"]["run_id"] for run in runs]
        if not run_ids:
            sys.exit(f"experiment {args.experiment} has no runs")
        query = urllib.parse.urlencode(
            {
                "runs": json.dumps(run_ids, separators=(",", ":")),
                "experiments": json.dumps([experiment["experiment_id"]], separators=(",", ":")),
            }
        )
        url = f"{base}/#/compare-runs?{query}"
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run(
                [
                    chromium,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--hide-scrollbars",
                    f"--user-data-dir={profile}",
                    f"--window-size={args.size}",
                    "--virtual-time-budget=20000",
                    f"--screenshot={args.out}",
                    url,
                ],
                check=True,
                timeout=180,
                capture_output=True,
            )
        print(f"{len(run_ids)} runs compared: {args.out}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
