"""Process settings for CPU inference: threads, and freed memory kept for reuse."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from emoprompt.infra.runtime import configure_cpu

# Passes of a small MLP over batches of changing size, as a forward pass allocates;
# prints the page faults of the passes after the first few.
WORKLOAD = """
import resource, sys, torch
from emoprompt.infra.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.set_num_threads(1)
x, w1, w2 = torch.randn(256, 576), torch.randn(1536, 576), torch.randn(576, 1536)
F = torch.nn.functional
def passes(n):
    for i in range(n):
        h = x[: 48 + (i * 37) % 112]
        for _ in range(4):
            h = F.linear(F.silu(F.linear(h, w1)), w2)
passes(20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
passes(100)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    run = subprocess.run(
        [sys.executable, "-c", WORKLOAD, mode], capture_output=True, text=True, check=True
    )
    return int(run.stdout.strip())


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the allocator settings are glibc's",
)
def test_kept_memory_is_reused_without_page_faults():
    kept, default = faults("keep"), faults("default")
    # 100 passes over 0.3-1 MB activations: the default allocator maps fresh pages again
    # and again (thousands of faults); with the settings the freed blocks are reused.
    assert kept < 1000 < default, (kept, default)


def test_thread_setting():
    before = torch.get_num_threads()
    try:
        assert configure_cpu("auto", 1, keep_memory=False) == 1 == torch.get_num_threads()
        assert configure_cpu(2, 1, keep_memory=False) == 2 == torch.get_num_threads()
        assert configure_cpu("auto", 0, keep_memory=False) == 1
    finally:
        torch.set_num_threads(before)
