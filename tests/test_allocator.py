"""The ``canfast`` command's allocator settings (canfast.allocator): what they change, and that
the command applies them."""

from __future__ import annotations

import subprocess
import sys

import pytest

import canfast.allocator
from canfast.cli import main

# Rounds of allocations of mixed sizes (1-3 MiB), freed after each round, as a pass frees its
# activations: the page faults of every round after the first.
_ROUNDS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from canfast.allocator import keep_freed_memory
    assert keep_freed_memory()
faults = 0
for r in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones((1 + (i + r) % 3) * 256 * 1024) for i in range(16)]
    del blocks
    if r:
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""


def _faults_after_first_round(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_new_page_faults():
    default = _faults_after_first_round("default")
    kept = _faults_after_first_round("keep")
    # 32 MiB of blocks a round is 8,192 pages: glibc's defaults fault most of them in again
    # for the next rounds, while kept memory is touched once.
    assert default > 4096
    assert kept < default / 4


def test_the_command_applies_the_settings(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(canfast.allocator, "keep_freed_memory", lambda: calls.append(1))
    main(["--version"])
    assert "canfast, version" in capsys.readouterr().out
    assert calls == [1]
