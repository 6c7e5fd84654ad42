"""keep_freed_memory: a freed large buffer is reused without new page faults (checked in a child process, because
the setting is process-wide)."""

import subprocess
import sys
import textwrap

import pytest

from llama_moe.training import cpu_memory

CHILD = textwrap.dedent(
    """
    import resource, sys
    import torch
    from llama_moe.training.cpu_memory import keep_freed_memory

    applied = keep_freed_memory() if sys.argv[1] == "keep" else False

    def faults_of_one_allocation():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffer = torch.empty(64 * 2**20 // 4).fill_(1.0)  # 64 MiB, above glibc's largest mmap threshold
        del buffer
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_one_allocation()
    print(applied, min(faults_of_one_allocation() for _ in range(3)))
    """
)


def run_child(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_buffers_are_reused_without_page_faults():
    applied, kept_faults = run_child("keep")
    _, default_faults = run_child("default")
    assert applied
    pages = 64 * 2**20 // 4096
    assert kept_faults < pages // 20  # the freed heap memory was reused
    assert kept_faults < default_faults  # by default glibc unmapped the buffer and faulted a fresh one in


def test_opt_out(monkeypatch):
    monkeypatch.setenv(cpu_memory.OPT_OUT, "1")
    assert cpu_memory.keep_freed_memory() is False
