"""The Numba threading layer that backends._numba selects, and its respect for a user's own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("numba", reason="Numba is not installed: its threading layer is moot")

_REPORT = ("import tokenpool_ops.backends._numba, numba, sys; "
           "sys.stdout.write(numba.config.THREADING_LAYER)")


def _layer_chosen(**env: str) -> str:
    """numba.config.THREADING_LAYER after importing tokenpool_ops.backends._numba in a fresh
    process."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY",
                          "OMP_WAIT_POLICY")}
    done = subprocess.run([sys.executable, "-c", _REPORT], env={**clean, **env},
                          capture_output=True, text=True, check=True, timeout=300)
    return done.stdout


def test_workqueue_by_default() -> None:
    assert _layer_chosen() == "workqueue"


@pytest.mark.parametrize("env", [{"NUMBA_THREADING_LAYER": "omp"},
                                 {"NUMBA_THREADING_LAYER_PRIORITY": "omp tbb workqueue"},
                                 {"OMP_WAIT_POLICY": "passive"}])
def test_user_choice_kept(env: dict[str, str]) -> None:
    assert _layer_chosen(**env) == env.get("NUMBA_THREADING_LAYER", "default")


def test_concurrent_launches_from_threads() -> None:
    """workqueue aborts the process when launches from several threads meet; the kernels
    launch under a lock (this aborted about one run in two without it)."""
    torch = pytest.importorskip("torch", reason="the parallel kernels serve PyTorch")
    del torch
    script = (
        "import threading, torch, tokenpool_ops\n"
        "x = torch.randn(8, 50, 16)\n"
        "want = tokenpool_ops.pool(x, 10, 'kmedoids')\n"
        "bad = []\n"
        "def run():\n"
        "    for _ in range(20):\n"
        "        if not torch.equal(tokenpool_ops.pool(x, 10, 'kmedoids'), want):\n"
        "            bad.append(1)\n"
        "threads = [threading.Thread(target=run) for _ in range(4)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print('bad', len(bad))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "bad 0"


@pytest.mark.parametrize("method", ["kmedoids", "wkmedoids", "kmeans", "wkmeans"])
def test_one_problem_serial_equals_its_share_of_a_parallel_batch(method: str) -> None:
    """One problem runs the serial kernels (no pool to wake); in a batch the same problem
    runs on the parallel ones: the same result, bit for bit."""
    torch = pytest.importorskip("torch", reason="the parallel kernels serve PyTorch")
    import numpy as np

    import tokenpool_ops

    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.normal(size=(3, 60, 8)).astype(np.float32))
    scores = torch.from_numpy(rng.random((3, 60)).astype(np.float32))
    batch = tokenpool_ops.pool(x, 17, method, scores=scores, return_info=True)
    for p in range(3):
        alone = tokenpool_ops.pool(x[p:p + 1], 17, method, scores=scores[p:p + 1],
                                   return_info=True)
        for field in ("tokens", "assignment", "sizes", "objective"):
            assert torch.equal(getattr(alone, field)[0], getattr(batch, field)[p]), field
