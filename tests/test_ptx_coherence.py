"""The PTX check of .ci/check_cuda.sh: a kernel must not load a buffer it writes through
ld.global.nc. On hand-written PTX in nvcc's style, and on the canary nvcc compiles."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

CI = Path(__file__).resolve().parents[1] / ".ci"


def _checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ptx_coherence", CI / "ptx_coherence.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


ptx_coherence = _checker()


def _kernel(body: str) -> str:
    """A kernel of three pointer parameters (in, out, other) around ``body``."""
    return f"""
.visible .entry _Z6kernelPKfPfS1_(
	.param .u64 _Z6kernelPKfPfS1__param_0,
	.param .u64 _Z6kernelPKfPfS1__param_1,
	.param .u64 _Z6kernelPKfPfS1__param_2
)
{{
	.reg .f32 	%f<4>;
	.reg .b64 	%rd<20>;
	.reg .pred 	%p<2>;

	ld.param.u64 	%rd1, [_Z6kernelPKfPfS1__param_0];
	ld.param.u64 	%rd2, [_Z6kernelPKfPfS1__param_1];
	ld.param.u64 	%rd3, [_Z6kernelPKfPfS1__param_2];
	cvta.to.global.u64 	%rd4, %rd1;
	cvta.to.global.u64 	%rd5, %rd2;
	cvta.to.global.u64 	%rd6, %rd3;
	mul.wide.s32 	%rd7, %r1, 4;
	add.s64 	%rd8, %rd4, %rd7;
	add.s64 	%rd9, %rd5, %rd7;
	add.s64 	%rd10, %rd6, %rd7;
{body}
	ret;
}}
"""


def test_flags_a_written_buffer_read_through_nc():
    ptx = _kernel("\tst.global.f32 \t[%rd9], %f1;\n\tbar.sync \t0;\n"
                  "\tld.global.nc.f32 \t%f2, [%rd9+4];")
    findings = ptx_coherence.check(ptx)
    assert [(f.kernel, f.parameter) for f in findings] == [("_Z6kernelPKfPfS1_", 1)]


def test_follows_selects_loops_and_atomics():
    # The merge kernel's case: one load through a pointer selected from two buffers.
    selected = ("\tselp.b64 \t%rd11, %rd8, %rd9, %p1;\n\tld.global.nc.f32 \t%f2, [%rd11];\n"
                "\tst.global.f32 \t[%rd9], %f2;")
    assert [f.parameter for f in ptx_coherence.check(_kernel(selected))] == [1]
    # A pointer advanced in a loop (a register defined twice) and written by an atomic.
    looped = ("$L__BB0_1:\n\tld.global.nc.f32 \t%f2, [%rd12];\n\tadd.s64 \t%rd12, %rd12, 4;\n"
              "\tbra.uni \t$L__BB0_1;\n\tmov.u64 \t%rd12, %rd10;\n"
              "\tatom.global.add.f32 \t%f3, [%rd10], %f2;")
    assert [f.parameter for f in ptx_coherence.check(_kernel(looped))] == [2]


def test_accepts_coherent_reads_and_read_only_buffers():
    plain = ("\tst.global.f32 \t[%rd9], %f1;\n\tbar.sync \t0;\n\tld.global.f32 \t%f2, [%rd9];\n"
             "\tld.global.cg.f32 \t%f3, [%rd9+4];\n\tld.global.nc.f32 \t%f1, [%rd8];\n"
             "\tst.shared.f32 \t[%rd8], %f1;")
    assert ptx_coherence.check(_kernel(plain)) == []
    # A value loaded through a pointer is data: addresses computed from it are not the
    # pointer's (the kernels index by loaded labels).
    indexed = ("\tld.global.nc.u64 \t%rd13, [%rd8];\n\tadd.s64 \t%rd14, %rd10, %rd13;\n"
               "\tst.global.f32 \t[%rd14], %f1;\n\tld.global.nc.f32 \t%f2, [%rd8+8];")
    assert ptx_coherence.check(_kernel(indexed)) == []


def test_flags_the_canary_as_nvcc_compiles_it(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: the canary cannot be compiled (check_cuda.sh needs it too)")
    ptx = tmp_path / "canary.ptx"
    subprocess.run([nvcc, "-gencode", "arch=compute_90,code=sm_90", "-ptx",
                    str(CI / "coherence_canary.cu"), "-o", str(ptx)], check=True)
    findings = ptx_coherence.check(ptx.read_text())
    assert {f.parameter for f in findings} == {1}  # `out`, and not `in` (read-only)
