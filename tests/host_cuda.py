"""The launches of the CUDA glue (backends/_cupy.py), checked and run on the CPU.

The glue's real launch code (``_launch``, ``_launch_merge``, under ``run_kmedoids``,
``run_merge``, the CuPy fast-path entries and the PyTorch entries) calls a stand-in CuPy
(tests/fake_cupy.py) that records each launch. This module

* parses the kernels' signatures (names, parameter order, C types) from
  backends/cuda/kmedoids.cu and the accumulator type of each element type from
  device_helpers.cuh: a small parser of its own, not the glue's names or tables;
* checks a recorded launch against them (:func:`check_launch`): the argument count, each
  array's dtype, contiguity and device, each scalar's exact type (a Python int would reach
  the GPU as 8 bytes where the kernel reads 4), grid, block, the shared-memory opt-in;
* runs the recorded argument tuple on the host build of the very kernel source
  (:class:`HostLauncher`): each argument is marshalled as CuPy marshals it (an array as its
  data pointer, a NumPy scalar as its own bytes, a Python int as int64) into one buffer per
  parameter, and a generated C++ entry reads each parameter's ``sizeof`` bytes from its
  buffer, as cuLaunchKernel's ``kernelParams`` are read, then launches the instantiation
  with the recorded grid, block and dynamic shared memory. The dynamic shared memory is
  exactly the recorded size followed by a guard; after the launch the highest byte the
  kernel wrote is reported (``high_water``): an independent count of the kernel's shared
  layout, which must equal the plan's size (a plan that is too small shows as writes into
  the guard, one that is too large as bytes never written).

:class:`GlueOnHost` runs ``_cupy._launch`` and ``_cupy._launch_merge`` this way for the
host tests of tests/test_cuda_kernel.py, so that they test the real marshalling instead of
re-implementing it.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenpool_ops.backends import _cupy

from tests.fake_cupy import FakeArray, FakeCupy, Launch

KERNEL_DIR = Path(__file__).resolve().parents[1] / "backends" / "cuda"
#: The fake's lowering of a name expression (FakeCupy's compile_using_nvrtc).
LOWERED_PREFIX = "_lowered_"
#: C element types as NumPy dtypes (None: no NumPy dtype, any 2-byte non-float16 stand-in).
C_DTYPES: dict[str, str | None] = {
    "double": "float64", "float": "float32", "long long": "int64", "int": "int32",
    "unsigned int": "uint32", "unsigned long long": "uint64", "Half": "float16",
    "BFloat16": None}
#: Above this much dynamic shared memory a kernel must have opted in (CUDA's default limit).
DEFAULT_SHARED_LIMIT = 48 * 1024


# ---------------------------------------------------------------------------------------------
# Parsing the kernel source


@dataclass(frozen=True)
class Parameter:
    ctype: str  # as written, without __restrict__, whitespace normalised
    name: str


@dataclass(frozen=True)
class KernelSignature:
    name: str
    template: tuple[str, ...]  # template parameter names, in order
    parameters: tuple[Parameter, ...]


def _without_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _balanced(text: str, start: int, open_: str = "(", close: str = ")") -> int:
    """Index just past the bracket that closes the one at ``text[start]``."""
    depth = 0
    for index in range(start, len(text)):
        depth += {open_: 1, close: -1}.get(text[index], 0)
        if depth == 0:
            return index + 1
    raise ValueError(f"unbalanced {open_}{close} from offset {start}")


def _split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside any (), <> or []."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        depth += 1 if char in "(<[" else -1 if char in ")>]" else 0
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def _parameter(text: str) -> Parameter:
    words = " ".join(text.replace("__restrict__", " ").split())
    match = re.fullmatch(r"(.*?[\s*&])(\w+)", words)
    if match is None:
        raise ValueError(f"cannot read the parameter {text!r}")
    ctype = re.sub(r"\s*\*", "*", match.group(1).strip())
    return Parameter(ctype, match.group(2))


def kernel_signatures(source: str) -> dict[str, KernelSignature]:
    """Every ``__global__`` function of ``source``, with its template parameters."""
    text = _without_comments(source)
    kernels = {}
    for found in re.finditer(r"\b__global__\s+void\s+", text):
        before = text[: found.start()].rstrip()
        template: tuple[str, ...] = ()
        if before.endswith(">"):
            opening = before.rfind("template")
            header = before[opening + len("template"):].strip()
            template = tuple(part.split()[-1] for part in _split_top_level(header[1:-1]))
        at = found.end()
        bounds = re.match(r"__launch_bounds__\s*", text[at:])
        if bounds:
            at = _balanced(text, at + bounds.end())
        name = re.match(r"\s*(\w+)\s*", text[at:])
        assert name is not None
        opening = at + name.end()
        closing = _balanced(text, opening)
        parameters = tuple(map(_parameter, _split_top_level(text[opening + 1: closing - 1])))
        kernels[name.group(1)] = KernelSignature(name.group(1), template, parameters)
    return kernels


def type_traits(source: str) -> dict[str, dict[str, str]]:
    """``template <typename T> struct Trait { using type = ...; };`` and its explicit
    specialisations: {trait: {argument or "*" for the primary template: type}}."""
    text = _without_comments(source)
    traits: dict[str, dict[str, str]] = {}
    primary = (r"template\s*<\s*typename\s+\w+\s*>\s*struct\s+(\w+)\s*\{\s*using\s+type\s*=\s*"
               r"([\w:]+)\s*;")
    for name, value in re.findall(primary, text):
        traits.setdefault(name, {})["*"] = value
    special = (r"template\s*<\s*>\s*struct\s+(\w+)\s*<\s*([\w:]+)\s*>\s*\{\s*using\s+type\s*=\s*"
               r"([\w:]+)\s*;")
    for name, argument, value in re.findall(special, text):
        traits.setdefault(name, {})[argument] = value
    return traits


def block_threads(header: str) -> int:
    """``TP_BLOCK_THREADS`` of device_helpers.cuh."""
    match = re.search(r"#define\s+TP_BLOCK_THREADS\s+(\d+)", header)
    assert match is not None, "TP_BLOCK_THREADS not found in device_helpers.cuh"
    return int(match.group(1))


def parse_instantiation(instantiation: str) -> tuple[str, list[str]]:
    """``"tokenpool::kmedoids<float, true, 2>"`` -> ``("kmedoids", ["float", "true", "2"])``."""
    match = re.fullmatch(r"(?:\w+::)*(\w+)\s*<(.*)>", instantiation.strip())
    if match is None:
        raise ValueError(f"not a template instantiation: {instantiation!r}")
    return match.group(1), _split_top_level(match.group(2))


def _plain(ctype: str) -> str:
    return re.sub(r"\b\w+::", "", ctype)  # namespaces dropped: tokenpool::Half is Half


@dataclass(frozen=True)
class KernelSource:
    """What the checks read from the CUDA source."""

    kernels: dict[str, KernelSignature]
    traits: dict[str, dict[str, str]]
    block_threads: int

    @classmethod
    def read(cls, folder: Path = KERNEL_DIR) -> KernelSource:
        header = (folder / "device_helpers.cuh").read_text()
        return cls(kernel_signatures((folder / "kmedoids.cu").read_text()),
                   type_traits(header), block_threads(header))

    def parameter_types(self, instantiation: str) -> list[tuple[str, str]]:
        """``(C type, name)`` of each parameter of ``instantiation``, its template
        arguments and type traits substituted."""
        name, arguments = parse_instantiation(instantiation)
        signature = self.kernels[name]
        assert len(arguments) == len(signature.template), (instantiation, signature.template)
        binding = dict(zip(signature.template, arguments, strict=True))

        def resolve(ctype: str) -> str:
            for parameter, argument in binding.items():
                ctype = re.sub(rf"\b{parameter}\b", argument, ctype)

            def trait(match: re.Match[str]) -> str:
                table = self.traits[match.group(1)]
                return table.get(match.group(2), table.get(_plain(match.group(2)), table["*"]))

            return re.sub(r"typename\s+(?:\w+::)*(\w+)\s*<\s*([\w:]+)\s*>::type", trait, ctype)

        return [(resolve(p.ctype), p.name) for p in signature.parameters]


# ---------------------------------------------------------------------------------------------
# Checking one recorded launch


def _element_type(ctype: str) -> tuple[str, bool]:
    """``("float", True)`` for ``const float*``: the pointee and whether it is const."""
    pointee = ctype.removesuffix("*").strip()
    const = pointee.startswith("const ")
    return _plain(pointee.removeprefix("const ").strip()), const


def check_arguments(source: KernelSource, instantiation: str, arguments: tuple[Any, ...]
                    ) -> dict[str, Any]:
    """Asserts that ``arguments`` fit the parameters of ``instantiation`` (count, order by
    type, every dtype); returns them by parameter name."""
    parameters = source.parameter_types(instantiation)
    assert len(arguments) == len(parameters), (
        f"{instantiation}: {len(arguments)} arguments for {len(parameters)} parameters "
        f"{[name for _, name in parameters]}")
    for argument, (ctype, name) in zip(arguments, parameters, strict=True):
        where = f"{instantiation}, parameter {name} ({ctype})"
        if ctype.endswith("*"):
            element, const = _element_type(ctype)
            assert isinstance(argument, np.ndarray), f"{where}: got {type(argument)}"
            dtype = C_DTYPES[element]
            if dtype is None:  # no NumPy dtype: any 2-byte stand-in but float16
                assert argument.dtype.itemsize == 2 and argument.dtype != np.float16, where
            else:
                assert argument.dtype == np.dtype(dtype), f"{where}: got {argument.dtype}"
            # x may be a view past prefix tokens: its layout is checked with its stride below.
            assert argument.flags.c_contiguous or name == "x", f"{where}: not C-contiguous"
            assert const or argument.flags.writeable, f"{where}: an output not writable"
        else:
            expected = np.dtype(C_DTYPES[_plain(ctype)]).type  # type: ignore[arg-type]
            # Exactly that NumPy type: CuPy passes a Python int as 8 bytes, a bool as 1.
            assert type(argument) is expected, f"{where}: got {type(argument).__name__}"
    named = {name: argument for argument, (_, name) in zip(arguments, parameters, strict=True)}
    _check_problems(instantiation, named)
    return named


def _check_problems(instantiation: str, named: dict[str, Any]) -> None:
    """x as the kernels read it: (B, N, M), each problem's (N, M) tokens contiguous,
    problem b's at b * x_stride elements from the first."""
    x, stride = named["x"], int(named["x_stride"])
    b, n, m = (int(named[name]) for name in ("n_problems", "n", "m"))
    items = x.itemsize
    assert x.shape == (b, n, m), (instantiation, x.shape, (b, n, m))
    assert n <= 1 or x.strides[1] == m * items, (instantiation, x.strides)
    assert m <= 1 or x.strides[2] == items, (instantiation, x.strides)
    assert b <= 1 or x.strides[0] == stride * items, (instantiation, x.strides, stride)


def check_launch(source: KernelSource, launch: Launch, *, device: int | None = None,
                 stream: Any = "any", shared_limit: int | None = None) -> dict[str, Any]:
    """Asserts that a recorded launch fits its kernel: the arguments (see
    :func:`check_arguments`), one block of ``TP_BLOCK_THREADS`` threads per problem, every
    array on the launch's device, and dynamic shared memory within the function's opt-in
    (which, with its static shared memory, fits the device's ``shared_limit``)."""
    instantiation = launch.lowered_name.removeprefix(LOWERED_PREFIX)
    named = check_arguments(source, instantiation, launch.arguments)
    assert launch.grid == (int(named["n_problems"]),), (launch.grid, named["n_problems"])
    assert launch.grid[0] >= 1, "a grid of no blocks is an invalid launch"
    assert launch.block == (source.block_threads,), launch.block
    if device is not None:
        assert launch.device == device
        assert launch.argument_devices <= {device}, launch.argument_devices
    if stream != "any":
        assert (launch.stream, launch.stream_argument) == (stream, None)
    limit = launch.opted_in if launch.opted_in is not None else DEFAULT_SHARED_LIMIT
    assert 0 <= launch.shared_mem <= limit, (launch.shared_mem, limit)
    if shared_limit is not None:
        assert launch.opted_in is not None
        assert launch.opted_in + launch.static_shared <= shared_limit
    return named


def check_extents(lowered_name: str, args: dict[str, Any]) -> None:
    """Each array holds what the kernel indexes in it (read from its source: one problem's
    slice is at ``problem * extent``), so that a short buffer cannot pass unseen on the
    host. Parameter names as in kmedoids.cu."""
    b, n, m, k = (int(args[name]) for name in ("n_problems", "n", "m", "k"))
    extents = {"x": b * n * m, "mean": b * m, "weights": b * n, "tokens": b * k * m,
               "sizes": b * k}
    if "max_iter" in args:  # kmedoids
        _, template_arguments = parse_instantiation(lowered_name.removeprefix(LOWERED_PREFIX))
        shared_matrix = template_arguments[1] == "true"  # kmedoids<T, SharedMatrix, TileRows>
        extents.update(init=b * k, labels_out=b * n, medoids_out=b * k, iterations=b,
                       history=b * (int(args["max_iter"]) + 1),
                       workspace=0 if shared_matrix else b * n * (n | 1))
    else:  # merge
        extents.update(labels=b * n, carried=b * n, objective=b, workspace=0,
                       fallback=b * n if int(args["has_fallback"]) else 0)
    for name, array in args.items():
        if isinstance(array, np.ndarray):
            assert array.size == extents[name], (lowered_name, name, array.shape)


# ---------------------------------------------------------------------------------------------
# Running one recorded launch on the host build

_PROGRAM = """// Generated by tests/host_cuda.py: the glue's instantiations of kmedoids.cu,
// launched on the host with their arguments read as cuLaunchKernel reads kernelParams.
#include "host_emulation.h"

#include <cstring>
#include <mutex>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

namespace tests_host {
// Dynamic shared memory: the launch's bytes, then a guard; all of it garbage-filled.
inline std::vector<unsigned char> shared;
constexpr std::size_t kGuardBytes = 1 << 16;
constexpr unsigned char kFill = 0xA5;
}  // namespace tests_host

#undef TP_DYNAMIC_SHARED
#define TP_DYNAMIC_SHARED(name) unsigned char* name = tests_host::shared.data()
#include "kmedoids.cu"

namespace tests_host {
template <typename... P, std::size_t... I>
int run(void (*kernel)(P...), unsigned grid, unsigned block, std::size_t bytes, void** params,
        long long* high_water, std::index_sequence<I...>) {
  static std::mutex one_launch;
  std::lock_guard<std::mutex> lock(one_launch);
  std::tuple<P...> values;
  (std::memcpy(&std::get<I>(values), params[I], sizeof(P)), ...);
  shared.assign(bytes + kGuardBytes, kFill);
  tp_host::launch(grid, block, 0, [=] { std::apply(kernel, values); });
  std::size_t end = shared.size();
  while (end > 0 && shared[end - 1] == kFill) --end;
  *high_water = static_cast<long long>(end);
  return 0;
}

template <typename... P>
int launch(void (*kernel)(P...), unsigned grid, unsigned block, std::size_t bytes,
           void** params, int count, long long* high_water) {
  if (count != static_cast<int>(sizeof...(P))) return -2;
  return run(kernel, grid, block, bytes, params, high_water, std::index_sequence_for<P...>{});
}
}  // namespace tests_host

TP_HOST_EXPORT int tp_test_launch(const char* name, unsigned grid, unsigned block,
                                  unsigned long long bytes, void** params, int count,
                                  long long* high_water) {
  const std::string_view wanted(name);
%(entries)s
  return -1;
}
"""


#: g++ options of the host builds (a shared library for ctypes): no implicit multiply-add (the
#: GPU build has none either, -fmad=false in _cupy.FLOAT_MODEL, so both round every operation
#: the same way); hidden symbols but the C entry points (host_emulation.h, TP_HOST_EXPORT), so
#: that the library neither serves nor takes another loaded library's definitions.
HOST_LIBRARY_OPTIONS = ("-std=c++20", "-O2", "-ffp-contract=off", "-fvisibility=hidden", "-Wall",
                        "-Wextra", "-Werror", "-shared", "-fPIC", "-pthread")


def exported_symbols(library: Path) -> list[str]:
    """``nm -D --defined-only`` of a built library: one "TYPE NAME" a defined dynamic symbol
    (type "u" is a process-wide unique symbol, which binds across RTLD_LOCAL libraries)."""
    listed = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True,
                            text=True, check=True).stdout
    return [" ".join(line.split()[1:]) for line in listed.splitlines() if line.strip()]


def build_library(folder: Path) -> ctypes.CDLL:
    """The generated launcher of every instantiation the glue names, built with g++ (the
    options of tests/test_cuda_kernel.py's host build); skips without g++."""
    compiler = shutil.which("g++")
    if compiler is None:
        # Worded without "CUDA" or "GPU": under TOKENPOOL_OPS_REQUIRE_CUDA=1 such skips fail
        # (tests/conftest.py), and a missing host compiler is no missing GPU.
        pytest.skip("g++ not found: the host build of the kernels cannot be compiled")
    entries = "\n".join(
        f'  if (wanted == "{name}") return tests_host::launch(&{name}, grid, block, bytes, '
        "params, count, high_water);" for name in _cupy.kernel_names())
    program = folder / "host_launch.cpp"
    program.write_text(_PROGRAM % {"entries": entries})
    library = folder / "libtokenpool_host_launch.so"
    command = [compiler, *HOST_LIBRARY_OPTIONS, f"-I{KERNEL_DIR}", str(program), "-o",
               str(library)]
    built = subprocess.run(command, capture_output=True, text=True, check=False)
    assert built.returncode == 0, f"host launcher build failed:\n{built.stderr[-5000:]}"
    loaded = ctypes.CDLL(str(library))
    loaded.tp_test_launch.restype = ctypes.c_int
    loaded.tp_test_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint,
                                      ctypes.c_ulonglong, ctypes.POINTER(ctypes.c_void_p),
                                      ctypes.c_int, ctypes.POINTER(ctypes.c_longlong)]
    return loaded


#: Bytes after each marshalled argument: garbage, so that a parameter read wider than the
#: argument passed (an int32 where the kernel takes a long long) reads garbage, as on a GPU.
_PADDING = b"\xee" * 16


def marshal(argument: Any) -> bytes:
    """One argument as CuPy passes it to the driver: an array as its data pointer; a NumPy
    scalar as its bytes; a Python int, float or bool as int64, float64 or bool."""
    if isinstance(argument, np.ndarray):
        return ctypes.c_void_p(argument.ctypes.data).value.to_bytes(8, "little")  # type: ignore[union-attr]
    if isinstance(argument, bool):
        argument = np.bool_(argument)
    elif isinstance(argument, int):
        argument = np.int64(argument)
    elif isinstance(argument, float):
        argument = np.float64(argument)
    assert isinstance(argument, np.generic), f"CuPy cannot pass a {type(argument)}"
    return argument.tobytes()


@dataclass
class HostLauncher:
    """``FakeCupy.execute``: runs each recorded launch on the host build, after ``check``
    (where given: a launch that does not fit its kernel must fail, not corrupt memory); keeps
    each launch with the highest byte of dynamic shared memory it wrote."""

    library: ctypes.CDLL
    check: Callable[[Launch], Any] | None = None
    executed: list[tuple[Launch, int]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, launch: Launch) -> None:
        if self.check is not None:
            self.check(launch)
        assert len(launch.grid) == len(launch.block) == 1, "the host runs 1-D launches only"
        buffers = [ctypes.create_string_buffer(marshal(a) + _PADDING) for a in launch.arguments]
        params = (ctypes.c_void_p * max(1, len(buffers)))(
            *[ctypes.cast(b, ctypes.c_void_p) for b in buffers])
        high_water = ctypes.c_longlong(-1)
        name = launch.lowered_name.removeprefix(LOWERED_PREFIX)
        status = self.library.tp_test_launch(
            name.encode(), launch.grid[0], launch.block[0], launch.shared_mem, params,
            len(buffers), ctypes.byref(high_water))
        assert status != -1, f"{name}: not an instantiation the host launcher has"
        assert status != -2, f"{name}: {len(buffers)} arguments, not the kernel's count"
        assert status == 0, status
        with self._lock:
            self.executed.append((launch, high_water.value))


def check_shared_layout(launcher: HostLauncher) -> None:
    """Each executed launch wrote its dynamic shared memory up to its last byte and no
    further: the plan's size is the kernel's layout."""
    for launch, high_water in launcher.executed:
        assert high_water == launch.shared_mem, (
            f"{launch.lowered_name}: the plan gives {launch.shared_mem} bytes of shared "
            f"memory, the kernel wrote up to byte {high_water}")


# ---------------------------------------------------------------------------------------------
# The glue's launches for tests/test_cuda_kernel.py


class GlueOnHost:
    """``_cupy._launch`` and ``_cupy._launch_merge`` (the real marshalling), with CuPy a
    fake whose kernels run on the host build; every launch checked against the source."""

    #: The host has no shared-memory limit: the tests force plans beyond a GPU's.
    SHARED_LIMIT = 1 << 40

    def __init__(self, library: ctypes.CDLL, cache: Path) -> None:
        self.source = KernelSource.read()
        self.launcher = HostLauncher(library, self._check)
        self.fake = FakeCupy({0: self.SHARED_LIMIT}, execute=self.launcher)
        self.cache = cache
        self.functions: dict[tuple[str, int], Any] = {}

    def _check(self, launch: Launch) -> None:
        named = check_launch(self.source, launch, device=0, stream=None,
                             shared_limit=self.SHARED_LIMIT)
        check_extents(launch.lowered_name, named)

    @contextlib.contextmanager
    def installed(self) -> Iterator[FakeCupy]:
        with pytest.MonkeyPatch.context() as patch:
            self.fake.install(patch)
            patch.setattr(_cupy, "_functions", self.functions)
            patch.setenv(_cupy.CACHE_DIR_VARIABLE, str(self.cache))
            _cupy._max_shared_bytes.cache_clear()
            _cupy._tile_rows.cache_clear()
            try:
                yield self.fake
            finally:
                _cupy._max_shared_bytes.cache_clear()
                _cupy._tile_rows.cache_clear()

    def _check_last(self) -> None:
        launch, high_water = self.launcher.executed[-1]
        assert high_water == launch.shared_mem, (launch.lowered_name, launch.shared_mem,
                                                 high_water)

    def launch(self, args: _cupy.KernelArguments, plan: _cupy.KMedoidsPlan,
               max_iter: int) -> None:
        """A ``_cupy.KMedoidsLauncher``."""
        with self.installed():
            _cupy._launch(0, args, plan, max_iter)
        self._check_last()

    def launch_merge(self, args: _cupy.MergeArguments, with_objective: bool) -> None:
        """A ``_cupy.MergeLauncher``."""
        with self.installed():
            _cupy._launch_merge(0, args, with_objective)
        self._check_last()


def on_device(fake: FakeCupy, array: np.ndarray, device: int = 0) -> FakeArray:
    """``array`` (no copy) as a fake CuPy array on ``device``."""
    view = array.view(FakeArray)
    view.device_id = device
    return view
