"""Quick speed check of emoprompt.engine against a naive per-tweet pipeline.

Usage::

    .venv/bin/python benchmarks/engine_quick.py DEV_TSV [--train TRAIN_TSV --shots 10]
        [--n 32] [--model .cache/SmolLM2-135M-Instruct] [--batch-size 16] [--threads 2]

Loads SmolLM2-135M-Instruct from a local folder (``save_pretrained`` output), builds a
zero-shot (or, with ``--train``/``--shots``, few-shot) chat prompt whose prefix is
the system prompt (plus the example turns) and whose suffix is the tweet's user turn
and the assistant header, then times, on the first ``--n`` tweets:

* first_token_probs, label_logprobs and greedy generate (20 new tokens), with the
  prefix cache and without it (``reuse_prefix=False``);
* the naive baseline: ``pipeline("text-generation")`` once per tweet, greedy, 20 new
  tokens, and whether the engine's greedy texts are identical to it.

Peak memory is the process's resident set size sampled during each phase (it includes
the model's weights).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from emoprompt.data import SplitFile, parse_split  # noqa: E402
from emoprompt.engine import Engine, PromptParts  # noqa: E402
from emoprompt.labels import LABELS  # noqa: E402

SYSTEM = (
    "Eres un experto en análisis de emociones en redes sociales. Lee el tuit en español "
    "que te dará el usuario y clasifica la emoción principal que expresa su autor en una "
    "de estas siete categorías:\n"
    "- Alegría: felicidad, entusiasmo, orgullo, gratitud o satisfacción.\n"
    "- Tristeza: pena, dolor, decepción, nostalgia o desánimo.\n"
    "- Desagrado: asco, repugnancia o rechazo ante algo desagradable.\n"
    "- Ira: enfado, rabia, indignación o irritación.\n"
    "- Miedo: temor, preocupación, ansiedad o angustia.\n"
    "- Sorpresa: asombro o sorpresa ante algo inesperado.\n"
    "- Otras: ninguna de las anteriores, o un tuit neutral o informativo.\n"
    "Responde primero con la etiqueta exacta (Alegría, Tristeza, Desagrado, Ira, Miedo, "
    "Sorpresa u Otras) y, si quieres, una breve justificación después."
)


def read_tsv(path: str):
    return parse_split(SplitFile(path, ".tsv", Path(path).read_bytes()))


def build_prompts(tokenizer, tweets, examples) -> list[PromptParts]:
    """Chat prompts split into prefix (system + example turns) and suffix (the tweet)."""
    head = [{"role": "system", "content": SYSTEM}]
    for tweet, label in examples:
        head += [
            {"role": "user", "content": tweet},
            {"role": "assistant", "content": label},
        ]
    prefix = tokenizer.apply_chat_template(head, tokenize=False)
    prompts = []
    for tweet in tweets:
        full = tokenizer.apply_chat_template(
            [*head, {"role": "user", "content": tweet}],
            add_generation_prompt=True,
            tokenize=False,
        )
        assert full.startswith(prefix)
        prompts.append(PromptParts(prefix, full[len(prefix) :]))
    return prompts


class PeakRSS:
    """Samples the resident set size in a thread; ``peak`` in GiB."""

    def __enter__(self):
        self.proc, self.peak_bytes, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while self.running:
            self.peak_bytes = max(self.peak_bytes, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = self.peak_bytes / 2**30


def timed(name, n, fn, results, repeat=1):
    """Run ``fn`` ``repeat`` times; keep the fastest wall time (other jobs share the CPU)."""
    runs = []
    with PeakRSS() as mem:
        for _ in range(repeat):
            wall, cpu = time.perf_counter(), time.process_time()
            out = fn()
            runs.append((time.perf_counter() - wall, time.process_time() - cpu))
    seconds, cpu = min(runs)
    results[name] = {
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "tweets_per_s": round(n / seconds, 2),
        "peak_rss_gib": round(mem.peak, 2),
        "all_seconds": [round(r[0], 2) for r in runs],
    }
    print(
        f"{name:28s} {seconds:7.2f} s  {n / seconds:7.2f} tweets/s  "
        f"peak RSS {mem.peak:.2f} GiB  (runs: {', '.join(f'{r[0]:.1f}' for r in runs)})",
        flush=True,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dev", help="TSV with columns id event tweet offensive emotion")
    parser.add_argument("--n", type=int, default=32, help="tweets to use (the first n)")
    parser.add_argument("--model", default=str(ROOT / ".cache" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--train", help="TSV to draw few-shot examples from")
    parser.add_argument("--shots", type=int, default=0, help="examples in the prefix")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement (best kept)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tweets = list(read_tsv(args.dev)["tweet"][: args.n])
    examples = []
    if args.shots:
        if not args.train:
            parser.error("--shots needs --train")
        train = read_tsv(args.train)
        examples = list(
            zip(train["tweet"][: args.shots], train["label"][: args.shots], strict=True)
        )
    prompts = build_prompts(tokenizer, tweets, examples)
    lengths = [len(tokenizer(p.text, add_special_tokens=False)["input_ids"]) for p in prompts]
    prefix_len = len(tokenizer(prompts[0].prefix, add_special_tokens=False)["input_ids"])
    n = len(prompts)
    print(
        f"{n} tweets, {args.shots} shots, prompt tokens: prefix {prefix_len}, "
        f"whole prompt mean {sum(lengths) / n:.0f}, threads {torch.get_num_threads()}"
    )
    results: dict = {
        "n": n,
        "shots": args.shots,
        "prefix_tokens": prefix_len,
        "mean_prompt_tokens": sum(lengths) / n,
    }

    cached = Engine(model, tokenizer, batch_size=args.batch_size, progress=False)
    plain = Engine(model, tokenizer, batch_size=args.batch_size, reuse_prefix=False, progress=False)
    cached.first_token_probs(prompts[:2], LABELS)  # warm-up
    p1 = timed(
        "first_token_probs cached",
        n,
        lambda: cached.first_token_probs(prompts, LABELS),
        results,
        args.repeat,
    )
    p2 = timed(
        "first_token_probs plain",
        n,
        lambda: plain.first_token_probs(prompts, LABELS),
        results,
        args.repeat,
    )
    l1 = timed(
        "label_logprobs cached",
        n,
        lambda: cached.label_logprobs(prompts, LABELS),
        results,
        args.repeat,
    )
    l2 = timed(
        "label_logprobs plain",
        n,
        lambda: plain.label_logprobs(prompts, LABELS),
        results,
        args.repeat,
    )
    g1 = timed(
        "generate cached",
        n,
        lambda: cached.generate(prompts, max_new_tokens=args.new_tokens),
        results,
        args.repeat,
    )
    g2 = timed(
        "generate plain",
        n,
        lambda: plain.generate(prompts, max_new_tokens=args.new_tokens),
        results,
        args.repeat,
    )
    results["max_abs_diff_first_token_probs"] = float(abs(p1 - p2).max())
    results["max_abs_diff_label_logprobs"] = float(abs(l1 - l2).max())
    results["generate_cached_equals_plain"] = [a.text for a in g1] == [b.text for b in g2]
    results["stats_cached"] = dict(cached.stats)

    if not args.skip_naive:
        pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)

        def naive():
            return [
                pipe(
                    p.text, max_new_tokens=args.new_tokens, do_sample=False, return_full_text=False
                )[0]["generated_text"]
                for p in prompts
            ]

        texts = timed("naive pipeline per tweet", n, naive, results, args.repeat)
        same = [a.text == b for a, b in zip(g1, texts, strict=True)]
        results["generate_equals_naive"] = f"{sum(same)}/{n}"
        base = results["naive pipeline per tweet"]["tweets_per_s"]
        results["speedup_vs_naive"] = {
            name: round(r["tweets_per_s"] / base, 1)
            for name, r in results.items()
            if isinstance(r, dict) and "tweets_per_s" in r
        }
        print("identical greedy texts (engine vs naive):", results["generate_equals_naive"])
        print("speed-up vs naive:", json.dumps(results["speedup_vs_naive"], indent=1))
    print(
        f"max |cached - plain|: first-token probs {results['max_abs_diff_first_token_probs']:.2e}"
        f", label logprobs {results['max_abs_diff_label_logprobs']:.2e}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
