"""Every launch of the CUDA glue (backends/_cupy.py), checked against the kernel source and
run on the host build, without a GPU.

The real ``run_kmedoids``, ``run_merge`` (so ``_launch``, ``_launch_merge``), the CuPy
fast-path entries and the PyTorch CUDA entries of backends/_torch.py call a stand-in CuPy
(tests/fake_cupy.py). Each launch it records is

* checked against the kernel's signature parsed from backends/cuda/kmedoids.cu
  (tests/host_cuda.py): argument count, each array's dtype by parameter (int64 indices,
  int32 counts, the accumulator type of each instantiation), each scalar's exact type, one
  block of TP_BLOCK_THREADS per problem, every array on the launch's device, the stream, and
  shared memory within the function's opt-in, which fits the device;
* run on the host build of the same source with its recorded argument tuple, grid, block
  and shared bytes; the kernel must write its dynamic shared memory exactly up to the
  recorded size (the plan equals the kernel's layout, counted by execution);
* and its results are compared with the generic code (``fast_paths=False``): exactly on
  zero-mean integer tokens, where every distance is exact and ties abound.

Shapes the merge kernel declines (shared memory, dtype) take the generic merge: only the
K-Medoids launch happens, and the results are the generic ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from tokenpool_ops.backends import _cupy

import tokenpool_ops
from tests.fake_cupy import FakeCupy
from tests.host_cuda import (
    HostLauncher,
    KernelSource,
    build_library,
    check_extents,
    check_launch,
    check_shared_layout,
    kernel_signatures,
    on_device,
    type_traits,
)
from tokenpool_ops import backends

with contextlib.suppress(ImportError):
    # Imported before any test installs the fake CuPy: it looks for CuPy on import.
    from tokenpool_ops.backends import _torch  # noqa: F401

#: Opt-in shared memory per block of device 0 (an H100) and device 1 (an A100).
H100, A100 = 232448, 166912


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_library(tmp_path_factory.mktemp("host_launch"))


@pytest.fixture(scope="module")
def source() -> KernelSource:
    return KernelSource.read()



@dataclass
class Glue:
    """The fake CuPy, its launches run on the host, and the kernel source to check them by."""

    fake: FakeCupy
    launcher: HostLauncher
    source: KernelSource

    def launched(self) -> list[str]:
        return [launch.lowered_name.removeprefix("_lowered_")
                for launch, _ in self.launcher.executed]

    def check(self, device: int, stream: Any = None) -> list[dict[str, Any]]:
        """Every launch so far checked (see the module docstring); their arguments by name."""
        named = []
        for launch, _ in self.launcher.executed:
            named.append(check_launch(self.source, launch, device=device, stream=stream,
                                      shared_limit=self.fake.shared_limits[device]))
            check_extents(launch.lowered_name, named[-1])
        check_shared_layout(self.launcher)
        return named


@pytest.fixture
def glue(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, library: Any,
         source: KernelSource) -> Iterator[Glue]:
    """CuPy replaced by the fake (device 0 an H100, sm_90; device 1 an A100, sm_80), its
    launches run on the host build; an empty kernel cache, no kernel loaded yet."""
    monkeypatch.setenv(_cupy.CACHE_DIR_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.setattr(_cupy, "_functions", {})
    _cupy._max_shared_bytes.cache_clear()
    _cupy._tile_rows.cache_clear()
    launcher = HostLauncher(library, lambda launch: check_extents(
        launch.lowered_name, check_launch(source, launch)))
    fake = FakeCupy({0: H100, 1: A100}, {0: "90", 1: "80"}, execute=launcher).install(monkeypatch)
    yield Glue(fake, launcher, source)
    _cupy._max_shared_bytes.cache_clear()
    _cupy._tile_rows.cache_clear()


# ---------------------------------------------------------------------------------------------
# Data: zero-mean integer tokens, every distance exact, many ties


def zero_mean_tokens(rng: np.random.Generator, batch: int, n: int, m: int) -> np.ndarray:
    """Integers in [-3, 3], each token with its mirror image (the origin for odd N)."""
    half = rng.integers(-3, 4, size=(batch, n // 2, m))
    parts = [half, -half] + ([np.zeros((batch, 1, m), dtype=half.dtype)] if n % 2 else [])
    return rng.permuted(np.concatenate(parts, axis=1), axis=1).astype(np.float64)


def problem(rng: np.random.Generator, batch: int, n: int, k: int, m: int = 5
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens, weights in {0, 1, 2}, distinct initial medoids."""
    x = zero_mean_tokens(rng, batch, n, m)
    weights = rng.integers(0, 3, size=(batch, n)).astype(np.float64)
    init = np.array([rng.permutation(n)[:k] for _ in range(batch)], dtype=np.int64)
    return x, weights, init.reshape(batch, k)


# ---------------------------------------------------------------------------------------------
# The parser


SYNTHETIC = """
// __global__ void commented_out(int a)
template <typename T, bool Flag>
__global__ void __launch_bounds__(THREADS, BLOCKS(Flag))
scale(const T* __restrict__ x, const typename Acc<T>::type* __restrict__ y, int n,
      long long* __restrict__ out, /* unused */ unsigned int flags) {}
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
"""


def test_the_parser_reads_template_kernels_and_traits():
    kernels = kernel_signatures(SYNTHETIC)
    assert list(kernels) == ["scale"]
    assert kernels["scale"].template == ("T", "Flag")
    source = KernelSource(kernels, type_traits(SYNTHETIC), 128)
    assert source.parameter_types("ns::scale<double, true>") == [
        ("const double*", "x"), ("const double*", "y"), ("int", "n"), ("long long*", "out"),
        ("unsigned int", "flags")]
    assert source.parameter_types("ns::scale<ns::Half, false>")[:2] == [
        ("const ns::Half*", "x"), ("const float*", "y")]


def test_every_instantiation_the_glue_names_is_in_the_source(source, library):
    # The host launcher was built with an entry per name the glue compiles (the build fails
    # on a name the source lacks); each parameter is a pointer or a scalar of a known type.
    assert set(source.kernels) >= {"kmedoids", "merge"}
    for name in _cupy.kernel_names():
        types = source.parameter_types(name)
        assert types[0][0] == f"const {_cupy.CXX_TYPES[_element_name(name)]}*", types[0]
        assert all(ctype.endswith("*") or ctype in ("int", "long long") for ctype, _ in types)


def _element_name(instantiation: str) -> str:
    cxx = instantiation.split("<", 1)[1].split(",")[0].rstrip(">").strip()
    return next(name for name, c in _cupy.CXX_TYPES.items() if c == cxx)


# ---------------------------------------------------------------------------------------------
# run_kmedoids and run_merge on fake CuPy arrays


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("device", [0, 1])
@pytest.mark.parametrize("n", [37, 210])
def test_kmedoids_and_merge_launches_fit_the_kernels_and_equal_generic(glue, dtype, device, n):
    # N = 210 float32: the distances in shared memory on the H100, in the global workspace
    # on the A100; float64 at N = 210: global on both.
    rng = np.random.default_rng(n + device)
    k, max_iter = n // 4, 12
    x, weights, init = problem(rng, 3, n, k)
    data = {name: on_device(glue.fake, array.astype(dtype), device)
            for name, array in (("x", x), ("mean", x.mean(axis=1, keepdims=True)),
                                ("weights", weights))}
    labels, medoids, history, count = _cupy.run_kmedoids(
        data["x"], data["mean"], on_device(glue.fake, init, device), data["weights"],
        max_iter, True)
    carried = on_device(glue.fake, np.ones((3, n), dtype), device)
    tokens, sizes, objective = _cupy.run_merge(data["x"], data["mean"], labels, k,
                                               data["weights"], carried, carried, True)
    element, rows = _cupy.CXX_TYPES[dtype], (2, 1)[device]  # pair tiles on sm_90 only
    assert glue.launched()[0] in (f"tokenpool::kmedoids<{element}, true, {rows}>",
                                  f"tokenpool::kmedoids<{element}, false, {rows}>")
    assert glue.launched()[1:] == [f"tokenpool::merge<{element}>"]
    glue.check(device)

    want = tokenpool_ops.kmedoids(x.astype(dtype), k, weights=weights.astype(dtype),
                                  init=init, max_iter=max_iter, fast_paths=False)
    np.testing.assert_array_equal(labels, want.assignment)
    np.testing.assert_array_equal(medoids, want.medoids)
    assert int(count) == want.n_iter
    np.testing.assert_array_equal(history[:, : want.n_iter + 1], want.history)
    pooled = tokenpool_ops.pool(x, k, "wkmedoids", scores=weights, init=init,
                                max_iter=max_iter, return_info=True, fast_paths=False)
    np.testing.assert_array_equal(labels, pooled.assignment)  # the same clustering
    np.testing.assert_array_equal(sizes, pooled.sizes)
    tolerance = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(tokens, pooled.tokens, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(objective, pooled.objective, rtol=tolerance, atol=tolerance)


def test_launches_go_to_the_current_stream(glue):
    # A CuPy user's stream: the launch goes to it (the glue passes no stream of its own).
    x, weights, init = problem(np.random.default_rng(1), 2, 24, 5)
    with glue.fake.cuda.ExternalStream(77):
        _cupy.run_kmedoids(*(on_device(glue.fake, a) for a in (
            x, x.mean(axis=1, keepdims=True), init, weights)), 5, False)
    glue.check(0, stream=77)


def test_an_empty_batch_launches_nothing(glue):
    x, weights, init = problem(np.random.default_rng(2), 0, 10, 3)
    labels, medoids, history, count = _cupy.run_kmedoids(
        *(on_device(glue.fake, a) for a in (x, x.mean(axis=1, keepdims=True), init, weights)),
        5, True)
    assert (labels.shape, medoids.shape, history.shape, count) == ((0, 10), (0, 3), (0, 2), 1)
    assert glue.launched() == []


# ---------------------------------------------------------------------------------------------
# pool through the CuPy fast-path entries


@contextlib.contextmanager
def cupy_fast_paths() -> Iterator[None]:
    """NumPy arrays (the fake's) get CuPy's ``Primitives`` entries, _cupy.FAST_PATHS."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backends, "_fast_paths", lambda name: _cupy.FAST_PATHS)
        patch.setattr(backends, "_compiled_paths", lambda name: {})
        yield


def assert_pool_equal(got: Any, want: Any, tolerance: float) -> None:
    for name in ("assignment", "medoids", "sizes"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), getattr(want, name))
    np.testing.assert_allclose(np.asarray(got.tokens), want.tokens, rtol=tolerance,
                               atol=tolerance)
    np.testing.assert_allclose(np.asarray(got.objective), want.objective, rtol=tolerance,
                               atol=tolerance)


@pytest.mark.parametrize("method", ["kmedoids", "wkmedoids"])
@pytest.mark.parametrize("with_sizes", [False, True])
def test_pool_through_the_cupy_entries_equals_generic(glue, method, with_sizes):
    rng = np.random.default_rng(3)
    x, scores, _ = problem(rng, 2, 40, 9)
    sizes = rng.integers(0, 3, size=(2, 40)).astype(np.float64) if with_sizes else None
    options = dict(scores=scores, sizes=sizes, return_info=True, init="random", seed=5)
    want = tokenpool_ops.pool(x, 9, method, fast_paths=False, **options)
    with cupy_fast_paths():
        got = tokenpool_ops.pool(on_device(glue.fake, x, 1), 9, method, **options)
    assert glue.launched() == ["tokenpool::kmedoids<double, true, 1>", "tokenpool::merge<double>"]
    named = glue.check(1)
    assert int(named[1]["has_fallback"]) == (with_sizes or method == "wkmedoids")
    assert_pool_equal(got, want, 1e-12)


@pytest.mark.parametrize("with_sizes", [False, True])
def test_tome_merges_its_matches_in_one_launch(glue, with_sizes):
    # One round (k >= N / 2): the matching is PyTorch's, the merge one launch of
    # Primitives.merge, which gives the means, the sizes and the objective together (the
    # separate weighted means launch no objective).
    rng = np.random.default_rng(8)
    x = zero_mean_tokens(rng, 2, 30, 4)
    sizes = rng.integers(1, 4, size=(2, 30)).astype(np.float64) if with_sizes else None
    options = dict(metric=rng.normal(size=(2, 30, 3)), sizes=sizes, return_info=True)
    want = tokenpool_ops.pool(x, 18, "tome", fast_paths=False, **options)
    with cupy_fast_paths():
        got = tokenpool_ops.pool(on_device(glue.fake, x, 1), 18, "tome", **options)
    assert glue.launched() == ["tokenpool::merge<double>"]
    (named,) = glue.check(1)
    assert int(named["with_objective"]) == 1
    assert_pool_equal(got, want, 1e-12)


def test_a_declined_merge_falls_back_to_the_generic_merge(glue):
    # Device 1's shared memory holds the K-Medoids plan but not the merge's (whose stage
    # holds the pooled tokens' features too): the merge kernel declines, pool merges with
    # the generic code, and the results are still the generic ones.
    n, k = 300, 150
    glue.fake.shared_limits[1] = merge_declining_limit(n, k, 5, "float64")
    rng = np.random.default_rng(4)
    x, scores, _ = problem(rng, 2, n, k)
    options = dict(scores=scores, return_info=True, init="random", seed=2)
    want = tokenpool_ops.pool(x, k, "wkmedoids", fast_paths=False, **options)
    with cupy_fast_paths():
        got = tokenpool_ops.pool(on_device(glue.fake, x, 1), k, "wkmedoids", **options)
    assert glue.launched() == ["tokenpool::kmedoids<double, false, 1>"]
    glue.check(1)
    assert_pool_equal(got, want, 1e-12)


def merge_declining_limit(n: int, k: int, m: int, dtype: str) -> int:
    """A device's shared memory that takes the K-Medoids kernel's plan for these shapes (the
    global workspace: N x N does not fit an H100) but not the merge kernel's."""
    plan = _cupy.kmedoids_plan(n, k, dtype, H100, _cupy.tile_rows("80"))  # device 1's fill
    assert plan is not None and not plan.shared_matrix
    limit = plan.shared_bytes + _cupy.STATIC_SHARED_BYTES
    assert _cupy.kmedoids_plan(n, k, dtype, limit, plan.tile_rows) == plan
    assert not _cupy.merge_applies(n, k, m, dtype, limit, True)
    return limit


def loop_weighted_means(values: np.ndarray, labels: np.ndarray, k: int, weights: np.ndarray,
                        empty: np.ndarray) -> np.ndarray:
    """sum_i w_i v_i / sum_i w_i per cluster, loops over problems and clusters; a cluster
    of zero total weight takes the problem's ``empty`` row."""
    out = np.empty((values.shape[0], k, values.shape[2]))
    for b in range(values.shape[0]):
        for c in range(k):
            members = labels[b] == c
            total = weights[b, members].sum()
            out[b, c] = (weights[b, members] @ values[b, members] / total if total > 0
                         else empty[b, 0])
    return out


@pytest.mark.parametrize("limit", [H100, 4096])
def test_weighted_means_entry_launches_or_falls_back(glue, limit):
    # CuPy's weighted_means: the merge kernel where it applies, the generic means where its
    # shared memory is too small (4 KiB): the same means either way.
    glue.fake.shared_limits[0] = limit
    rng = np.random.default_rng(5)
    values = zero_mean_tokens(rng, 2, 64, 6)
    labels = rng.integers(0, 20, size=(2, 64))
    weights = rng.integers(0, 3, size=(2, 64)).astype(np.float64)
    empty = rng.normal(size=(2, 1, 6))
    got = _cupy.weighted_means(np, *(on_device(glue.fake, a) for a in (values, labels)), 20,
                               *(on_device(glue.fake, a) for a in (weights, empty)))
    assert glue.launched() == (["tokenpool::merge<double>"] if limit == H100 else [])
    glue.check(0)
    np.testing.assert_allclose(got, loop_weighted_means(values, labels, 20, weights, empty),
                               rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The PyTorch CUDA entries (backends/_torch.py), CPU tensors standing in for CUDA ones


@contextlib.contextmanager
def torch_through_the_fake(glue: Glue, stream: int) -> Iterator[Any]:
    """backends._torch takes its CUDA branches for CPU tensors (its one substitution point,
    ``_on_cuda``); _cupy.torch_cupy runs its own checks as for a CUDA tensor and gives the
    fake; PyTorch's current stream is ``stream``."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    from tokenpool_ops.backends import _torch  # imported before the test: see the top

    real_torch_cupy = _cupy.torch_cupy

    def torch_cupy(x: Any) -> Any:
        return real_torch_cupy(SimpleNamespace(device=SimpleNamespace(type="cuda"),
                                               dtype=x.dtype))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_torch, "_on_cuda", lambda tensor: True)
        patch.setattr(_cupy, "torch_cupy", torch_cupy)
        patch.setattr(torch.cuda, "current_stream",
                      lambda device: SimpleNamespace(cuda_stream=stream))
        yield torch


def no_dlpack(*args: Any) -> Any:
    raise AssertionError("a DLPack exchange on the PyTorch CUDA route")


def no_cupy_allocation(*args: Any) -> Any:
    raise AssertionError("an allocation from CuPy's pool on the PyTorch CUDA route")


def test_torch_arrays_are_views_that_map_back_to_their_tensors(glue, monkeypatch):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    base = torch.arange(120, dtype=torch.float32).reshape(4, 6, 5)
    tensor = base[1:, 2:, ::2]  # a storage offset and strides that are not C-contiguous
    with glue.fake.cuda.Device(1):  # no index: the current device
        arrays = _cupy.TorchArrays(glue.fake, torch.device("cpu"))
    array = arrays.to_array(tensor)
    assert array.device.id == 1
    np.testing.assert_array_equal(array, tensor.numpy())
    array[0, 0, 1] = -7.0  # writes land in the tensor: a view, not a copy
    assert base[1, 2, 2] == -7.0
    part = arrays.from_array(array[1:, ::2, 1:])
    want = tensor[1:, ::2, 1:]
    assert torch.equal(part, want)
    assert (part.data_ptr(), part.stride()) == (want.data_ptr(), want.stride())
    assert part.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    # An array the exchange did not make goes back through DLPack, as a copy of its values.
    other = glue.fake.asarray(np.ones((2, 3), dtype=np.float32))
    assert torch.equal(arrays.from_array(other), torch.ones(2, 3))
    # An empty tensor is a view of no bytes: CuPy's allocator is not asked (a CUDA graph
    # capture needs every buffer from PyTorch's), and an empty tensor comes back.
    monkeypatch.setattr(glue.fake, "empty", no_cupy_allocation)
    empty = arrays.to_array(torch.empty(0, 5, dtype=torch.int64))
    assert empty.shape == (0, 5) and empty.dtype == np.int64
    back = arrays.from_array(empty)
    assert back.shape == (0, 5) and back.dtype == torch.int64


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("merge_fits", [True, False])
def test_torch_pool_through_the_cuda_entries(glue, dtype, merge_fits, monkeypatch):
    n, k = (48, 20) if merge_fits else (300, 150)
    if not merge_fits:
        glue.fake.shared_limits[0] = merge_declining_limit(n, k, 4, dtype)
    rng = np.random.default_rng(6)
    x, scores, _ = problem(rng, 3, n, k, m=4)
    with torch_through_the_fake(glue, stream=4242) as torch:
        tensors = {name: torch.as_tensor(a, dtype=getattr(torch, dtype))
                   for name, a in (("x", x), ("scores", scores))}
        options = dict(scores=tensors["scores"], return_info=True, init="random", seed=3)
        # Views (TorchArrays), never DLPack: its exchanges were most of a block's host time.
        monkeypatch.setattr(glue.fake, "from_dlpack", no_dlpack)
        monkeypatch.setattr(torch, "from_dlpack", no_dlpack)
        monkeypatch.setattr(glue.fake, "empty", no_cupy_allocation)  # PyTorch's buffers only
        got = tokenpool_ops.pool(tensors["x"], k, "wkmedoids", **options)
        monkeypatch.undo()
    want = tokenpool_ops.pool(tensors["x"], k, "wkmedoids", fast_paths=False, **options)
    element = _cupy.CXX_TYPES[dtype]
    assert glue.launched() == [f"tokenpool::kmedoids<{element}, {str(merge_fits).lower()}, 2>"] + (
        [f"tokenpool::merge<{element}>"] if merge_fits else [])
    glue.check(0, stream=4242)
    tolerance = 1e-12 if dtype == "float64" else 1e-5
    for name in ("assignment", "medoids", "sizes"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0)
    torch.testing.assert_close(got.tokens, want.tokens, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(got.objective, want.objective, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("arrays", ["cupy", "torch"])
@pytest.mark.parametrize("prefix", [1, 4])
def test_patch_tokens_past_the_prefix_reach_the_kernels_uncopied(glue, arrays, prefix):
    # A ViT block pools the patch tokens of its (B, P + N, M) sequence, a view past the P
    # prefix tokens: both kernels read it where it is (problem b at b * (P + N) * M), and
    # the results are the generic code's on the same view.
    rng = np.random.default_rng(8 + prefix)
    b, n, k, m = 3, 40, 9, 4
    tokens, scores, _ = problem(rng, b, n, k, m)
    sequence = np.concatenate([rng.normal(size=(b, prefix, m)), tokens], axis=1)
    options = dict(scores=scores, return_info=True, init="random", seed=2)
    want = tokenpool_ops.pool(sequence[:, prefix:], k, "wkmedoids", fast_paths=False,
                              **options)
    if arrays == "cupy":
        on_gpu = on_device(glue.fake, sequence)
        with cupy_fast_paths():
            got = tokenpool_ops.pool(on_gpu[:, prefix:], k, "wkmedoids", **options)
        first_patch = on_gpu[:, prefix:].ctypes.data
    else:
        with torch_through_the_fake(glue, stream=5) as torch:
            tensor = torch.as_tensor(sequence)
            got = tokenpool_ops.pool(tensor[:, prefix:], k, "wkmedoids",
                                     **{**options, "scores": torch.as_tensor(scores)})
        first_patch = tensor[:, prefix:].data_ptr()
    assert glue.launched() == ["tokenpool::kmedoids<double, true, 2>", "tokenpool::merge<double>"]
    for named in glue.check(0, stream=None if arrays == "cupy" else 5):
        assert named["x"].ctypes.data == first_patch  # the sequence's memory: no copy
        assert int(named["x_stride"]) == (prefix + n) * m
    for name in ("assignment", "medoids", "sizes"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), getattr(want, name))
    np.testing.assert_allclose(np.asarray(got.tokens), want.tokens, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("compiled", [False, True])
def test_the_operators_pass_patch_tokens_to_the_kernels_uncopied(glue, compiled):
    # The custom operators (the kernels of a compiled pool call) hand a view past the
    # prefix to the glue as it is, which reads it in place; compiled by inductor, the graph
    # passes the view itself (no copy inserted). The results are the bits of the operators
    # on a contiguous copy.
    rng = np.random.default_rng(12)
    b, n, k, m, prefix = 3, 40, 9, 4, 1
    tokens, weights, init = problem(rng, b, n, k, m)
    sequence = np.concatenate([rng.normal(size=(b, prefix, m)), tokens], axis=1)
    with torch_through_the_fake(glue, stream=6) as torch:
        ops = torch.ops.tokenpool_ops
        given = torch.as_tensor(sequence)
        mean = given[:, prefix:].mean(dim=1, keepdim=True)
        init_t, weights_t = torch.as_tensor(init), torch.as_tensor(weights)

        def both_kernels(patches: Any) -> Any:
            clustered = ops.kmedoids(patches, mean, init_t, weights_t, 5, False)
            return (*clustered, *ops.merge(patches, mean, clustered[0], k, weights_t, None,
                                           weights_t, True))

        past_prefix = (torch.compile(lambda t: both_kernels(t[:, prefix:]), fullgraph=True)
                       if compiled else lambda t: both_kernels(t[:, prefix:]))
        got = past_prefix(given)
        want = both_kernels(given[:, prefix:].contiguous())
    assert glue.launched() == ["tokenpool::kmedoids<double, true, 2>",
                               "tokenpool::merge<double>"] * 2
    for named in glue.check(0, stream=6)[:2]:  # the view's launches
        assert named["x"].ctypes.data == given[:, prefix:].data_ptr()  # no copy
        assert int(named["x_stride"]) == (prefix + n) * m
    for got_one, want_one in zip(got, want, strict=True):
        torch.testing.assert_close(got_one, want_one, rtol=0, atol=0)


def test_torch_weighted_means_entry(glue):
    rng = np.random.default_rng(7)
    values = zero_mean_tokens(rng, 2, 30, 3)
    labels = rng.integers(0, 6, size=(2, 30))
    weights = rng.integers(0, 3, size=(2, 30)).astype(np.float32)
    empty = rng.normal(size=(2, 1, 3)).astype(np.float32)
    with torch_through_the_fake(glue, stream=99) as torch:
        from tokenpool_ops.backends import _torch

        got = _torch.cuda_weighted_means(
            torch.as_tensor(values.astype(np.float32)), torch.as_tensor(labels), 6,
            torch.as_tensor(weights), torch.as_tensor(empty))
    assert glue.launched() == ["tokenpool::merge<float>"]
    glue.check(0, stream=99)
    np.testing.assert_allclose(got.numpy(), loop_weighted_means(values, labels, 6, weights,
                                                                empty), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arrays", ["cupy", "torch"])
def test_shapes_neither_kernel_covers_take_the_generic_code(glue, arrays):
    # 2 KiB of shared memory: no plan for either kernel; nothing is compiled or launched,
    # and pool gives the generic results.
    glue.fake.shared_limits[0] = 2048
    x, scores, _ = problem(np.random.default_rng(8), 2, 30, 7)
    options = dict(scores=scores, return_info=True, init="random", seed=4)
    want = tokenpool_ops.pool(x, 7, "wkmedoids", fast_paths=False, **options)
    if arrays == "cupy":
        with cupy_fast_paths():
            got = tokenpool_ops.pool(on_device(glue.fake, x), 7, "wkmedoids", **options)
    else:
        with torch_through_the_fake(glue, stream=5) as torch:
            options["scores"] = torch.as_tensor(scores)
            got = tokenpool_ops.pool(torch.as_tensor(x), 7, "wkmedoids", **options)
        got = SimpleNamespace(**{name: getattr(got, name).numpy() for name in (
            "assignment", "medoids", "sizes", "tokens", "objective")})
    assert glue.launched() == [] and glue.fake.compiles == []
    assert_pool_equal(got, want, 1e-12)
