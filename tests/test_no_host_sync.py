"""A pooled forward pass reads no value on the host: the path a GPU tensor takes, proven on
the CPU.

On the CPU, ``fast_paths=False`` stands in for a GPU tensor's path (the Numba kernels read
host memory by design). Two proofs:

* every way a tensor's value reaches Python (``bool``, ``item``, ``tolist``, ``numpy``,
  ``cpu``, ``int``, ``float``) raises while ``pool(..., check_values=False,
  stop_early=False)`` and a patched model's forward run;
* on PyTorch's meta device, where no value exists, a dispatch mode fails any operation that
  mixes in a tensor from the CPU (a host-side draw copied over), and the tensor constructors
  refuse a Python value for the device (a constant built on the host).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch", reason="the host-read checks are about PyTorch tensors")
timm = pytest.importorskip("timm", reason="the patched-model checks need timm")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import tokenpool_ops  # noqa: E402
import tokenpool_ops._batching as batching  # noqa: E402
from tests.conftest import cuda_or_skip  # noqa: E402
from tokenpool_ops.timm import patch_timm  # noqa: E402

METHODS = ["kmeans", "kmedoids", "wkmeans", "wkmedoids", "topk", "random", "importance", "tome"]
HOST_READS = ("__bool__", "item", "tolist", "numpy", "cpu", "__int__", "__float__")
NO_SYNC = dict(check_values=False, stop_early=False, fast_paths=False)
SCHEDULE = [16, 14, 10, 6]  # patch tokens left after each of the 4 blocks


@contextmanager
def host_reads_forbidden(monkeypatch):
    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"host read: Tensor.{name}")
        return read

    with monkeypatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, refuse(name))
        yield


@contextmanager
def host_reads_counted(monkeypatch, reads: list[str]):
    """Every host read of a tensor value is appended to ``reads`` (and still happens)."""
    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            reads.append(name)
            return original(self, *args, **kwargs)
        return read

    with monkeypatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, counted(name))
        yield


def small_vit(device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4,
                             embed_dim=48, num_heads=3).eval().to(device)


def test_the_guard_catches_a_host_read(monkeypatch):
    with host_reads_forbidden(monkeypatch), pytest.raises(AssertionError, match="host read"):
        tokenpool_ops.pool(torch.randn(2, 10, 3), 4, "kmedoids")  # checks values: reads


@pytest.mark.parametrize("method", METHODS)
def test_pool_reads_no_value_on_the_host(monkeypatch, method):
    gen = torch.Generator().manual_seed(0)
    x, scores = torch.randn(2, 30, 8, generator=gen), torch.rand(2, 30, generator=gen)
    with host_reads_forbidden(monkeypatch):
        result = tokenpool_ops.pool(x, 7, method, scores=scores, return_info=True, **NO_SYNC)
    expected = tokenpool_ops.pool(x, 7, method, scores=scores, return_info=True,
                                  stop_early=False)
    torch.testing.assert_close(result.tokens, expected.tokens)


CHECKED_CALLS = {
    "pool wkmedoids": lambda x, s: tokenpool_ops.pool(x, 7, "wkmedoids", scores=s, sizes=s + 1,
                                                      stop_early=False, fast_paths=False),
    "pool topk": lambda x, s: tokenpool_ops.pool(x, 7, "topk", scores=s, fast_paths=False),
    "pool tome": lambda x, s: tokenpool_ops.pool(x, 7, "tome", metric=x[..., :3], sizes=s + 1,
                                                 fast_paths=False),
    "pool k >= N": lambda x, s: tokenpool_ops.pool(x, 30, "wkmedoids", scores=s,
                                                   fast_paths=False),
    "kmeans": lambda x, s: tokenpool_ops.kmeans(x, 7, weights=s, stop_early=False,
                                                fast_paths=False),
    "kmedoids k = 0": lambda x, s: tokenpool_ops.kmedoids(x, 0, weights=s, fast_paths=False),
}


@pytest.mark.parametrize("call", CHECKED_CALLS)
def test_default_checks_read_the_host_once(monkeypatch, call):
    """Issue #10 section 2: every value check (x, scores, sizes, weights, the overflow check
    of the result) is reduced into one flag, read once. The generic path stands in for a GPU
    tensor's (see the module docstring); its stop_early reads once per iteration by
    design, so it is off here."""
    gen = torch.Generator().manual_seed(0)
    x, scores = torch.randn(2, 30, 8, generator=gen), torch.rand(2, 30, generator=gen)
    reads: list[str] = []
    with host_reads_counted(monkeypatch, reads):
        CHECKED_CALLS[call](x, scores)
    assert reads == ["__int__"], reads


def test_cpu_tensors_are_read_one_by_one_and_device_tensors_packed(monkeypatch):
    """On the CPU a read costs no synchronisation, so PyTorch's fast path reads the flags
    one by one (the packing costs half a dozen operations); elsewhere it packs them into
    one read, as the generic code. Same answers either way."""
    import array_api_compat.torch as xp
    import tokenpool_ops.backends._torch as fast

    from tokenpool_ops._primitives import read_flags
    flags = [torch.tensor(True), torch.tensor(False), torch.tensor(True)]
    count = torch.tensor(7)
    assert fast.read_flags(xp, flags, count) == read_flags(xp, flags, count) == (
        [True, False, True], 7)
    assert fast.read_flags(xp, flags, None) == read_flags(xp, flags, None) == (
        [True, False, True], None)
    packed = []
    monkeypatch.setattr(fast, "generic_read_flags",
                        lambda *args: packed.append(args) or ([True], None))
    on_meta = [torch.tensor(True, device="meta")]
    assert fast.read_flags(xp, on_meta, None) == ([True], None)
    assert len(packed) == 1


@pytest.mark.parametrize("check_values", [True, False])
def test_only_the_host_reads_and_history_cut_of_a_stand_in_fused_kernel(monkeypatch,
                                                                         check_values):
    """A fused kernel (the CUDA one) leaves its iteration count on the device and writes
    max_iter + 1 history entries. The count is read in the one host read of the value
    checks (alone without them) and the history is cut to it. Stand-in kernel on torch CPU:
    the generic loop's own results, its count as a 0-d tensor, its history padded; so what
    this tests is the read count and the cut, not the kernel's results (tests/
    test_cuda_kernel.py and tests/test_tie_references.py test those)."""
    gen = torch.Generator().manual_seed(0)
    x, scores = torch.randn(2, 30, 8, generator=gen), torch.rand(2, 30, generator=gen)
    want = tokenpool_ops.pool(x, 7, "wkmedoids", scores=scores, return_info=True,
                              fast_paths=False)
    assert 0 < want.n_iter < 9, want.n_iter  # converged early: the padding is visible
    padded = torch.cat([want.history,
                        want.history[:, -1:].expand(-1, 10 - want.n_iter)], dim=1)

    def fused(xp, x, mean, init, weights, max_iter, stop_early):
        assert max_iter == 10
        return (want.assignment.clone(), want.medoids.clone(), padded.clone(),
                torch.tensor(want.n_iter))

    generic = batching.primitives_for
    monkeypatch.setattr(batching, "primitives_for",
                        lambda xp, fast_paths=True: replace(generic(xp, False), kmedoids=fused))
    reads: list[str] = []
    with host_reads_counted(monkeypatch, reads):
        got = tokenpool_ops.pool(x, 7, "wkmedoids", scores=scores, return_info=True,
                                 check_values=check_values)
    assert reads == ["__int__"], reads
    assert isinstance(got.n_iter, int) and got.n_iter == want.n_iter
    torch.testing.assert_close(got.history, want.history, rtol=0, atol=0)
    torch.testing.assert_close(got.tokens, want.tokens, rtol=0, atol=0)


@pytest.mark.parametrize(("bad", "message"), [
    ("x", "x contains NaN"), ("scores", "scores must be finite"),
    ("sizes", "sizes must be finite")])
def test_deferred_checks_still_raise_their_own_errors(bad, message):
    gen = torch.Generator().manual_seed(0)
    args = {"x": torch.randn(2, 30, 8, generator=gen), "scores": torch.rand(2, 30, generator=gen),
            "sizes": torch.ones(2, 30)}
    args[bad] = args[bad].clone()
    args[bad][1, 3] = float("nan") if bad == "x" else -1.0
    x = args.pop("x")
    before = {name: t.clone() for name, t in args.items()}
    with pytest.raises(ValueError, match=message):
        tokenpool_ops.pool(x, 7, "wkmedoids", **args)
    for name, tensor in args.items():  # inputs untouched by the computation that ran first
        assert torch.equal(tensor, before[name])


@pytest.mark.parametrize("method", METHODS)
def test_patched_forward_reads_no_value_on_the_host(monkeypatch, method):
    # The reference is the same network patched with the default options (value checks,
    # stopping early, the fast paths): a path that reads the host freely, and whose
    # clusterings reach the same fixed points.
    model = patch_timm(small_vit(), SCHEDULE, method=method, stop_early=False, fast_paths=False)
    reference = patch_timm(small_vit(), SCHEDULE, method=method)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with host_reads_forbidden(monkeypatch):
            logits = model(images)
        expected = reference(images)
    torch.testing.assert_close(logits, expected)


class NoHostTensors(TorchDispatchMode):
    """Fails any operation that takes a CPU tensor while its other tensors are on meta."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs))
                   if isinstance(a, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        if ("cpu" in devices and "meta" in devices) or (
                func is torch.ops.aten._to_copy.default and "cpu" in devices
                and kwargs.get("device") is not None
                and torch.device(kwargs["device"]).type == "meta"):
            raise AssertionError(f"{func} mixes a host tensor into the meta device")
        return func(*args, **kwargs)


@contextmanager
def no_host_data(monkeypatch):
    """``NoHostTensors``, and tensors made from Python or NumPy values on another device than
    the CPU refused: on a GPU that is a copy from host memory, which synchronises (CUDA's
    sync debug mode calls it one), and which the dispatch mode never sees (the copy happens
    inside the constructor)."""
    def refusing(name):
        original = getattr(torch, name)

        def make(data, *args, **kwargs):
            target = kwargs.get("device")
            if (not isinstance(data, torch.Tensor) and target is not None
                    and torch.device(target).type != "cpu"):
                raise AssertionError(f"torch.{name} copies a host value to {target}")
            return original(data, *args, **kwargs)
        return make

    with monkeypatch.context() as patch, NoHostTensors():
        for name in ("asarray", "as_tensor", "tensor"):
            patch.setattr(torch, name, refusing(name))
        yield


def test_the_meta_guard_catches_a_host_copy(monkeypatch):
    with NoHostTensors(), pytest.raises(AssertionError, match="host tensor"):
        torch.ones(3, device="meta") + torch.ones(3)
    with no_host_data(monkeypatch), pytest.raises(AssertionError, match="copies a host value"):
        torch.asarray(1.0, dtype=torch.float32, device="meta")


@pytest.mark.parametrize("method", METHODS)
def test_pool_on_the_meta_device_copies_nothing_from_the_host(method, monkeypatch):
    x = torch.empty(2, 30, 8, device="meta")
    scores = torch.empty(2, 30, device="meta")
    with no_host_data(monkeypatch):
        tokens = tokenpool_ops.pool(x, 7, method, scores=scores, **NO_SYNC)
    assert tokens.device.type == "meta" and tokens.shape == (2, 7, 8)


@pytest.mark.parametrize("method", ["wkmedoids", "random"])
def test_patched_forward_on_the_meta_device_copies_nothing_from_the_host(method, monkeypatch):
    model = patch_timm(small_vit("meta"), SCHEDULE, method=method, stop_early=False,
                       fast_paths=False)
    with torch.no_grad(), no_host_data(monkeypatch):
        logits = model(torch.empty(2, 3, 64, 64, device="meta"))
    assert logits.device.type == "meta" and logits.shape == (2, 1000)


# ---------------------------------------------------------------------------------------------
# On a GPU: the same promises checked by CUDA itself (benchmarks/gpu_check.sh runs these).


@pytest.mark.parametrize("fast_paths", [False, True], ids=["generic", "kernel"])
@pytest.mark.parametrize("method", METHODS)
def test_gpu_pool_makes_no_host_sync(method, fast_paths):
    device = cuda_or_skip()
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(4, 197, 64, device=device, generator=gen)
    scores = torch.rand(4, 197, device=device, generator=gen)
    options = dict(check_values=False, stop_early=False, fast_paths=fast_paths)
    tokenpool_ops.pool(x, 49, method, scores=scores, **options)  # warm-up: compiles, caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = tokenpool_ops.pool(x, 49, method, scores=scores, **options)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.device.type == "cuda" and tokens.shape == (4, 49, 64)


@pytest.mark.parametrize("fast_paths", [False, True], ids=["generic", "kernel"])
def test_gpu_patched_deit_replays_in_a_cuda_graph(fast_paths):
    device = cuda_or_skip()
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval().to(device)
    patch_timm(model, [196, 193, 179, 142, 97, 64, 46, 34, 13, 9, 1, 0], stop_early=False,
               fast_paths=fast_paths)
    images = torch.randn(8, 3, 224, 224, device=device)
    static = images.clone()
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up on a side stream, as capture requires
                model(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(static)
        eager = model(images)
        static.copy_(images)
        graph.replay()
    torch.testing.assert_close(captured, eager)
