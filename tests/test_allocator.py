"""keep_freed_memory: large freed blocks stay in the process (no page faults at the next allocation)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from mdetr import cli
from mdetr.ops import allocator
from mdetr.ops.allocator import ALLOCATOR_ENV, keep_freed_memory

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")

# Minor page faults per allocation of a 48 MiB tensor written in full, before and after the call, in a
# fresh interpreter (the setting is process-wide and cannot be undone).
_FAULTS = """
import json, resource, torch
from mdetr.ops.allocator import keep_freed_memory

def faults(rounds=12):
    for _ in range(5):  # the heap grows over the first rounds
        torch.ones(12 << 20)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        torch.ones(12 << 20)  # 12 Mi float32 = 48 MiB, above glibc's largest dynamic mmap threshold
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / rounds

before = faults()
applied = keep_freed_memory()
print(json.dumps({"before": before, "applied": applied, "after": faults()}))
"""


@glibc_only
def test_freed_blocks_are_reused_without_page_faults() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["applied"] is True
    # 48 MiB of 4 KiB pages is 12,288 faults per round when the block comes fresh from the kernel: before,
    # every round; after, the block is reused (a round may still grow the heap while its layout settles,
    # more often on a busy machine, so a few rounds in twelve are allowed)
    assert result["before"] > 12_000
    assert result["after"] < result["before"] / 3


CHOSEN = {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "MALLOC_MMAP_THRESHOLD_": "65536",
          "MALLOC_TRIM_THRESHOLD_": "65536", "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}


@pytest.mark.parametrize("name", ALLOCATOR_ENV)
def test_left_alone_when_the_allocator_is_chosen_by_the_environment(monkeypatch, name) -> None:
    for other in ALLOCATOR_ENV:
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, CHOSEN[name])
    monkeypatch.setattr(allocator, "_glibc", lambda: pytest.fail("the C library was reached"))
    assert keep_freed_memory() is False


@glibc_only
def test_applied_beside_variables_that_do_not_choose_the_allocator(monkeypatch) -> None:
    for other in ALLOCATOR_ENV:
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libgomp.so.1")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX512F")
    assert keep_freed_memory() is True  # this test process keeps freed memory, as the mdetr command's


@pytest.mark.parametrize(("setting", "calls"), [(None, 1), ("1", 1), ("0", 0)])
def test_the_command_keeps_freed_memory_unless_told_not_to(monkeypatch, setting, calls) -> None:
    seen = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: seen.append(True) or True)
    monkeypatch.setitem(cli.COMMANDS, "data", lambda argv: 0)
    if setting is None:
        monkeypatch.delenv("MDETR_KEEP_FREED_MEMORY", raising=False)
    else:
        monkeypatch.setenv("MDETR_KEEP_FREED_MEMORY", setting)
    assert cli.main(["data"]) == 0
    assert len(seen) == calls
