"""The timing scripts that benchmarks/gpu_check.sh runs on a GPU, run once here on the CPU
with tiny sizes: a GPU session has minutes, and a script that broke must not cost them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the timing scripts need PyTorch")
pytest.importorskip("timm", reason="timm_speedup.py needs timm")

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_timm_speedup_prints_a_row_per_method() -> None:
    out = _run("timm_speedup.py", "--batch", "1", "--repeats", "1", "--schedule", "level4",
               "--methods", "wkmedoids,topk,tome")
    number = r"\s+([0-9.]+)"
    for method in ("plain", "wkmedoids", "topk", "tome"):
        row = re.search(rf"^{method}{number}{number}{number}", out, re.MULTILINE)
        assert row, out
        ms, speedup, flop_ratio = (float(g) for g in row.groups())
        assert ms > 0 and speedup > 0
        # Level 4 keeps under half the block FLOPs; the plain model is the unit.
        assert flop_ratio == 1.0 if method == "plain" else 0.3 < flop_ratio < 0.6
    assert re.search(r"^wkmedoids.*\s([0-9.]+)%$", out, re.MULTILINE), out  # pooling share


def test_score_pass_times_both_ways_and_names_the_sdpa_kernel() -> None:
    out = _run("score_pass.py", "--batch", "1", "--tokens", "17", "--repeats", "1")
    rows = re.findall(r"^(forward|fwd\+bwd)\s+(no|yes)\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+x", out,
                      re.MULTILINE)
    assert sorted(rows) == sorted((p, b) for p in ("forward", "fwd+bwd") for b in ("no", "yes"))
    dispatched = re.findall(r"^  (no bias|bias)\s+(\S.*)$", out, re.MULTILINE)
    assert [bias for bias, _ in dispatched] == ["no bias", "bias"], out
    assert all("attention" in kernel or "math" in kernel for _, kernel in dispatched), out
