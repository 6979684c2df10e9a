"""Convolution downsampling: the paper's grid baseline (§5 "Methods" 1, Appendix D).

A 2x2 convolution with stride 2 over the grid of patch tokens: the tokens of each 2x2
window of adjacent patches are concatenated (4M numbers) and mapped to R^M, so the width
stays M (the paper keeps DeiT's width to see the pure effect of downsampling) and each
layer divides the patch tokens by 4 (8x8 = 64 -> 16 -> 4 -> 1). Prefix tokens (the class
token; ``model.num_prefix_tokens`` of them) pass through unchanged.

Placement: a layer runs after the whole block it follows, so that block's attention and
MLP see all of its tokens and the next block sees a quarter of the patches (the FLOP
counter's ``placement="block"``). It is a forward hook on the block returning the new
output, so block indices and every state_dict key of the base model stay as they are; the
convolutions live in ``model.token_downsample`` as ``conv<l>`` (``l`` the 1-based block),
keys ``token_downsample.conv<l>.weight`` and ``.bias``, which ``--finetune`` may miss.

Depths (``--conv-depths 1,3``: after blocks 1 and 3) are 1-based, strictly increasing and
within 1..depth; every layer needs an even grid side, since nothing is padded. Two notes
on the paper: with 3 layers at l1 < l2 < l3 its search took only l2 - l1 == l3 - l2, a
restriction of which configurations it enumerated, not of which are valid, so it is not
enforced here; and it fits up to 3 layers into DeiT-S's 14x14 grid, which needs padding
(or rounding) at the odd side 7 that it does not describe: here 14x14 takes one layer.

Initialisation (the paper gives none): 2x2 average pooling, each of the four window slots
the identity divided by 4 and a zero bias, so a model finetuned from a base checkpoint
starts as the base model with tokens averaged per window, not behind a random projection.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from .errors import ConfigError

__all__ = ["TokenGridConv", "add_conv_downsampling", "conv_after", "conv_plan",
           "parse_conv_depths"]


class TokenGridConv(nn.Conv2d):
    """A 2x2 stride-2 convolution, width to width, over a ``grid`` of patch tokens.

    Examples
    --------
    >>> conv = TokenGridConv(width=8, grid=(4, 6), prefix=1, after_block=2)
    >>> tuple(conv(torch.randn(2, 1 + 4 * 6, 8)).shape)
    (2, 7, 8)
    """

    def __init__(self, width: int, grid: tuple[int, int], prefix: int,
                 after_block: int) -> None:
        super().__init__(width, width, kernel_size=2, stride=2)
        self.grid, self.prefix, self.after_block = grid, prefix, after_block

    def reset_parameters(self) -> None:
        """2x2 average pooling (see the module text); ``nn.Conv2d.__init__`` calls it."""
        width = self.in_channels
        with torch.no_grad():
            mean = torch.eye(width, dtype=self.weight.dtype, device=self.weight.device) / 4
            self.weight.copy_(mean[:, :, None, None].expand(width, width, 2, 2))
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, prefix + rows * cols, M) -> (B, prefix + rows * cols / 4, M), row-major grid."""
        prefix, patches = tokens[:, :self.prefix], tokens[:, self.prefix:]
        rows, cols = self.grid
        grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, rows, cols)
        pooled = super().forward(grid).flatten(2).transpose(1, 2)
        return torch.cat([prefix, pooled], dim=1)

    def run_after(self, block: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor:
        """Forward hook of the block: its output, downsampled.

        A bound method rather than a closure, so that ``copy.deepcopy(model)`` (timm's EMA)
        gives the copy's hook the copy's convolution.
        """
        return self(output)


def parse_conv_depths(text: str) -> list[int]:
    """``--conv-depths``: block numbers separated by commas or spaces.

    >>> parse_conv_depths("1, 3")
    [1, 3]
    """
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"--conv-depths {text!r} is no list of block numbers (1-based, "
                          "comma-separated, e.g. 1,3)") from None


def conv_plan(grid: tuple[int, int], depth: int, depths: Sequence[int]
              ) -> tuple[list[int], dict[int, tuple[int, int]]]:
    """Check ``depths``; return patch tokens after each block and each layer's input grid.

    >>> conv_plan((8, 8), 4, [1, 3])
    ([16, 16, 4, 4], {1: (8, 8), 3: (4, 4)})
    """
    if not depths:
        raise ConfigError("--downsample conv needs --conv-depths (the blocks after which "
                          "a convolution runs, 1-based, e.g. 1,3)")
    if not all(1 <= block <= depth for block in depths):
        raise ConfigError(f"--conv-depths {','.join(map(str, depths))}: blocks are numbered "
                          f"1 to {depth}")
    if any(later <= earlier for earlier, later in pairwise(depths)):
        raise ConfigError(f"--conv-depths {','.join(map(str, depths))} must be strictly "
                          "increasing")
    rows, cols = grid
    schedule, grids = [], {}
    for block in range(1, depth + 1):
        if block in depths:
            if rows % 2 or cols % 2:
                raise ConfigError(f"--conv-depths: the convolution after block {block} "
                                  f"meets a {rows}x{cols} grid of patch tokens; a 2x2 "
                                  "stride-2 convolution needs even sides (none is padded)")
            grids[block] = (rows, cols)
            rows, cols = rows // 2, cols // 2
        schedule.append(rows * cols)
    return schedule, grids


def add_conv_downsampling(model: VisionTransformer, depths: Sequence[int]) -> list[int]:
    """Put a :class:`TokenGridConv` after each block in ``depths`` (1-based) into
    ``model.token_downsample``; return the patch tokens left after each block."""
    grid = tuple(model.patch_embed.grid_size)
    schedule, grids = conv_plan((grid[0], grid[1]), len(model.blocks), depths)
    convs = {}
    for block, block_grid in grids.items():
        conv = TokenGridConv(model.embed_dim, block_grid, model.num_prefix_tokens, block)
        model.blocks[block - 1].register_forward_hook(conv.run_after)
        convs[f"conv{block}"] = conv
    model.token_downsample = nn.ModuleDict(convs)
    return schedule


def conv_after(model: nn.Module) -> list[int]:
    """The blocks (1-based) a convolution follows; empty without convolution downsampling."""
    modules = getattr(model, "token_downsample", None)
    if not isinstance(modules, nn.ModuleDict):
        return []
    return sorted(m.after_block for m in modules.values() if isinstance(m, TokenGridConv))
