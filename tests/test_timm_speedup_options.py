"""benchmarks/timm_speedup.py's options: ``--slice`` (the plain model with free pooling) and
``--cuda-graphs`` (each model captured once as a CUDA graph and replayed)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

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


class StandInCuda:
    """torch.cuda's stream and graph API on the CPU, recording what happens in order. A
    model called inside ``graph`` is being captured: it hands its input and output to
    :meth:`captured`, and a replay recomputes that output in place from that input, as the
    captured kernels would."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.capturing = False
        self.capture: tuple[torch.Tensor, torch.Tensor] | None = None

    def Stream(self) -> SimpleNamespace:  # torch.cuda's names
        self.events.append("side stream")
        return SimpleNamespace(wait_stream=lambda _: self.events.append("side waits"))

    def current_stream(self) -> SimpleNamespace:
        return SimpleNamespace(wait_stream=lambda _: self.events.append("current waits"))

    @contextmanager
    def stream(self, _stream):
        self.events.append("on side")
        yield
        self.events.append("off side")

    def CUDAGraph(self) -> SimpleNamespace:
        return SimpleNamespace(replay=self._replay)

    @contextmanager
    def graph(self, _graph):
        self.events.append("capture")
        self.capturing = True
        yield
        self.capturing = False
        self.events.append("captured")

    def _replay(self) -> None:
        self.events.append("replay")
        assert self.capture is not None
        source, output = self.capture
        output.copy_(source * 2)


def test_graphed_captures_after_a_side_stream_warm_up_and_replays_new_images():
    bench = _benchmark_module()
    cuda = StandInCuda()

    def model(images: torch.Tensor) -> torch.Tensor:
        # Inference, and under bf16 autocast without its cache (a capture must not read
        # weights cast before it).
        assert not torch.is_grad_enabled() and not torch.is_autocast_cache_enabled()
        cuda.events.append("forward")
        output = images * 2
        if cuda.capturing:
            cuda.capture = (images, output)
        return output

    x = torch.arange(6.0).reshape(2, 3)
    replay = bench.graphed(model, x, "bf16", cuda=cuda)
    assert cuda.events == ["side stream", "side waits", "on side", "forward", "forward",
                           "off side", "current waits", "capture", "forward", "captured"]
    first, second = torch.full((2, 3), 5.0), torch.full((2, 3), -1.0)
    got = replay(first)
    torch.testing.assert_close(got, first * 2)
    assert replay(second) is got  # the captured output, overwritten by each replay
    torch.testing.assert_close(got, second * 2)
    assert cuda.events[-2:] == ["replay", "replay"]
    assert torch.equal(x, torch.arange(6.0).reshape(2, 3))  # the caller's tensor untouched


def test_cuda_graphs_option_needs_a_gpu_and_no_sync():
    for extra in ([], ["--device", "cuda"]):
        done = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "timm_speedup.py"), "--cuda-graphs",
             *extra], capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "PYTHONPATH": checkout_first(os.environ.get("PYTHONPATH"))})
        assert done.returncode == 2
        assert "--cuda-graphs needs --device cuda and --no-sync" in done.stderr


def test_best_times_keeps_the_host_time_until_a_pass_returns(monkeypatch):
    # A stand-in clock: each pass takes the host 1 + its round, and awaiting the device 10
    # more; the host column is the pass until it returns, the time the whole pass.
    module = _benchmark_module()
    now = [0.0]
    rounds = iter([0.0, 3.0, 5.0, 2.0, 9.0, 9.0, 9.0, 9.0])

    def model(images):
        now[0] += 1.0 + next(rounds)

    monkeypatch.setattr(module, "synchronise", lambda device: now.__setitem__(0, now[0] + 10))
    host: dict[str, float] = {}
    best = module.best_times({"a": model, "b": model}, torch.zeros(1), 3, "fp32",
                             clock=lambda: now[0], host=host)
    # Warm-ups took rounds 0 and 3; then a, b, a, b, a, b: 5, 2, 9, 9, 9, 9.
    assert host == {"a": 6.0, "b": 3.0}
    assert best == {"a": 16.0, "b": 13.0}
