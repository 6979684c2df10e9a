"""Draw the clusters of one block over the input image (the paper's Figure 1c).

``python -m tokenpool_ops.visualize`` pools the patch tokens of scikit-learn's "china.jpg"
with a randomly initialised DeiT-Ti (no weights are downloaded) and writes a PNG: left, the
photo with the borders between clusters; right, every cluster filled with its mean colour.
Random weights give clusters driven by the patch embedding, i.e. mostly by colour and
position; trained weights give the semantic clusters of the paper.
"""

from __future__ import annotations

import argparse
import colorsys
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from PIL import Image, ImageDraw

from ._pool import METHODS

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

    from .timm import TokenPoolState

__all__ = ["build_parser", "cluster_map", "draw_clusters", "main", "prepare_image",
           "render_clusters"]

#: DeiT-S sparsity level 1 (patch tokens left after each block), from PoWER-BERT's search.
DEFAULT_KEEP = [196, 195, 193, 188, 169, 140, 121, 110, 73, 38, 7, 0]
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def prepare_image(image: np.ndarray, size: int = 224) -> tuple[Image.Image, torch.Tensor]:
    """Centre-crop an (H, W, 3) uint8 image to a square, resize; return it and a (1, 3, size,
    size) ImageNet-normalised tensor."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(image[top:top + side, left:left + side]).convert("RGB")
    square = square.resize((size, size), Image.Resampling.BICUBIC)
    pixels = (np.asarray(square, dtype=np.float32) / 255.0 - MEAN) / STD
    return square, torch.from_numpy(pixels).permute(2, 0, 1)[None]


def cluster_map(model: torch.nn.Module, pixels: torch.Tensor, block: int) -> np.ndarray:
    """Cluster of every patch after ``block`` (0-based) of a model patched by ``patch_timm``.

    Runs the blocks up to ``block`` with ``trace_source`` on and returns an (rows, cols)
    integer grid of patch-token indices; -1 where no patch token is left.
    """
    vit = cast("VisionTransformer", model)
    state = cast("TokenPoolState", vit._tokenpool)
    tracing = state["trace_source"]
    state["trace_source"] = True
    try:
        with torch.no_grad():
            state.update({"sizes": None, "source": None})
            x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixels))))
            for blk in vit.blocks[:block + 1]:
                x = blk(x)
        n = vit.patch_embed.num_patches
        source = state["source"]
        labels = (np.arange(n)[None] if source is None else source.cpu().numpy())[0]
    finally:
        state["trace_source"] = tracing
    return labels.reshape(vit.patch_embed.grid_size)


#: Height in pixels of the caption strip under the picture.
CAPTION_HEIGHT = 18


#: Distinct colours for ``fill="palette"``, most distinct first (no grays: gray is NEUTRAL).
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (255, 225, 25), (70, 240, 240), (240, 50, 230),
                    (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0),
                    (0, 0, 128), (128, 128, 0), (250, 190, 212), (220, 190, 255),
                    (170, 255, 195), (255, 215, 180)], dtype=np.float64)
#: ``fill="palette"``: the colour of clusters of one patch, where nothing was merged.
NEUTRAL = np.array((205, 205, 205), dtype=np.float64)


def _distinct_colours(count: int) -> np.ndarray:
    """``count`` colours, all different: PALETTE's first, evenly spaced hues beyond it."""
    if count <= len(PALETTE):
        return PALETTE[:count]
    hues = [colorsys.hsv_to_rgb(i / count, 0.85, 0.9) for i in range(count)]
    return np.array(hues, dtype=np.float64) * 255.0


def render_clusters(image: Image.Image, labels: np.ndarray, fill: str = "mean",
                    border: str = "white") -> Image.Image:
    """The image with borders between clusters, next to the clusters filled in.

    ``labels`` is a (rows, cols) grid of cluster ids over the image's patches (-1: no token,
    drawn black). ``fill="mean"`` paints each cluster with its mean colour (the paper's
    Figure 1c) and outlines every cluster. ``fill="palette"`` shows the merges: each cluster
    of two or more patches gets its own colour (the largest first) and an outline, clusters
    of one patch are NEUTRAL and not outlined. ``border`` is the outline colour.
    """
    if fill not in ("mean", "palette"):
        raise ValueError(f"fill must be 'mean' or 'palette', got {fill!r}")
    rows, cols = labels.shape
    width, height = image.size
    cell_w, cell_h = width / cols, height / rows
    pixels = np.asarray(image, dtype=np.float64)
    # The patch under every pixel.
    ys = np.minimum((np.arange(height) / cell_h).astype(int), rows - 1)
    xs = np.minimum((np.arange(width) / cell_w).astype(int), cols - 1)
    cell_ids = labels[ys[:, None], xs[None, :]]

    clusters, sizes = np.unique(labels[labels >= 0], return_counts=True)
    filled = np.zeros_like(pixels)
    if fill == "mean":
        outlined = clusters
        for c in clusters:
            members = cell_ids == c
            filled[members] = pixels[members].mean(axis=0)
    else:
        outlined = clusters[sizes > 1][np.argsort(-sizes[sizes > 1], kind="stable")]
        filled[np.isin(cell_ids, clusters[sizes == 1])] = NEUTRAL
        for c, colour in zip(outlined, _distinct_colours(len(outlined)), strict=True):
            filled[cell_ids == c] = colour

    left = image.copy()
    _outline(ImageDraw.Draw(left), labels, set(outlined.tolist()), (cell_w, cell_h), border)
    pair = Image.new("RGB", (2 * width, height), "white")
    pair.paste(left, (0, 0))
    pair.paste(Image.fromarray(filled.astype(np.uint8)), (width, 0))
    return pair


def _outline(draw: ImageDraw.ImageDraw, labels: np.ndarray, outlined: set[int],
             cell: tuple[float, float], colour: str) -> None:
    """Lines between neighbouring patches of different clusters, one of them ``outlined``."""
    rows, cols = labels.shape
    cell_w, cell_h = cell
    for r in range(rows):
        for c in range(cols):
            x0, y0 = c * cell_w, r * cell_h
            here = labels[r, c]
            if c + 1 < cols and here != labels[r, c + 1] and \
                    (here in outlined or labels[r, c + 1] in outlined):
                draw.line([(x0 + cell_w, y0), (x0 + cell_w, y0 + cell_h)], fill=colour, width=2)
            if r + 1 < rows and here != labels[r + 1, c] and \
                    (here in outlined or labels[r + 1, c] in outlined):
                draw.line([(x0, y0 + cell_h), (x0 + cell_w, y0 + cell_h)], fill=colour, width=2)


def draw_clusters(image: Image.Image, labels: np.ndarray, path: str,
                  caption: str | None = None, fill: str = "mean",
                  border: str = "white") -> int:
    """Write ``path`` (PNG): :func:`render_clusters`'s picture, with ``caption`` written in
    a strip underneath (so the picture says what it shows). Returns the number of clusters
    drawn.
    """
    pair = render_clusters(image, labels, fill, border)
    strip = CAPTION_HEIGHT if caption else 0
    canvas = Image.new("RGB", (pair.width, pair.height + strip), "white")
    canvas.paste(pair, (0, 0))
    if caption:
        ImageDraw.Draw(canvas).text((4, pair.height + 3), caption, fill="black")
    canvas.save(path, format="PNG")
    return int(np.unique(labels[labels >= 0]).size)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m tokenpool_ops.visualize``; every option has help."""
    parser = argparse.ArgumentParser(
        prog="python -m tokenpool_ops.visualize", description=__doc__.split("\n\n")[0],
        epilog="The caption (block, clusters, model, method) is printed and written under "
               "the picture.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="deit_tiny_patch16_224",
                        help="timm VisionTransformer to build, with random weights")
    parser.add_argument("--method", default="wkmedoids", choices=METHODS,
                        help="pooling method of every block")
    parser.add_argument("--block", type=int, default=7,
                        help="0-based block whose clusters are drawn")
    parser.add_argument("--keep", type=int, nargs="+", default=DEFAULT_KEEP,
                        help="patch tokens left after each block (one value or one per "
                             "block); the default is the paper's DeiT-S sparsity level 1")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--out", default="tokenpool_clusters.png",
                        help="PNG file to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import timm
    from sklearn.datasets import load_sample_image

    from .timm import patch_timm

    args = build_parser().parse_args(argv)

    torch.manual_seed(args.seed)
    model = cast("VisionTransformer", timm.create_model(args.model, pretrained=False).eval())
    keep = args.keep[0] if len(args.keep) == 1 else args.keep
    patch_timm(model, keep, method=args.method, trace_source=True)
    image, pixels = prepare_image(load_sample_image("china.jpg"))
    labels = cluster_map(model, pixels, args.block)
    drawn = int(np.unique(labels[labels >= 0]).size)
    caption = (f"block {args.block}: {drawn} clusters of {labels.size} patches "
               f"({args.model}, {args.method}, random weights)")
    draw_clusters(image, labels, args.out, caption)
    print(f"{args.out}: {caption}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
