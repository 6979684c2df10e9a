#!/bin/bash
# GPU run 5: the glue's views, ToMe's one-launch merge, the flash scores; measured and tested.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENPOOL_OPS_REQUIRE_CUDA=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/array_api*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
start=$SECONDS
echo "== tests"
timeout 50 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_flash_scores.py tests/test_cuda_kernel.py tests/test_nn_timm.py tests/test_tome.py -k "gpu or torch-cuda or cupy" 2>&1 | tail -4
echo "== $((SECONDS - start)) s: bf16 eager and replayed"
timeout 50 python3 benchmarks/timm_speedup.py --device cuda --dtype bf16 --batch 256 --schedule level4 \
  --methods wkmedoids,topk,tome --no-sync --slice --cuda-graphs 2>&1 | grep -v Warn
echo "== $((SECONDS - start)) s: scores, bf16"
timeout 25 python3 benchmarks/score_pass.py --device cuda --dtype bfloat16 --batch 256 --repeats 20 2>&1 | grep -v "Warn\|seconds = \|^  *q, k, v"
echo "== $((SECONDS - start)) s: bf16 compiled, reduce-overhead"
timeout 75 python3 benchmarks/timm_speedup.py --device cuda --dtype bf16 --batch 256 \
  --schedule level4 --methods wkmedoids --no-sync --compile --compile-mode reduce-overhead 2>&1 | grep -v "Warn\|warn_once"
echo "== $((SECONDS - start)) s: fp32 eager"
timeout 25 python3 benchmarks/timm_speedup.py --device cuda --dtype fp32 --batch 256 --schedule level4 \
  --methods wkmedoids,topk,tome --no-sync --slice 2>&1 | grep -v Warn
echo "== $((SECONDS - start)) s: done"
