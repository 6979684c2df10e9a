"""A stand-in for the few parts of CuPy that backends/_cupy.py uses, recording each call, so
that the glue's device, stream, compile and attribute handling runs on a machine without a
GPU (tests/test_cuda_glue.py). Arrays are NumPy arrays that remember the device they were
made on, as CuPy's do. Each launch is recorded with its argument tuple as the glue passed it;
``FakeCupy.execute``, where set, then runs it (tests/host_cuda.py runs it on the host build of
the kernels, tests/test_cuda_launches.py checks it against the kernel's signature).

Use: ``monkeypatch.setitem(sys.modules, "cupy", FakeCupy(...))``, and the same for
``cupy.cuda`` and ``cupy.cuda.compiler`` (see :meth:`FakeCupy.install`).
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest


class FakeArray(np.ndarray):
    """A NumPy array with CuPy's ``device.id``: the device current when it was made."""

    device_id: int = 0

    def __array_finalize__(self, source: Any) -> None:
        self.device_id = getattr(source, "device_id", 0)

    @property
    def device(self) -> Any:  # type: ignore[override]
        return SimpleNamespace(id=self.device_id)

    @property
    def data(self) -> Any:  # type: ignore[override]
        """CuPy's ``MemoryPointer`` of the first element: its ``ptr`` is all the glue reads."""
        return SimpleNamespace(ptr=self.__array_interface__["data"][0])


@dataclass
class Launch:
    """One kernel launch: which, where, with what."""

    lowered_name: str
    device: int  # the current device at the launch
    stream: int | None  # the current external stream's pointer, None for the default
    grid: tuple[int, ...]
    block: tuple[int, ...]
    shared_mem: int
    argument_devices: set[int]  # devices of the array arguments
    arguments: tuple[Any, ...] = ()  # the argument tuple, as the glue passed it
    opted_in: int | None = None  # the function's max dynamic shared memory at the launch
    static_shared: int = 0  # the function's static shared memory
    stream_argument: Any = None  # the ``stream`` keyword (None: the current stream)


class FakeFunction:
    def __init__(self, cupy: FakeCupy, lowered_name: str, device: int) -> None:
        self.cupy, self.lowered_name, self.device = cupy, lowered_name, device
        self.ptr = id(self)
        self.attributes = {cupy.SHARED_SIZE: 16}  # static shared memory, as ptxas reports

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...],
                 shared_mem: int = 0, stream: Any = None) -> None:
        launch = Launch(
            self.lowered_name, self.cupy.current_device(), self.cupy.current_stream(), grid,
            block, shared_mem, {a.device_id for a in args if isinstance(a, FakeArray)},
            arguments=args, opted_in=self.attributes.get(self.cupy.MAX_DYNAMIC_SHARED),
            static_shared=self.attributes[self.cupy.SHARED_SIZE], stream_argument=stream)
        self.cupy.launches.append(launch)
        if self.cupy.execute is not None:
            self.cupy.execute(launch)


class FakeModule:
    def __init__(self, cupy: FakeCupy) -> None:
        self.cupy = cupy
        self.image = b""

    def load(self, image: bytes) -> None:
        time.sleep(0.01)  # a driver takes its time: threads that race to load meet here
        self.cupy.loads.append((image, self.cupy.current_device()))
        self.image = image

    def get_function(self, lowered_name: str) -> FakeFunction:
        assert lowered_name.encode() in self.image, "a name from another binary"
        function = FakeFunction(self.cupy, lowered_name, self.cupy.current_device())
        self.cupy.functions[function.ptr] = function
        return function


@dataclass
class FakeCupy:
    """The fake ``cupy`` module. ``shared_limits``: each device's opt-in shared memory;
    ``architectures``: each device's compute capability ("90", an H100's, where not given)."""

    shared_limits: dict[int, int]
    architectures: dict[int, str] = field(default_factory=dict)
    __version__: str = "99.0.0-fake"
    compiles: list[tuple[str, tuple[str, ...], list[str]]] = field(default_factory=list)
    loads: list[tuple[bytes, int]] = field(default_factory=list)
    set_attributes: list[tuple[int, int, int]] = field(default_factory=list)  # (ptr, attr, v)
    launches: list[Launch] = field(default_factory=list)
    asked_limits: list[int] = field(default_factory=list)
    #: Runs each launch after recording it (None: nothing runs).
    execute: Callable[[Launch], None] | None = None

    SHARED_SIZE = 1  # CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES's stand-in
    MAX_DYNAMIC_SHARED = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES's stand-in

    def __post_init__(self) -> None:
        self._local = threading.local()  # CuPy's current device and stream are per thread
        self._lock = threading.Lock()
        fake = self

        class Device:
            def __init__(self, device_id: int | None = None) -> None:
                self.id = fake.current_device() if device_id is None else device_id
                self.compute_capability = fake.architectures.get(self.id, "90")

            def __enter__(self) -> Device:
                fake._stack("devices").append(self.id)
                return self

            def __exit__(self, *exc: object) -> None:
                fake._stack("devices").pop()

        class ExternalStream:
            def __init__(self, ptr: int) -> None:
                self.ptr = ptr

            def __enter__(self) -> ExternalStream:
                fake._stack("streams").append(self.ptr)
                return self

            def __exit__(self, *exc: object) -> None:
                fake._stack("streams").pop()

        def compile_using_nvrtc(source: str, options: tuple[str, ...] = (), arch: Any = None,
                                filename: str = "kern.cu", name_expressions: Any = None,
                                **unused: Any) -> tuple[bytes, dict[str, str]]:
            with fake._lock:
                fake.compiles.append((source, tuple(options), list(name_expressions)))
            lowered = {name: f"_lowered_{name}" for name in name_expressions}
            return f"image of {sorted(lowered.values())}".encode(), lowered

        def deviceGetAttribute(attribute: int, device_id: int) -> int:  # CuPy's name
            fake.asked_limits.append(device_id)
            return fake.shared_limits[device_id]

        def funcGetAttribute(attribute: int, ptr: int) -> int:  # CuPy's name
            return fake.functions[ptr].attributes[attribute]

        def funcSetAttribute(ptr: int, attribute: int, value: int) -> None:
            with fake._lock:
                fake.set_attributes.append((ptr, attribute, value))
                fake.functions[ptr].attributes[attribute] = value

        self.functions: dict[int, FakeFunction] = {}  # by ptr
        self.compiler = SimpleNamespace(compile_using_nvrtc=compile_using_nvrtc)
        self.cuda = SimpleNamespace(
            Device=Device, ExternalStream=ExternalStream, Module=lambda: FakeModule(fake),
            UnownedMemory=lambda ptr, size, owner, device_id: SimpleNamespace(
                ptr=ptr, size=size, owner=owner, device_id=device_id),
            MemoryPointer=lambda mem, offset: SimpleNamespace(mem=mem, offset=offset),
            compiler=self.compiler, nvrtc=SimpleNamespace(getVersion=lambda: (13, 0)),
            runtime=SimpleNamespace(deviceGetAttribute=deviceGetAttribute,
                                    cudaDevAttrMaxSharedMemoryPerBlockOptin=97),
            driver=SimpleNamespace(
                funcGetAttribute=funcGetAttribute, funcSetAttribute=funcSetAttribute,
                CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES=self.SHARED_SIZE,
                CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES=self.MAX_DYNAMIC_SHARED))
        self.int32, self.int64, self.dtype = np.int32, np.int64, np.dtype

    def _stack(self, name: str) -> list[int]:
        if not hasattr(self._local, name):
            setattr(self._local, name, [])
        return getattr(self._local, name)

    def current_device(self) -> int:
        devices = self._stack("devices")
        return devices[-1] if devices else 0

    def current_stream(self) -> int | None:
        streams = self._stack("streams")
        return streams[-1] if streams else None

    # Arrays, made on the current device, as CuPy makes them.
    def _here(self, array: np.ndarray) -> FakeArray:
        fake = array.view(FakeArray)
        fake.device_id = self.current_device()
        return fake

    def asarray(self, values: Any, device: int = 0) -> FakeArray:
        """Test helper: ``values`` as an array on ``device``."""
        array = np.array(values).view(FakeArray)
        array.device_id = device
        return array

    def empty(self, shape: Any, dtype: Any = float) -> FakeArray:
        return self._here(np.empty(shape, dtype=dtype))

    def ascontiguousarray(self, array: Any, dtype: Any = None) -> FakeArray:
        if (isinstance(array, FakeArray) and array.flags.c_contiguous
                and (dtype is None or np.dtype(dtype) == array.dtype)):
            return array  # as CuPy: no copy, wherever it is
        return self._here(np.ascontiguousarray(array, dtype=dtype))

    def ndarray(self, shape: tuple[int, ...], dtype: Any, memptr: Any,
                strides: tuple[int, ...]) -> FakeArray:
        """CuPy's array over memory it does not own (``UnownedMemory``, here host memory
        standing in for a device's): a view of the bytes at the pointer, which keeps the
        owner alive, on the memory's device."""
        memory = memptr.mem
        if memory.size == 0:  # an empty tensor's pointer may be null
            flat = np.empty(0, dtype=dtype)
        else:
            raw = (ctypes.c_byte * memory.size).from_address(memory.ptr + memptr.offset)
            flat = np.frombuffer(raw, dtype=np.uint8).view(dtype)
        array = np.lib.stride_tricks.as_strided(flat, shape, strides).view(FakeArray)
        array.device_id = memory.device_id
        array.owner = memory.owner  # alive as long as the view (and its slices, by .base)
        return array

    def from_dlpack(self, tensor: Any) -> FakeArray:
        """A view of a (CPU) tensor's memory, on the current device, as CuPy's from_dlpack
        gives a view of a CUDA tensor's."""
        return self._here(np.from_dlpack(tensor))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeCupy:
        """Makes ``import cupy`` (and its submodules the glue imports) give this fake."""
        for name, module in (("cupy", self), ("cupy.cuda", self.cuda),
                             ("cupy.cuda.compiler", self.compiler),
                             ("cupy.cuda.runtime", self.cuda.runtime),
                             ("cupy.cuda.driver", self.cuda.driver)):
            monkeypatch.setitem(sys.modules, name, module)
        return self
