"""Time tokenpool_ops.pool next to peer clustering packages and a ToMe-style merge.

Everything runs in one process, on the same seeded float32 inputs (B, N, M), on the CPU,
with ``--threads`` threads (default 2) for NumPy/BLAS, PyTorch, scikit-learn and faiss.
Each option is timed as the best of ``--repeat`` runs after one warm-up run, and divided by
the time of one batched Gram matrix ``x @ x^T`` (PyTorch), the floor for K-Medoids.

Peers that are not installed are listed as skipped. Per-image peers (kmedoids, scikit-learn,
faiss, fast-pytorch-kmeans, kmeans-pytorch) loop over the B images in Python.

Same initialisation: the unweighted methods of tokenpool_ops and every peer that takes
initial centres start from the same evenly spaced tokens ``(arange(k) * N) // k``; the
w-methods start from their default, the k highest scores.

Also prints the peak extra memory of ``pool(x, k, "wkmedoids", scores=s)``: NumPy measured
with tracemalloc (NumPy reports its buffers to it; the per-problem scratch arrays inside the
Numba kernels, O(N + largest cluster^2) elements each, are not reported), PyTorch CPU as the
peak-RSS increase of a fresh subprocess (which sees everything), both relative to the B*N*N
float32 distance matrices.

Run: ``python benchmarks/compare_peers.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass
class Row:
    name: str
    backend: str
    batched: bool
    note: str = ""
    ms: float | None = None
    skipped: str = ""
    extra: dict = field(default_factory=dict)


def best_ms(call: Callable[[], object], repeat: int) -> float:
    call()  # warm-up: allocations, thread pools, lazy imports
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


# ---------------------------------------------------------------------------------------------
# Baselines written here


def tome_merge(x, r: int, sizes=None):
    """ToMe-style bipartite soft matching: merge the r most similar (A -> B) edges.

    Tokens alternate into sets A (even positions) and B (odd positions). Each token of A
    points at its most cosine-similar token of B; the r A-tokens with the most similar
    partners are merged into them by a size-weighted average, the other A-tokens are kept.
    Returns (tokens (B, N - r, M), sizes (B, N - r)). r is capped at |A|.
    """
    import torch

    batch, n, m = x.shape
    if sizes is None:
        sizes = x.new_ones(batch, n)
    a, b = x[:, ::2], x[:, 1::2]
    size_a, size_b = sizes[:, ::2], sizes[:, 1::2]
    r = min(r, a.shape[1])
    a_unit = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b_unit = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    similarity = a_unit @ b_unit.mT  # (B, |A|, |B|)
    best, partner = similarity.max(dim=-1)  # each A token's most similar B token
    order = best.argsort(dim=-1, descending=True)
    merged, kept = order[:, :r], order[:, r:]
    dest = partner.gather(1, merged)  # (B, r)

    weighted_b = b * size_b[..., None]
    src = (a * size_a[..., None]).gather(1, merged[..., None].expand(-1, -1, m))
    weighted_b = weighted_b.scatter_add(1, dest[..., None].expand(-1, -1, m), src)
    new_size_b = size_b.scatter_add(1, dest, size_a.gather(1, merged))
    new_b = weighted_b / new_size_b[..., None]

    kept_a = a.gather(1, kept[..., None].expand(-1, -1, m))
    kept_size = size_a.gather(1, kept)
    return torch.cat([kept_a, new_b], dim=1), torch.cat([kept_size, new_size_b], dim=1)


def sq_distances(x):
    """Per-image squared Euclidean distance matrix (N, N), float32, zero diagonal."""
    import numpy as np

    sq = np.einsum("nm,nm->n", x, x)
    d = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.maximum(d, 0.0, out=d)
    np.fill_diagonal(d, 0.0)
    return d


# ---------------------------------------------------------------------------------------------
# Memory


def numpy_peak_extra(x, scores, k: int) -> int:
    import tokenpool_ops

    tokenpool_ops.pool(x, k, "wkmedoids", scores=scores)  # warm-up outside tracing
    tracemalloc.start()
    tracemalloc.reset_peak()
    tokenpool_ops.pool(x, k, "wkmedoids", scores=scores)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def _vm_hwm() -> int:
    """Peak RSS (VmHWM) of this process in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def rss_probe(b: int, n: int, m: int, k: int, threads: int) -> dict:
    """Run in a fresh process: peak-RSS increase of one torch-cpu wkmedoids call.

    Linux only: writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM) to the current
    RSS, so the peak after the call minus the RSS before it is what the call added (pages the
    allocator touched, an upper bound on live bytes up to allocator slack).
    """
    import psutil
    import torch

    import tokenpool_ops

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    # Warm-up on a small problem: loads code pages and thread pools, not big buffers.
    small = torch.randn(2, n, m, generator=g)
    tokenpool_ops.pool(small, k, "wkmedoids", scores=torch.rand(2, n, generator=g))
    x = torch.randn(b, n, m, generator=g)
    s = torch.rand(b, n, generator=g)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    rss_before = psutil.Process().memory_info().rss
    hwm_before = _vm_hwm()
    tokenpool_ops.pool(x, k, "wkmedoids", scores=s)
    hwm_after = _vm_hwm()
    return {"extra": hwm_after - max(rss_before, hwm_before),
            "hwm_before_above_rss": max(0, hwm_before - rss_before)}


def torch_peak_extra(b: int, n: int, m: int, k: int, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--_rss-probe", str(b), str(n), str(m), str(k),
         "--threads", str(threads)],
        capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# The comparison


def build_rows(args, x, scores, init):
    import numpy as np
    import torch

    import tokenpool_ops

    b, n, m = x.shape
    k, iters = args.k, args.max_iter
    xt, st, init_t = torch.from_numpy(x), torch.from_numpy(scores), torch.from_numpy(init)
    rows: list[tuple[Row, Callable[[], object] | str]] = []

    def add(row: Row, call: Callable[[], object] | str) -> None:
        rows.append((row, call))

    add(Row("Gram x @ x^T (floor)", "torch", True), lambda: xt @ xt.mT)
    add(Row("Gram x @ x^T (floor)", "numpy", True), lambda: x @ np.swapaxes(x, 1, 2))

    for backend, xa, sa, ia in (("torch", xt, st, init_t), ("numpy", x, scores, init)):
        for method in ("wkmedoids", "kmedoids", "wkmeans", "kmeans"):
            weighted = method.startswith("w")
            note = f"max_iter={iters}, init=" + ("topk (default)" if weighted else "spread")
            kw = {} if weighted else {"init": ia}
            add(Row(f"tokenpool_ops {method}", backend, True, note),
                lambda xa=xa, sa=sa, method=method, kw=kw: tokenpool_ops.pool(
                    xa, k, method, scores=sa, max_iter=iters, **kw))

        # Random tokens converge in one or two iterations; this row always runs all of them.
        add(Row("tokenpool_ops kmeans, every iteration", backend, True,
                f"max_iter={iters}, stop_early=False, init=spread"),
            lambda xa=xa, ia=ia: tokenpool_ops.pool(xa, k, "kmeans", init=ia, max_iter=iters,
                                                    stop_early=False))

    add(Row("ToMe bipartite merge (here)", "torch", True, f"r = N - k = {n - k}"),
        lambda: tome_merge(xt, n - k))

    try:
        import kmedoids

        dists = [sq_distances(x[i]) for i in range(b)]
        add(Row("kmedoids pkg alternating, incl. distances", "numpy+rust", False,
                "per image: numpy sq. distances + kmedoids.alternating"),
            lambda: [kmedoids.alternating(sq_distances(x[i]), init[i].copy(), max_iter=iters)
                     for i in range(b)])
        add(Row("kmedoids pkg alternating, excl. distances", "rust", False,
                "per image, distance matrices precomputed: its iterations alone, not a "
                "complete option"),
            lambda: [kmedoids.alternating(dists[i], init[i].copy(), max_iter=iters)
                     for i in range(b)])
    except ImportError as err:
        add(Row("kmedoids pkg alternating", "rust", False), f"not installed ({err.name})")

    try:
        from sklearn.cluster import KMeans

        add(Row("scikit-learn KMeans", "numpy/cython", False,
                f"per image, n_init=1, max_iter={iters}, lloyd, init=spread"),
            lambda: [KMeans(k, init=x[i, init[i]], n_init=1, max_iter=iters,
                            algorithm="lloyd").fit(x[i]) for i in range(b)])
    except ImportError as err:
        add(Row("scikit-learn KMeans", "numpy/cython", False), f"not installed ({err.name})")

    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)

        def run_faiss():
            for i in range(b):
                km = faiss.Kmeans(m, k, niter=iters, seed=0, min_points_per_centroid=1,
                                  max_points_per_centroid=n, verbose=False)
                km.train(x[i], init_centroids=np.ascontiguousarray(x[i, init[i]]))

        add(Row("faiss Kmeans", "faiss", False, f"per image, niter={iters}, init=spread"),
            run_faiss)
    except ImportError as err:
        add(Row("faiss Kmeans", "faiss", False), f"not installed ({err.name})")

    try:
        from fast_pytorch_kmeans import KMeans as FastKMeans

        def run_fast():
            for i in range(b):
                FastKMeans(k, max_iter=iters, tol=-1.0, verbose=0).fit_predict(
                    xt[i], centroids=xt[i, init_t[i]].clone())

        add(Row("fast-pytorch-kmeans", "torch", False,
                f"per image (2-D API), max_iter={iters}, init=spread"), run_fast)
    except ImportError as err:
        add(Row("fast-pytorch-kmeans", "torch", False), f"not installed ({err.name})")

    try:
        import torch_kmeans

        tkm = torch_kmeans.KMeans(n_clusters=k, num_init=1, max_iter=iters, tol=0.0,
                                  verbose=False, seed=0)
        centres = xt.gather(1, init_t[..., None].expand(-1, -1, m))
        add(Row("torch-kmeans", "torch", True,
                f"batched, num_init=1, max_iter={iters}, init=spread"),
            lambda: tkm(xt, centers=centres.clone()))
    except ImportError as err:
        add(Row("torch-kmeans", "torch", True), f"not installed ({err.name})")

    if args.unbounded_peers:
        try:
            from kmeans_pytorch import kmeans as kmeans_pt

            def run_kmeans_pt():
                with contextlib.redirect_stdout(io.StringIO()), \
                        contextlib.redirect_stderr(io.StringIO()):
                    for i in range(b):
                        kmeans_pt(xt[i], k, distance="euclidean")

            add(Row("kmeans-pytorch", "torch", False,
                    "per image, runs to convergence (no max_iter), own random init"),
                run_kmeans_pt)
        except ImportError as err:
            add(Row("kmeans-pytorch", "torch", False), f"not installed ({err.name})")
    return rows


def render(rows: list[Row], gram: dict[str, float], header: str) -> str:
    lines = [header, "",
             "| option | backend | batched | ms (best) | x torch Gram | x same-backend Gram "
             "| notes |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        if r.ms is None:
            lines.append(f"| {r.name} | {r.backend} | {'yes' if r.batched else 'no'} | "
                         f"- | - | - | skipped: {r.skipped} |")
            continue
        own = gram.get(r.backend)
        own_ratio = f"{r.ms / own:.2f}" if own else "-"
        lines.append(f"| {r.name} | {r.backend} | {'yes' if r.batched else 'no'} | "
                     f"{r.ms:.2f} | {r.ms / gram['torch']:.2f} | {own_ratio} | {r.note} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], gram_ms: float, path: Path, title: str) -> str:
    done = [r for r in rows if r.ms is not None]
    labels = [f"{r.name} [{r.backend}]" for r in done]
    values = [r.ms for r in done]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 0.38 * len(done) + 1.5))
        colours = ["tab:grey" if r.name.startswith("Gram") else
                   "tab:blue" if r.name.startswith("tokenpool") else "tab:orange"
                   for r in done]
        ax.barh(range(len(done)), values, color=colours)
        ax.set_yticks(range(len(done)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(gram_ms, color="k", lw=0.8, ls="--")
        ax.set_xlabel("ms, best of runs (log scale); dashed: torch Gram")
        ax.set_title(title.replace("; ", "\n", 1), fontsize=9)  # two lines: it fits the width
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return "matplotlib"
    except ImportError:
        import math

        from PIL import Image, ImageDraw

        width, bar_h, left = 900, 18, 380
        img = Image.new("RGB", (width, bar_h * len(done) + 40), "white")
        draw = ImageDraw.Draw(img)
        draw.text((5, 5), title + " (log ms)", fill="black")
        lo, hi = math.log10(min(values)) - 0.1, math.log10(max(values)) + 0.1
        for i, (label, v) in enumerate(zip(labels, values, strict=True)):
            y = 30 + i * bar_h
            w = int((math.log10(v) - lo) / (hi - lo) * (width - left - 80))
            draw.text((5, y), label[:60], fill="black")
            draw.rectangle([left, y + 2, left + max(w, 1), y + bar_h - 4], fill="steelblue")
            draw.text((left + w + 4, y), f"{v:.1f}", fill="black")
        img.save(path)
        return "pillow"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=64)
    parser.add_argument("--N", type=int, default=196)
    parser.add_argument("--M", type=int, default=384)
    parser.add_argument("--k", type=int, default=98)
    parser.add_argument("--max-iter", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=7, help="runs after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="regex: time only matching options")
    parser.add_argument("--unbounded-peers", action=argparse.BooleanOptionalAction,
                        default=True, help="include kmeans-pytorch (runs to convergence)")
    parser.add_argument("--out-md", type=Path, default=HERE / "results" / "compare_peers.md")
    parser.add_argument("--out-png", type=Path, default=HERE / "results" / "compare_peers.png")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--tokens", choices=("gaussian", "plane"), default="gaussian",
                        help="gaussian: K-Means converges in one or two iterations; plane: "
                             "points on a random plane (1%% noise), several iterations")
    parser.add_argument("--_rss-probe", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    if args._rss_probe:
        print(json.dumps(rss_probe(*args._rss_probe, threads=args.threads)))
        return

    import re

    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)

    b, n, m, k = args.B, args.N, args.M, args.k
    rng = np.random.default_rng(0)
    if args.tokens == "gaussian":
        x = rng.standard_normal((b, n, m), dtype=np.float32)
    else:
        plane = rng.random((b, n, 2)) @ rng.standard_normal((2, m))
        x = (plane + 0.01 * rng.standard_normal((b, n, m))).astype(np.float32)
    scores = rng.random((b, n), dtype=np.float32)
    init = np.broadcast_to((np.arange(k) * n) // k, (b, k)).astype(np.int64)

    pattern = re.compile(args.only) if args.only else None
    results: list[Row] = []
    for row, call in build_rows(args, x, scores, init):
        if isinstance(call, str):
            row.skipped = call
        elif pattern is None or pattern.search(row.name) or row.name.startswith("Gram"):
            try:
                # The unbounded peer runs to convergence: a single timed run is enough.
                repeat = 1 if row.name == "kmeans-pytorch" else args.repeat
                row.ms = best_ms(call, repeat)
            except Exception as err:  # a peer that fails on this input is reported, not fatal
                row.skipped = f"failed: {type(err).__name__}: {err}"[:160]
        else:
            continue
        results.append(row)
        shown = f"{row.ms:10.2f} ms" if row.ms is not None else f"skipped: {row.skipped}"
        print(f"{row.name:<45}{row.backend:<14}{shown}", flush=True)

    gram = {r.backend: r.ms for r in results if r.name.startswith("Gram") and r.ms}
    header = (f"B={b}, N={n}, M={m}, k={k}, {args.tokens} tokens, float32, CPU, "
              f"{args.threads} threads, "
              f"best of {args.repeat} after 1 warm-up; torch {torch.__version__}, "
              f"numpy {np.__version__}")
    table = render(results, gram, header)

    memory = ""
    if not args.no_memory:
        dist_bytes = 4 * b * n * n
        np_peak = numpy_peak_extra(x, scores, k)
        probe = torch_peak_extra(b, n, m, k, args.threads)
        memory = (
            f"\nPeak extra memory of pool(x, {k}, 'wkmedoids', scores=s); B*N*N float32 "
            f"distance matrices = {dist_bytes / 2**20:.1f} MiB\n\n"
            f"| backend | how | peak extra MiB | x distance matrices |\n|---|---|---:|---:|\n"
            f"| numpy | tracemalloc peak | {np_peak / 2**20:.1f} | "
            f"{np_peak / dist_bytes:.2f} |\n"
            f"| torch-cpu | peak-RSS increase, fresh process | {probe['extra'] / 2**20:.1f} | "
            f"{probe['extra'] / dist_bytes:.2f} |\n")
        if probe["hwm_before_above_rss"] > 0:
            above = probe["hwm_before_above_rss"] / 2**20
            memory += (f"\n(torch probe: high-water mark was {above:.1f} MiB above RSS before "
                       "the call; the RSS figure may be an underestimate)\n")

    print()
    print(table + memory)
    args.out_md.parent.mkdir(parents=True, exist_ok=True)
    args.out_md.write_text("# tokenpool_ops vs peers\n\n" + table + memory)
    how = plot(results, gram["torch"], args.out_png, header)
    print(f"wrote {args.out_md} and {args.out_png} ({how})")


if __name__ == "__main__":
    main()
