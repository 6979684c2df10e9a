"""``tokenpool_ops.visualize.render_clusters``: what ``fill="palette"`` shows of the merges."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="tokenpool_ops.visualize imports PyTorch")
PIL = pytest.importorskip("PIL", reason="tokenpool_ops.visualize draws with Pillow")

from PIL import Image  # noqa: E402

from tokenpool_ops.visualize import render_clusters  # noqa: E402

CELL = 10  # pixels per patch in these pictures


def _filled_colours(labels: np.ndarray) -> dict[int, set[tuple[int, ...]]]:
    """The colours each cluster gets in the filled (right) half, sampled at patch centres."""
    rows, cols = labels.shape
    image = Image.new("RGB", (cols * CELL, rows * CELL), (90, 90, 90))
    right = np.asarray(render_clusters(image, labels, fill="palette"))[:, cols * CELL:]
    colours: dict[int, set[tuple[int, ...]]] = {}
    for r in range(rows):
        for c in range(cols):
            centre = right[r * CELL + CELL // 2, c * CELL + CELL // 2]
            colours.setdefault(int(labels[r, c]), set()).add(tuple(int(v) for v in centre))
    return colours


def test_palette_gives_merged_clusters_distinct_colours_and_single_patches_one_gray() -> None:
    labels = np.arange(16).reshape(4, 4)
    labels[0, :3] = 0  # a cluster of three patches
    labels[3, 2:] = 15  # one of two; every other patch is alone
    colours = _filled_colours(labels)
    assert all(len(found) == 1 for found in colours.values())  # one colour per cluster
    merged = {next(iter(colours[c])) for c in (0, 15)}
    single = {next(iter(found)) for c, found in colours.items() if c not in (0, 15)}
    assert len(merged) == 2 and len(single) == 1 and not merged & single
    gray = next(iter(single))
    assert gray[0] == gray[1] == gray[2]  # neutral: no hue


def test_palette_stays_distinct_beyond_its_named_colours() -> None:
    labels = np.repeat(np.arange(40), 2).reshape(8, 10)  # forty clusters of two patches
    colours = _filled_colours(labels)
    assert len({next(iter(found)) for found in colours.values()}) == 40


def test_palette_outlines_merged_clusters_only() -> None:
    labels = np.arange(9).reshape(3, 3)
    labels[0, 0] = labels[0, 1] = 0  # merged: patches (0, 0) and (0, 1)
    image = Image.new("RGB", (3 * CELL, 3 * CELL), (0, 0, 0))
    left = np.asarray(render_clusters(image, labels, fill="palette", border="white"))
    left = left[:, :3 * CELL]

    def lit(x: int, y: int) -> bool:
        return bool(left[y, x].any())

    assert lit(2 * CELL, CELL // 2)  # between the merged cluster and patch (0, 2)
    assert lit(CELL // 2, CELL)  # under the merged cluster
    assert not lit(2 * CELL, CELL + CELL // 2)  # between single patches (1, 1) and (1, 2)
    assert not lit(CELL + CELL // 2, 2 * CELL)  # between single patches (1, 1) and (2, 1)
    everything = np.asarray(render_clusters(image, labels, fill="mean", border="white"))
    assert everything[CELL + CELL // 2, 2 * CELL].any()  # fill="mean" outlines every cluster
