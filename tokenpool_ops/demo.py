"""Token Pooling on a real photo: ``python -m tokenpool_ops.demo [--k K] [--backend torch]``.

The project's main job on its embedded default until a DeiT trainer exists. It builds the
tokens a DeiT patch embedding would see, pools them with every method of :func:`pool` and
prints, per method, the reconstruction error (Eq. 9), the weighted error (Eq. 13), the
clustering iterations and the best wall time of ``--repeat`` calls.

Pipeline (no downloads: the photo ships with scikit-learn):

1. ``sklearn.datasets.load_sample_image("china.jpg")``, resized so the short side is 256
   and centre-cropped to 224x224 (DeiT's evaluation transform), with pillow.
2. Cut into 16x16 patches: N = 196 tokens of 16*16*3 = 768 raw RGB values in [0, 1],
   flattened channel-first as a ``Conv2d`` patch embedding would read them, then
   standardised per feature over the tokens.
3. ``--dim`` (default 768) keeps these pixel features as they are, so the clusters and the
   ``--save`` picture are about the pixels themselves. Any other value multiplies by a fixed
   seeded Gaussian matrix (768 x dim, variance 1/768) to mimic a DeiT width without learned
   weights, e.g. ``--dim 384`` for DeiT-S.
4. Significance scores (Eq. 5) from one single-head self-attention with no learned weights,
   ``A = softmax(X X^T / sqrt(M))``, via ``significance_scores(A[None])``.

The same image is stacked ``--batch`` times to show batching; errors are per image, averaged
over the batch. Only the ``pool`` call is timed. ``--save PATH`` writes a PNG: the photo on
the left, and on the right each patch recoloured by the mean colour of its wkmedoids cluster.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._measures import reconstruction_error, significance_scores
from ._pool import Method, PoolResult, pool

METHODS: tuple[Method, ...] = (
    "kmeans", "kmedoids", "wkmeans", "wkmedoids", "topk", "random", "importance")
IMAGE_NAME = "china.jpg"
IMAGE_SIZE = 224
RESIZE_TO = 256
PATCH = 16
GRID = IMAGE_SIZE // PATCH
PICTURE_METHOD: Method = "wkmedoids"
INSTALL_HINT = 'the demo needs scikit-learn and pillow: pip install "tokenpool-ops[demo]"'


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    method: str
    error: float
    weighted_error: float
    n_iter: int
    ms: float


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; checks that the chosen backend is installed."""
    parser = argparse.ArgumentParser(prog="python -m tokenpool_ops.demo",
                                     description="Token Pooling on a real 224x224 photo.")
    parser.add_argument("--k", type=_positive, default=GRID * GRID // 2,
                        help="tokens to keep (default: %(default)s, half of them)")
    parser.add_argument("--batch", type=_positive, default=1,
                        help="pool the same image this many times at once (default: 1)")
    parser.add_argument("--backend", choices=("numpy", "torch"), default="numpy",
                        help="array library the tokens live in (default: numpy)")
    parser.add_argument("--repeat", type=_positive, default=5,
                        help="timed calls per method; the best is reported (default: 5)")
    parser.add_argument("--dim", type=_positive, default=PATCH * PATCH * 3,
                        help="token width; not 768 = seeded random projection (default: 768)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the projection and of the random methods (default: 0)")
    parser.add_argument("--save", metavar="PATH", default=None,
                        help="write a PNG of the wkmedoids clusters to PATH")
    args = parser.parse_args(argv)
    if args.backend == "torch" and importlib.util.find_spec("torch") is None:
        parser.error('--backend torch needs PyTorch: pip install "tokenpool-ops[torch]"')
    return args


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def load_photo() -> np.ndarray:
    """The sample photo as a (224, 224, 3) uint8 array: short side to 256, centre crop."""
    try:
        from PIL import Image
        from sklearn.datasets import load_sample_image
    except ImportError as exc:
        raise ModuleNotFoundError(f"{INSTALL_HINT} ({exc})") from exc
    image = Image.fromarray(load_sample_image(IMAGE_NAME))
    scale = RESIZE_TO / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)),
                         Image.Resampling.BICUBIC)
    left, top = (image.width - IMAGE_SIZE) // 2, (image.height - IMAGE_SIZE) // 2
    return np.asarray(image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE)))


def patchify(photo: np.ndarray) -> np.ndarray:
    """(224, 224, 3) uint8 to (196, 768) values in [0, 1], each patch flattened as (C, P, P)."""
    pixels = photo.astype(np.float64) / 255.0
    patches = pixels.reshape(GRID, PATCH, GRID, PATCH, 3).transpose(0, 2, 4, 1, 3)
    return patches.reshape(GRID * GRID, 3 * PATCH * PATCH)


def make_tokens(patches: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Standardise each feature over the tokens; project to ``dim`` if it is not 768."""
    std = patches.std(axis=0)
    tokens = (patches - patches.mean(axis=0)) / np.where(std > 0, std, 1.0)
    if dim != tokens.shape[1]:
        rng = np.random.default_rng(seed)
        tokens = tokens @ rng.normal(scale=tokens.shape[1] ** -0.5, size=(tokens.shape[1], dim))
    return tokens.astype(np.float32)


def attention_scores(tokens: np.ndarray) -> np.ndarray:
    """Eq. 5 scores of the weight-free single-head attention softmax(X X^T / sqrt(M))."""
    x = tokens.astype(np.float64)
    logits = x @ x.T / np.sqrt(x.shape[1])
    attn = np.exp(logits - logits.max(axis=1, keepdims=True))
    attn /= attn.sum(axis=1, keepdims=True)
    return significance_scores(attn[None]).astype(np.float32)


def to_backend(array: np.ndarray, backend: str, batch: int) -> Any:
    """Stack ``batch`` copies and move them into the chosen array library."""
    stacked = np.repeat(array[None], batch, axis=0)
    if backend == "torch":
        import torch

        return torch.from_numpy(stacked)
    return stacked


def run_method(x: Any, scores: Any, k: int, method: Method, repeat: int,
               seed: int) -> tuple[Row, PoolResult]:
    """Pool ``repeat`` times; the table row (best time) and the last result."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = pool(x, k, method, scores=scores, seed=seed, return_info=True)
        best = min(best, time.perf_counter() - start)
    error = float(reconstruction_error(x, result.tokens).mean())
    weighted = float(reconstruction_error(x, result.tokens, weights=scores).mean())
    return Row(method, error, weighted, result.n_iter, best * 1e3), result


#: The error each method's search minimises; the baselines minimise none.
MINIMISES = {"kmeans": "Eq. 9", "kmedoids": "Eq. 9", "wkmeans": "Eq. 13",
             "wkmedoids": "Eq. 13", "topk": "(none)", "random": "(none)",
             "importance": "(none)"}

TABLE_LEGEND = """\
Reconstruction errors of the pooled tokens, lower is better:
  Eq. 9  = sum over the N tokens of the squared distance to the nearest pooled token;
  Eq. 13 = the same, each token weighted by its significance score (Eq. 5).
'minimises' is the error a method's clustering searches to minimise; topk, random and
importance keep input tokens without a search (the paper's baselines)."""


def format_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table, under a legend that says what they measure."""
    header = (f"{'method':<10} {'minimises':>9} {'Eq.9 error':>11} {'Eq.13 error':>12} "
              f"{'iters':>5} {'ms':>8}")
    lines = [TABLE_LEGEND, "", header]
    lines += [f"{r.method:<10} {MINIMISES[r.method]:>9} {r.error:>11.2f} "
              f"{r.weighted_error:>12.2f} {r.n_iter:>5d} {r.ms:>8.2f}" for r in rows]
    return "\n".join(lines)


def cluster_picture(photo: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """The photo beside a copy whose patches wear the mean colour of their cluster."""
    labels = np.asarray(assignment).reshape(-1)
    patches = photo.astype(np.float64).reshape(GRID, PATCH, GRID, PATCH, 3)
    patch_means = patches.mean(axis=(1, 3)).reshape(-1, 3)  # (196, 3), equal pixel counts
    colours = np.zeros((labels.max() + 1, 3))
    np.add.at(colours, labels, patch_means)
    colours /= np.maximum(np.bincount(labels, minlength=len(colours)), 1)[:, None]
    recoloured = np.repeat(np.repeat(colours[labels].reshape(GRID, GRID, 3), PATCH, 0), PATCH, 1)
    gap = np.full((IMAGE_SIZE, 4, 3), 255.0)
    return np.concatenate([photo, gap, recoloured], axis=1).round().astype(np.uint8)


def save_picture(path: str, photo: np.ndarray, result: PoolResult) -> None:
    """Write :func:`cluster_picture` of the first problem of ``result`` as a PNG."""
    from PIL import Image

    assignment = np.asarray(result.assignment.cpu() if hasattr(result.assignment, "cpu")
                            else result.assignment)
    Image.fromarray(cluster_picture(photo, assignment[0])).save(path, format="PNG")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns 0 (1 when the demo's optional dependencies are missing)."""
    args = parse_args(argv)
    try:
        photo = load_photo()
    except ModuleNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    tokens = make_tokens(patchify(photo), args.dim, args.seed)
    x = to_backend(tokens, args.backend, args.batch)
    scores = to_backend(attention_scores(tokens), args.backend, args.batch)
    print(f"image {IMAGE_NAME} {IMAGE_SIZE}x{IMAGE_SIZE}, {PATCH}x{PATCH} patches: "
          f"N={tokens.shape[0]} M={tokens.shape[1]} k={args.k} batch={args.batch} "
          f"backend={args.backend} (errors per image, best of {args.repeat})")
    rows, results = [], {}
    for method in METHODS:
        row, results[method] = run_method(x, scores, args.k, method, args.repeat, args.seed)
        rows.append(row)
    print(format_table(rows))
    if args.save is not None:
        save_picture(args.save, photo, results[PICTURE_METHOD])
        print(f"saved {PICTURE_METHOD} clusters to {args.save}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
