"""Fine-tuning speed: the default adapter trained with and without its speed-up.

    python benchmarks/finetune.py          # what `make bench-finetune` runs

Trains the adapter of config.yaml's ``finetune`` settings for the embedded model twice,
each in its own process (``python -m emoprompt.training.job``), first with
``frozen_states: off`` (every step runs the whole model: the plain reference), then
with ``frozen_states: auto`` (the frozen bottom layers computed once). Both are scored
on the validation split as the workflow scores them. Needs the prepared splits and the
converted model (``make bench-finetune`` makes them). Writes
``results/bench/finetune.json`` and the table between the fine-tuning markers of
``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from harness.measure import machine_info
from harness.tables import job_arguments, publish

from emoprompt.plan import Study

ROOT = Path(__file__).resolve().parents[1]
MARKERS = ("<!-- bench-finetune:start -->", "<!-- bench-finetune:end -->")
MODES = ("off", "auto")  # the plain reference first


def job_file(args: argparse.Namespace, mode: str, out: Path) -> Path:
    study = Study.from_files(ROOT)
    location = str(args.workdir / "data" / "models" / args.model)
    entry = {**study.entry(args.model), "location": location}
    processed = args.workdir / "data" / "processed"
    job = {
        "model_name": args.model,
        "entry": entry,
        "train_path": str(processed / "train.tsv"),
        "held_out_paths": [str(processed / "validation.tsv"), str(processed / "test.tsv")],
        "validation_path": str(processed / "validation.tsv"),
        "finetuned_prompt_path": str(ROOT / "prompts" / "finetuned.yaml"),
        "zero_shot_prompt_path": str(ROOT / "prompts" / "zero_shot.yaml"),
        "settings": {**study.config["finetune"], "frozen_states": mode},
        "out_dir": str(out / f"adapter-{mode}"),
        "threads": args.threads,
    }
    for path in (location, job["train_path"], *job["held_out_paths"]):
        if not Path(path).exists():
            raise SystemExit(f"{path} is missing: `make bench-finetune` prepares it")
    path = out / f"job-{mode}.json"
    path.write_text(json.dumps(job), encoding="utf-8")
    return path


def measure(args: argparse.Namespace) -> dict:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for mode in MODES:
        adapter = out / f"adapter-{mode}"
        shutil.rmtree(adapter, ignore_errors=True)  # trained afresh, never resumed
        shutil.rmtree(f"{adapter}.checkpoints", ignore_errors=True)
        job = job_file(args, mode, out)
        log = out / f"finetune-{mode}.log"
        print(f"training with frozen_states: {mode} (log: {log})", flush=True)
        subprocess.run(
            [sys.executable, "-m", "emoprompt.training.job", str(job), "--log", str(log)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        record = json.loads((adapter / "training_config.json").read_text(encoding="utf-8"))
        rows[mode] = record
    predictions = {
        mode: pd.read_csv(out / f"adapter-{mode}" / "validation_predictions.tsv", sep="\t")
        for mode in MODES
    }
    same = (predictions["off"]["predicted"] == predictions["auto"]["predicted"]).mean()
    losses = {
        mode: pd.read_csv(out / f"adapter-{mode}" / "loss.tsv", sep="\t")["loss"].to_numpy()
        for mode in MODES
    }
    return {
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "model": args.model,
        "runs": {
            mode: {
                "frozen_states": record["frozen_states"],
                "steps": record["steps"],
                "train_tweets": record["train_tweets"],
                "autocast": record["autocast"],
                "training_seconds": record["seconds"],
                "frozen_seconds": record["frozen_states"].get("seconds", 0.0),
                "final_loss": record["final_loss"],
                "validation": record["validation"],
            }
            for mode, record in rows.items()
        },
        "validation_labels_same": float(same),
        "largest_loss_difference": float(np.abs(losses["off"] - losses["auto"]).max()),
    }


def render(result: dict) -> str:
    machine, runs = result["machine"], result["runs"]
    plain, fast = runs["off"], runs["auto"]
    lines = [
        f"Measured on {result['date']}: {machine['cpu']}, {machine['cores']} cores, "
        f"torch {machine['torch']}, transformers {machine['transformers']}; "
        f"{result['model']} (dequantised from Q4_1 to float32), the default `finetune:` "
        f"settings ({plain['train_tweets']:,} tweets, {plain['steps']} steps, "
        f"autocast {plain['autocast']}), `python benchmarks/finetune.py`.",
        "",
        "| frozen_states | frozen layers computed once | training (s) | of which the "
        "frozen layers (s) | ratio | final loss | validation macro F1 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, run in (("off", plain), ("auto", fast)):
        total = run["training_seconds"] + run["frozen_seconds"]
        ratio = (plain["training_seconds"] + plain["frozen_seconds"]) / total
        f1 = run["validation"]["f1_macro"]
        lines.append(
            f"| {mode} | {run['frozen_states']['layers']} | {total:.1f} | "
            f"{run['frozen_seconds']:.1f} | {ratio:.2f}x | {run['final_loss']:.4f} | "
            f"{f1['value']:.3f} [{f1['low']:.3f}, {f1['high']:.3f}] |"
        )
    lines += [
        "",
        f"Validation labels the same for {result['validation_labels_same']:.1%} of the "
        f"tweets; largest difference of a step's loss {result['largest_loss_difference']:.2e}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    job_arguments(parser, ROOT, "finetune")
    args = parser.parse_args(argv)
    result = measure(args)
    publish(result, render(result), args.out / "finetune.json", args.doc, MARKERS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
