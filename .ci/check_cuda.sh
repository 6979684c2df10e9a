#!/usr/bin/env bash
# Compile check of the CUDA kernels (backends/cuda), for machines without a GPU.
#
# Every template instantiation the CuPy glue loads (backends/_cupy.py, kernel_name) is
# compiled with nvcc for sm_80 and sm_90, with the glue's floating-point model, warnings as
# errors, and ptxas prints its resource report (registers, shared memory, spills). The
# float32, float16 and bfloat16 kernels must not spill (ptxas -warn-spills is an error for
# them); the float64 kernels, which only the tests use, may, and their spills are reported.
# The PTX of every kernel is then checked for what no test on the CPU can see:
# * no flush-to-zero and no approximate division or square root (the host emulation, and
#   so the tests, compute with subnormals and IEEE rounding);
# * no ld.global.nc (non-coherent) load of a buffer the same kernel writes
#   (.ci/ptx_coherence.py), and that check flags a kernel that does (.ci/coherence_canary.cu),
#   so it cannot pass by looking at nothing.
# The host build that the tests run (host_build.cpp through host_emulation.h) is compiled
# too, warnings as errors.
#
# Usage: .ci/check_cuda.sh            (NVCC, CXX and PYTHON may name other programs)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
source_dir="$root/backends/cuda"
nvcc=${NVCC:-nvcc}
cxx=${CXX:-g++}
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! command -v "$nvcc" >/dev/null; then
  echo "check_cuda: $nvcc not found" >&2
  exit 1
fi

# One translation unit per element-type group, taking the address of each kernel so that
# every instantiation is compiled: kmedoids<T, SharedMatrix, TileRows> with both shapes of
# fill_matrix's blocks (1: 4 x 4 tiles, the glue's choice before sm_90; 2: 8 x 4 pairs, from
# sm_90 on; both are compiled for both architectures, so that each is checked for spills
# wherever it could run) and merge<T>.
instantiate() {  # file, element types...
  local file=$1
  shift
  {
    echo '#include "kmedoids.cu"'
    echo 'void* tokenpool_kernels[] = {'
    for type in "$@"; do
      for rows in 1 2; do
        echo "  reinterpret_cast<void*>(&tokenpool::kmedoids<$type, true, $rows>),"
        echo "  reinterpret_cast<void*>(&tokenpool::kmedoids<$type, false, $rows>),"
      done
      echo "  reinterpret_cast<void*>(&tokenpool::merge<$type>),"
    done
    echo '};'
  } >"$file"
}
instantiate "$work/float_kernels.cu" float tokenpool::Half tokenpool::BFloat16
instantiate "$work/double_kernels.cu" double

# ptxas's resource report, one line per kernel: instantiation, registers, spills, shared
# memory; errors and warnings as they came.
report() {
  (command -v c++filt >/dev/null && c++filt || cat) <"$1" | awk '
    /Function properties for/ { name = $0; sub(/^.*void tokenpool::/, "", name);
                                sub(/\(.*/, "", name); next }
    /spill stores/ { spills = $0; gsub(/^ +/, "", spills); next }
    /Used [0-9]+ registers/ { used = $0; sub(/.*Used /, "", used);
                              printf "  %-40s %s; %s\n", name, used, spills; next }
    /error|warning/ { print }'
}

# The floating-point model the glue gives NVRTC (backends/_cupy.py, FLOAT_MODEL; a test
# checks that both lists agree): subnormals kept, IEEE division and square root, and no
# multiply-add contracted by the compiler (the kernels fuse explicitly, as the host does).
float_model=(-ftz=false -prec-div=true -prec-sqrt=true -fmad=false)
common=(-std=c++17 -I"$source_dir" "${float_model[@]}" -Werror all-warnings
        -Xcompiler -Wall,-Wextra)
status=0
for arch in 80 90; do
  target=(-gencode "arch=compute_$arch,code=sm_$arch")
  echo "== sm_$arch: float32, float16, bfloat16 (no spill allowed)"
  if ! "$nvcc" "${common[@]}" "${target[@]}" -c -Xptxas -v,-warn-spills,-warn-lmem-usage \
      "$work/float_kernels.cu" -o "$work/float_$arch.o" 2>"$work/float_$arch.log"; then
    status=1
  fi
  report "$work/float_$arch.log"
  echo "== sm_$arch: float64 (tests only; spills reported, allowed)"
  if ! "$nvcc" "${common[@]}" "${target[@]}" -c -Xptxas -v \
      "$work/double_kernels.cu" -o "$work/double_$arch.o" 2>"$work/double_$arch.log"; then
    status=1
  fi
  report "$work/double_$arch.log"
  for group in float double; do
    "$nvcc" "${common[@]}" "${target[@]}" -ptx "$work/${group}_kernels.cu" \
      -o "$work/${group}_$arch.ptx" || status=1
  done
done

echo "== PTX: no flush-to-zero, no approximate division or square root"
if grep -nE '\.ftz|\.approx|div\.full' "$work"/*.ptx; then
  echo "check_cuda: the kernels above would not round as the host emulation does" >&2
  status=1
fi

echo "== PTX: no kernel loads a buffer it writes through ld.global.nc"
"$python" "$root/.ci/ptx_coherence.py" "$work"/*.ptx || status=1
"$nvcc" -gencode arch=compute_90,code=sm_90 -ptx "$root/.ci/coherence_canary.cu" \
  -o "$work/canary.ptx" || status=1
if "$python" "$root/.ci/ptx_coherence.py" "$work/canary.ptx" >/dev/null; then
  echo "check_cuda: the coherence check missed .ci/coherence_canary.cu: it is not live" >&2
  status=1
else
  echo "  (and it flags .ci/coherence_canary.cu, which does)"
fi

echo "== PTX: merge<float> stages its tokens with asynchronous copies"
# A load and the store that waits for it kept one load in flight per thread, which left
# the merge latency-bound on an H200 (kStagedAsIs in device_helpers.cuh); the float32 merge
# must keep its cp.async staging.
for arch in 80 90; do
  copies=$(awk '/\.entry _ZN9tokenpool5mergeIfE/ {inside = 1} inside && /cp\.async\.ca\.shared\.global/ {n++}
                inside && /^}/ {inside = 0} END {print n + 0}' "$work/float_$arch.ptx")
  if [ "$copies" -eq 0 ]; then
    echo "check_cuda: merge<float> (sm_$arch) has no cp.async: its staging waits on each load" >&2
    status=1
  else
    echo "  sm_$arch: $copies cp.async in merge<float>"
  fi
done

echo "== host build (g++ -std=c++20, as tests/test_cuda_kernel.py compiles it)"
if command -v "$cxx" >/dev/null; then
  "$cxx" -std=c++20 -ffp-contract=off -fsyntax-only -Wall -Wextra -Werror -pthread \
    "$source_dir/host_build.cpp" || status=1
else
  echo "check_cuda: $cxx not found, host build not checked" >&2
  status=1
fi

if [ "$status" -ne 0 ]; then
  echo "check_cuda: FAILED (errors above)" >&2
else
  echo "check_cuda: every instantiation compiles for sm_80 and sm_90; no spill in float32;" \
    "IEEE arithmetic without flush-to-zero; no non-coherent load of a written buffer;" \
    "the float32 merge stages asynchronously"
fi
exit "$status"
