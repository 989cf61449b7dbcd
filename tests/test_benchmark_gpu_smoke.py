"""``benchmarks/gpu.py --smoke`` runs every path of the GPU benchmark at tiny sizes on CPU, so the one-command
GPU run cannot rot unseen."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_smoke_mode_runs_and_prints_every_figure():
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "sdk"), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for figure in ("time to first token", "decode, batch 1", "batch of 8, mixed images", "peak memory", "warm-up"):
        assert figure in done.stdout
