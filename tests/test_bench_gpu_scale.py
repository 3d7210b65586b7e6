"""The GPU scale script's CPU twin: the same code path at a tiny size, so the prepared GPU run cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gpu_scale.py"


def test_the_gpu_scale_script_runs_on_the_cpu_and_checks_its_tiles():
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--items", "20000", "--positions", "300",
                          "--tiles", "128x8192", "64x4096", "--steps", "1", "--batch", "8", "--full-batch", "4"],
                         check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert sum("positions/s" in line for line in lines) == 2  # each tile shape ran and matched one matrix
    assert any(line.strip().startswith("sampled (512 negatives)") for line in lines)
    assert any("more under the full softmax" in line for line in lines)
