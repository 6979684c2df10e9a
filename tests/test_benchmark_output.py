"""A benchmark's output holds its table and nothing else: no profiler log among it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="timm_speedup.py needs PyTorch")
pytest.importorskip("timm", reason="timm_speedup.py needs timm")

from tests.conftest import checkout_first

ROOT = Path(__file__).resolve().parents[1]


def test_timm_speedup_prints_no_profiler_log() -> None:
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    env["PYTHONPATH"] = checkout_first(os.environ.get("PYTHONPATH"))
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "timm_speedup.py"), "--batch", "1",
         "--repeats", "1", "--schedule", "level4", "--methods", "topk"],
        capture_output=True, text=True, timeout=300, check=False, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    for stream in (done.stdout, done.stderr):  # Kineto writes to stderr, among the rows
        assert "profiler_start" not in stream and "gpuGetDeviceCount" not in stream, stream
    assert done.stdout.splitlines()[-1].startswith("topk"), done.stdout


COMPILE_ONE = """
import sys
sys.path.insert(0, sys.argv[1])
import torch
from timm_speedup import compile_models
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.LayerNorm(8))
x = torch.ones(3, 4)
with torch.no_grad():
    (compiled,) = compile_models({"tiny": model}, x, "default", "fp32").values()
    print(tuple(compiled(x).shape))
"""


def test_compiling_prints_nothing_but_the_result() -> None:
    """``--compile`` switches inductor's caches off, which makes dynamo warn once, and on a
    machine without a CUDA runtime inductor's import of cpp_extension logs a line: both
    would land among the tables. A fresh process, as each is said once per process."""
    env = dict(os.environ, PYTHONPATH=checkout_first(os.environ.get("PYTHONPATH")))
    done = subprocess.run([sys.executable, "-c", COMPILE_ONE, str(ROOT / "benchmarks")],
                          capture_output=True, text=True, timeout=300, check=False, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "(3, 8)\n" and done.stderr == "", (done.stdout, done.stderr)
