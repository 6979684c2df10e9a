"""The timing scripts that benchmarks/gpu_check.sh runs on a GPU, run once here on the CPU
with tiny sizes, and gpu_check.sh itself with stand-ins for Python and compute-sanitizer: a
GPU session has minutes, and a script that broke must not cost them."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the timing scripts need PyTorch")
pytest.importorskip("timm", reason="timm_speedup.py needs timm")

from tests.conftest import checkout_first

ROOT = Path(__file__).resolve().parents[1]


#: This checkout's tokenpool_ops first, as gpu_check.sh sets it (not an installed copy).
ENVIRONMENT = {**os.environ, "PYTHONPATH": checkout_first(os.environ.get("PYTHONPATH"))}


def _run(script: str, *args: str, returncode: int = 0) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=300, check=False,
                          env=ENVIRONMENT)
    assert done.returncode == returncode, done.stderr[-2000:]
    return done.stdout


def test_timm_speedup_prints_a_row_per_method() -> None:
    out = _run("timm_speedup.py", "--batch", "1", "--repeats", "1", "--schedule", "level4",
               "--methods", "wkmedoids,topk,tome", "--profile", "3")
    number = r"\s+([0-9.]+)"
    for method in ("plain", "wkmedoids", "topk", "tome"):
        row = re.search(rf"^{method}{number}{number}{number}", out, re.MULTILINE)
        assert row, out
        ms, speedup, flop_ratio = (float(g) for g in row.groups())
        assert ms > 0 and speedup > 0
        # Level 4 keeps under half the block FLOPs; the plain model is the unit.
        assert flop_ratio == 1.0 if method == "plain" else 0.3 < flop_ratio < 0.6
    assert re.search(r"^wkmedoids.*\s([0-9.]+)%$", out, re.MULTILINE), out  # pooling share
    # --profile: after the table, each model's profile, its three busiest operators (the
    # matrix products lead on the CPU), and the profiler's total.
    profiles = out.split("\nprofile of ")[1:]
    assert [p.split(":")[0] for p in profiles] == ["plain", "wkmedoids", "topk", "tome"], out
    for profile in profiles:
        assert "aten::addmm" in profile and "Self CPU time total" in profile, profile


def test_hf_speedup_prints_a_row_per_model() -> None:
    pytest.importorskip("transformers", reason="hf_speedup.py needs transformers")
    out = _run("hf_speedup.py", "--batch", "1", "--repeats", "1", "--methods", "wkmedoids,tome")
    number = r"\s+([0-9.]+)"
    for name in ("plain", "wkmedoids", "tome"):
        row = re.search(rf"^{name}{number * 6}$", out, re.MULTILINE)
        assert row, out
        best, median, speedup, per_round, cpu, cpu_speedup = (float(g) for g in row.groups())
        assert best > 0 and median >= best and speedup > 0 and per_round > 0
        assert cpu > 0 and cpu_speedup > 0
        assert name != "plain" or speedup == per_round == cpu_speedup == 1.0
    assert "deits-level4 [196, 193, 179" in out, out


def test_score_pass_times_both_ways_and_names_the_sdpa_kernel() -> None:
    out = _run("score_pass.py", "--batch", "1", "--tokens", "17", "--repeats", "1")
    rows = re.findall(r"^(forward|fwd\+bwd)\s+(no|yes)\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+x", out,
                      re.MULTILINE)
    assert sorted(rows) == sorted((p, b) for p in ("forward", "fwd+bwd") for b in ("no", "yes"))
    dispatched = re.findall(r"^  (no bias|bias)\s+(\S.*)$", out, re.MULTILINE)
    assert [bias for bias, _ in dispatched] == ["no bias", "bias"], out
    assert all("attention" in kernel or "math" in kernel for _, kernel in dispatched), out


def test_bench_cuda_prints_the_row_of_the_issue_shape() -> None:
    out = _run("benchmarks/bench_cuda.py", "--cases", "256x197/98")
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \|(.*)$", out, re.MULTILINE)
    assert [row[:3] for row in rows] == [("256", "197", "98")], out
    cells = [cell.strip() for cell in rows[0][3].rstrip(" |").split("|")]
    assert len(cells) == 7 and all(cells), out  # each column a time or why not (no GPU)


def test_gpu_probe_lists_the_libraries_and_fails_without_a_gpu() -> None:
    gpu = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                         capture_output=True, text=True, check=True).stdout.strip() == "True"
    out = _run("gpu_kernels.py", "probe", returncode=0 if gpu else 1)
    assert re.search(r"^torch \d", out, re.MULTILINE), out
    assert re.search(r"^cupy( \d|: not available)", out, re.MULTILINE), out


#: Stands in for Python and compute-sanitizer: records its arguments, succeeds.
STAND_IN = """#!/usr/bin/env bash
printf '%s\\n' "$(basename "$0") $*" >> "$GPU_CHECK_CALLS"
echo "output of $*"
"""


def test_gpu_check_runs_each_step_in_order_and_records_them(tmp_path: Path) -> None:
    # bash -n, then the whole script with stand-ins: the probe passes, each step runs once in
    # the order the issue asks for (sanitizers, tests, then timings), every script it names
    # exists and takes the options it is given, and the record has every section.
    script = ROOT / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "compute-sanitizer"):
        (bin_dir / name).write_text(STAND_IN)
        (bin_dir / name).chmod(0o755)
    calls, results = tmp_path / "calls", tmp_path / "gpu_check.md"
    environment = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                   "PYTHON": str(bin_dir / "python"), "GPU_CHECK_CALLS": str(calls),
                   "GPU_CHECK_RESULTS": str(results)}
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                          check=False, env=environment, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = calls.read_text().splitlines()
    steps = [line.split(" --")[0] if line.startswith("compute-sanitizer") else line
             for line in lines]
    assert [step.split()[0] for step in steps] == ["python"] + ["compute-sanitizer"] * 2 + [
        "python"] * 8
    assert "benchmarks/gpu_kernels.py probe" in lines[0]
    for line, tool in zip(lines[1:3], ("memcheck", "racecheck"), strict=True):
        assert f"--tool {tool} --error-exitcode 1 " in line
        assert line.endswith("benchmarks/gpu_kernels.py launch-each")
    assert "-m pytest" in lines[3] and "cupy or torch-cuda or gpu" in lines[3]
    assert "bench_cuda.py --cases 256x197/98" in lines[4]
    for line, dtype in zip(lines[5:7], ("bf16", "fp32"), strict=True):
        assert f"timm_speedup.py --device cuda --dtype {dtype} --batch 256" in line
        assert "--schedule level4 --methods wkmedoids,topk" in line
    assert "score_pass.py" in lines[7]
    assert "hf_speedup.py --device cuda --dtype bf16 --batch 256" in lines[8]
    assert "timm_speedup.py --device cuda --dtype bf16 --batch 256" in lines[9]
    assert "--no-sync --slice --cuda-graphs" in lines[9]
    assert "timm_speedup.py --device cuda --dtype bf16 --batch 256" in lines[10]
    assert "--compile --compile-mode reduce-overhead" in lines[10]
    usages: dict[str, str] = {}
    for line in lines:  # the scripts exist and accept these options
        words = shlex.split(line)
        scripts = [w for w in words if w.endswith(".py")]
        if not scripts:
            continue
        assert (ROOT / scripts[0]).is_file(), scripts[0]
        if scripts[0].endswith("gpu_kernels.py"):
            continue  # a subcommand, not options: run above and in test_cuda_kernel.py
        if scripts[0] not in usages:
            usages[scripts[0]] = _run(scripts[0].removeprefix("benchmarks/"), "--help")
        for option in (w for w in words if w.startswith("--")):
            assert option in usages[scripts[0]], (scripts[0], option)
    record = results.read_text()
    for section in ("memcheck", "racecheck", "tests", "pool", "model_bf16", "model_fp32",
                    "scores", "hf_model", "model_graphs", "model_compiled"):
        assert f"## {section}" in record
        if section not in ("memcheck", "racecheck"):  # each step's time and exit status
            assert re.search(rf"^{section}: exit 0 after \d+ s \(limit \d+ s\)$", record,
                             re.MULTILINE), section
    assert "output of benchmarks/benchmarks/bench_cuda.py --cases 256x197/98" in record
