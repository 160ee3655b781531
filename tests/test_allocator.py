"""pipeline.allocator: glibc keeps freed tensor-sized blocks instead of returning them to the kernel."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Four 20 MB arrays allocated and freed ten times, the pattern of a training step's edge tensors;
# prints the minor page faults of the ten steps (each fresh page from the kernel is one).
_STEPS = """
import resource, sys
import numpy as np
if sys.argv[1] == "1":
    from pipeline.allocator import keep_freed_memory
    print(keep_freed_memory())
def step():
    blocks = [np.ones(2_500_000) for _ in range(4)]
    del blocks
step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="the settings are glibc's")


def _faults(tuned: bool, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _STEPS, "1" if tuned else "0"], cwd=ROOT, env={**clean, **env},
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


@glibc_only
def test_freed_blocks_are_reused_without_new_pages() -> None:
    default = int(_faults(False)[-1])
    applied, tuned = _faults(True)
    assert applied == "True"
    # 10 steps x 80 MB: glibc's defaults return the blocks and fault ~20k fresh pages back in
    assert default > 5_000
    assert int(tuned) < 100


@glibc_only
def test_a_users_own_malloc_settings_are_left_alone() -> None:
    applied, _ = _faults(True, MALLOC_TRIM_THRESHOLD_="1000000")
    assert applied == "False"
