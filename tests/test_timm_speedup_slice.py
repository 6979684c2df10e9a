"""benchmarks/timm_speedup.py's ``--slice`` row: the plain model with free pooling."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="timm_speedup.py needs PyTorch")
timm = pytest.importorskip("timm", reason="timm_speedup.py needs timm")

from tests.conftest import checkout_first  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("timm_speedup",
                                                  ROOT / "benchmarks" / "timm_speedup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sliced_model_keeping_every_token_is_the_plain_model():
    bench = _benchmark_module()
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(bench.SlicedViT(model, [196] * 12)(x), model(x),
                                   rtol=0, atol=0)


def test_sliced_model_runs_its_blocks_on_the_kept_tokens():
    # Each block's MLP sees the class token and the first keep[i] patch tokens.
    bench = _benchmark_module()
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    keep = [196, 150, 100, 60, 30, 20, 10, 5, 3, 2, 1, 0]
    seen: list[int] = []
    for block in model.blocks:
        block.mlp.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[1]))
    with torch.no_grad():
        out = bench.SlicedViT(model, keep)(torch.randn(1, 3, 224, 224))
    assert seen == [k + 1 for k in keep]
    assert out.shape == (1, 1000)


def test_timm_speedup_prints_the_slice_row():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "timm_speedup.py"), "--batch", "1",
         "--repeats", "1", "--schedule", "level4", "--methods", "topk", "--slice"],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": checkout_first(os.environ.get("PYTHONPATH"))})
    assert done.returncode == 0, done.stderr[-2000:]
    row = re.search(r"^slice\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)$", done.stdout, re.MULTILINE)
    assert row, done.stdout
    ms, speedup, flop_ratio = (float(g) for g in row.groups())
    assert ms > 0 and speedup > 0
    assert 0.3 < flop_ratio < 0.6  # level 4 keeps under half the block FLOPs
