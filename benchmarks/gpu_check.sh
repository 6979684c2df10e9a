#!/usr/bin/env bash
# The prepared GPU check (issues #10, #11 and #19), for a machine with a CUDA GPU and no
# network. Installs nothing. Prints, in this order:
#   1. the device and the libraries (benchmarks/gpu_kernels.py probe);
#   2. the correctness checks that only a GPU can run: compute-sanitizer's memcheck and
#      racecheck on one small launch of each kernel instantiation (gpu_kernels.py
#      launch-each; skipped, saying so, where the toolkit has no compute-sanitizer), then the
#      CuPy and torch-cuda tests of the suite and the GPU tests of the CUDA kernel;
#   3. the timings: pool at B=256, N=197, M=384, K=98, float32 (generic, CuPy kernel, torch
#      kernel: benchmarks/benchmarks/bench_cuda.py, which first prints the instantiation the
#      kernel runs, and so its fill's tile shape: 8 x 4 pairs on sm_90, 4 x 4 before), the
#      whole DeiT-S at batch 256, plain and its free-pooling slice against level-4
#      wkmedoids, topk and ToMe (tome), in bf16 (with each model's busiest kernels and its
#      kernel count: where the pooled models' time goes) then fp32 (timm_speedup.py --slice
#      --profile), the Eq. 5 score pass (benchmarks/score_pass.py),
#      the Hugging Face ViT (hf_speedup.py), the bf16 models captured once as CUDA graphs
#      and replayed (timm_speedup.py --cuda-graphs: the same kernels without the host's
#      launches), then plain against level-4 wkmedoids at batch 256 in bf16 under
#      torch.compile with CUDA graphs (mode reduce-overhead: timm_speedup.py --compile),
#      eager and compiled;
# and writes the same to benchmarks/results/gpu_check.md (or $GPU_CHECK_RESULTS), to be
# committed.
#
# Under 9 minutes, to fit one 10-minute call of a lent GPU machine: each step runs under
# `timeout` with its own limit (probe 20 s, memcheck 90 s: the kernels compile under it,
# racecheck 50 s, tests 210 s, pool 30 s, whole model 50 + 30 s, scores 30 s, Hugging Face
# model 30 s, replayed graphs 40 s, compiled model 150 s; run 4 took 60, 143 and 19 s of the
# 60, 150 and 20 s it had for memcheck, tests and scores, and the GPU tests have grown
# since), capped by what is left of a 480 s budget counted from
# the start ($GPU_CHECK_BUDGET sets another), and is killed 3 s after an ignored TERM: the
# whole check ends within 480 + 11 x 3 = 513 s, whatever the start-up took. The compiled
# model comes last: it gets what the others left of the budget. The first launch of each
# kernel compiles it (NVRTC) into the user cache (tokenpool_ops/cuda under $XDG_CACHE_HOME
# or ~/.cache, or $TOKENPOOL_OPS_CACHE_DIR); every later process reads it.
#
# Usage: bash benchmarks/gpu_check.sh        (PYTHON may name the interpreter to use,
#        GPU_CHECK_WORKERS the pytest-xdist workers of the tests;
#        tests/test_benchmark_scripts.py runs it with stand-ins for it and the sanitizer)
set -uo pipefail

cd "$(dirname "$0")/.."
# This checkout's tokenpool_ops, installed or not (the benchmarks run as scripts).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
budget=${GPU_CHECK_BUDGET:-480}
limit() {  # the step's own limit, or what is left of the budget (at least 1 s)
  local left=$((budget - SECONDS))
  if [ "$left" -lt 1 ]; then left=1; fi
  if [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}
results=${GPU_CHECK_RESULTS:-benchmarks/results/gpu_check.md}
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
step() {  # name, limit, command...: runs it under its limit; shows its output, keeps stdout
  local name=$1 seconds status start=$SECONDS
  seconds=$(limit "$2")
  shift 2
  timeout -k 3 "$seconds" "$@" | tee "$logs/$name"
  status=${PIPESTATUS[0]}
  # How long each step took, for the next run's limits.
  echo "$name: exit $status after $((SECONDS - start)) s (limit $seconds s)" >>"$logs/steps"
  return "$status"
}
passed() { [ "$1" = 0 ] || [ "$1" = skipped ]; }

echo "== device"
device=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  2>/dev/null || echo "nvidia-smi not available")
echo "$device"
if ! step probe 20 "$python" benchmarks/gpu_kernels.py probe; then
  echo "gpu_check: no CUDA GPU visible to torch or cupy: nothing to check here" >&2
  exit 2
fi

echo "== correctness 1/3: compute-sanitizer on one launch of each instantiation"
sanitizer=$(command -v compute-sanitizer \
  || ls "${CUDA_HOME:-${CUDA_PATH:-/usr/local/cuda}}/bin/compute-sanitizer" 2>/dev/null)
if [ -n "$sanitizer" ]; then
  step memcheck 90 "$sanitizer" --tool memcheck --error-exitcode 1 \
    "$python" benchmarks/gpu_kernels.py launch-each
  memcheck_status=$?
  echo "== correctness 2/3: racecheck"
  step racecheck 50 "$sanitizer" --tool racecheck --error-exitcode 1 \
    "$python" benchmarks/gpu_kernels.py launch-each
  racecheck_status=$?
else
  echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin): memcheck and racecheck not run" \
    | tee "$logs/memcheck" "$logs/racecheck"
  memcheck_status=skipped racecheck_status=skipped
fi

echo "== correctness 3/3: CuPy and torch-cuda tests, GPU kernel tests"
# Here a GPU was seen: a test skipped for want of CuPy or CUDA fails (tests/conftest.py), so
# a missing or broken CuPy fails the check instead of passing as skips.
export TOKENPOOL_OPS_REQUIRE_CUDA=1
# GPU_CHECK_WORKERS=N spreads the tests over N pytest-xdist workers (where it is installed).
step tests 210 "$python" -m pytest -q -ra -p no:cacheprovider \
  ${GPU_CHECK_WORKERS:+-n "$GPU_CHECK_WORKERS"} tests \
  -k "cupy or torch-cuda or gpu"
tests_status=$?

echo "== timing: pool at B=256, N=197, M=384, K=98, float32"
step pool 30 "$python" benchmarks/benchmarks/bench_cuda.py --cases 256x197/98
pool_status=$?

echo "== timing: whole DeiT-S, batch 256, plain vs level-4 wkmedoids, topk and tome, bf16 then fp32"
step model_bf16 50 "$python" benchmarks/timm_speedup.py --device cuda --dtype bf16 \
  --batch 256 --schedule level4 --methods wkmedoids,topk,tome --no-sync --slice --profile 15
bf16_status=$?
step model_fp32 30 "$python" benchmarks/timm_speedup.py --device cuda --dtype fp32 \
  --batch 256 --schedule level4 --methods wkmedoids,topk,tome --no-sync --slice
fp32_status=$?

echo "== timing: Eq. 5 scores, materialised vs SDPA + score pass, SDPA backends with the bias"
step scores 30 "$python" benchmarks/score_pass.py --device cuda --dtype bfloat16 --batch 256 \
  --repeats 20
score_status=$?
echo "== timing: Hugging Face ViT (DeiT-S), batch 256, plain vs level-4 wkmedoids, bf16"
step hf_model 30 "$python" benchmarks/hf_speedup.py --device cuda --dtype bf16 --batch 256 --no-sync

echo "== timing: DeiT-S captured as CUDA graphs and replayed (no compiler), bf16: the host's launches gone"
step model_graphs 40 "$python" benchmarks/timm_speedup.py --device cuda --dtype bf16 \
  --batch 256 --schedule level4 --methods wkmedoids,topk,tome --no-sync --slice --cuda-graphs
graphs_status=$?

echo "== timing: DeiT-S compiled with CUDA graphs (reduce-overhead), plain vs level-4 wkmedoids, bf16"
step model_compiled 150 "$python" benchmarks/timm_speedup.py --device cuda --dtype bf16 \
  --batch 256 --schedule level4 --methods wkmedoids --no-sync --compile \
  --compile-mode reduce-overhead
compiled_status=$?

summary="memcheck exit ${memcheck_status}, racecheck exit ${racecheck_status}, tests exit \
${tests_status}, pool exit ${pool_status}, whole model exit ${bf16_status} (bf16) and \
${fp32_status} (fp32), scores exit ${score_status}, replayed graphs exit ${graphs_status}, \
compiled model exit ${compiled_status} (124: a step hit its time limit)"
{
  echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null)"
  echo
  echo "Written by benchmarks/gpu_check.sh: $summary."
  echo
  echo '```'
  echo "$device"
  cat "$logs/probe"
  echo '```'
  echo
  echo "## step times"
  echo
  echo '```'
  cat "$logs/steps"
  echo '```'
  for name in memcheck racecheck tests pool model_bf16 model_fp32 scores hf_model model_graphs \
      model_compiled; do
    echo
    echo "## $name"
    echo
    echo '```'
    tail -n 150 "$logs/$name" 2>/dev/null  # the bf16 step's profiles included
    echo '```'
  done
} >"$results"
echo
echo "== summary: $summary; written to $results"
for status in "$memcheck_status" "$racecheck_status" "$tests_status" "$pool_status" \
    "$bf16_status" "$fp32_status" "$score_status" "$graphs_status" "$compiled_status"; do
  passed "$status" || exit 1
done
