"""GPU fast paths: the CUDA kernels of ``backends/cuda/kmedoids.cu``.

One launch runs the whole (weighted) K-Medoids loop of Eq. 16-17, one thread block per
problem, with the tie rules of the generic code (see the kernel source). It serves CuPy
arrays (``FAST_PATHS``) and PyTorch CUDA tensors (zero-copy views, :class:`TorchArrays`,
on PyTorch's current stream; see ``backends._torch``). Shapes the kernel does not cover
return None, and the generic code runs: see :func:`kmedoids_plan`. A second kernel merges
the clusters (Algorithm 1, line 6); CuPy arrays and PyTorch CUDA tensors that need no
gradient use its weighted means (:func:`means_by_merge`, :func:`torch_weighted_means`). For
PyTorch, every buffer a launch touches comes from PyTorch's allocator
(:func:`torch_allocator`).

Each instantiation a call needs is compiled on its first launch (NVRTC, with the
floating-point model of :data:`FLOAT_MODEL`) and cached on disk across processes
(:func:`cached_binary`, in :func:`cache_dir`), then loaded once per device and process
(:func:`_function`); launches go to the arrays' device and its current stream.

Everything with logic in it (the plan, the layout arithmetic, the argument preparation, the
result post-processing and the disk cache) is plain Python or works on NumPy as well as
CuPy, so that the tests run it on the CPU against the host build of the same CUDA source
(tests/test_cuda_kernel.py) and with a stand-in for CuPy (tests/test_cuda_glue.py). Only
:func:`_nvrtc`, :func:`_load` and the launches need CuPy and a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenpool_ops._primitives import weighted_means as generic_weighted_means

#: The CUDA sources: kmedoids.cu and its headers.
KERNEL_DIR = Path(__file__).parent / "cuda"
#: Threads per block and features per distance chunk: kBlockThreads and kFeatureChunk in
#: device_helpers.cuh (a test checks that both sides agree).
BLOCK_THREADS = 256
#: Warps per block (kWarps): the block reductions keep one partial sum per warp.
WARPS = BLOCK_THREADS // 32
FEATURE_CHUNK = 32
#: Side of the distance tiles (kTile): the stage's rows are padded to whole tiles.
TILE = 4
#: Most tokens per problem (kMaxTokens): N * N must index in a 32-bit int.
MAX_TOKENS = 4096
#: Shared memory the kernel declares statically (one flag), rounded up generously.
STATIC_SHARED_BYTES = 64

#: Element types of x the kernel is instantiated for, with their C++ names and the dtype
#: the kernel accumulates in (float32 for every input but float64, which serves the tests).
CXX_TYPES = {"float64": "double", "float32": "float", "float16": "tokenpool::Half",
             "bfloat16": "tokenpool::BFloat16"}
ACCUMULATOR = {"float64": "float64", "float32": "float32", "float16": "float32",
               "bfloat16": "float32"}


#: The shapes of fill_matrix's blocks of distances (TileRows): tile rows by one tile column.
#: 1 (4 x 4 cells) where the fill is limited by arithmetic (sm_80, 86, 89: the A100); 2
#: (8 x 4, two tiles sharing their column's loads) where shared-memory loads limit it
#: (sm_90: the H100, H200). See benchmarks/README.md, CUDA.
TILE_ROWS = (1, 2)


def tile_rows(compute_capability: str) -> int:
    """fill_matrix's tile rows for a device of ``compute_capability`` (CuPy's, e.g. "90"):
    pairs (2) from sm_90 on, single tiles (1) before."""
    return 2 if int(compute_capability) >= 90 else 1


def kernel_name(dtype_name: str, shared_matrix: bool, rows: int) -> str:
    """The template instantiation for tokens of ``dtype_name`` (e.g. ``float32``), the
    distances in shared memory or not, and ``rows`` tile rows a block of the fill."""
    return (f"tokenpool::kmedoids<{CXX_TYPES[dtype_name]}, "
            f"{'true' if shared_matrix else 'false'}, {rows}>")


#: Blocks each thread sums per round of fill_matrix (round_blocks), by where the matrix is
#: and the blocks' tile rows.
ROUND_BLOCKS = {(True, 1): 7, (False, 1): 4, (True, 2): 4, (False, 2): 2}


def upper_blocks(side: int, rows: int) -> int:
    """Blocks of ``rows`` tile rows by one tile column that cover the upper triangle of a
    side x side grid of tiles (upper_blocks): block row P holds side - rows * P of them."""
    block_rows = -(-side // rows)
    return block_rows * side - rows * block_rows * (block_rows - 1) // 2
#: Row stride of the raw feature buffers (kRawStride).
RAW_STRIDE = FEATURE_CHUNK + 8
#: Elements of one tile group of the (tile-major) stage (kStageGroupStride).
STAGE_GROUP_STRIDE = FEATURE_CHUNK * TILE + TILE
#: Bytes of one element of each element type.
ELEMENT_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def _round16(size: int) -> int:
    return -(-size // 16) * 16


def matrix_stride(n: int) -> int:
    """Row stride of the distances (``KMedoidsLayout::matrix_stride``): N or N + 1, odd."""
    return n | 1


def kmedoids_shared_bytes(n: int, k: int, dtype_name: str, shared_matrix: bool,
                          rows: int) -> int:
    """Dynamic shared memory of one block: ``KMedoidsLayout<T>::bytes()`` of the kernel.

    A region for the distance fill: a stage of centred features (ceil(N / TILE) groups of
    STAGE_GROUP_STRIDE elements) and, with ``shared_matrix``, two
    (N, RAW_STRIDE) raw buffers of ``dtype_name`` elements and the (N, matrix_stride(N))
    distances, which overlay that region when the fill runs in one round (else they follow
    it). Then each cluster's least cost key (K, 8
    bytes), the weights and medoid costs (N each), a reduction scratch (WARPS), and four int
    arrays (labels and the medoid of each token: N; medoids and each cluster's best member:
    K); with ``shared_matrix``, each cluster's members as a bit set (K, ceil(N / 32) words),
    the clusters whose medoid moved (K ints), the tokens to search in full (N) and two counts.
    ``rows``, the fill's tile rows (:data:`TILE_ROWS`), decides whether the fill runs in one
    round (:data:`ROUND_BLOCKS`).
    """
    accumulator_bytes = 8 if ACCUMULATOR[dtype_name] == "float64" else 4
    side = -(-n // TILE)
    per_round = ROUND_BLOCKS[shared_matrix, rows] * BLOCK_THREADS
    rounds = -(-upper_blocks(side, rows) // per_round)
    raw = 2 * n * RAW_STRIDE * ELEMENT_BYTES[dtype_name] if shared_matrix else 0
    fill = _round16(side * STAGE_GROUP_STRIDE * accumulator_bytes + raw)
    matrix = _round16(n * matrix_stride(n) * accumulator_bytes) if shared_matrix else 0
    region = max(fill, matrix) if shared_matrix and rounds == 1 else fill + matrix
    member_words = -(-n // 32) if shared_matrix else 0
    lists = k + n + 2 if shared_matrix else 0  # moved clusters, tokens to search, two counts
    return (region + 8 * k + (2 * n + WARPS) * accumulator_bytes
            + (2 * n + 2 * k + k * member_words + lists) * 4)


@dataclass(frozen=True)
class KMedoidsPlan:
    """How the kernel runs one batch: where the distances live, and its shared memory."""

    kernel: str
    shared_matrix: bool  # N x N distances in shared memory; else in a (B, N, N | 1) workspace
    shared_bytes: int
    tile_rows: int  # fill_matrix's blocks: tile rows by one tile column (TILE_ROWS)


def kmedoids_plan(n: int, k: int, dtype_name: str, max_shared_bytes: int,
                  rows: int) -> KMedoidsPlan | None:
    """The kernel's plan for problems of ``n`` tokens and ``k`` medoids; None where the kernel
    does not apply and the generic code runs (the "does it apply" test of the fast path).

    Parameters
    ----------
    n, k : int
        Tokens and medoids per problem. The kernel covers ``1 <= k <= n <= MAX_TOKENS``.
    dtype_name : str
        Element type of the tokens, one of ``CXX_TYPES``.
    max_shared_bytes : int
        The device's opt-in limit of dynamic shared memory per block.
    rows : int
        The device's tile rows of the fill (:func:`tile_rows`).

    Returns
    -------
    KMedoidsPlan or None
        The N x N distances in shared memory where they fit (float32 N up to 237 on Hopper
        with its pair tiles, 236 with single tiles; 201 on Ampere, for small K; 231 and 195
        at K = N), else in a global (B, N, N | 1)
        workspace as long as a chunk of every token's features fits in shared memory
        (float32 N up to about 1570 on Hopper, 1120 on Ampere; float64 about 800 and 575);
        None beyond, and the generic code runs.
    """
    if dtype_name not in CXX_TYPES or not 1 <= k <= n <= MAX_TOKENS:
        return None
    budget = max_shared_bytes - STATIC_SHARED_BYTES
    for shared_matrix in (True, False):
        shared = kmedoids_shared_bytes(n, k, dtype_name, shared_matrix, rows)
        if shared <= budget:
            return KMedoidsPlan(kernel_name(dtype_name, shared_matrix, rows), shared_matrix,
                                shared, rows)
    return None


#: Allocates an output or workspace the kernel writes in full: ``allocate(shape, dtype)``,
#: uninitialised. None means ``np_like.empty`` (CuPy's memory pool on a GPU); the PyTorch
#: entries pass PyTorch's allocator (:func:`torch_allocator`), so that a CUDA graph captured
#: by PyTorch owns every buffer the launch touches.
Allocator = Callable[[tuple[int, ...], Any], Any]


def _allocator(np_like: Any, allocate: Allocator | None) -> Allocator:
    return allocate or (lambda shape, dtype: np_like.empty(shape, dtype=dtype))


def problems_contiguous(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether tokens of ``shape`` (B, N, M) and ``strides`` (in elements) are laid out as
    the kernels read them: each problem's (N, M) tokens contiguous, the problems a
    non-negative number of elements apart (``x_stride``). The patch tokens of (B, P + N, M)
    sequences, viewed past their P prefix tokens, are: the kernels read them where they are.
    (Copied contiguous, they cost a pooled ViT block on a GPU two copies of its tokens, one
    a kernel.)"""
    batches, n, m = shape
    batch, token, feature = strides
    return ((m <= 1 or feature == 1) and (n <= 1 or token == m)
            and (batches <= 1 or batch >= 0))


def as_problems(np_like: Any, x: Any) -> Any:
    """``x`` (B, N, M) itself where :func:`problems_contiguous`, else a C-contiguous copy."""
    elements = tuple(stride // x.itemsize for stride in x.strides)
    if (all(stride % x.itemsize == 0 for stride in x.strides)
            and problems_contiguous(tuple(x.shape), elements)):
        return x
    return np_like.ascontiguousarray(x)


def problem_stride(x: Any) -> int:
    """The kernels' ``x_stride``: elements from one problem's tokens to the next's."""
    batches, n, m = x.shape
    return int(x.strides[0] // x.itemsize) if batches > 1 else n * m


@dataclass(frozen=True)
class KernelArguments:
    """Arrays in the layout the kernel reads, and the arrays it writes."""

    x: Any  # (B, N, M), tokens' dtype, laid out as problems_contiguous says
    mean: Any  # (B, M), accumulator dtype
    init: Any  # (B, K), int64
    weights: Any  # (B, N), accumulator dtype
    workspace: Any  # (B, N, matrix_stride(N)) distances, accumulator dtype; (0,) when shared
    labels: Any  # (B, N), int64
    medoids: Any  # (B, K), int64
    history: Any  # (B, max_iter + 1), accumulator dtype
    iterations: Any  # (B,), int32


def kernel_arguments(np_like: Any, x: Any, mean: Any, init: Any, weights: Any, max_iter: int,
                     plan: KMedoidsPlan, allocate: Allocator | None = None) -> KernelArguments:
    """Inputs made contiguous in the kernel's dtypes (copies only where needed) and the
    outputs allocated by ``allocate``. ``np_like`` is ``cupy`` on the GPU or ``numpy`` in
    the tests."""
    n_problems, n, m = x.shape
    k = init.shape[-1]
    accumulator = np_like.dtype(ACCUMULATOR[np_like.dtype(x.dtype).name])
    new = _allocator(np_like, allocate)
    workspace_shape = (0,) if plan.shared_matrix else (n_problems, n, matrix_stride(n))
    return KernelArguments(
        x=as_problems(np_like, x),
        mean=np_like.ascontiguousarray(mean.reshape(n_problems, m), dtype=accumulator),
        init=np_like.ascontiguousarray(init, dtype=np_like.int64),
        weights=np_like.ascontiguousarray(weights, dtype=accumulator),
        workspace=new(workspace_shape, accumulator),
        labels=new((n_problems, n), np_like.dtype(np_like.int64)),
        medoids=new((n_problems, k), np_like.dtype(np_like.int64)),
        history=new((n_problems, max_iter + 1), accumulator),
        # Uninitialised: every block writes its problem's count (and B = 0 launches none).
        iterations=new((n_problems,), np_like.dtype(np_like.int32)),
    )


#: The most iterations any problem ran, from the kernel's per-problem counts (B,): a 0-d
#: array on the device. None means the counts' own ``max`` (CuPy's memory pool on a GPU);
#: the PyTorch entries take it in PyTorch, so that its allocator holds the count too.
Most = Callable[[Any], Any]


def _array_max(counts: Any) -> Any:
    return counts.max(keepdims=True).reshape(())  # 0-d: NumPy too (host twin)


def kernel_results(args: KernelArguments, max_iter: int, stop_early: bool,
                   most: Most | None = None) -> tuple[Any, Any, Any, Any]:
    """``(labels, medoids, history, n_iter)`` as ``_clustering.run_kmedoids`` returns them.

    Each problem stopped at its own fixed point and repeated its last objective, so the
    iterations the generic loop runs are the most any problem needed. With ``stop_early``
    that count stays on the device (a 0-d array from ``most``) beside the whole history:
    the core reads it with its value checks, in their one host read, and cuts the history
    (see ``tokenpool_ops._overflow``). Without it the loop runs ``max_iter`` iterations, as
    the generic loop does.
    """
    if stop_early and args.iterations.shape[0] > 0:
        count = (most or _array_max)(args.iterations)
        return args.labels, args.medoids, args.history, count
    # Without stop_early, max_iter; with no problem, the generic loop stops after one
    # (empty) iteration.
    n_iter = min(1, max_iter) if stop_early else max_iter
    return args.labels, args.medoids, args.history[:, : n_iter + 1], n_iter


# ---------------------------------------------------------------------------------------------
# The merge (Algorithm 1, line 6): pooled tokens, their sizes and the objective.


def merge_name(dtype_name: str) -> str:
    return f"tokenpool::merge<{CXX_TYPES[dtype_name]}>"


def merge_shared_bytes(n: int, k: int, accumulator_bytes: int, with_objective: bool) -> int:
    """``MergeLayout::bytes()``: a (kFeatureChunk, stride) stage of the tokens' and the pooled
    tokens' features (N and K each rounded up to TILE, the sum to 8 mod 32); effective
    weights (N), cluster totals (K), a reduction scratch (WARPS); with the objective, each
    token's nearest-distance key (N, 8 bytes); labels and members (N each), cluster starts
    (K + 1)."""
    columns = -(-n // TILE) * TILE + -(-k // TILE) * TILE
    stride = 8 if columns <= 8 else -(-(columns - 8) // 32) * 32 + 8
    keys = 8 * n if with_objective else 0
    return ((stride * FEATURE_CHUNK + n + k + WARPS) * accumulator_bytes + keys
            + (2 * n + k + 1) * 4)


def merge_applies(n: int, k: int, m: int, dtype_name: str, max_shared_bytes: int,
                  with_objective: bool) -> bool:
    """Whether the merge kernel covers these shapes (else the generic merge runs)."""
    if dtype_name not in CXX_TYPES or not 1 <= k <= n <= MAX_TOKENS or k * m >= 2**31:
        return False
    accumulator_bytes = 8 if ACCUMULATOR[dtype_name] == "float64" else 4
    shared = merge_shared_bytes(n, k, accumulator_bytes, with_objective)
    return shared <= max_shared_bytes - STATIC_SHARED_BYTES


@dataclass(frozen=True)
class MergeArguments:
    """The merge kernel's inputs, contiguous in its dtypes, and its outputs."""

    kernel: str  # the instantiation that takes them (merge_name of x's element type)
    x: Any  # (B, N, M), laid out as problems_contiguous says
    mean: Any  # (B, M)
    labels: Any  # (B, N) int64
    weights: Any  # (B, N)
    fallback: Any  # (B, N), or (0,) when there is none (weights all positive)
    has_fallback: bool
    carried: Any  # (B, N) input sizes
    workspace: Any  # (0,): the kernel keeps the objective's distances in registers
    tokens: Any  # (B, K, M) pooled tokens
    sizes: Any  # (B, K) their sizes
    objective: Any  # (B,) Eq. 13 of the pooled tokens


def merge_arguments(np_like: Any, x: Any, mean: Any, labels: Any, k: int, weights: Any,
                    fallback: Any | None, carried: Any, with_objective: bool,
                    allocate: Allocator | None = None) -> MergeArguments:
    n_problems, _, m = x.shape
    accumulator = np_like.dtype(ACCUMULATOR[np_like.dtype(x.dtype).name])
    new = _allocator(np_like, allocate)

    def per_token(values: Any) -> Any:
        return np_like.ascontiguousarray(values, dtype=accumulator)

    return MergeArguments(
        kernel=merge_name(np_like.dtype(x.dtype).name),
        x=as_problems(np_like, x),
        mean=np_like.ascontiguousarray(mean.reshape(n_problems, m), dtype=accumulator),
        labels=np_like.ascontiguousarray(labels, dtype=np_like.int64),
        weights=per_token(weights),
        fallback=new((0,), accumulator) if fallback is None else per_token(fallback),
        has_fallback=fallback is not None,
        carried=per_token(carried),
        workspace=new((0,), accumulator),  # unused: the distances stay in registers
        tokens=new((n_problems, k, m), accumulator),
        sizes=new((n_problems, k), accumulator),
        objective=new((n_problems,), accumulator),
    )


# ---------------------------------------------------------------------------------------------
# Compiling: one instantiation at a time, cached on disk across processes.

#: NVRTC's floating-point model for the kernels: subnormals kept (no flush-to-zero), IEEE
#: division and square root, and no multiply-add contracted by the compiler. The kernels
#: write every fused multiply-add out (multiply_add), and the host build that the tests run
#: contracts nothing either (g++ -ffp-contract=off), so both round each operation alike and
#: give the same bits. (CuPy's RawModule adds -ftz=true to every build, which flushes
#: subnormal distances to zero: hence NVRTC directly. .ci/check_cuda.sh compiles with the
#: same model and checks the PTX.)
FLOAT_MODEL = ("-ftz=false", "-prec-div=true", "-prec-sqrt=true", "-fmad=false")


def compile_options() -> tuple[str, ...]:
    """NVRTC options: the source includes only its own header (no CUDA header)."""
    return ("-std=c++17", f"-I{KERNEL_DIR}", *FLOAT_MODEL)


def kernel_names() -> list[str]:
    """Every instantiation the glue may launch (each is compiled on its first launch)."""
    return ([kernel_name(dtype, shared, rows) for dtype in CXX_TYPES
             for shared in (True, False) for rows in TILE_ROWS]
            + [merge_name(dtype) for dtype in CXX_TYPES])


@dataclass(frozen=True)
class KernelBinary:
    """One compiled instantiation: what the driver loads (a cubin, or PTX) and the
    instantiation's lowered (mangled) name in it."""

    image: bytes
    lowered_name: str


#: Compiles one instantiation for the current device: ``compile(source, options,
#: name_expression)``. :func:`_nvrtc` on a GPU; stand-ins in the tests.
Compiler = Callable[[str, tuple[str, ...], str], KernelBinary]

#: Names the folder of compiled kernels, overriding the user cache folder.
CACHE_DIR_VARIABLE = "TOKENPOOL_OPS_CACHE_DIR"
#: Version of the cache entries' layout (part of the key).
_CACHE_FORMAT = 1
_ENTRY_MAGIC = b"tokenpool_ops compiled kernel\n"


def cache_dir() -> Path:
    """Where compiled kernels are kept: $TOKENPOOL_OPS_CACHE_DIR, else
    tokenpool_ops/cuda in the user cache folder ($XDG_CACHE_HOME, by default ~/.cache)."""
    if os.environ.get(CACHE_DIR_VARIABLE):
        return Path(os.environ[CACHE_DIR_VARIABLE])
    user_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(user_cache) / "tokenpool_ops" / "cuda"


def _source() -> str:
    return (KERNEL_DIR / "kmedoids.cu").read_text()


def cache_key(instantiation: str, arch: str, toolchain: str) -> str:
    """Everything a binary depends on: the kernel source and the header it includes, the
    instantiation, the device architecture, the options and the compiler (``toolchain``:
    CuPy's and NVRTC's versions)."""
    sources = hashlib.sha256()
    for name in ("kmedoids.cu", "device_helpers.cuh"):
        sources.update((KERNEL_DIR / name).read_bytes())
    return json.dumps({"format": _CACHE_FORMAT, "instantiation": instantiation,
                       "sources": sources.hexdigest(), "arch": arch,
                       "options": compile_options(), "toolchain": toolchain}, sort_keys=True)


def _read_entry(path: Path, key: str) -> KernelBinary | None:
    """The binary stored at ``path`` for ``key``; None (rebuild) for a missing, corrupt,
    truncated or stale entry, or one written for another key."""
    try:
        magic, header, image = path.read_bytes().split(b"\n", 2)
        if magic + b"\n" != _ENTRY_MAGIC:
            return None
        fields = json.loads(header)
        if (fields["key"] != key or fields["size"] != len(image)
                or fields["sha256"] != hashlib.sha256(image).hexdigest()):
            return None
        return KernelBinary(image, fields["lowered_name"])
    except (OSError, ValueError, KeyError, TypeError):  # no entry, or not one of ours
        return None


def _write_entry(path: Path, key: str, binary: KernelBinary) -> None:
    """Stores ``binary`` atomically: written to a temporary file beside ``path``, then renamed
    over it, so that a reader sees a whole entry or none (and checks it all the same)."""
    header = json.dumps({"key": key, "lowered_name": binary.lowered_name,
                         "size": len(binary.image),
                         "sha256": hashlib.sha256(binary.image).hexdigest()})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(_ENTRY_MAGIC + header.encode() + b"\n" + binary.image)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as error:  # a read-only or full disk costs a compilation per process
        warnings.warn(f"tokenpool_ops: the compiled CUDA kernel could not be cached in "
                      f"{path.parent} ({error}); set {CACHE_DIR_VARIABLE} to a writable "
                      "folder to compile it once", RuntimeWarning, stacklevel=3)


def cached_binary(instantiation: str, arch: str, toolchain: str, compile: Compiler,
                  folder: Path | None = None) -> KernelBinary:
    """Instantiation ``instantiation`` compiled for ``arch`` (a compute capability, "90"):
    from the disk cache (``folder``, by default :func:`cache_dir`) where an intact entry
    for the same key is there, else compiled by ``compile`` and stored."""
    key = cache_key(instantiation, arch, toolchain)
    path = (folder or cache_dir()) / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.kernel"
    binary = _read_entry(path, key)
    if binary is None:
        binary = compile(_source(), compile_options(), instantiation)
        _write_entry(path, key, binary)
    return binary


# ---------------------------------------------------------------------------------------------
# CuPy only: load each kernel once per device, launch on the arrays' device.


def _nvrtc(source: str, options: tuple[str, ...], instantiation: str) -> KernelBinary:
    """NVRTC through CuPy, for the current device; only ``instantiation`` is compiled (it is
    the one name expression, and templates are instantiated only where named)."""
    from cupy.cuda import compiler

    image, lowered = compiler.compile_using_nvrtc(source, options,
                                                  name_expressions=[instantiation])
    return KernelBinary(image, lowered[instantiation])


def _toolchain() -> str:
    import cupy

    nvrtc = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
    return f"cupy {cupy.__version__}, nvrtc {nvrtc}"


@functools.cache
def _tile_rows(device_id: int) -> int:
    """fill_matrix's tile rows on this device (:func:`tile_rows` of its architecture)."""
    import cupy

    return tile_rows(str(cupy.cuda.Device(device_id).compute_capability))


@functools.cache
def _max_shared_bytes(device_id: int) -> int:
    """Dynamic shared memory one block may opt in to on this device."""
    from cupy.cuda import runtime

    attribute = getattr(runtime, "cudaDevAttrMaxSharedMemoryPerBlockOptin",
                        _SHARED_OPTIN_ATTRIBUTE)
    return int(runtime.deviceGetAttribute(attribute, device_id))


#: cudaDevAttrMaxSharedMemoryPerBlockOptin of the CUDA runtime API (its enum value, should a
#: CuPy version not name it).
_SHARED_OPTIN_ATTRIBUTE = 97

#: Loaded kernels by (instantiation, device id). A lock makes each load happen once, so the
#: attributes are set once, before the kernel is published here, and never while another
#: thread launches it.
_functions: dict[tuple[str, int], Any] = {}
_functions_lock = threading.Lock()


def _function(instantiation: str, device_id: int) -> Any:
    """The ``cupy.cuda.Function`` of ``instantiation`` on device ``device_id``, loaded on
    first use (see :func:`_load`) and kept for the process."""
    function = _functions.get((instantiation, device_id))  # loaded: no lock to take
    if function is None:
        with _functions_lock:
            function = _functions.get((instantiation, device_id))
            if function is None:
                function = _load(instantiation, device_id)
                _functions[instantiation, device_id] = function
    return function


def _load(instantiation: str, device_id: int) -> Any:
    """Compiles (or reads from the disk cache) and loads ``instantiation`` on the device,
    and opts it in to all the dynamic shared memory the device allows beside its static
    shared memory: above 48 KiB a kernel must opt in, and doing it once, to the most, lets
    every launch ask for its own size without touching the attribute again."""
    import cupy
    from cupy.cuda import driver

    with cupy.cuda.Device(device_id) as device:
        binary = cached_binary(instantiation, str(device.compute_capability), _toolchain(),
                               _nvrtc)
        module = cupy.cuda.Module()
        module.load(binary.image)
        function = module.get_function(binary.lowered_name)
        static = driver.funcGetAttribute(driver.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
                                         function.ptr)
        driver.funcSetAttribute(function.ptr,
                                driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                _max_shared_bytes(device_id) - static)
    return function


def _launch(device_id: int, args: KernelArguments, plan: KMedoidsPlan, max_iter: int) -> None:
    """One block per problem, on device ``device_id`` (current) and its current stream."""
    import numpy as np

    n_problems, n, m = args.x.shape
    k = args.init.shape[1]
    _function(plan.kernel, device_id)(
        (n_problems,), (BLOCK_THREADS,),
        (args.x, np.int64(problem_stride(args.x)), args.mean, args.init, args.weights,
         np.int32(n_problems), np.int32(n),
         np.int32(m), np.int32(k), np.int32(max_iter), args.workspace, args.labels,
         args.medoids, args.history, args.iterations),
        shared_mem=plan.shared_bytes)


#: Launches the kmedoids kernel: ``launch(args, plan, max_iter)`` (_launch on a GPU, the
#: host build in the tests).
KMedoidsLauncher = Callable[[KernelArguments, KMedoidsPlan, int], None]
#: Launches the merge kernel: ``launch(args, with_objective)``.
MergeLauncher = Callable[["MergeArguments", bool], None]


def fused_kmedoids(np_like: Any, launch: KMedoidsLauncher, max_shared_bytes: int, rows: int,
                   x: Any, mean: Any, init: Any, weights: Any, max_iter: int,
                   stop_early: bool, allocate: Allocator | None = None,
                   most: Most | None = None) -> tuple[Any, Any, Any, Any] | None:
    """:func:`run_kmedoids` for any array module and launcher (the tests run it with NumPy
    and the host build of the kernel), on a device of ``max_shared_bytes`` and fill tile
    ``rows`` (:func:`tile_rows`)."""
    if x.ndim != 3:
        return None
    plan = kmedoids_plan(x.shape[1], init.shape[-1], x.dtype.name, max_shared_bytes, rows)
    if plan is None:
        return None
    args = kernel_arguments(np_like, x, mean, init, weights, max_iter, plan, allocate)
    if x.shape[0] > 0:  # a grid of no blocks is an invalid launch
        launch(args, plan, max_iter)
    return kernel_results(args, max_iter, stop_early, most)


def run_kmedoids(x: Any, mean: Any, init: Any, weights: Any, max_iter: int, stop_early: bool,
                 allocate: Allocator | None = None, most: Most | None = None
                 ) -> tuple[Any, Any, Any, Any] | None:
    """(Weighted) K-Medoids (Eq. 16-17, weights inside) of CuPy arrays in one launch.

    Parameters
    ----------
    x : cupy.ndarray (B, N, M)
        Tokens, float16, float32 or float64.
    mean : cupy.ndarray (B, 1, M)
        Each problem's mean token (distances are those of the centred tokens).
    init : cupy.ndarray (B, K)
        Initial medoids, distinct token indices.
    weights : cupy.ndarray (B, N)
        Token weights ``w_i`` of Eq. 13 and 17.
    max_iter : int
        Most iterations; each problem stops at its own fixed point.
    stop_early : bool
        As in ``_clustering.run_kmedoids``: the iterations reported are the most any problem
        needed, left on the device for the caller to read (see :func:`kernel_results`);
        False reports ``max_iter``.
    allocate : Allocator, optional
        Where the outputs and the workspace come from; CuPy's memory pool by default.
    most : Most, optional
        Where the iteration count comes from, with ``stop_early`` (see :data:`Most`).

    Returns
    -------
    tuple or None
        ``(labels (B, N), medoids (B, K), history (B, T + 1), T)`` as
        ``_clustering.run_kmedoids`` returns them, on ``x``'s device, computed on its current
        stream; None where :func:`kmedoids_plan` declines (planned with that device's
        shared memory and tile rows, whichever device is current).
    """
    import cupy

    device_id = x.device.id
    with cupy.cuda.Device(device_id):
        return fused_kmedoids(cupy, functools.partial(_launch, device_id),
                              _max_shared_bytes(device_id), _tile_rows(device_id), x, mean,
                              init, weights, max_iter, stop_early, allocate, most)


def fused_merge(np_like: Any, launch: MergeLauncher, max_shared_bytes: int, x: Any, mean: Any,
                labels: Any, k: int, weights: Any, fallback: Any | None, carried: Any,
                with_objective: bool, allocate: Allocator | None = None
                ) -> tuple[Any, Any, Any | None] | None:
    """:func:`run_merge` for any array module and launcher (see :func:`fused_kmedoids`)."""
    n_problems, n, m = x.shape
    if not merge_applies(n, k, m, x.dtype.name, max_shared_bytes, with_objective):
        return None
    args = merge_arguments(np_like, x, mean, labels, k, weights, fallback, carried,
                           with_objective, allocate)
    if n_problems > 0:
        launch(args, with_objective)
    return args.tokens, args.sizes, args.objective if with_objective else None


def _launch_merge(device_id: int, args: MergeArguments, with_objective: bool) -> None:
    """One block per problem, on device ``device_id`` (current) and its current stream."""
    import numpy as np

    n_problems, n, m = args.x.shape
    k = args.tokens.shape[1]
    _function(args.kernel, device_id)(
        (n_problems,), (BLOCK_THREADS,),
        (args.x, np.int64(problem_stride(args.x)), args.mean, args.labels, args.weights,
         args.fallback, args.carried,
         np.int32(n_problems), np.int32(n), np.int32(m), np.int32(k),
         np.int32(args.has_fallback), np.int32(with_objective), args.workspace, args.tokens,
         args.sizes, args.objective),
        shared_mem=merge_shared_bytes(n, k, args.tokens.itemsize, with_objective))


def run_merge(x: Any, mean: Any, labels: Any, k: int, weights: Any, fallback: Any | None,
              carried: Any, with_objective: bool, allocate: Allocator | None = None
              ) -> tuple[Any, Any, Any | None] | None:
    """Algorithm 1, line 6 on CuPy arrays: pooled tokens (B, K, M), their sizes (B, K) and,
    ``with_objective``, Eq. 13 of the pooled tokens (B,); None where the kernel does not
    apply. Arguments as in ``_merge.merge_clusters`` (``fallback`` None: the weights are
    all positive); results in the accumulator dtype, allocated by ``allocate`` (CuPy's
    pool by default), on ``x``'s device as :func:`run_kmedoids` does.
    """
    import cupy

    device_id = x.device.id
    with cupy.cuda.Device(device_id):
        return fused_merge(cupy, functools.partial(_launch_merge, device_id),
                           _max_shared_bytes(device_id), x, mean, labels, k, weights,
                           fallback, carried, with_objective, allocate)


def kmedoids(xp: Any, x: Any, mean: Any, init: Any, weights: Any, max_iter: int,
             stop_early: bool) -> tuple[Any, Any, Any, Any] | None:
    """The ``Primitives.kmedoids`` entry for CuPy arrays (see :func:`run_kmedoids`)."""
    return run_kmedoids(x, mean, init, weights, max_iter, stop_early)


def means_by_merge(merge: Callable[..., tuple[Any, Any, Any] | None], xp: Any, values: Any,
                   labels: Any, k: int, weights: Any, empty: Any) -> Any:
    """``Primitives.weighted_means`` from the merge kernel (``merge`` is :func:`run_merge`,
    or its host twin in the tests): sum_i w_i v_i / sum_i w_i per cluster, in token order,
    O(N M) per problem instead of the one-hot product's O(N K M).

    The kernel gives a cluster of zero total weight the problem's one ``empty`` row, which
    is what the K-Medoids merge passes (the mean token); other calls (K-Means keeps one
    centre per cluster) and shapes the kernel does not cover take the generic code.
    """
    if values.ndim == 3 and empty.ndim == 3 and empty.shape[1] == 1:
        merged = merge(values, empty, labels, k, weights, None, weights, False)
        if merged is not None:
            return merged[0]
    return generic_weighted_means(xp, values, labels, k, weights, empty)


def weighted_means(xp: Any, values: Any, labels: Any, k: int, weights: Any, empty: Any) -> Any:
    """The ``Primitives.weighted_means`` entry for CuPy arrays (see :func:`means_by_merge`)."""
    return means_by_merge(run_merge, xp, values, labels, k, weights, empty)


def merge(xp: Any, x: Any, mean: Any, labels: Any, k: int, weights: Any, fallback: Any | None,
          carried: Any, with_objective: bool) -> tuple[Any, Any, Any | None] | None:
    """The ``Primitives.merge`` entry for CuPy arrays (see :func:`run_merge`)."""
    return run_merge(x, mean, labels, k, weights, fallback, carried, with_objective)


FAST_PATHS: dict[str, Callable[..., Any]] = {"kmedoids": kmedoids,
                                             "weighted_means": weighted_means,
                                             "merge": merge}


# ---------------------------------------------------------------------------------------------
# PyTorch CUDA tensors: zero-copy views (TorchArrays), on PyTorch's current stream.

#: PyTorch dtypes the kernel takes (CuPy has no bfloat16; the core computes
#: half precision in float32 anyway, see _compat.compute_dtype).
TORCH_DTYPES = ("float16", "float32", "float64")


def torch_cupy(x: Any) -> Any | None:
    """The ``cupy`` module where the kernels may take PyTorch tensor ``x``; else None (the
    PyTorch code runs): without CuPy, off CUDA, inside ``torch.compile`` (which cannot trace
    a CuPy launch) and for dtypes outside ``TORCH_DTYPES``."""
    import torch

    if (x.device.type != "cuda" or torch.compiler.is_compiling()
            or str(x.dtype).removeprefix("torch.") not in TORCH_DTYPES):
        return None
    try:
        import cupy
    except ImportError:
        return None
    return cupy


@contextlib.contextmanager
def _on_torch_stream(cupy: Any, device: Any) -> Iterator[None]:
    """CuPy launches on PyTorch's current stream of ``device``, so they are ordered with the
    surrounding PyTorch work without a synchronisation."""
    import torch

    stream = torch.cuda.current_stream(device).cuda_stream
    with torch.no_grad(), cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream):
        yield


class TorchArrays:
    """Zero-copy views of PyTorch CUDA tensors as CuPy arrays, and back, for one call of the
    glue: ``to_array`` and ``from_array`` of :func:`kmedoids_for_torch` and
    :func:`merge_for_torch`.

    Why not DLPack: each exchange builds a capsule, and PyTorch's ``__dlpack__`` a stream
    object and a device lookup. On an H200 (torch 2.11, CuPy 14.2) the 15 exchanges of a
    K-Medoids block were most of a pooled DeiT-S block's host time: wkmedoids took 39 ms
    of host time a pass against 18 ms for topk, whose blocks launch no CuPy kernel
    (benchmarks/results/gpu_check_run4.md). A view here is a pointer, a byte size and the
    tensor that owns the memory (CuPy's ``UnownedMemory`` keeps it alive). No stream
    handshake is needed: the launches run on the tensor's current stream
    (:func:`_on_torch_stream`). Arrays viewing a tensor given here map back to that tensor
    (a slice to the same slice); any other array goes back through DLPack.
    """

    def __init__(self, cupy: Any, device: Any) -> None:
        """Views of tensors on PyTorch device ``device``, a CUDA device (the current one
        where it has no index)."""
        self._cupy, self._device = cupy, device
        self._device_id = cupy.cuda.Device().id if device.index is None else device.index
        self._owners: list[tuple[int, int, Any]] = []  # (first byte, byte size, tensor)

    def to_array(self, tensor: Any) -> Any:
        import numpy as np

        dtype = np.dtype(str(tensor.dtype).removeprefix("torch."))
        shape = tuple(tensor.shape)
        # Bytes from the first element to one past the last, strides being non-negative. An
        # empty tensor is a view of no bytes too: CuPy's allocator is asked for nothing, as
        # a CUDA graph capture requires (its pool knows nothing of the graph).
        size = 0 if tensor.numel() == 0 else (
            1 + sum((n - 1) * s for n, s in zip(shape, tensor.stride(), strict=True))
        ) * dtype.itemsize
        start = tensor.data_ptr()
        memory = self._cupy.cuda.UnownedMemory(start, size, tensor, self._device_id)
        self._owners.append((start, size, tensor))
        return self._cupy.ndarray(shape, dtype, self._cupy.cuda.MemoryPointer(memory, 0),
                                  tuple(s * dtype.itemsize for s in tensor.stride()))

    def from_array(self, array: Any) -> Any:
        import torch

        dtype = getattr(torch, array.dtype.name)
        if array.size == 0:
            return torch.empty(array.shape, dtype=dtype, device=self._device)
        pointer = array.data.ptr
        for start, size, tensor in self._owners:
            if start <= pointer < start + size and tensor.dtype == dtype:
                offset, remainder = divmod(pointer - start, array.itemsize)
                if remainder == 0 and all(s % array.itemsize == 0 for s in array.strides):
                    return tensor.as_strided(array.shape,
                                             [s // array.itemsize for s in array.strides],
                                             tensor.storage_offset() + offset)
        return torch.from_dlpack(array)


def torch_allocator(device: Any, to_array: Callable[[Any], Any]) -> Allocator:
    """An :data:`Allocator` from PyTorch's allocator on ``device``: each buffer is a torch
    tensor seen through ``to_array`` (:meth:`TorchArrays.to_array`).

    Inside a CUDA graph capture PyTorch draws these from the graph's private pool and keeps
    them for its replays; CuPy's own pool knows nothing of the graph.
    """
    import numpy as np
    import torch

    def allocate(shape: tuple[int, ...], dtype: Any) -> Any:
        torch_dtype = getattr(torch, np.dtype(dtype).name)
        return to_array(torch.empty(shape, dtype=torch_dtype, device=device))

    return allocate


def _torch_accumulator(x: Any) -> Any:
    import torch

    return getattr(torch, ACCUMULATOR[str(x.dtype).removeprefix("torch.")])


def _torch_problems(x: Any) -> Any:
    """Tensor ``x`` (B, N, M) itself where :func:`problems_contiguous`, else contiguous."""
    return x if problems_contiguous(tuple(x.shape), tuple(x.stride())) else x.contiguous()


def kmedoids_for_torch(run: Callable[..., tuple[Any, Any, Any, Any] | None],
                       to_array: Callable[[Any], Any], from_array: Callable[[Any], Any],
                       x: Any, mean: Any, init: Any, weights: Any, max_iter: int,
                       stop_early: bool) -> tuple[Any, Any, Any, Any] | None:
    """:func:`torch_kmedoids` with the launch (``run``: :func:`run_kmedoids`, or the host
    build in the tests) and the array exchange given.

    PyTorch puts the inputs in the kernel's layout and dtypes (a no-op where they already
    are), so the glue copies nothing, and :func:`torch_allocator` gives the outputs: every
    buffer the launch touches comes from PyTorch's allocator.
    """
    if x.ndim != 3:
        return None
    accumulator = _torch_accumulator(x)
    inputs = (_torch_problems(x.detach()), mean.detach().to(accumulator).contiguous(),
              init.long().contiguous(), weights.detach().to(accumulator).contiguous())
    # Positional, as every argument of a launch path: wrappers that count its calls
    # (benchmarks/bench_cuda.py, the GPU tests) pass positional arguments on. The count of
    # iterations is reduced by PyTorch, as every other buffer comes from its allocator.
    result = run(*map(to_array, inputs), max_iter, stop_early,
                 torch_allocator(x.device, to_array), lambda counts: from_array(counts).amax())
    if result is None:
        return None
    labels, medoids, history, n_iter = result  # n_iter: an int, or a 0-d tensor (unread)
    return from_array(labels), from_array(medoids), from_array(history), n_iter


def _torch_entry(for_torch: Callable[..., Any], run: Callable[..., Any], x: Any,
                 *args: Any) -> Any | None:
    """``for_torch(run, to_array, from_array, x, *args)`` with the views of
    :class:`TorchArrays`, on PyTorch's current stream of ``x``'s device; None where
    :func:`torch_cupy` declines."""
    cupy = torch_cupy(x)
    if cupy is None:
        return None
    with _on_torch_stream(cupy, x.device):
        arrays = TorchArrays(cupy, x.device)
        return for_torch(run, arrays.to_array, arrays.from_array, x, *args)


def torch_kmedoids(x: Any, mean: Any, init: Any, weights: Any, max_iter: int,
                   stop_early: bool) -> tuple[Any, Any, Any, Any] | None:
    """:func:`run_kmedoids` for PyTorch CUDA tensors; torch tensors on the same device back.

    None (the PyTorch code runs) where :func:`torch_cupy` declines and for shapes the
    kernel does not cover. Zero-copy (:class:`TorchArrays`), on PyTorch's current stream,
    outputs from PyTorch's allocator (see :func:`kmedoids_for_torch`). Nothing here needs
    gradients: labels and medoids have none, and the merge that follows stays in PyTorch.
    """
    return _torch_entry(kmedoids_for_torch, run_kmedoids, x, mean, init, weights, max_iter,
                        stop_early)


def merge_for_torch(run: Callable[..., tuple[Any, Any, Any | None] | None],
                    to_array: Callable[[Any], Any], from_array: Callable[[Any], Any],
                    x: Any, mean: Any, labels: Any, k: int, weights: Any, fallback: Any | None,
                    carried: Any, with_objective: bool) -> tuple[Any, Any, Any | None] | None:
    """:func:`torch_merge` with the launch (``run``: :func:`run_merge`, or the host build in
    the tests) and the array exchange given; inputs and outputs as in
    :func:`kmedoids_for_torch`. Results in the accumulator dtype, which is the core's
    compute dtype."""
    if x.ndim != 3:
        return None
    accumulator = _torch_accumulator(x)

    def per_token(values: Any) -> Any:
        return to_array(values.detach().to(accumulator).contiguous())

    merged = run(to_array(_torch_problems(x.detach())), per_token(mean), to_array(
        labels.long().contiguous()), k, per_token(weights),
        None if fallback is None else per_token(fallback), per_token(carried), with_objective,
        torch_allocator(x.device, to_array))  # positional: see kmedoids_for_torch
    if merged is None:
        return None
    tokens, sizes, objective = merged
    return (from_array(tokens), from_array(sizes),
            None if objective is None else from_array(objective))


def means_for_torch(merge: Callable[..., tuple[Any, Any, Any | None] | None],
                    to_array: Callable[[Any], Any], from_array: Callable[[Any], Any],
                    values: Any, labels: Any, k: int, weights: Any, empty: Any) -> Any | None:
    """:func:`torch_weighted_means` with the launch (``merge``: :func:`run_merge`, or the
    host build in the tests) and the array exchange given: :func:`merge_for_torch` with the
    weights as sizes and no objective. None where :func:`means_by_merge` would take the
    generic code (``empty`` not one row per problem) or the kernel declines.
    """
    import torch

    if empty.ndim != 3 or empty.shape[1] != 1:
        return None
    merged = merge_for_torch(merge, to_array, from_array, values, empty, labels, k, weights,
                             None, weights, False)
    if merged is None:
        return None
    # The generic means come in the promoted dtype of their inputs; the kernel's in the
    # accumulator dtype (float32 for float16 tokens).
    dtype = torch.promote_types(torch.promote_types(values.dtype, weights.dtype), empty.dtype)
    return merged[0].to(dtype)


def torch_weighted_means(values: Any, labels: Any, k: int, weights: Any, empty: Any
                         ) -> Any | None:
    """:func:`weighted_means` (the merge kernel) for PyTorch CUDA tensors; a torch tensor on
    the same device back, or None (the PyTorch code runs) where :func:`torch_cupy` or
    :func:`means_for_torch` declines.

    Detached: the caller keeps the differentiable PyTorch path for tensors that need
    gradients (``tokenpool_ops.nn.merge``).
    """
    return _torch_entry(means_for_torch, run_merge, values, labels, k, weights, empty)


def torch_merge(x: Any, mean: Any, labels: Any, k: int, weights: Any, fallback: Any | None,
                carried: Any, with_objective: bool) -> tuple[Any, Any, Any | None] | None:
    """:func:`run_merge` for PyTorch CUDA tensors (``Primitives.merge``); torch tensors on the
    same device back, or None (the PyTorch code runs) where :func:`torch_cupy` or the
    kernel declines. Detached, like :func:`torch_weighted_means`."""
    return _torch_entry(merge_for_torch, run_merge, x, mean, labels, k, weights, fallback,
                        carried, with_objective)
