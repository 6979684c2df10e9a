"""Analytic FLOPs of a ViT with a keep schedule, in the paper's breakdown (Table 1).

One multiply-add counts as one flop, as in the paper. Per block with ``n`` tokens (prefix
tokens included) entering attention, ``m`` leaving the pooling step, width ``M``, ``H``
heads and MLP ratio ``r``:

* softmax-attention: ``2 n^2 M`` (the products Q K^T and A V) plus ``n^2 H`` (one
  normalisation per attention weight);
* QKV projections: ``3 n M^2``; O projection: ``n M^2``;
* MLP: ``2 r m M^2``: with pooling between attention and MLP (``patch_timm``'s default
  placement) the MLP sees the pooled tokens; with ``placement="block"`` it sees ``n``.

The model total adds the patch embedding (``P^2 C M`` per patch) and the classifier head
(``M`` times the classes). These reproduce Table 1 to its printed precision and the
PoWER-BERT rows of Table 3 within 0.05 GFLOPs (``tests/test_flops.py``).

The clustering's own cost, per pooling block (``k < n`` patch tokens), from §4 of the paper:

* K-Medoids: ``n^2 M`` for the pairwise distances (once), then ``n^2 + n k`` per iteration
  (medoid costs within clusters, assignment to k medoids);
* K-Means: ``n k M`` per iteration (distances from n tokens to k centres);
* the selection baselines (topk, random, importance): nothing counted;
* a block that keeps every token or none (``k >= n`` or ``k = 0``): nothing counted, for
  every method (``pool`` returns ``x`` itself or the empty set before clustering);
* ToMe's matching (tome; Bolya et al., ICLR 2023), with metric width ``D = M / H`` (the keys
  averaged over heads, ``n M``): per round of bipartite matching on ``n'`` tokens (at most
  ``floor(n' / 2)`` merged per round; one round where ``n - k <= floor(n / 2)``), the norms
  ``n' D`` and the similarities ``ceil(n' / 2) floor(n' / 2) D``, and between rounds the
  metric's merge ``n' D``; then the tokens' size-weighted merge, ``n M``. (The clustering
  methods' own merge, ``n M`` too, is not counted above.)

Iterations default to ``max_iter`` (10, every iteration run); Table 3's "+" column is
consistent with about 5 K-Means iterations on average, which ``--iterations`` sets.

Convolution downsampling (Appendix D, ``conv_after``: the 1-based blocks a 2x2 stride-2
convolution follows): ``n M^2`` per layer for ``n`` patch tokens entering it (``n / 4``
outputs, each ``4 M`` inputs times ``M`` outputs; the bias is not counted). It is a learned
layer of the model, like the patch embedding, so it is part of the total
(``conv_downsampling``), unlike the clustering. The convolution runs after its block, so
it needs ``placement="block"``: block l's attention and MLP see its full tokens, the next
block a quarter of the patches; without ``keep`` the count quarters the patches (rounding
down) at each convolution, and no clustering is counted where a convolution reduces.

    python -m reference_models.flops                   # Table 1
    python -m reference_models.flops --model deit_small_patch16_224 \\
        --keep deits-level4 --method kmedoids [--json]
    python -m reference_models.flops --model deit_small_patch16_224 --conv-after 4
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .cli import given_flags, int_at_least
from .errors import ConfigError
from .schedules import PAPER_SCHEDULES

#: Table 1's models: (name, timm name, image size).
TABLE1_MODELS = (
    ("ViT-B/384", "vit_base_patch16_384", 384), ("ViT-B", "vit_base_patch16_224", 224),
    ("DeiT-S", "deit_small_patch16_224", 224), ("DeiT-Ti", "deit_tiny_patch16_224", 224))
CLUSTERING = ("kmeans", "kmedoids", "wkmeans", "wkmedoids")
#: --method: the clustering methods, and the selections whose cost is not counted.
METHODS = (*CLUSTERING, "topk", "random", "importance", "none")
DEFAULT_ITERATIONS = 10


@dataclass(frozen=True)
class ViTShape:
    """What the count needs of a ViT."""

    depth: int
    width: int
    heads: int
    patches: int
    prefix: int = 1
    mlp_ratio: float = 4.0
    patch_size: int = 16
    channels: int = 3
    classes: int = 1000

    @classmethod
    def of(cls, model: object) -> ViTShape:
        """The shape of a timm VisionTransformer (an instance)."""
        embed = model.patch_embed  # type: ignore[attr-defined]
        block = model.blocks[0]  # type: ignore[attr-defined]
        head = model.head  # type: ignore[attr-defined]
        return cls(depth=len(model.blocks), width=model.embed_dim,  # type: ignore[attr-defined]
                   heads=block.attn.num_heads, patches=embed.num_patches,
                   prefix=model.num_prefix_tokens,  # type: ignore[attr-defined]
                   mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,  # type: ignore[attr-defined]
                   patch_size=embed.patch_size[0], channels=embed.proj.in_channels,
                   classes=getattr(head, "out_features", 0))


@dataclass(frozen=True)
class Breakdown:
    """GFLOPs of one model and schedule, in Table 1's rows (``--json`` keys)."""

    softmax_attention: float
    qkv_projections: float
    o_projection: float
    mlp: float
    embedding_and_head: float
    clustering: float
    conv_downsampling: float = 0.0

    @property
    def total(self) -> float:
        """Everything but the clustering (Table 1's total; Table 3's first number), with
        the convolutions of convolution downsampling."""
        return (self.softmax_attention + self.qkv_projections + self.o_projection + self.mlp
                + self.embedding_and_head + self.conv_downsampling)


def clustering_flops(method: str, n: int, k: int, width: int, iterations: int,
                     metric_width: int | None = None) -> float:
    """Multiply-adds of one pooling step from n to k patch tokens (see the module text);
    ``metric_width``: tome's D (``width`` when None)."""
    if k == 0 or k >= n:  # pool returns the empty set or x itself at once: no clustering
        return 0.0
    if method == "tome":
        return matching_flops(n, k, width, width if metric_width is None else metric_width)
    if method not in CLUSTERING:
        return 0.0
    if method.endswith("kmedoids"):
        return n * n * width + iterations * (n * n + n * k)
    return iterations * n * k * width


def matching_flops(n: int, k: int, width: int, metric_width: int) -> float:
    """ToMe's cost from n to 0 < k < n patch tokens: the metric (keys averaged over heads), each
    round's norms and similarities, the metric's merge between rounds, the tokens' merge."""
    from tokenpool_ops._tome import merge_rounds  # the rounds pool runs

    total = 2 * n * width  # the metric, and the size-weighted merge of the tokens
    rounds = merge_rounds(n, k)
    for i, r in enumerate(rounds):
        total += n * metric_width + ((n + 1) // 2) * (n // 2) * metric_width
        if i + 1 < len(rounds):
            total += n * metric_width
        n -= r
    return total


def conv_flops(n: int, width: int) -> float:
    """Multiply-adds of one 2x2 stride-2 convolution, width to width, over n patch tokens."""
    return n * width * width


def _conv_keep(patches: int, depth: int, conv_after: Collection[int]) -> list[int]:
    """Patch tokens after each block when the convolutions alone reduce them."""
    keep = []
    for block in range(1, depth + 1):
        patches = patches // 4 if block in conv_after else patches
        keep.append(patches)
    return keep


def count(shape: ViTShape, keep: Sequence[int] | None = None, method: str = "wkmedoids",
          placement: str = "attn", iterations: int = DEFAULT_ITERATIONS,
          conv_after: Collection[int] = ()) -> Breakdown:
    """GFLOPs of ``shape`` with ``keep[i]`` patch tokens left after block i (None: none
    pooled, or quartered at each of ``conv_after``). Prefix tokens are never pooled."""
    if conv_after and placement != "block":
        raise ValueError("a convolution runs after its block: conv_after needs "
                         "placement='block'")
    keep = _conv_keep(shape.patches, shape.depth, conv_after) if keep is None else list(keep)
    if len(keep) != shape.depth:
        raise ValueError(f"keep has {len(keep)} entries for {shape.depth} blocks")
    sums = dict.fromkeys(("attention", "qkv", "o", "mlp", "clustering", "conv"), 0.0)
    width, patches = shape.width, shape.patches
    for block, k in enumerate(keep, start=1):
        after = min(patches, k)
        n, m = patches + shape.prefix, after + shape.prefix
        sums["attention"] += 2 * n * n * width + n * n * shape.heads
        sums["qkv"] += 3 * n * width * width
        sums["o"] += n * width * width
        sums["mlp"] += 2 * shape.mlp_ratio * (m if placement == "attn" else n) * width**2
        if block in conv_after:  # the convolution reduces here, not a clustering
            sums["conv"] += conv_flops(patches, width)
        else:
            sums["clustering"] += clustering_flops(method, patches, after, width, iterations,
                                                   width // shape.heads)
        patches = after
    embed = shape.patches * shape.patch_size**2 * shape.channels * width
    giga = 1e-9
    return Breakdown(sums["attention"] * giga, sums["qkv"] * giga, sums["o"] * giga,
                     sums["mlp"] * giga, (embed + width * shape.classes) * giga,
                     sums["clustering"] * giga, sums["conv"] * giga)


def shape_of(name: str, image_size: int | None = None) -> ViTShape:
    """The shape of a timm model by name, built on the meta device (no weights, no memory);
    :class:`ConfigError` for a name neither timm nor ``reference_models.models`` knows."""
    import torch

    from .models import build_model  # it registers the digits and DeiT-e318/e252 models

    with torch.device("meta"):
        return ViTShape.of(build_model(name, 1000, img_size=image_size))


def table1() -> str:
    """Table 1 of the paper: GFLOPs per part, one column per model."""
    rows = ("softmax-attention", "QKV projections", "O projection", "MLP", "Total")
    columns = [count(shape_of(timm_name, size)) for _, timm_name, size in TABLE1_MODELS]
    values = [[c.softmax_attention, c.qkv_projections, c.o_projection, c.mlp, c.total]
              for c in columns]
    lines = [f"{'GFLOPs':<18}" + "".join(f"{name:>11}" for name, _, _ in TABLE1_MODELS)]
    for r, row in enumerate(rows):
        lines.append(f"{row:<18}" + "".join(f"{v[r]:>11.2f}" for v in values))
    return "\n".join(lines)


def parse_keep(text: str) -> list[int]:
    """``--keep``: a paper schedule by name (``deits-level4``), a schedule file
    (``search_schedule``'s JSON) or comma-separated counts."""
    if text in PAPER_SCHEDULES:
        return list(PAPER_SCHEDULES[text])
    if text.endswith(".json") or Path(text).is_file():
        from .models import read_keep_file  # here: models imports timm, as shape_of does

        try:
            return read_keep_file(text)
        except ValueError as error:  # ConfigError
            raise argparse.ArgumentTypeError(str(error)) from None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--keep must be a paper schedule (such as "
                                         f"deits-level4) or integers separated by commas, "
                                         f"got {text!r}") from error


def parse_blocks(text: str) -> tuple[int, ...]:
    """``--conv-after``: 1-based block numbers separated by commas."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--conv-after must be block numbers separated "
                                         f"by commas, got {text!r}") from error


def build_parser() -> argparse.ArgumentParser:
    """The FLOP counter's flags."""
    parser = argparse.ArgumentParser(prog="python -m reference_models.flops",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", help="timm model name; without it, print Table 1 (and "
                                        "no other flag applies)")
    parser.add_argument("--img-size", type=int_at_least(1), default=None,
                        help="input image size, a multiple of the patch size")
    parser.add_argument("--keep", type=parse_keep, default=None,
                        help="patch tokens left after each block, comma-separated, a "
                             "paper schedule (deits-, deite318-, deite252-level0 to level7), "
                             "or a schedule file of reference_models.search_schedule")
    parser.add_argument("--method", default="wkmedoids", choices=METHODS,
                        help="pooling method (its cost; with --keep only)")
    parser.add_argument("--placement", choices=("attn", "block"), default="attn",
                        help="pooling between attention and MLP, or after the block")
    parser.add_argument("--iterations", type=int_at_least(1), default=DEFAULT_ITERATIONS,
                        help="clustering iterations counted per pooling step (with --keep "
                             "and a clustering --method only)")
    parser.add_argument("--conv-after", type=parse_blocks, default=(),
                        help="convolution downsampling (Appendix D) after these blocks, "
                             "1-based, comma-separated; implies --placement block")
    parser.add_argument("--json", action="store_true",
                        help="print the Breakdown's fields and total as JSON "
                             "(conv_downsampling only with --conv-after)")
    return parser


def validate(args: argparse.Namespace, given: set[str]) -> ViTShape | None:
    """Check the flags across each other and against the model; return its shape (None:
    print Table 1). ``given`` names the flags the command line set; ConfigError for the
    first check that fails."""
    if args.model is None:
        if given:
            flag = "--" + sorted(given)[0].replace("_", "-")
            raise ConfigError(f"{flag} applies with --model only; without it the command "
                              "prints Table 1")
        return None
    for dest in ("method", "iterations"):
        if dest in given and args.keep is None:
            raise ConfigError(f"--{dest} applies with --keep only: without a schedule "
                              "nothing is pooled")
    if "iterations" in given and args.method not in CLUSTERING:
        raise ConfigError(f"--iterations applies to the clustering methods only "
                          f"({', '.join(CLUSTERING)}), not to --method {args.method}")
    if args.conv_after and "placement" in given and args.placement != "block":
        raise ConfigError("--conv-after needs --placement block (a convolution runs after "
                          "its block); leave --placement out")
    shape = shape_of(args.model, args.img_size)
    if args.img_size is not None and args.img_size % shape.patch_size:
        raise ConfigError(f"--img-size {args.img_size}: {args.model} cuts images into "
                          f"{shape.patch_size} px patches; use a multiple of it")
    if args.keep is not None:
        if len(args.keep) != shape.depth:
            raise ConfigError(f"--keep has {len(args.keep)} entries for {shape.depth} blocks")
        if not all(0 <= k <= shape.patches for k in args.keep):
            raise ConfigError(f"--keep: each count is 0 to {shape.patches} (the model's "
                              f"patch tokens), got {','.join(map(str, args.keep))}")
    if args.conv_after:
        from .conv import conv_plan  # torch is loaded by now (shape_of)

        side = math.isqrt(shape.patches)  # timm's ViTs have square grids
        try:
            conv_plan((side, shape.patches // side), shape.depth, args.conv_after)
        except ConfigError as error:  # the trainer's --conv-depths rules, for --conv-after
            raise ConfigError(str(error).replace("--conv-depths", "--conv-after")) from None
    return shape


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        shape = validate(args, given_flags(parser, argv))
    except ConfigError as error:
        parser.error(str(error))
    if shape is None:
        print(table1())
        return 0
    placement = "block" if args.conv_after else args.placement
    result = count(shape, args.keep, args.method, placement, args.iterations,
                   conv_after=args.conv_after)
    if args.json:
        record = asdict(result)
        if not args.conv_after:  # the printed parts stay Table 1's and the clustering
            del record["conv_downsampling"]
        print(json.dumps({**record, "total": result.total}))
    elif args.conv_after:
        print(f"{result.total:.2f} GFLOPs ({result.conv_downsampling:.3f} of them the "
              "downsampling convolutions)")
    else:
        print(f"{result.total:.2f} GFLOPs (+{result.clustering:.2f} {args.method})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
