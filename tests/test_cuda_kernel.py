"""The CUDA K-Medoids kernel (backends/cuda/kmedoids.cu) equals the generic code.

No GPU is needed: the same CUDA source is compiled for the CPU with g++ through
backends/cuda/host_emulation.h (one std::thread per CUDA thread, blocks one after another)
and called through ctypes, with the argument preparation and result handling of
backends/_cupy.py. The kernel then replaces ``Primitives.kmedoids`` of the NumPy backend,
and ``pool``/``kmedoids`` must give what ``fast_paths=False`` gives:

* exactly, on integer tokens of mean zero (every distance exact however it is computed, so
  the many exact ties must break the same way);
* up to rounding on float tokens (labels and medoids identical in float64);
* over N from 1 to 1024, every K, batches of B = 0, zero-weight clusters and duplicated
  tokens; and shapes beyond the kernel's plan take the generic path, launching nothing.

The merge kernel (Algorithm 1, line 6) is compared with the generic merge the same way.
PyTorch tensors reach both kernels through backends._torch's CUDA branches and _cupy's torch
entries; on the CPU, CPU tensors stand in for CUDA ones (NumPy views of their memory for
CuPy's), so the routing, the gradient rule and "every buffer is PyTorch's" are checked with
the host build. NVRTC, the compiler the glue calls through CuPy, compiles each instantiation
alone with the glue's options, without flush-to-zero; any input, NaN and overflow included,
leaves labels and medoids in range. The
tests at the end need a CUDA GPU with CuPy (and PyTorch) and skip, with the reason,
elsewhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import importlib.util
import itertools
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenpool_ops.backends import _cupy

import tokenpool_ops
from tests.host_cuda import HOST_LIBRARY_OPTIONS, GlueOnHost, build_library, exported_symbols
from tokenpool_ops import backends

#: Dynamic shared memory per block on an H100 (opt-in limit): the plan of a real GPU.
H100_SHARED_BYTES = 232448
#: Where the distances live on the host: as the kernel's plan for an H100 decides, or forced
#: into shared memory or into the global workspace at any N.
SCHEMES = ["plan", "shared", "global"]


# ---------------------------------------------------------------------------------------------
# The host build


class HostKernels:
    """The CPU build of kmedoids.cu, called as the GPU glue calls the GPU build."""

    def __init__(self, library: ctypes.CDLL, glue: GlueOnHost, rows: int) -> None:
        self.library = library
        self.glue = glue  # the glue's own launches, run on the host (tests/host_cuda.py)
        self.rows = rows  # fill_matrix's tile rows (_cupy.TILE_ROWS) its plans take
        for suffix in _cupy.CXX_TYPES:
            function = getattr(library, f"tp_kmedoids_{suffix}")
            function.restype = None
            function.argtypes = ([ctypes.c_void_p, ctypes.c_longlong] + [ctypes.c_void_p] * 3
                                 + [ctypes.c_int] * 7 + [ctypes.c_void_p] * 5)
            getattr(library, f"tp_kmedoids_shared_bytes_{suffix}").restype = ctypes.c_longlong
            merge = getattr(library, f"tp_merge_{suffix}")
            merge.restype = None
            merge.argtypes = ([ctypes.c_void_p, ctypes.c_longlong] + [ctypes.c_void_p] * 5
                              + [ctypes.c_int] * 6 + [ctypes.c_void_p] * 4)
            getattr(library, f"tp_merge_shared_bytes_{suffix}").restype = ctypes.c_longlong

    def with_rows(self, rows: int) -> HostKernels:
        """The same builds, planning fills of ``rows`` tile rows."""
        return HostKernels(self.library, self.glue, rows)

    def plan(self, n: int, k: int, dtype_name: str, scheme: str) -> _cupy.KMedoidsPlan:
        plan = _cupy.kmedoids_plan(n, k, dtype_name, H100_SHARED_BYTES, self.rows)
        if scheme == "plan" and plan is not None:
            return plan
        # Forced, or beyond an H100's shared memory (float64 at large N): the host has no
        # such limit.
        shared = scheme == "shared"
        return _cupy.KMedoidsPlan(_cupy.kernel_name(dtype_name, shared, self.rows), shared,
                                  _cupy.kmedoids_shared_bytes(n, k, dtype_name, shared,
                                                              self.rows), self.rows)

    def launch(self, args: _cupy.KernelArguments, plan: _cupy.KMedoidsPlan,
               max_iter: int) -> None:
        """A ``_cupy.KMedoidsLauncher``: ``_cupy._launch`` itself, run on the host."""
        self.glue.launch(args, plan, max_iter)

    def launch_merge(self, args: _cupy.MergeArguments, with_objective: bool) -> None:
        """A ``_cupy.MergeLauncher``: ``_cupy._launch_merge`` itself, run on the host."""
        self.glue.launch_merge(args, with_objective)

    def run(self, x: np.ndarray, mean: np.ndarray, init: np.ndarray, weights: np.ndarray,
            max_iter: int, stop_early: bool, scheme: str = "plan",
            dtype_name: str | None = None) -> tuple[Any, Any, Any, int]:
        """The kernel on the host: with scheme "plan", exactly ``_cupy.run_kmedoids`` with
        NumPy for CuPy and an H100's shared memory (and ``rows``); else the distances forced
        into shared or global memory at any N. ``dtype_name`` names the element type where
        NumPy has none (bfloat16, passed as its uint16 bits)."""
        if scheme == "plan" and dtype_name is None:
            fused = _cupy.fused_kmedoids(np, self.launch, H100_SHARED_BYTES, self.rows, x,
                                         mean, init, weights, max_iter, stop_early)
            if fused is not None:
                return fused
        dtype_name = dtype_name or x.dtype.name
        plan = self.plan(x.shape[1], init.shape[-1], dtype_name, scheme)
        stand_in = x.view(np.float16) if dtype_name == "bfloat16" else x  # same item size
        args = _cupy.kernel_arguments(np, stand_in, mean, init, weights, max_iter, plan)
        if x.shape[0] > 0:  # as the glue: a grid of no blocks is an invalid launch
            self.launch(dataclasses.replace(args, x=np.ascontiguousarray(x)), plan, max_iter)
        return _cupy.kernel_results(args, max_iter, stop_early)

    def merge(self, x: np.ndarray, mean: np.ndarray, labels: np.ndarray, k: int,
              weights: np.ndarray, fallback: np.ndarray | None, carried: np.ndarray
              ) -> tuple[Any, Any, Any]:
        """Exactly ``_cupy.run_merge``, with NumPy and the host build."""
        merged = _cupy.fused_merge(np, self.launch_merge, H100_SHARED_BYTES, x, mean, labels,
                                   k, weights, fallback, carried, True)
        assert merged is not None, "every test shape is one the merge kernel covers"
        return merged


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> HostKernels:
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ not found: the host build of the kernel source cannot be compiled")
    library = tmp_path_factory.mktemp("cuda_host") / "libtokenpool_cuda_host.so"
    command = [compiler, *HOST_LIBRARY_OPTIONS, str(_cupy.KERNEL_DIR / "host_build.cpp"), "-o",
               str(library)]
    built = subprocess.run(command, capture_output=True, text=True, check=False)
    assert built.returncode == 0, f"host build failed:\n{built.stderr}"
    glue = tmp_path_factory.mktemp("glue_on_host")
    return HostKernels(ctypes.CDLL(str(library)), GlueOnHost(build_library(glue), glue / "cache"),
                       _cupy.tile_rows("90"))


@pytest.fixture(scope="module", params=_cupy.TILE_ROWS,
                ids=lambda rows: "4x4 tiles" if rows == 1 else "8x4 pair tiles")
def tiles(host: HostKernels, request: pytest.FixtureRequest) -> HostKernels:
    """The host build planning each shape of fill_matrix's blocks in turn (the A100's 4 x 4
    tiles, the H100's 8 x 4 pairs): both must give the generic code's bits."""
    return host.with_rows(request.param)


@contextlib.contextmanager
def numpy_kmedoids_is(kmedoids: Any) -> Iterator[None]:
    """NumPy's ``Primitives.kmedoids`` (the Numba kernel's entry) becomes ``kmedoids``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backends, "_compiled_paths", lambda name: {"kmedoids": kmedoids})
        yield


@contextlib.contextmanager
def kernel_as_fast_path(host: HostKernels, scheme: str) -> Iterator[list[int]]:
    """NumPy's ``Primitives.kmedoids`` becomes the host kernel; yields the number of calls
    (so a test can see that the kernel ran)."""
    calls = [0]

    def kmedoids(xp: Any, x: np.ndarray, mean: np.ndarray, init: np.ndarray,
                 weights: np.ndarray, max_iter: int, stop_early: bool) -> Any:
        calls[0] += 1
        return host.run(x, mean, init, weights, max_iter, stop_early, scheme)

    with numpy_kmedoids_is(kmedoids):
        yield calls


# ---------------------------------------------------------------------------------------------
# Data


def zero_mean_integer_tokens(rng: np.random.Generator, batch: int, n: int, m: int,
                             spread: int) -> np.ndarray:
    """Integer tokens in [-spread, spread], each with its mirror image (an odd N adds the
    origin): the mean is exactly zero, so every distance is exact whichever way it is
    computed. Small spreads give many duplicates and ties."""
    half = rng.integers(-spread, spread + 1, size=(batch, n // 2, m))
    parts = [half, -half] + ([np.zeros((batch, 1, m), dtype=half.dtype)] if n % 2 else [])
    return rng.permuted(np.concatenate(parts, axis=1), axis=1).astype(np.float64)


def integer_weights(rng: np.random.Generator, batch: int, n: int) -> np.ndarray:
    """Weights in {0, 1, 2}: zero-weight tokens, and clusters whose weights sum to zero."""
    return rng.integers(0, 3, size=(batch, n)).astype(np.float64)


def distinct_init(rng: np.random.Generator, batch: int, n: int, k: int) -> np.ndarray:
    rows = [rng.permutation(n)[:k] for _ in range(batch)]
    return np.stack(rows).astype(np.int64) if rows else np.empty((0, k), dtype=np.int64)


def assert_same_clustering(got: Any, want: Any, exact: bool) -> None:
    assert got.n_iter == want.n_iter
    for field in ("assignment", "medoids"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
    for field in ("history", "objective"):
        if exact:
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field),
                                          err_msg=field)
        else:
            np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-10,
                                       atol=1e-10, err_msg=field)


def test_host_libraries_export_only_their_entry_points(host):
    # Both host builds live in the test process beside PyTorch and other C++ libraries. A
    # process-wide unique symbol ("u": g++ makes inline variables and the statics of inline
    # functions so, libstdc++'s std::barrier waiter pool among them) binds every library loaded
    # after to the first definition, even under RTLD_LOCAL, whatever layout each was compiled
    # with; none may be exported, and no function but the C entry points.
    if shutil.which("nm") is None:
        pytest.skip("nm not found: the host libraries' symbols cannot be listed")
    for library, entries in ((host.library, "tp_"), (host.glue.launcher.library, "tp_test_")):
        symbols = exported_symbols(Path(library._name))
        assert not [s for s in symbols if s.startswith("u ")], symbols
        functions = {s.split()[1] for s in symbols if s.startswith("T ")}
        assert functions and all(name.startswith(entries) for name in functions), functions


# ---------------------------------------------------------------------------------------------
# The glue's arithmetic agrees with the kernel's


def test_constants_and_layout_agree_with_the_kernel(host):
    assert host.library.tp_block_threads() == _cupy.BLOCK_THREADS
    assert host.library.tp_feature_chunk() == _cupy.FEATURE_CHUNK
    for dtype_name, accumulator in (("float64", 8), ("float32", 4), ("float16", 4),
                                    ("bfloat16", 4)):
        entry = getattr(host.library, f"tp_kmedoids_shared_bytes_{dtype_name}")
        merge_entry = getattr(host.library, f"tp_merge_shared_bytes_{dtype_name}")
        for n, k in ((1, 1), (197, 98), (237, 1), (253, 1), (577, 49), (4096, 4096)):
            for shared, rows in itertools.product((True, False), _cupy.TILE_ROWS):
                assert entry(n, k, int(shared), rows) == _cupy.kmedoids_shared_bytes(
                    n, k, dtype_name, shared, rows)
            for objective in (True, False):
                assert merge_entry(n, k, int(objective)) == _cupy.merge_shared_bytes(
                    n, k, accumulator, objective)


#: A host program on the device helpers alone: what the kernels rely on from the emulation's
#: cp.async model and from the order keys of the medoid choice and the merge objective.
_HELPERS_PROGRAM = r"""
#include <cstdio>
#include "host_emulation.h"
#include "device_helpers.cuh"
using namespace tokenpool;
int main() {
  float source = 7.0f, target = -1.0f;
  copy_async(&target, &source);
  commit_copies();
  std::printf("before wait %g\n", target);
  wait_copies<0>();
  std::printf("after wait %g\n", target);
  const float floats[] = {-INFINITY, -3.5f, -1e-45f, -0.0f, 0.0f, 1e-45f, 2.0f, INFINITY};
  for (float v : floats) {
    std::printf("float %a %llu %a\n", v, order_key(v), from_order_key<float>(order_key(v)));
  }
  const double doubles[] = {-INFINITY, -3.5, -5e-324, -0.0, 0.0, 5e-324, 2.0, INFINITY};
  for (double v : doubles) {
    std::printf("double %a %llu %a\n", v, order_key(v), from_order_key<double>(order_key(v)));
  }
  return 0;
}
"""


_OVERRUN_PROGRAM = r"""
#include "host_emulation.h"

// One block whose first thread writes `past` bytes beyond its `bytes` of dynamic shared memory.
void kernel(std::size_t bytes, std::size_t past) {
  TP_DYNAMIC_SHARED(shared);
  if (threadIdx.x == 0) shared[bytes + past - 1] = 0;
}

int main(int, char** argv) {
  const std::size_t past = static_cast<std::size_t>(std::atoi(argv[1]));
  tp_host::launch(1, 32, 100, [=] { kernel(100, past); });
  std::puts("launched");
  return 0;
}
"""


def _build_host_program(folder: Path, name: str, source: str, what: str) -> Path:
    """``source`` built with g++ beside the kernel headers, as ``folder / name``; skips
    without g++, saying ``what`` cannot be done."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip(f"g++ not found: {what}")
    program = folder / f"{name}.cpp"
    program.write_text(source)
    binary = folder / name
    built = subprocess.run([compiler, "-std=c++20", "-O1", "-pthread", f"-I{_cupy.KERNEL_DIR}",
                            str(program), "-o", str(binary)], capture_output=True, text=True,
                           check=False)
    assert built.returncode == 0, built.stderr
    return binary


def test_host_launch_stops_a_kernel_that_writes_past_its_shared_memory(tmp_path):
    # A write past the layout lands in the guard after the buffer and stops the process at the
    # launch's end, rather than corrupt the heap of the test process unseen; a write within
    # the layout passes.
    binary = _build_host_program(tmp_path, "overrun", _OVERRUN_PROGRAM,
                                 "the host emulation cannot be built")
    within = subprocess.run([str(binary), "0"], capture_output=True, text=True, check=False)
    assert (within.returncode, within.stdout) == (0, "launched\n"), within.stderr
    past = subprocess.run([str(binary), "1"], capture_output=True, text=True, check=False)
    assert past.returncode != 0 and "launched" not in past.stdout
    assert "wrote past its dynamic shared memory" in past.stderr


def test_helpers_defer_copies_and_order_keys_sort_numerically(tmp_path):
    # The host model of cp.async lands a copy only at the wait that covers it (so a kernel
    # reading its stage too early fails here as it might on a GPU); order_key sorts values as
    # numbers, -0 as +0, and from_order_key inverts it (the atomicMin choices rely on both).
    binary = _build_host_program(tmp_path, "helpers", _HELPERS_PROGRAM,
                                 "the device helpers cannot be built for the host")
    lines = subprocess.run([str(binary)], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert lines[:2] == ["before wait -1", "after wait 7"]
    for kind in ("float", "double"):
        rows = [line.split()[1:] for line in lines if line.startswith(kind + " ")]
        values = [float.fromhex(value) for value, _, _ in rows]
        keys = [int(key) for _, key, _ in rows]
        back = [float.fromhex(value) for _, _, value in rows]
        assert values == sorted(values)  # the table is in numeric order...
        zero = values.index(0.0)  # -0.0 (equal to 0.0, listed first)
        assert keys[zero] == keys[zero + 1]  # ...-0 and +0 share a key...
        assert keys[: zero + 1] == sorted(set(keys[: zero + 1]))  # ...and keys rise with it
        assert keys[zero + 1 :] == sorted(set(keys[zero + 1 :]))
        assert max(keys) < 2**64 - 1  # below kNoKey, infinity included
        assert [str(v) for v in back] == [str(abs(v)) if v == 0 else str(v) for v in values]


@pytest.mark.parametrize("rows", _cupy.TILE_ROWS)
def test_plan_chooses_a_scheme_or_declines(rows):
    # The N x N matrix in shared memory where it fits, in the global workspace above.
    plan = _cupy.kmedoids_plan(197, 98, "float32", H100_SHARED_BYTES, rows)
    assert plan is not None and plan.shared_matrix and plan.tile_rows == rows
    assert plan.kernel == f"tokenpool::kmedoids<float, true, {rows}>"
    assert plan.shared_bytes <= H100_SHARED_BYTES
    a100_limit = 166912
    # On an A100 too: the fill's stage and raw buffers overlay the matrix (one round).
    assert _cupy.kmedoids_plan(197, 98, "float32", a100_limit, rows).shared_matrix
    assert not _cupy.kmedoids_plan(202, 98, "float32", a100_limit, rows).shared_matrix
    for n in (577, 1025):
        plan = _cupy.kmedoids_plan(n, n // 2, "float32", a100_limit, rows)
        assert plan is not None and not plan.shared_matrix
    assert _cupy.kmedoids_plan(577, 98, "float16", H100_SHARED_BYTES, rows).kernel == (
        f"tokenpool::kmedoids<tokenpool::Half, false, {rows}>")
    # The limits the README gives, float32 on an H100 (232448 - 64 bytes), worked out from
    # KMedoidsLayout::bytes(). With the matrix: N = 236, K = 1 fills in one round
    # (59 * 60 / 2 = 1770 <= 7 * 256 tiles), so the matrix overlays the fill region:
    # 236 * 237 * 4 = 223728, + 8 + (2*236 + 8) * 4 + (2*236 + 2 + 1 * 8 + 1 + 236 + 2) * 4
    # = 228540 bytes (the one cluster's 8 words of member bits, then the moved list, the
    # search list and their two counts); N = 237 takes two rounds
    # (1830 tiles) with 4 x 4 tiles, matrix beside the fill region (60 groups of 132 floats
    # and two raw buffers, 107520 bytes): 337040. In the workspace (a tile-major
    # stage of ceil(N / 4) groups of 132 elements, no raw buffers, no member bits),
    # N = 1568 (392 groups) needs 392*132*4 + 8 + (2*1568 + 8) * 4 + (2*1568 + 2) * 4 =
    # 232112; N = 1569 (393 groups) needs 232656, over 232448 - 64.
    assert _cupy.kmedoids_shared_bytes(236, 1, "float32", True, rows) == 228540
    assert _cupy.kmedoids_shared_bytes(1568, 1, "float32", False, rows) == 232112
    assert _cupy.kmedoids_plan(236, 1, "float32", H100_SHARED_BYTES, rows).shared_matrix
    # With 8 x 4 pairs (4 * 256 a round) N = 237 still fills in one round (60 tile rows: 30
    # block rows, 30 * 60 - 2 * 30 * 29 / 2 = 930 pairs): 237 * 237 * 4 = 224676 -> 224688,
    # + 8 + (2*237 + 8) * 4 + (2*237 + 2 + 8 + 1 + 237 + 2) * 4 = 229520 bytes. N = 238 in one
    # round needs 238 * 239 * 4 = 227536 + 8 + 484 * 4 + 727 * 4 = 232388, 4 bytes over.
    pairs = rows == 2
    assert _cupy.kmedoids_shared_bytes(237, 1, "float32", True, rows) == (
        229520 if pairs else 337040)
    assert _cupy.kmedoids_plan(237, 1, "float32", H100_SHARED_BYTES, rows).shared_matrix == pairs
    assert not _cupy.kmedoids_plan(238, 1, "float32", H100_SHARED_BYTES, rows).shared_matrix
    assert _cupy.kmedoids_plan(1568, 1, "float32", H100_SHARED_BYTES, rows) is not None
    assert _cupy.kmedoids_plan(1569, 1, "float32", H100_SHARED_BYTES, rows) is None
    # The shape, B=256, N=197, K=98: 197 * 197 * 4 = 155236 -> 155248 (16-byte
    # round), + 8*98 + (2*197 + 8) * 4 + (2*197 + 2*98 + 98*7 + 98 + 197 + 2) * 4 = 163932,
    # under the A100's 166912 - 64 too.
    assert _cupy.kmedoids_shared_bytes(197, 98, "float32", True, rows) == 163932
    # Shapes and types the kernel does not cover: the generic code runs.
    assert _cupy.kmedoids_plan(10, 0, "float32", H100_SHARED_BYTES, rows) is None
    assert _cupy.kmedoids_plan(10, 11, "float32", H100_SHARED_BYTES, rows) is None
    assert _cupy.kmedoids_plan(_cupy.MAX_TOKENS + 1, 8, "float32", H100_SHARED_BYTES,
                               rows) is None
    assert _cupy.kmedoids_plan(10, 3, "complex64", H100_SHARED_BYTES, rows) is None
    assert _cupy.kmedoids_plan(2048, 64, "float32", H100_SHARED_BYTES, rows) is None


def _nvrtc() -> ctypes.CDLL:
    """NVRTC, the compiler the glue calls through CuPy: from the system or from the pip wheels
    that PyTorch and CuPy install (nvidia/cu13/lib, nvidia/cuda_nvrtc/lib)."""
    import ctypes.util
    import site

    candidates = [ctypes.util.find_library("nvrtc")]
    for packages in site.getsitepackages():
        candidates += sorted(str(p) for p in Path(packages).glob("nvidia/*/lib/libnvrtc.so*"))
    for candidate in filter(None, candidates):
        folder = Path(candidate).parent
        for builtins in sorted(folder.glob("libnvrtc-builtins.so*")):  # NVRTC loads it itself
            with contextlib.suppress(OSError):
                ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
        with contextlib.suppress(OSError):
            return ctypes.CDLL(candidate)
    pytest.skip("NVRTC not found: the CuPy module's compilation is untested")


def _nvrtc_ptx(nvrtc: ctypes.CDLL, name: str, options: tuple[str, ...]) -> tuple[str, str]:
    """(PTX, lowered name) of instantiation ``name`` of kmedoids.cu, compiled alone as
    ``_cupy._nvrtc`` compiles it (CuPy adds --device-as-default-execution-space and the
    architecture)."""
    program = ctypes.c_void_p()
    source = (_cupy.KERNEL_DIR / "kmedoids.cu").read_bytes()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), source, b"kmedoids.cu", 0, None,
                                    None) == 0
    assert nvrtc.nvrtcAddNameExpression(program, name.encode()) == 0
    encoded = [o.encode() for o in (*options, "--device-as-default-execution-space",
                                    "-arch=compute_80")]
    compiled = nvrtc.nvrtcCompileProgram(program, len(encoded),
                                         (ctypes.c_char_p * len(encoded))(*encoded))
    log_size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(log_size))
    log = ctypes.create_string_buffer(log_size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    assert compiled == 0, log.value.decode()
    lowered = ctypes.c_char_p()
    assert nvrtc.nvrtcGetLoweredName(program, name.encode(), ctypes.byref(lowered)) == 0, name
    lowered_name = (lowered.value or b"").decode()  # the program owns it: read it now
    ptx_size = ctypes.c_size_t()
    nvrtc.nvrtcGetPTXSize(program, ctypes.byref(ptx_size))
    ptx = ctypes.create_string_buffer(ptx_size.value)
    nvrtc.nvrtcGetPTX(program, ptx)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    return ptx.value.decode(), lowered_name


@pytest.mark.parametrize("name", ["tokenpool::kmedoids<float, true, 1>",
                                  "tokenpool::kmedoids<float, true, 2>",
                                  "tokenpool::merge<float>"])
def test_nvrtc_compiles_one_instantiation_without_flush_to_zero(name):
    # With the glue's options, NVRTC compiles just the instantiation named, and its PTX keeps
    # subnormals and IEEE division and square root (the host build's arithmetic). CuPy's
    # RawModule appends -ftz=true, which would flush them: that PTX is not the same.
    nvrtc = _nvrtc()
    ptx, lowered = _nvrtc_ptx(nvrtc, name, _cupy.compile_options())
    assert lowered.startswith("_ZN9tokenpool") and ptx.count(".entry") == 1
    assert f".entry {lowered}(" in ptx
    for approximation in (".ftz", ".approx", "div.full"):
        assert approximation not in ptx, approximation
    assert "div.rn.f32" in ptx or "sqrt.rn.f32" in ptx  # IEEE forms, present in both kernels
    flushed, _ = _nvrtc_ptx(nvrtc, name, (*_cupy.compile_options(), "-ftz=true"))
    assert ".ftz" in flushed


def test_every_instantiation_the_glue_names_compiles():
    # One NVRTC program with every name: each lowers to a kernel of the source.
    nvrtc = _nvrtc()
    program = ctypes.c_void_p()
    source = (_cupy.KERNEL_DIR / "kmedoids.cu").read_bytes()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), source, b"kmedoids.cu", 0, None,
                                    None) == 0
    names = [name.encode() for name in _cupy.kernel_names()]
    for name in names:
        assert nvrtc.nvrtcAddNameExpression(program, name) == 0
    options = [option.encode() for option in (*_cupy.compile_options(), "-arch=compute_80")]
    compiled = nvrtc.nvrtcCompileProgram(program, len(options),
                                         (ctypes.c_char_p * len(options))(*options))
    assert compiled == 0
    for name in names:
        lowered = ctypes.c_char_p()
        assert nvrtc.nvrtcGetLoweredName(program, name, ctypes.byref(lowered)) == 0, name
        assert lowered.value and lowered.value.startswith(b"_ZN9tokenpool")
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


def test_dispatch_offers_the_kernel_to_cupy_and_declines_off_cuda():
    # CuPy arrays get the kernel as their fused K-Medoids and the merge kernel's means;
    # PyTorch tensors that are not on a CUDA device never reach CuPy (the CPU ones take the
    # Numba kernel or PyTorch).
    assert backends._fast_paths("cupy")["kmedoids"] is _cupy.kmedoids
    assert backends._fast_paths("cupy")["weighted_means"] is _cupy.weighted_means
    torch = pytest.importorskip("torch", reason="torch is not installed")
    from tokenpool_ops.backends import _torch

    for device in ("cpu", "meta"):
        x = torch.zeros(2, 5, 3, device=device)
        labels = torch.zeros(2, 5, dtype=torch.int64, device=device)
        weights = torch.ones(2, 5, device=device)
        empty = x.mean(1, keepdim=True)
        assert _cupy.torch_cupy(x) is None
        assert _cupy.torch_kmedoids(x, empty, labels[:, :2], weights, 3, True) is None
        assert _cupy.torch_weighted_means(x, labels, 2, weights, empty) is None
        assert not _torch._on_cuda(x)
        assert _torch.cuda_weighted_means(x, labels, 2, weights, empty) is None


# ---------------------------------------------------------------------------------------------
# Exact equality with the generic code


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 48), m=st.integers(1, 4),
       batch=st.integers(1, 3), data=st.data())
def test_pool_equals_generic_exactly_on_integer_tokens(tiles, seed, n, m, batch, data):
    rng = np.random.default_rng(seed)
    k = data.draw(st.integers(1, n), label="k")
    method = data.draw(st.sampled_from(["kmedoids", "wkmedoids"]), label="method")
    scheme = data.draw(st.sampled_from(SCHEMES), label="scheme")
    stop_early = data.draw(st.booleans(), label="stop_early")
    max_iter = data.draw(st.integers(0, 8), label="max_iter")
    dtype = data.draw(st.sampled_from([np.float64, np.float32]), label="dtype")
    x = zero_mean_integer_tokens(rng, batch, n, m, spread=data.draw(st.integers(1, 3)))
    scores = integer_weights(rng, batch, n).astype(dtype)
    init = distinct_init(rng, batch, n, k) if data.draw(st.booleans()) else None
    kwargs = dict(scores=scores, init=init, max_iter=max_iter, stop_early=stop_early,
                  return_info=True)
    want = tokenpool_ops.pool(x.astype(dtype), k, method, fast_paths=False, **kwargs)
    with kernel_as_fast_path(tiles, scheme) as calls:
        got = tokenpool_ops.pool(x.astype(dtype), k, method, **kwargs)
    assert calls[0] == (1 if k < n else 0)  # k = n returns x itself (Algorithm 1, line 1)
    assert_same_clustering(got, want, exact=True)
    np.testing.assert_array_equal(got.sizes, want.sizes)
    np.testing.assert_allclose(got.tokens, want.tokens, rtol=1e-6, atol=1e-6)


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40), data=st.data())
def test_kmedoids_equals_generic_exactly_with_zero_weights_and_duplicates(tiles, seed, n, data):
    # kmedoids() itself (k = n runs the loop too), every k, weights with zero-weight clusters;
    # and init with repeated tokens, which only check_values=False lets through (the lowest
    # cluster keeps a shared medoid, the others stay empty).
    rng = np.random.default_rng(seed)
    k = data.draw(st.integers(1, n), label="k")
    x = zero_mean_integer_tokens(rng, 2, n, 2, spread=1)  # spread 1: mostly duplicates
    weights = integer_weights(rng, 2, n)
    scheme = data.draw(st.sampled_from(SCHEMES), label="scheme")
    repeats = data.draw(st.booleans(), label="repeats")
    init = rng.integers(0, n, size=(2, k)) if repeats else "random"
    kwargs = dict(weights=weights, init=init, seed=seed % 1000, max_iter=6,
                  check_values=not repeats)
    want = tokenpool_ops.kmedoids(x, k, fast_paths=False, **kwargs)
    with kernel_as_fast_path(tiles, scheme) as calls:
        got = tokenpool_ops.kmedoids(x, k, **kwargs)
    assert calls[0] == 1
    assert_same_clustering(got, want, exact=True)
    np.testing.assert_array_equal(got.centres, want.centres)


@settings(max_examples=12)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 1024), batch=st.integers(1, 2))
@example(seed=1, n=1024, batch=2)  # the largest N of issue #10, matrix in the workspace
@example(seed=2, n=224, batch=1)  # the first N whose float32 matrix leaves shared memory
@example(seed=3, n=577, batch=0)  # no problem at all
def test_pool_equals_generic_exactly_at_every_size(tiles, seed, n, batch):
    # N over the kernel's range on an H100's plan, every K, tokens with many duplicates,
    # weights in {0, 1, 2}, and a problem whose scores are all zero: every cluster has zero
    # weight (the merge falls back to the sizes) and every medoid cost ties at 0.
    rng = np.random.default_rng(seed)
    # Any K, but mostly K < 64 (as in a ViT): large K leaves little for the loop to do.
    k = int(rng.integers(1, (n if rng.random() < 0.3 else min(n, 64)) + 1))
    dtype = (np.float64, np.float32)[seed % 2]
    x = zero_mean_integer_tokens(rng, batch, n, int(rng.integers(1, 4)),
                                 spread=int(rng.integers(1, 5))).astype(dtype)
    scores = integer_weights(rng, batch, n).astype(dtype)
    if batch and rng.random() < 0.5:
        scores[0] = 0
    kwargs = dict(scores=scores, init="random", seed=seed % 1000,
                  max_iter=int(rng.integers(0, 9)), return_info=True)
    want = tokenpool_ops.pool(x, k, "wkmedoids", fast_paths=False, **kwargs)
    with kernel_as_fast_path(tiles, "plan") as calls:
        got = tokenpool_ops.pool(x, k, "wkmedoids", **kwargs)
    assert calls[0] == (1 if k < n else 0)  # k = n returns x itself (Algorithm 1, line 1)
    assert_same_clustering(got, want, exact=True)
    np.testing.assert_array_equal(got.sizes, want.sizes)
    np.testing.assert_allclose(got.tokens, want.tokens, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("n", "dtype", "shared_limit", "launches"), [
    (2048, np.float32, H100_SHARED_BYTES, 0),  # no chunk of every token's features fits
    (300, np.float64, 48 * 1024, 0),  # beyond a block without the shared-memory opt-in
    (300, np.float32, H100_SHARED_BYTES, 1),  # covered: the kernel runs
])
def test_shapes_beyond_the_kernel_take_the_generic_path(host, n, dtype, shared_limit,
                                                        launches, rng):
    # _cupy.fused_kmedoids (what run_kmedoids does on a GPU) declines with None, and pool
    # then gives the generic results without launching anything.
    launched = []

    def launch(*args: Any) -> None:
        launched.append(1)
        host.launch(*args)

    def kmedoids(xp: Any, x: np.ndarray, mean: np.ndarray, init: np.ndarray,
                 weights: np.ndarray, max_iter: int, stop_early: bool) -> Any:
        return _cupy.fused_kmedoids(np, launch, shared_limit, host.rows, x, mean, init,
                                    weights, max_iter, stop_early)

    x = zero_mean_integer_tokens(rng, 1, n, 2, spread=3).astype(dtype)
    kwargs = dict(scores=integer_weights(rng, 1, n).astype(dtype), max_iter=3,
                  return_info=True)
    want = tokenpool_ops.pool(x, 64, "wkmedoids", fast_paths=False, **kwargs)
    with numpy_kmedoids_is(kmedoids):
        got = tokenpool_ops.pool(x, 64, "wkmedoids", **kwargs)
    assert len(launched) == launches
    assert_same_clustering(got, want, exact=True)
    np.testing.assert_array_equal(got.tokens, want.tokens)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_empty_batch_and_single_token(host, scheme):
    for shape, k in (((0, 5, 3), 2), ((2, 0, 5, 3), 2), ((3, 1, 2), 1)):
        x = np.ones(shape)
        scores = np.ones(shape[:-1])
        for stop_early in (True, False):
            want = tokenpool_ops.kmedoids(x, k, weights=scores, stop_early=stop_early,
                                          fast_paths=False)
            with kernel_as_fast_path(host, scheme):
                got = tokenpool_ops.kmedoids(x, k, weights=scores, stop_early=stop_early)
            assert got.assignment.shape == want.assignment.shape
            assert_same_clustering(got, want, exact=True)


# ---------------------------------------------------------------------------------------------
# Rounding-level agreement on float tokens


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 120), m=st.integers(1, 40),
       data=st.data())
def test_pool_agrees_with_generic_on_float_tokens(host, seed, n, m, data):
    # Gaussian tokens far from the origin, float64: the generic path and the kernel both
    # take the Gram form of the centred tokens, but the generic matrix product sums in
    # another order than the kernel's feature order, so they round differently; no
    # comparison is that close.
    rng = np.random.default_rng(seed)
    k = data.draw(st.integers(1, n - 1), label="k")
    scheme = data.draw(st.sampled_from(SCHEMES), label="scheme")
    x = rng.normal(size=(2, n, m)) + rng.normal(scale=10.0, size=(2, 1, m))
    scores = rng.exponential(size=(2, n))
    kwargs = dict(scores=scores, init="random", max_iter=20, return_info=True)
    want = tokenpool_ops.pool(x, k, "wkmedoids", fast_paths=False, **kwargs)
    with kernel_as_fast_path(host, scheme):
        got = tokenpool_ops.pool(x, k, "wkmedoids", **kwargs)
    assert_same_clustering(got, want, exact=False)
    np.testing.assert_allclose(got.tokens, want.tokens, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scheme", ["shared", "global"])
def test_gram_distances_below_zero_are_clamped(tiles, scheme, rng):
    # Two tight groups of float32 tokens on either side of the mean: the Gram form's
    # cancellation leaves about a tenth of the within-group distances below zero before
    # the generic clamp (checked here with NumPy's own Gram form). The kernel clamps them
    # too: every objective in the history is a sum of weights times distances >= 0, and
    # every token's medoid is in its own group (the groups are 200 apart, the noise 1e-3).
    batch, n, m, k = 4, 24, 16, 6
    side = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)[None, :, None]
    x = (side * rng.normal(scale=100.0, size=(batch, 1, m))
         + rng.normal(scale=1e-3, size=(batch, n, m))).astype(np.float32)
    mean = x.mean(axis=1, keepdims=True, dtype=np.float32)
    centred = x - mean
    norms = (centred * centred).sum(axis=-1)
    unclamped = norms[:, :, None] + norms[:, None, :] - 2 * (centred @ centred.transpose(0, 2, 1))
    assert (unclamped[:, ~np.eye(n, dtype=bool)] < 0).mean() > 0.05
    weights = rng.exponential(size=(batch, n)).astype(np.float32)
    labels, medoids, history, _ = tiles.run(x, mean, distinct_init(rng, batch, n, k), weights,
                                           8, False, scheme)
    assert (history >= 0).all(), history
    own_medoid = np.take_along_axis(medoids, labels, axis=1)
    np.testing.assert_array_equal(own_medoid % 2, np.broadcast_to(np.arange(n) % 2, (batch, n)))


@pytest.mark.parametrize(("n", "k", "scheme"), [(1024, 1, "global"), (1024, 700, "plan"),
                                                (577, 98, "shared"), (300, 49, "plan")])
def test_large_problems_agree_with_generic(tiles, n, k, scheme, rng):
    x = rng.normal(size=(1, n, 3))
    scores = rng.exponential(size=(1, n))
    kwargs = dict(scores=scores, init="random", max_iter=4, return_info=True)
    want = tokenpool_ops.pool(x, k, "wkmedoids", fast_paths=False, **kwargs)
    with kernel_as_fast_path(tiles, scheme) as calls:
        got = tokenpool_ops.pool(x, k, "wkmedoids", **kwargs)
    assert calls[0] == 1
    assert_same_clustering(got, want, exact=False)


@settings(max_examples=12)  # six emulated launches each, for each tile shape
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 60), m=st.integers(1, 70),
       data=st.data())
def test_both_schemes_and_all_element_types_give_the_same_bits(tiles, seed, n, m, data):
    # The matrix in shared or in global memory: the same bits; float16 and bfloat16 tokens
    # are converted exactly to float32.
    rng = np.random.default_rng(seed)
    k = data.draw(st.integers(1, n), label="k")
    x32 = rng.normal(size=(2, n, m)).astype(np.float32)
    half = x32.astype(np.float16)
    brain_bits = (x32.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16, rounded down
    brain = (brain_bits.astype(np.uint32) << 16).view(np.float32)
    weights = rng.exponential(size=(2, n)).astype(np.float32)
    init = distinct_init(rng, 2, n, k)
    # Each pair of runs must agree to the bit (tokens, element type, scheme of each run).
    pairs = [((x32, None, "shared"), (x32, None, "global")),
             ((half, None, "shared"), (half.astype(np.float32), None, "shared")),
             ((brain_bits, "bfloat16", "global"), (brain, None, "global"))]
    for first, second in pairs:
        mean = second[0].astype(np.float32).mean(axis=1, keepdims=True)
        runs = [tiles.run(tokens, mean, init, weights, 8, True, scheme, dtype_name)
                for tokens, dtype_name, scheme in (first, second)]
        for got, want in zip(*runs, strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("m", [64, 66, 72])
def test_whole_chunks_copied_by_16_bytes_or_by_element_give_the_same_bits(host, m, rng):
    # The shared variant copies a whole chunk of 32 features 16 bytes at a time where every
    # token's row allows it (M a multiple of 4 float32 or 8 float16 elements), else one
    # element a lane, and a last partial chunk element by element; the global variant reads
    # x straight from memory. M = 64: 16-byte copies for both types; 66: element copies;
    # 72: 16-byte copies for float32 and float16, then a partial chunk of 8. Every pair runs
    # to the same bits, and float16 to the bits of its exact float32 values.
    n, k = 45, 11
    x32 = rng.normal(size=(2, n, m)).astype(np.float32)
    half = x32.astype(np.float16)
    weights = rng.exponential(size=(2, n)).astype(np.float32)
    init = distinct_init(rng, 2, n, k)
    for tokens, dtype_name in ((x32, None), (half, None)):
        mean = tokens.astype(np.float32).mean(axis=1, keepdims=True)
        runs = [host.run(tokens, mean, init, weights, 6, True, scheme, dtype_name)
                for scheme in ("shared", "global")]
        runs.append(host.run(tokens.astype(np.float32), mean, init, weights, 6, True,
                             "shared", None))
        for got, want in zip(runs[0], runs[1], strict=True):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(runs[0], runs[2], strict=True):
            np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------
# The merge kernel (Algorithm 1, line 6) equals the generic merge


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 60), m=st.integers(1, 40),
       data=st.data())
def test_merge_equals_generic_merge(host, seed, n, m, data):
    # Labels from the generic pool; weights in {0, 1, 2} (clusters of zero weight fall back
    # to the sizes, then to ones); sizes given or not, as pool's weights and fallback rules.
    rng = np.random.default_rng(seed)
    k = data.draw(st.integers(1, n - 1), label="k")
    method = data.draw(st.sampled_from(["kmedoids", "wkmedoids"]), label="method")
    x = zero_mean_integer_tokens(rng, 2, n, m, spread=3) + rng.normal(size=(2, n, m))
    scores = integer_weights(rng, 2, n)
    sizes = (rng.integers(0, 3, size=(2, n)).astype(float) if data.draw(st.booleans())
             else None)
    want = tokenpool_ops.pool(x, k, method, scores=scores, sizes=sizes, return_info=True,
                              fast_paths=False)
    carried = np.ones((2, n)) if sizes is None else sizes
    weights = scores * carried if method == "wkmedoids" else carried
    fallback = None if sizes is None and method == "kmedoids" else carried
    tokens, out_sizes, objective = host.merge(x, x.mean(axis=1, keepdims=True),
                                              want.assignment, k, weights, fallback, carried)
    np.testing.assert_array_equal(out_sizes, want.sizes)
    np.testing.assert_allclose(tokens, want.tokens, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(objective, want.objective, rtol=1e-10, atol=1e-10)


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 50), m=st.integers(1, 40),
       data=st.data())
def test_weighted_means_by_merge_equal_generic(host, seed, n, m, data):
    # CuPy's weighted_means: the merge kernel where `empty` is one row per problem (clusters
    # of zero weight, or none, take it), the generic code for one row per cluster.
    import array_api_compat.numpy as xp

    from tokenpool_ops._primitives import Primitives

    rng = np.random.default_rng(seed)
    k = data.draw(st.integers(1, n), label="k")
    values = rng.normal(size=(3, n, m))
    labels = rng.integers(0, k, size=(3, n))
    weights = integer_weights(rng, 3, n)
    empty = rng.normal(size=(3, data.draw(st.sampled_from([1, k]), label="rows"), m))
    launched = []

    def merge(*args: Any) -> Any:
        launched.append(1)
        return _cupy.fused_merge(np, host.launch_merge, H100_SHARED_BYTES, *args)

    got = _cupy.means_by_merge(merge, xp, values, labels, k, weights, empty)
    want = Primitives(xp).weighted_means(xp, values, labels, k, weights, empty)
    assert bool(launched) == (empty.shape[1] == 1)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# PyTorch tensors through _cupy's torch entries, with the host build (CPU tensors stand in for
# CUDA ones, NumPy views of their memory for CuPy's)


class TorchOnHost:
    """_cupy's torch entries run by the host build: launches counted, and each launch checks
    that every array it is given lies in the memory of a tensor the entry converted (that
    is, PyTorch's allocator gave every input, output and workspace; CuPy's pool none)."""

    def __init__(self, host: HostKernels) -> None:
        self.host = host
        self.tensors: list[Any] = []  # every tensor the entries hand to the kernel side
        self.launches = {"kmedoids": 0, "merge": 0}
        self.merged_objective: list[bool] = []  # with_objective of each merge launch

    def to_array(self, tensor: Any) -> np.ndarray:
        self.tensors.append(tensor)
        return tensor.numpy()

    def assert_torch_memory(self, args: Any) -> None:
        starts = {tensor.data_ptr() for tensor in self.tensors}
        for field in dataclasses.fields(args):
            array = getattr(args, field.name)
            if isinstance(array, np.ndarray) and array.size:  # (0,) placeholders: unread
                assert array.ctypes.data in starts, f"{field.name}: not a PyTorch buffer"

    def launch(self, args: _cupy.KernelArguments, plan: _cupy.KMedoidsPlan,
               max_iter: int) -> None:
        self.launches["kmedoids"] += 1
        self.assert_torch_memory(args)
        self.host.launch(args, plan, max_iter)

    def launch_merge(self, args: _cupy.MergeArguments, with_objective: bool) -> None:
        self.launches["merge"] += 1
        self.merged_objective.append(with_objective)
        self.assert_torch_memory(args)
        self.host.launch_merge(args, with_objective)

    def kmedoids(self, *args: Any) -> Any:
        """``_cupy.torch_kmedoids`` past its device test."""
        import torch

        run = functools.partial(_cupy.fused_kmedoids, np, self.launch, H100_SHARED_BYTES,
                                self.host.rows)
        return _cupy.kmedoids_for_torch(run, self.to_array, torch.from_numpy, *args)

    def weighted_means(self, *args: Any) -> Any:
        """``_cupy.torch_weighted_means`` past its device test."""
        import torch

        merge = functools.partial(_cupy.fused_merge, np, self.launch_merge, H100_SHARED_BYTES)
        return _cupy.means_for_torch(merge, self.to_array, torch.from_numpy, *args)

    def merge(self, *args: Any) -> Any:
        """``_cupy.torch_merge`` past its device test."""
        import torch

        run = functools.partial(_cupy.fused_merge, np, self.launch_merge, H100_SHARED_BYTES)
        return _cupy.merge_for_torch(run, self.to_array, torch.from_numpy, *args)


@contextlib.contextmanager
def cpu_tensors_take_the_cuda_branches(host: HostKernels) -> Iterator[TorchOnHost]:
    """backends._torch treats CPU tensors as CUDA ones, and _cupy's torch entries run the
    host build: the dispatch of PyTorch's fast paths is exercised as on a GPU."""
    from tokenpool_ops.backends import _torch

    on_host = TorchOnHost(host)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_torch, "_on_cuda", lambda tensor: True)
        patch.setattr(_cupy, "torch_kmedoids", on_host.kmedoids)
        patch.setattr(_cupy, "torch_weighted_means", on_host.weighted_means)
        patch.setattr(_cupy, "torch_merge", on_host.merge)
        yield on_host


#: Float dtypes of the torch entries, with the tolerance of their means against the generic
#: code (which sums float16 in float16; the kernel in float32).
TORCH_TOLERANCES = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3}


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 50), m=st.integers(1, 40),
       data=st.data())
def test_torch_weighted_means_by_merge_equal_generic_in_torch_memory(host, seed, n, m, data):
    # The torch entry of the merge kernel: where `empty` is one row per problem, the means
    # of the generic PyTorch code, in its dtype, from buffers PyTorch allocated; else None.
    torch = pytest.importorskip("torch", reason="torch is not installed")
    import array_api_compat.torch as xp

    from tokenpool_ops._primitives import Primitives

    rng = np.random.default_rng(seed)
    k = data.draw(st.integers(1, n), label="k")
    dtype_name = data.draw(st.sampled_from(sorted(TORCH_TOLERANCES)), label="dtype")
    dtype = getattr(torch, dtype_name)
    values = torch.as_tensor(rng.normal(size=(3, n, m)), dtype=dtype)
    labels = torch.as_tensor(rng.integers(0, k, size=(3, n)))
    weights = torch.as_tensor(integer_weights(rng, 3, n), dtype=dtype)
    rows = data.draw(st.sampled_from([1, k]), label="rows")
    empty = torch.as_tensor(rng.normal(size=(3, rows, m)), dtype=dtype)
    on_host = TorchOnHost(host)
    got = on_host.weighted_means(values, labels, k, weights, empty)
    want = Primitives(xp).weighted_means(xp, values, labels, k, weights, empty)
    if rows != 1:
        assert got is None and on_host.launches["merge"] == 0
        return
    assert on_host.launches["merge"] == 1 and got.dtype == want.dtype
    tolerance = TORCH_TOLERANCES[dtype_name]
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 48), m=st.integers(1, 4),
       data=st.data())
def test_torch_pool_through_the_cuda_branches_equals_generic(host, seed, n, m, data):
    # pool on PyTorch tensors routed as CUDA tensors are: both kernels launch, on PyTorch's
    # buffers only, and give the generic results (exactly: integer tokens of mean zero);
    # with Numba or without it (the CUDA route must not depend on the CPU compiler).
    torch = pytest.importorskip("torch", reason="torch is not installed")
    rng = np.random.default_rng(seed)
    k = data.draw(st.integers(1, n - 1), label="k")
    with_numba = data.draw(st.booleans(), label="with_numba")
    if with_numba and not backends.numba_available():
        with_numba = False  # the case without Numba still runs
    x = torch.as_tensor(zero_mean_integer_tokens(rng, 2, n, m, spread=3))
    scores = torch.as_tensor(integer_weights(rng, 2, n))
    options = dict(scores=scores, return_info=True, init="random", seed=seed)
    want = tokenpool_ops.pool(x, k, "wkmedoids", fast_paths=False, **options)
    with cpu_tensors_take_the_cuda_branches(host) as on_host, pytest.MonkeyPatch.context() as patch:
        patch.setattr(backends, "numba_available", lambda: with_numba)
        got = tokenpool_ops.pool(x, k, "wkmedoids", **options)
    assert on_host.launches == {"kmedoids": 1, "merge": 1}
    for field in ("assignment", "medoids", "sizes"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=0, atol=0)
    torch.testing.assert_close(got.tokens, want.tokens, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.objective, want.objective, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("lean", [True, False])
def test_plan_through_the_cuda_branches_merges_in_one_launch(host, lean):
    # What a patched model's block asks for (tokenpool_ops.nn.plan): one K-Medoids launch and
    # one merge launch, the objective computed only where the plan is not lean.
    torch = pytest.importorskip("torch", reason="torch is not installed")
    from tokenpool_ops.nn import plan

    rng = np.random.default_rng(7)
    x = torch.as_tensor(zero_mean_integer_tokens(rng, 3, 24, 4, spread=3))
    scores = torch.as_tensor(integer_weights(rng, 3, 24))
    want = plan(x, 6, "wkmedoids", scores=scores, sizes=scores + 1, fast_paths=False)
    with cpu_tensors_take_the_cuda_branches(host) as on_host:
        got = plan(x, 6, "wkmedoids", scores=scores, sizes=scores + 1, lean=lean)
    assert on_host.launches == {"kmedoids": 1, "merge": 1}
    assert on_host.merged_objective == [not lean]
    for field in ("assignment", "medoids", "sizes"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=0, atol=0)
    torch.testing.assert_close(got.tokens, want.tokens, rtol=1e-12, atol=1e-12)
    if lean:
        assert got.objective is None
    else:
        torch.testing.assert_close(got.objective, want.objective, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype_name", ["float16", "float32", "float64"])
def test_torch_kmedoids_entry_converts_in_torch_and_equals_the_numpy_entry(host, dtype_name,
                                                                            rng):
    # Tokens and a mean in their own dtype, int32 medoids: PyTorch converts them (to the
    # accumulator dtype, int64), so the glue copies nothing; results as _cupy's NumPy entry.
    torch = pytest.importorskip("torch", reason="torch is not installed")
    x = rng.normal(size=(3, 40, 6)).astype(dtype_name)
    mean = x.mean(axis=1, keepdims=True)
    init = distinct_init(rng, 3, 40, 7).astype(np.int32)
    weights = rng.random((3, 40)).astype(dtype_name)
    on_host = TorchOnHost(host)
    got = on_host.kmedoids(*map(torch.as_tensor, (x, mean, init, weights)), 6, True)
    want = host.run(x, mean, init, weights, 6, True)
    assert on_host.launches["kmedoids"] == 1
    for got_array, want_array in zip(got[:3], want[:3], strict=True):
        np.testing.assert_array_equal(got_array.numpy(), want_array)
    assert got[3] == want[3]


class _Unreducible(np.ndarray):
    """How a PyTorch buffer looks to CuPy, in the tests: a reduction over it would allocate
    its result from CuPy's memory pool, which the torch entries must not use."""

    def max(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("reduced outside PyTorch: CuPy's pool would hold the result")


def test_torch_iteration_count_stays_in_a_torch_buffer(host, rng):
    # With stop_early, the most iterations any problem ran is reduced by PyTorch from the
    # kernel's per-problem counts (in a PyTorch buffer), not by the array library.
    torch = pytest.importorskip("torch", reason="torch is not installed")
    x = rng.normal(size=(3, 40, 6))
    mean = x.mean(axis=1, keepdims=True)
    init = distinct_init(rng, 3, 40, 7)
    weights = rng.random((3, 40))
    on_host = TorchOnHost(host)
    plain = on_host.to_array
    on_host.to_array = lambda tensor: plain(tensor).view(_Unreducible)  # type: ignore[method-assign]
    got = on_host.kmedoids(*map(torch.as_tensor, (x, mean, init, weights)), 6, True)
    want = host.run(x, mean, init, weights, 6, True)
    assert isinstance(got[3], torch.Tensor) and got[3].shape == ()
    assert int(got[3]) == int(want[3]) and 1 <= int(got[3]) <= 6
    for got_array, want_array in zip(got[:3], want[:3], strict=True):
        np.testing.assert_array_equal(got_array.numpy(), want_array)


@pytest.mark.parametrize("with_numba", [True, False])
@pytest.mark.parametrize("grad", ["requires_grad", "no_grad", "no_tensor_requires_grad"])
def test_torch_means_needing_gradients_keep_the_torch_path(host, grad, with_numba, rng):
    # The kernel has no backward: means that need gradients (nn.merge's) take the PyTorch
    # code, and their gradient is the generic one; all others take the kernel, through
    # PyTorch's fast paths with the Numba kernels or without them.
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if with_numba and not backends.numba_available():
        pytest.skip("numba is not installed: the route with it cannot be taken")
    import array_api_compat.torch as xp

    from tokenpool_ops._primitives import Primitives

    values = torch.tensor(rng.normal(size=(2, 12, 5)),
                          requires_grad=grad != "no_tensor_requires_grad")
    labels = torch.as_tensor(rng.integers(0, 4, size=(2, 12)))
    weights = torch.as_tensor(rng.random((2, 12)))
    empty = torch.zeros(2, 1, 5, dtype=torch.float64)
    with cpu_tensors_take_the_cuda_branches(host) as on_host, pytest.MonkeyPatch.context() as patch:
        patch.setattr(backends, "numba_available", lambda: with_numba)
        means = backends.primitives_for(xp).weighted_means
        with torch.no_grad() if grad == "no_grad" else contextlib.nullcontext():
            got = means(xp, values, labels, 4, weights, empty)
    want = Primitives(xp).weighted_means(xp, values, labels, 4, weights, empty)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert on_host.launches["merge"] == (0 if grad == "requires_grad" else 1)
    if grad == "requires_grad":
        (got_grad,) = torch.autograd.grad(got.square().sum(), values)
        (want_grad,) = torch.autograd.grad(want.square().sum(), values)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Any input: labels and medoids in range, no crash, no hang (issue #9's invariants)


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40), data=st.data())
def test_bad_values_never_give_out_of_range_results(host, seed, n, data):
    rng = np.random.default_rng(seed)
    k = data.draw(st.integers(1, n), label="k")
    scheme = data.draw(st.sampled_from(["shared", "global"]), label="scheme")
    dtype = data.draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    bad = [np.nan, np.inf, -np.inf, 1e19, -1e19, 3e38, 0.0]
    x = rng.normal(size=(2, n, 3)).astype(dtype)
    corrupt = rng.random(x.shape) < data.draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    x[corrupt] = rng.choice(bad, size=int(corrupt.sum()))
    weights = rng.choice([0.0, 1.0, 2.5, np.nan, np.inf], size=(2, n)).astype(dtype)
    with np.errstate(all="ignore"):
        mean = x.mean(axis=1, keepdims=True)
    init = distinct_init(rng, 2, n, k)
    labels, medoids, history, count = host.run(x, mean, init, weights, 5, True, scheme)
    n_iter = int(count)  # left on the device for the core's one read
    assert 0 <= n_iter <= 5 and history.shape == (2, 6)
    np.testing.assert_array_equal(history[:, n_iter:],  # each problem repeats its end
                                  np.broadcast_to(history[:, n_iter:n_iter + 1], (2, 6 - n_iter)))
    assert ((labels >= 0) & (labels < k)).all()
    assert ((medoids >= 0) & (medoids < n)).all()
    for problem in range(2):  # distinct medoids, each in its own cluster
        assert len(set(medoids[problem].tolist())) == k
        np.testing.assert_array_equal(labels[problem, medoids[problem]], np.arange(k))


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 30), data=st.data())
def test_init_out_of_range_or_repeated_stays_in_bounds(host, seed, n, data):
    # Possible only with check_values=False: indices are mapped into [0, N).
    rng = np.random.default_rng(seed)
    k = data.draw(st.integers(1, n), label="k")
    x = rng.normal(size=(1, n, 2))
    init = rng.integers(-3 * n, 3 * n, size=(1, k))
    labels, medoids, _, _ = host.run(x, x.mean(axis=1, keepdims=True), init, np.ones((1, n)),
                                     4, True, data.draw(st.sampled_from(["shared", "global"])))
    assert ((labels >= 0) & (labels < k)).all()
    assert ((medoids >= 0) & (medoids < n)).all()


def test_gpu_checks_launch_of_each_instantiation_runs_on_the_host(host):
    # benchmarks/gpu_kernels.py launch-each (what compute-sanitizer runs on a GPU) with the
    # host build: every instantiation the glue names is launched once, with results in range.
    spec = importlib.util.spec_from_file_location(
        "gpu_kernels", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_kernels.py")
    assert spec is not None and spec.loader is not None
    gpu_kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_kernels)
    results: list[Any] = []

    def launch(args: _cupy.KernelArguments, plan: _cupy.KMedoidsPlan, max_iter: int) -> None:
        host.launch(args, plan, max_iter)
        results.append(args)

    def launch_merge(args: _cupy.MergeArguments, with_objective: bool) -> None:
        host.launch_merge(args, with_objective)
        results.append(args)

    names = list(gpu_kernels.launches(np, launch, launch_merge))
    assert sorted(names) == sorted(_cupy.kernel_names())
    _, n, m, k = gpu_kernels.SHAPE
    for args in results:
        assert _cupy.problem_stride(args.x) == (1 + n) * m  # a view past a prefix token
        if isinstance(args, _cupy.KernelArguments):
            assert ((args.labels >= 0) & (args.labels < k)).all()
            assert ((args.medoids >= 0) & (args.medoids < n)).all()
        else:  # sizes: the weights of each cluster's members, all of them once
            np.testing.assert_allclose(args.sizes.sum(axis=1), args.weights.sum(axis=1),
                                       rtol=1e-5)
            assert np.isfinite(args.tokens).all() and np.isfinite(args.objective).all()


# ---------------------------------------------------------------------------------------------
# On a GPU (skipped elsewhere, with the reason)


def _gpu_libraries() -> tuple[Any, Any]:
    cupy = pytest.importorskip("cupy", reason="cupy is not installed: GPU kernel untested")
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            raise RuntimeError("no device")
    except Exception as error:
        pytest.skip(f"no CUDA GPU on this machine ({error}): GPU kernel untested")
    torch = pytest.importorskip("torch", reason="torch is not installed")
    return cupy, torch


@pytest.mark.parametrize("n,k", [(197, 98), (197, 49), (577, 98), (1025, 256)])
@pytest.mark.parametrize("library", ["cupy", "torch"])
def test_gpu_kernel_equals_generic(library, n, k, rng):
    cupy, torch = _gpu_libraries()
    x = rng.normal(size=(4, n, 16))
    scores = rng.exponential(size=(4, n))
    as_gpu = cupy.asarray if library == "cupy" else (lambda a: torch.as_tensor(a, device="cuda"))
    kwargs = dict(scores=as_gpu(scores), init="random", max_iter=10, return_info=True)
    calls = []
    plain = _cupy.run_kmedoids

    def counted(*args: Any) -> Any:
        calls.append(1)
        return plain(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_cupy, "run_kmedoids", counted)
        got = tokenpool_ops.pool(as_gpu(x), k, "wkmedoids", **kwargs)
    want = tokenpool_ops.pool(as_gpu(x), k, "wkmedoids", fast_paths=False, **kwargs)
    assert calls, "the kernel did not run"
    to_numpy = cupy.asnumpy if library == "cupy" else (lambda a: a.cpu().numpy())
    for field in ("assignment", "medoids"):
        np.testing.assert_array_equal(to_numpy(getattr(got, field)),
                                      to_numpy(getattr(want, field)))
    assert got.n_iter == want.n_iter
    np.testing.assert_allclose(to_numpy(got.tokens), to_numpy(want.tokens), rtol=1e-10)
    if library == "torch":
        assert got.tokens.device == torch.device("cuda", torch.cuda.current_device())


@contextlib.contextmanager
def _reads_of_x() -> Iterator[list[tuple[int, int]]]:
    """Where each K-Medoids and merge launch reads its tokens: (address, x_stride)."""
    read: list[tuple[int, int]] = []

    def recording(launch: Any) -> Any:
        def recorded(device_id: int, args: Any, *rest: Any) -> None:
            read.append((args.x.data.ptr, _cupy.problem_stride(args.x)))
            launch(device_id, args, *rest)
        return recorded

    with pytest.MonkeyPatch.context() as patch:
        for name in ("_launch", "_launch_merge"):
            patch.setattr(_cupy, name, recording(getattr(_cupy, name)))
        yield read


@pytest.mark.parametrize("library", ["cupy", "torch"])
def test_gpu_patch_tokens_past_the_prefix_are_read_in_place(library, rng):
    # A ViT block's patch tokens, a view past its class token: both launches read the
    # sequence's own memory (no copy), with the same bits as from a contiguous copy.
    cupy, torch = _gpu_libraries()
    sequence = rng.normal(size=(4, 1 + 197, 16)).astype(np.float32)
    scores = rng.exponential(size=(4, 197)).astype(np.float32)
    as_gpu = cupy.asarray if library == "cupy" else (lambda a: torch.as_tensor(a, device="cuda"))
    on_gpu = as_gpu(sequence)
    patches = on_gpu[:, 1:]
    first = patches.data.ptr if library == "cupy" else patches.data_ptr()
    kwargs = dict(scores=as_gpu(scores), init="random", max_iter=10, return_info=True)
    with _reads_of_x() as read:
        got = tokenpool_ops.pool(patches, 98, "wkmedoids", **kwargs)
    assert read == [(first, (1 + 197) * 16)] * 2, read
    want = tokenpool_ops.pool(as_gpu(sequence[:, 1:].copy()), 98, "wkmedoids", **kwargs)
    to_numpy = cupy.asnumpy if library == "cupy" else (lambda a: a.cpu().numpy())
    for field in ("assignment", "medoids", "sizes", "tokens", "objective"):
        np.testing.assert_array_equal(to_numpy(getattr(got, field)),
                                      to_numpy(getattr(want, field)))


def test_gpu_compiled_operators_read_patch_tokens_in_place(rng):
    # A compiled pool call's kernels are the custom operators: inductor passes them a view
    # past the class token as it is, and both launches read the sequence's memory, with
    # the bits of the operators on a contiguous copy.
    _, torch = _gpu_libraries()
    sequence = torch.as_tensor(rng.normal(size=(4, 1 + 197, 16)), dtype=torch.float32,
                               device="cuda")
    weights = torch.as_tensor(rng.exponential(size=(4, 197)), dtype=torch.float32,
                              device="cuda")
    init = torch.as_tensor(np.stack([rng.permutation(197)[:98] for _ in range(4)]),
                           device="cuda")
    mean = sequence[:, 1:].mean(dim=1, keepdim=True)
    from tokenpool_ops.backends import _torch_ops as ops  # imported, so registered

    def both_kernels(patches: Any) -> Any:
        clustered = ops.kmedoids(patches, mean, init, weights, 10, False)
        return (*clustered, *ops.merge(patches, mean, clustered[0], 98, weights, None,
                                       weights, True))

    compiled = torch.compile(lambda t: both_kernels(t[:, 1:]), fullgraph=True)
    with _reads_of_x() as read:
        got = compiled(sequence)
    assert read == [(sequence[:, 1:].data_ptr(), (1 + 197) * 16)] * 2, read
    want = both_kernels(sequence[:, 1:].contiguous())
    for got_one, want_one in zip(got, want, strict=True):
        torch.testing.assert_close(got_one, want_one, rtol=0, atol=0)


def test_gpu_float32_on_torch_stream_without_checks():
    _, torch = _gpu_libraries()
    rng = np.random.default_rng(5)
    x = torch.as_tensor(rng.normal(size=(8, 197, 384)), dtype=torch.float32, device="cuda")
    scores = torch.as_tensor(rng.random((8, 197)), dtype=torch.float32, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # x and scores were made on that one
    with torch.cuda.stream(stream):
        got = tokenpool_ops.pool(x, 98, "wkmedoids", scores=scores, check_values=False,
                                 stop_early=False, return_info=True)
    stream.synchronize()
    want = tokenpool_ops.pool(x, 98, "wkmedoids", scores=scores, stop_early=False,
                              return_info=True, fast_paths=False)
    agree = (got.assignment == want.assignment).float().mean().item()
    assert agree > 0.99  # float32: a rare near tie may break the other way
    torch.testing.assert_close(got.objective, want.objective, rtol=1e-4, atol=1e-4)


def _counting(patch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Calls of ``_cupy.<name>`` (the kernel's launch path) from now on."""
    calls: list[int] = []
    plain = getattr(_cupy, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return plain(*args, **kwargs)

    patch.setattr(_cupy, name, counted)
    return calls


def _integer_problem(torch: Any, seed: int) -> tuple[Any, Any]:
    """float32 CUDA tokens whose distances and weighted costs are exact (integer tokens of
    mean zero, integer scores), so that the kernel's clustering is the generic one and only
    the means' rounding differs."""
    rng = np.random.default_rng(seed)
    x = zero_mean_integer_tokens(rng, 4, 197, 16, spread=8)
    scores = integer_weights(rng, 4, 197)
    return (torch.as_tensor(x, dtype=torch.float32, device="cuda"),
            torch.as_tensor(scores, dtype=torch.float32, device="cuda"))


def test_gpu_torch_merge_kernel_equals_generic():
    # PyTorch CUDA tensors: pool's means come from the merge kernel (no one-hot), equal to
    # the generic path's within float32 rounding.
    _, torch = _gpu_libraries()
    x, scores = _integer_problem(torch, 11)
    options = dict(scores=scores, return_info=True, init="random", seed=3)
    with pytest.MonkeyPatch.context() as patch:
        merges = _counting(patch, "run_merge")
        got = tokenpool_ops.pool(x, 49, "wkmedoids", **options)
    want = tokenpool_ops.pool(x, 49, "wkmedoids", fast_paths=False, **options)
    assert merges, "the merge kernel did not run"
    assert got.tokens.dtype == torch.float32 and got.tokens.device == x.device
    for field in ("assignment", "medoids", "sizes"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=0, atol=0)
    torch.testing.assert_close(got.tokens, want.tokens, rtol=1e-5, atol=1e-5)


def test_gpu_torch_means_with_gradients_keep_the_torch_path():
    _, torch = _gpu_libraries()
    import array_api_compat.torch as xp

    x, scores = _integer_problem(torch, 12)
    values = x.clone().requires_grad_()
    labels = torch.arange(197, device="cuda").remainder(5).expand(4, -1)
    empty = x.mean(1, keepdim=True)
    means = backends.primitives_for(xp).weighted_means
    with pytest.MonkeyPatch.context() as patch:
        merges = _counting(patch, "run_merge")
        with_grad = means(xp, values, labels, 5, scores, empty)
        assert not merges and with_grad.requires_grad
        with torch.no_grad():
            without = means(xp, values, labels, 5, scores, empty)
        assert merges, "the merge kernel did not run without gradients"
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-5, atol=1e-5)


def test_gpu_torch_kernels_allocate_nothing_from_cupy_and_replay_in_a_cuda_graph():
    # Every buffer of both launches is PyTorch's (CuPy's allocator refuses any request), so
    # a CUDA graph captures pool and replays it on new tokens as eager PyTorch computes them.
    cupy, torch = _gpu_libraries()
    x, scores = _integer_problem(torch, 13)
    # The default start (the top scores): no random draw inside the capture.
    options = dict(scores=scores, check_values=False, stop_early=False)

    def refuse(size: int) -> Any:
        raise AssertionError(f"CuPy's allocator asked for {size} bytes")

    static = x.clone()
    with pytest.MonkeyPatch.context() as patch:
        launches = _counting(patch, "run_kmedoids"), _counting(patch, "run_merge")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), cupy.cuda.using_allocator(refuse):
            for _ in range(2):  # warm-up on a side stream, as capture requires (compiles)
                tokenpool_ops.pool(static, 49, "wkmedoids", **options)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), cupy.cuda.using_allocator(refuse):
            captured = tokenpool_ops.pool(static, 49, "wkmedoids", **options)
    assert all(len(calls) == 3 for calls in launches), launches
    fresh = x.flip(1)  # other tokens: the same integers in another order
    eager = tokenpool_ops.pool(fresh, 49, "wkmedoids", **options)
    static.copy_(fresh)
    graph.replay()
    torch.testing.assert_close(captured, eager)


def test_gpu_torch_pool_with_stop_early_allocates_nothing_from_cupy():
    # The default options: stop_early and the value checks. The iteration count is reduced
    # by PyTorch, so CuPy's allocator is asked for nothing here either.
    cupy, torch = _gpu_libraries()
    x, scores = _integer_problem(torch, 14)

    def refuse(size: int) -> Any:
        raise AssertionError(f"CuPy's allocator asked for {size} bytes")

    with pytest.MonkeyPatch.context() as patch:
        launches = _counting(patch, "run_kmedoids")
        with cupy.cuda.using_allocator(refuse):
            got = tokenpool_ops.pool(x, 49, "wkmedoids", scores=scores, return_info=True)
    want = tokenpool_ops.pool(x, 49, "wkmedoids", scores=scores, return_info=True,
                              fast_paths=False)
    assert launches, "the kernel did not run"
    assert got.n_iter == want.n_iter
    torch.testing.assert_close(got.assignment, want.assignment, rtol=0, atol=0)


def test_kernel_sources_ship_with_the_package():
    for name in ("kmedoids.cu", "device_helpers.cuh", "host_emulation.h", "host_build.cpp"):
        assert (Path(_cupy.KERNEL_DIR) / name).is_file(), name
