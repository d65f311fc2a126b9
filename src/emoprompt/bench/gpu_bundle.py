"""What the GPU check (:mod:`emoprompt.bench.gpu_check`) carries to a GPU machine without
internet, and how it reads it back there: the Llama 3.2 tokenizer built here (its
tokenizer.json gzipped), the benchmark's test tweets, train tweets for the shots and
bitsandbytes' wheel (``make gpu-check-bundle``)."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

TWEETS = 100
#: Bundle layout.
TOKENIZER = "tokenizer"
TWEETS_FILE = "tweets.tsv"
SHOTS_FILE = "shots.tsv"  # train tweets the few-shot prompts draw from
SHOT_POOL = 200
WHEELS = "wheels"
BITSANDBYTES = "bitsandbytes==0.50.2"


def bundle(
    out: Path,
    splits: Path,
    tweets: int = TWEETS,
    shots: int = SHOT_POOL,
    wheels: bool = True,
) -> Path:
    """Write the bundle: the Llama 3.2 tokenizer (built from ``llama-models``, its
    tokenizer.json gzipped), ``tweets`` test tweets (the benchmark's draw) and ``shots``
    train tweets for the few-shot prompts, from the prepared ``splits`` folder, and, with
    ``wheels``, bitsandbytes' wheel."""
    from emoprompt.bench.llama3 import build_llama3_tokenizer
    from emoprompt.data.sampling import benchmark_sample
    from emoprompt.data.splits import read_split, write_split

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = out / TOKENIZER
    with tempfile.TemporaryDirectory() as folder:
        build_llama3_tokenizer(folder)
        shutil.rmtree(tokenizer, ignore_errors=True)
        tokenizer.mkdir()
        for path in Path(folder).iterdir():
            if path.name == "tokenizer.json":
                with open(path, "rb") as raw, gzip.open(tokenizer / "tokenizer.json.gz", "wb") as z:
                    shutil.copyfileobj(raw, z)
            else:
                shutil.copy2(path, tokenizer / path.name)
    write_split(benchmark_sample(read_split(splits / "test.tsv"), tweets), out / TWEETS_FILE)
    write_split(benchmark_sample(read_split(splits / "train.tsv"), shots), out / SHOTS_FILE)
    if wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--dest", str(out / WHEELS), BITSANDBYTES],
            check=True,
        )  # fmt: skip
    return out


def open_bundle(folder: Path) -> tuple[Any, Any, Any]:
    """The bundle's tokenizer (prepared as the workflow prepares one), test tweets and
    train tweets."""
    from transformers import AutoTokenizer

    from emoprompt.data.splits import read_split
    from emoprompt.models.loading import prepare_tokenizer

    source = folder / TOKENIZER
    with tempfile.TemporaryDirectory() as plain:
        for path in source.iterdir():
            if path.name.endswith(".gz"):
                with gzip.open(path, "rb") as z, open(Path(plain) / path.stem, "wb") as raw:
                    shutil.copyfileobj(z, raw)
            else:
                shutil.copy2(path, Path(plain) / path.name)
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(plain))
    return tokenizer, read_split(folder / TWEETS_FILE), read_split(folder / SHOTS_FILE)
