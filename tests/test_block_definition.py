"""A pooled timm block equals the block assembled by hand from its definition.

For each block of a small timm ViT (float64, so that no clustering meets a rounding tie)
the reference below runs, with the unpatched model's own modules:

1. attention written out: ``softmax(q k^T * scale + log(sizes))`` (the log-size bias only
   with carry, ``prop_attn=True``, Appendix E, and only once a block has pooled), its
   output projected and added to the residual stream;
2. the significance scores of Eq. 5 from that attention matrix: the attention each patch
   token receives, summed over heads and over every query (prefix queries included); with
   carry they are divided by the sizes (the bias already counted them), since ``pool``
   weighs each token by ``scores * sizes``; ToMe's metric instead: the keys averaged over
   heads;
3. ``tokenpool_ops.pool`` on the patch tokens (prefix tokens kept), sizes carried from the
   previous block (the counts of original patches, summed over each cluster);
4. the MLP on the pooled tokens, added to the residual stream.

The patched model's features and its carried sizes must equal the reference's, for every
method, with and without carry.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the block is a PyTorch module")
timm = pytest.importorskip("timm", reason="the block is timm's")

import tokenpool_ops  # noqa: E402
from tokenpool_ops.timm import patch_timm  # noqa: E402

METHODS = ["kmeans", "kmedoids", "wkmeans", "wkmedoids", "topk", "random", "importance", "tome"]
KEEP = [11, 11, 6]  # patch tokens after each block: 16 -> 11 -> 11 (no pooling) -> 6
SCORED = ("wkmeans", "wkmedoids", "topk", "importance")


def small_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, depth=3, embed_dim=24, num_heads=3)
    return model.eval().double()


def attention_by_hand(attn: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm Attention's output written out; with its probabilities (B, H, N, N) and keys."""
    b, n, dim = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = q @ k.transpose(-2, -1) * (dim // heads) ** -0.5
    if bias is not None:
        logits = logits + bias[:, None, None, :]
    probabilities = logits.softmax(dim=-1)
    out = (probabilities @ v).transpose(1, 2).reshape(b, n, dim)
    return attn.proj(out), probabilities, k


def eq5_scores(probabilities: torch.Tensor, prefix: int) -> torch.Tensor:
    """Eq. 5: s_j = sum over heads h and queries i of A[h, i, j], for patch keys j."""
    return probabilities.sum(dim=(1, 2))[:, prefix:]


def features_by_hand(model: torch.nn.Module, images: torch.Tensor, method: str, carry: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled model's features (before the final norm's head) and last sizes."""
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    sizes = None
    for block, keep in zip(model.blocks, KEEP, strict=True):
        bias = None
        if carry and sizes is not None:
            # log(size) in the model's float64 (Appendix E's bias, prefix tokens size 1).
            ones = torch.ones(x.shape[0], prefix, dtype=torch.float64)
            bias = torch.cat([ones, sizes], dim=1).log()
        out, probabilities, keys = attention_by_hand(block.attn, block.norm1(x), bias)
        x = x + out
        patches = x[:, prefix:]
        if keep < patches.shape[1]:
            scores = metric = None
            if method in SCORED:
                scores = eq5_scores(probabilities, prefix)
                if carry and sizes is not None:
                    scores = scores / sizes
            if method == "tome":
                metric = keys.mean(dim=1)[:, prefix:]
            result = tokenpool_ops.pool(patches, keep, method, scores=scores, sizes=sizes,
                                        metric=metric, return_info=True, check_values=False)
            sizes = result.sizes.double()
            x = torch.cat([x[:, :prefix], result.tokens], dim=1)
        x = x + block.mlp(block.norm2(x))
    return model.norm(x), sizes


@pytest.mark.parametrize("carry", [True, False], ids=["carry", "no-carry"])
@pytest.mark.parametrize("method", METHODS)
def test_pooled_blocks_equal_their_definition(method, carry):
    reference = small_vit()
    patched = patch_timm(copy.deepcopy(reference), KEEP, method=method, prop_attn=carry)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    with torch.no_grad():
        want, want_sizes = features_by_hand(reference, images, method, carry)
        got = patched.forward_features(images)
    got_sizes = patched._tokenpool["sizes"]
    assert got.shape == (2, 1 + KEEP[-1], 24)
    np.testing.assert_array_equal(got_sizes.numpy(), want_sizes.numpy())
    assert sorted(set(want_sizes.flatten().tolist())) != [1.0] or method in (
        "topk", "random", "importance"), "no cluster merged two tokens: a weak test"
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_carry_changes_the_result():
    # The log-size bias is not a no-op on this model: with and without carry differ.
    reference = small_vit()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    with torch.no_grad():
        with_carry, _ = features_by_hand(reference, images, "wkmedoids", True)
        without, _ = features_by_hand(reference, images, "wkmedoids", False)
    assert not torch.allclose(with_carry, without, rtol=1e-6, atol=1e-6)
