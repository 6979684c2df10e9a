#!/usr/bin/env bash
# The prepared GPU check of issue #10, for a machine with a CUDA GPU (and no network):
#   1. the CuPy and torch-cuda tests of the suite, and the GPU tests of the CUDA kernel;
#   2. the kernel benchmark (benchmarks/benchmarks/bench_cuda.py);
#   3. the whole-model benchmark (benchmarks/timm_speedup.py, issue #11): wkmedoids, topk and
#      ToMe's matching (tome, issue #20) in bf16, wkmedoids in fp32;
#   4. the Eq. 5 score pass and SDPA backends (benchmarks/score_pass.py); the tables come last.
# Installs nothing. Under 6 minutes: each step runs under `timeout` with its own limit
# (tests 170 s, benchmark 60 s, whole model 45 + 30 s, scores 30 s), capped by what is left
# of a 330 s budget counted from the start, and is killed 3 s after an ignored TERM. So the
# whole check ends within 330 + 5 x 3 = 345 s, whatever the start-up took.
#
# Usage: bash benchmarks/gpu_check.sh        (PYTHON may name the interpreter to use)
set -uo pipefail

cd "$(dirname "$0")/.."
# This checkout's tokenpool_ops, installed or not (the benchmarks run as scripts).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
budget=330
limit() {  # the step's own limit, or what is left of the budget (at least 1 s)
  local left=$((budget - SECONDS))
  if [ "$left" -lt 1 ]; then left=1; fi
  if [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi not available"
if ! "$python" - <<'EOF'
import importlib
import sys

for name in ("torch", "cupy", "numba", "timm", "jax"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as error:  # missing, or failing to load
        print(f"{name}: not available ({type(error).__name__})")

def gpu_count(library: str) -> int:
    try:
        module = importlib.import_module(library)
        if library == "torch":
            return module.cuda.device_count()
        return module.cuda.runtime.getDeviceCount()
    except Exception:  # the library is missing or sees no driver
        return 0


sys.exit(0 if gpu_count("torch") or gpu_count("cupy") else 1)
EOF
then
  echo "gpu_check: no CUDA GPU visible to torch or cupy: nothing to check here" >&2
  exit 2
fi

echo "== tests: CuPy and torch-cuda backends, GPU kernel tests, no host sync (limit 170 s)"
timeout -k 3 "$(limit 170)" "$python" -m pytest -q -ra -p no:cacheprovider tests \
  -k "cupy or torch-cuda or gpu"
tests_status=$?

echo "== benchmark (limit 60 s)"
table=$(timeout -k 3 "$(limit 60)" "$python" benchmarks/benchmarks/bench_cuda.py)
bench_status=$?

echo "== whole model: DeiT-S level 4, batch 256, bf16 then fp32 (limits 45 s and 30 s)"
model_table=$(timeout -k 3 "$(limit 45)" "$python" benchmarks/timm_speedup.py --device cuda \
  --dtype bf16 --batch 256 --schedule level4 --methods wkmedoids,topk,tome --no-sync 2>/dev/null \
  && timeout -k 3 "$(limit 30)" "$python" benchmarks/timm_speedup.py --device cuda \
  --dtype fp32 --batch 256 --schedule level4 --methods wkmedoids --no-sync 2>/dev/null)
model_status=$?

echo "== Eq. 5 scores: materialised vs SDPA + score pass, SDPA backends with the bias (limit 30 s)"
score_table=$(timeout -k 3 "$(limit 30)" "$python" benchmarks/score_pass.py --device cuda \
  --dtype bfloat16 --batch 256 --repeats 20 2>&1)
score_status=$?

echo
echo "== summary (exit 124: a step hit its time limit): tests exit ${tests_status}, benchmark exit ${bench_status}, whole model exit ${model_status}, scores exit ${score_status}"
echo "$table"
echo "$model_table"
echo "$score_table"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ] && [ "$model_status" -eq 0 ] \
  && [ "$score_status" -eq 0 ]
