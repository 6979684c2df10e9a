"""The CuPy glue of the CUDA kernels (backends/_cupy.py) without a GPU: a stand-in for CuPy
(tests/fake_cupy.py) records what the glue compiles, loads, sets and launches, and where.

* each call compiles only the instantiation it launches, with the floating-point model of
  ``_cupy.FLOAT_MODEL`` (CuPy's RawModule would add -ftz=true);
* the compiled kernel is cached on disk: a second process's first call compiles nothing, and
  a corrupt or stale entry is rebuilt, never loaded;
* each kernel is loaded and opted in to its shared memory once per device, whatever the
  launches and threads, and launches on the arrays' device (not the current one) with that
  device's plan, on PyTorch's stream for PyTorch tensors.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from tokenpool_ops.backends import _cupy

from tests.conftest import checkout_first
from tests.fake_cupy import FakeCupy

ROOT = Path(__file__).resolve().parents[1]
#: Opt-in shared memory per block: an H100 and an A100. The N x N matrix of N = 210 fits in
#: the H100's, not in the A100's (there it goes to the global workspace); N = 197 fits both.
H100, A100 = 232448, 166912


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeCupy:
    """CuPy replaced by the fake, device 0 an H100 (sm_90) and device 1 an A100 (sm_80), an
    empty kernel cache, and no kernel loaded in this process yet."""
    monkeypatch.setenv(_cupy.CACHE_DIR_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.setattr(_cupy, "_functions", {})
    _cupy._max_shared_bytes.cache_clear()
    _cupy._tile_rows.cache_clear()
    yield FakeCupy({0: H100, 1: A100}, {0: "90", 1: "80"}).install(monkeypatch)
    _cupy._max_shared_bytes.cache_clear()
    _cupy._tile_rows.cache_clear()


def _problem(fake: FakeCupy, device: int, n: int = 197, k: int = 98) -> tuple[Any, ...]:
    """float32 K-Medoids arguments (x, mean, init, weights) on ``device``."""
    rng = np.random.default_rng(n)
    x = rng.normal(size=(2, n, 8)).astype(np.float32)
    init = np.stack([rng.permutation(n)[:k] for _ in range(2)])
    return (fake.asarray(x, device), fake.asarray(x.mean(axis=1, keepdims=True), device),
            fake.asarray(init, device), fake.asarray(np.ones((2, n), np.float32), device))


def _instantiation(lowered_name: str) -> str:
    return lowered_name.removeprefix("_lowered_")  # the fake's lowering


# ---------------------------------------------------------------------------------------------
# Device, plan and stream


def test_cupy_entries_plan_and_launch_on_the_arrays_device(fake):
    # The current device is 0 (an H100); the arrays live on device 1 (an A100), whose
    # shared memory cannot hold the N x N matrix and whose fill takes 4 x 4 tiles: the plan,
    # the loads, the outputs and the launches must all be device 1's.
    x, mean, init, weights = _problem(fake, device=1, n=210)
    labels, medoids, history, _ = _cupy.run_kmedoids(x, mean, init, weights, 5, True)
    tokens, sizes, objective = _cupy.run_merge(x, mean, labels, 98, weights, None, weights,
                                               True)
    assert fake.current_device() == 0  # the glue restored it
    assert set(fake.asked_limits) == {1}
    assert [_instantiation(launch.lowered_name) for launch in fake.launches] == [
        "tokenpool::kmedoids<float, false, 1>", "tokenpool::merge<float>"]
    for launch in fake.launches:
        assert launch.device == 1 and launch.argument_devices == {1}
    assert {device for _, device in fake.loads} == {1}
    for output in (labels, medoids, history, tokens, sizes, objective):
        assert output.device.id == 1


def test_the_plan_follows_each_devices_shared_memory_and_architecture(fake):
    # The H100 (sm_90) fills with 8 x 4 pair tiles, the A100 (sm_80) with 4 x 4 tiles.
    for device, kernel in ((0, "tokenpool::kmedoids<float, true, 2>"),
                           (1, "tokenpool::kmedoids<float, false, 1>")):
        _cupy.run_kmedoids(*_problem(fake, device, n=210), 5, False)
        launch = fake.launches[-1]
        assert (launch.device, _instantiation(launch.lowered_name)) == (device, kernel)
        assert launch.shared_mem <= fake.shared_limits[device] - 16  # beside static memory


def test_bench_cuda_names_the_instantiation_and_tile_shape_each_case_runs(fake, monkeypatch):
    # What gpu_check.sh's timing step prints first: on the current device, the instantiation
    # the glue plans for each case, with its fill's tile shape.
    spec = importlib.util.spec_from_file_location(
        "bench_cuda", ROOT / "benchmarks" / "benchmarks" / "bench_cuda.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "_libraries", lambda: (fake, None, "", "no torch"))
    assert list(bench.fill_shapes([(256, 197, 98), (64, 577, 144)])) == [
        "kernel fill at 256x197/98, sm_90: 8 x 4 pair tiles, "
        "tokenpool::kmedoids<float, true, 2>",
        "kernel fill at 64x577/144, sm_90: 8 x 4 pair tiles, "
        "tokenpool::kmedoids<float, false, 2>"]
    with fake.cuda.Device(1):  # the A100
        assert list(bench.fill_shapes([(256, 197, 98)])) == [
            "kernel fill at 256x197/98, sm_80: 4 x 4 tiles, tokenpool::kmedoids<float, true, 1>"]
    monkeypatch.setattr(bench, "_libraries", lambda: (None, None, "no CuPy", "no torch"))
    assert list(bench.fill_shapes([(256, 197, 98)])) == ["kernel fill: not known (no CuPy)"]


def test_torch_entries_launch_on_the_tensors_device_and_current_stream(fake, monkeypatch):
    # PyTorch's current stream of cuda:1 (the fake's current device stays 0): the launch goes
    # to device 1, on that stream, with no synchronisation.
    torch = pytest.importorskip("torch", reason="torch is not installed")
    asked = []

    def current_stream(device: Any) -> Any:
        asked.append(device)
        return SimpleNamespace(cuda_stream=1000 + device.index)

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    with _cupy._on_torch_stream(fake, torch.device("cuda", 1)):
        _cupy.run_kmedoids(*_problem(fake, device=1), 5, True)
    assert asked == [torch.device("cuda", 1)]
    assert [(launch.device, launch.stream) for launch in fake.launches] == [(1, 1001)]


# ---------------------------------------------------------------------------------------------
# Compiling and loading


def test_each_call_compiles_only_its_instantiation_with_the_float_model(fake):
    _cupy.run_kmedoids(*_problem(fake, device=0), 5, True)
    x, mean, _, weights = _problem(fake, device=0)
    labels = fake.asarray(np.zeros((2, 197), np.int64))
    _cupy.run_merge(x, mean, labels, 98, weights, None, weights, False)
    assert [names for _, _, names in fake.compiles] == [
        ["tokenpool::kmedoids<float, true, 2>"], ["tokenpool::merge<float>"]]
    source = (_cupy.KERNEL_DIR / "kmedoids.cu").read_text()
    for compiled, options, _ in fake.compiles:
        assert compiled == source
        for option in ("-ftz=false", "-prec-div=true", "-prec-sqrt=true", "-fmad=false"):
            assert option in options
        assert not any(o in options for o in ("-ftz=true", "-use_fast_math", "--use_fast_math"))


def test_check_cuda_compiles_with_the_glues_float_model():
    script = (ROOT / ".ci" / "check_cuda.sh").read_text()
    assert f"float_model=({' '.join(_cupy.FLOAT_MODEL)})" in script


@pytest.mark.parametrize("threads", [1, 8])
def test_shared_memory_opt_in_is_set_once_per_kernel_and_device(fake, threads):
    # Launches at many N, from several threads, on two devices (one instantiation each): each
    # (kernel, device) is loaded once and opted in once, to the device's limit less the
    # kernel's static shared memory, before its first launch; no launch changes it again.
    start = threading.Barrier(threads)
    sizes = [40 + 20 * i for i in range(8)]  # N = 40 .. 180: the matrix fits on both devices
    errors = []

    def launch_all(first: int) -> None:
        try:
            start.wait()
            for n in sizes[first:] + sizes[:first]:
                for device in (0, 1):
                    _cupy.run_kmedoids(*_problem(fake, device, n, k=n // 4), 3, True)
        except BaseException as error:  # reported below, with the thread's traceback lost
            errors.append(error)

    workers = [threading.Thread(target=launch_all, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors, errors
    assert len(fake.launches) == threads * len(sizes) * 2
    assert sorted(device for _, device in fake.loads) == [0, 1]
    # One compilation per architecture, however many threads: the H100 (sm_90) runs the
    # 8 x 4 pair tiles, the A100 (sm_80) the 4 x 4 tiles.
    assert sorted(names for _, _, names in fake.compiles) == [
        ["tokenpool::kmedoids<float, true, 1>"], ["tokenpool::kmedoids<float, true, 2>"]]
    assert sorted(value for _, _, value in fake.set_attributes) == [A100 - 16, H100 - 16]
    assert {attribute for _, attribute, _ in fake.set_attributes} == {fake.MAX_DYNAMIC_SHARED}
    assert {ptr for ptr, _, _ in fake.set_attributes} == set(fake.functions)


def test_second_process_first_call_compiles_nothing(tmp_path):
    # Three fresh interpreters, each making its first call: the first compiles and stores the
    # kernel, the second loads it from disk; after the entry is corrupted, the third
    # rebuilds it (and loads what it compiled, not the corrupt bytes).
    child = f"""
import json, sys
import numpy as np, pytest
sys.path.insert(0, {str(ROOT / "tests")!r})
from tests.fake_cupy import FakeCupy
fake = FakeCupy({{0: {H100}}}).install(pytest.MonkeyPatch())
from tokenpool_ops.backends import _cupy
x = fake.asarray(np.arange(60, dtype=np.float32).reshape(1, 20, 3))
_cupy.run_kmedoids(x, x.mean(axis=1, keepdims=True), fake.asarray([[0, 7, 9]]),
                   fake.asarray(np.ones((1, 20), np.float32)), 3, True)
print(json.dumps({{"compiled": [names for _, _, names in fake.compiles],
                  "loaded": [image.decode() for image, _ in fake.loads]}}))
"""
    cache = tmp_path / "cache"
    environment = {"TOKENPOOL_OPS_CACHE_DIR": str(cache),
                   "PYTHONPATH": checkout_first(os.environ.get("PYTHONPATH"))}

    def first_call() -> dict[str, list[Any]]:
        done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                              cwd=ROOT, env={**_inherited_environment(), **environment},
                              timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.splitlines()[-1])

    first = first_call()
    assert first["compiled"] == [["tokenpool::kmedoids<float, true, 2>"]]
    second = first_call()
    assert second == {"compiled": [], "loaded": first["loaded"]}
    (entry,) = cache.glob("*.kernel")
    entry.write_bytes(entry.read_bytes()[:-1] + b"!")  # one byte of the image changed
    third = first_call()
    assert third == first
    assert first_call()["compiled"] == []  # the rebuilt entry serves again


def _inherited_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != _cupy.CACHE_DIR_VARIABLE}


# ---------------------------------------------------------------------------------------------
# The disk cache on its own


class StandIn:
    """A compiler that counts its calls; its binary names the options it was given."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, source: str, options: tuple[str, ...], name: str) -> _cupy.KernelBinary:
        self.calls.append(name)
        return _cupy.KernelBinary(f"binary of {name} {options}".encode(), f"_Z{len(name)}")


KERNEL = "tokenpool::merge<float>"


def test_an_entry_serves_the_same_key_only(tmp_path):
    compile = StandIn()
    first = _cupy.cached_binary(KERNEL, "90", "tools 1", compile, tmp_path)
    assert _cupy.cached_binary(KERNEL, "90", "tools 1", compile, tmp_path) == first
    assert compile.calls == [KERNEL]
    # Another architecture, compiler or instantiation is another entry.
    _cupy.cached_binary(KERNEL, "80", "tools 1", compile, tmp_path)
    _cupy.cached_binary(KERNEL, "90", "tools 2", compile, tmp_path)
    _cupy.cached_binary("tokenpool::merge<double>", "90", "tools 1", compile, tmp_path)
    assert len(compile.calls) == 4 and len(list(tmp_path.glob("*.kernel"))) == 4
    assert not list(tmp_path.glob("*.tmp"))  # every temporary file was renamed


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "empty", "garbage",
                                    "other key", "header only"])
def test_a_corrupt_or_stale_entry_is_rebuilt_never_loaded(tmp_path, damage):
    compile = StandIn()
    good = _cupy.cached_binary(KERNEL, "90", "tools 1", compile, tmp_path)
    (entry,) = tmp_path.glob("*.kernel")
    stored = entry.read_bytes()
    if damage == "other key":  # a whole, valid entry, written for sm_80, under sm_90's name
        _cupy.cached_binary(KERNEL, "80", "tools 1", compile, tmp_path)
        other = next(p for p in tmp_path.glob("*.kernel") if p != entry)
        stored = other.read_bytes()
    entry.write_bytes({"flipped byte": stored[:-1] + bytes([stored[-1] ^ 1]),
                       "truncated": stored[:-5], "empty": b"", "garbage": b"\x7fELF\n{}\nxyz",
                       "other key": stored, "header only": stored.split(b"\n", 2)[0]}[damage])
    calls = len(compile.calls)
    assert _cupy.cached_binary(KERNEL, "90", "tools 1", compile, tmp_path) == good
    assert len(compile.calls) == calls + 1  # rebuilt
    assert _cupy.cached_binary(KERNEL, "90", "tools 1", compile, tmp_path) == good
    assert len(compile.calls) == calls + 1  # and stored whole again


def test_the_key_covers_the_sources_and_options(tmp_path, monkeypatch):
    key = _cupy.cache_key(KERNEL, "90", "tools 1")
    for name in ("kmedoids.cu", "device_helpers.cuh"):  # an edit of either changes the key
        copy = tmp_path / name.replace(".", "_")
        copy.mkdir()
        for source in ("kmedoids.cu", "device_helpers.cuh"):
            text = (_cupy.KERNEL_DIR / source).read_text()
            (copy / source).write_text(text + ("// edited\n" if source == name else ""))
        with monkeypatch.context() as patch:
            patch.setattr(_cupy, "KERNEL_DIR", copy)
            assert _cupy.cache_key(KERNEL, "90", "tools 1") != key
    with monkeypatch.context() as patch:
        patch.setattr(_cupy, "FLOAT_MODEL", ("-ftz=true",))
        assert _cupy.cache_key(KERNEL, "90", "tools 1") != key


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(_cupy.CACHE_DIR_VARIABLE, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _cupy.cache_dir() == tmp_path / "home" / ".cache" / "tokenpool_ops" / "cuda"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _cupy.cache_dir() == tmp_path / "xdg" / "tokenpool_ops" / "cuda"
    monkeypatch.setenv(_cupy.CACHE_DIR_VARIABLE, str(tmp_path / "mine"))
    assert _cupy.cache_dir() == tmp_path / "mine"


def test_an_unwritable_cache_warns_and_still_compiles(tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    compile = StandIn()
    with pytest.warns(RuntimeWarning, match=_cupy.CACHE_DIR_VARIABLE):
        binary = _cupy.cached_binary(KERNEL, "90", "tools 1", compile, blocker / "cache")
    assert binary.lowered_name == f"_Z{len(KERNEL)}" and compile.calls == [KERNEL]
