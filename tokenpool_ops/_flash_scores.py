"""Attention and its Eq. 5 scores from two flash-attention passes, without the (B, H, N, N)
probabilities: the half-precision inference route of a scored block on a GPU.

Eq. 5 scores key j by the attention it receives, sum_h sum_i P_hij, with
P_ij = exp(s q_i . k_j + b_j - lse_i) and lse_i = log sum_j exp(s q_i . k_j + b_j) (scale s,
the optional log-size bias b of proportional attention).

* Pass 1 is the attention itself: its output, and lse per query, which the flash kernel
  computes anyway (it keeps it for the backward pass).
* Pass 2 swaps the roles: each key j is a query, each query i a key, and the logits are
  s k_j . q_i + b_j - lse_i = log P_ij. The log-sum-exp the kernel returns for "query" j is
  then log sum_i P_ij: the head's Eq. 5 sum for key j, in float32, from logits the kernel
  forms in float32. Its output is not needed.

The kernel takes only feature vectors, so the biases travel as extra feature columns,
divided by s (the kernel multiplies every product by s) and split into a high and a low half
precision part, whose sum keeps float32's accuracy: lse is of the order of log N plus the
largest logit, where one bfloat16 would round it by up to 2^-8 of itself. The head dimension
grows by 8 (the kernel's multiple): D + 8 <= 256.

Measured on an H200 (B=256, H=6, D=64, bfloat16, no bias; ``benchmarks/results``
``/gpu_host_time_issue25.md``): at N=197, 0.53 ms against 0.81 ms for the materialised
attention (SDPA alone: 0.11 ms); at N=98, 0.26 against 0.28 ms. The scores' largest relative
error against float32's: 2.8e-6 against 3.2e-3 (the materialised probabilities are rounded to
bfloat16 before they are summed).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Device types whose half-precision scored blocks take the two passes (the tests add "cpu",
#: whose flash kernel returns the same log-sum-exp).
FLASH_DEVICES = ("cuda",)
#: The kernel's head dimensions: a multiple of 8, at most 256 (with the 8 extra columns).
MAX_HEAD_DIM = 256
EXTRA = 8
#: log(size) of an empty token, for the kernel: exp of it underflows to 0 in float32.
EMPTY_LOG_SIZE = -1e4


def flash_scores_apply(q: Tensor) -> bool:
    """Whether :func:`flash_attention_with_scores` serves queries ``q`` (B, H, N, D): eager
    inference in half precision on a device of ``FLASH_DEVICES``, with D + 8 a head
    dimension the flash kernel takes."""
    head_dim = q.shape[-1]
    return (q.device.type in FLASH_DEVICES and q.dtype in (torch.float16, torch.bfloat16)
            and head_dim % EXTRA == 0 and head_dim + EXTRA <= MAX_HEAD_DIM
            and not q.requires_grad and not torch.compiler.is_compiling())


def _flash(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The flash kernel's output (B, H, N, D) and log-sum-exp (B, H, N), float32."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, False, False, scale=scale)[:2]
    return out, lse


def _high_low(values: Tensor, dtype: torch.dtype) -> Tensor:
    """float32 ``values`` (..., 1) as two columns of ``dtype`` whose sum is ``values`` to
    about 2^-16 of itself."""
    high = values.to(dtype)
    return torch.cat([high, (values - high.float()).to(dtype)], dim=-1)


def flash_attention_with_scores(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                                scale: float, num_prefix: int) -> tuple[Tensor, Tensor]:
    """``attention_with_scores`` by two flash passes (see the module docstring): the output
    (B, N, H, D) as a view, and the Eq. 5 scores of the keys after the ``num_prefix`` first
    (B, N - num_prefix), in ``q``'s dtype as the materialised route gives them."""
    batch, heads, n, head_dim = q.shape
    dtype = q.dtype
    ones = q.new_ones(batch, heads, n, 2)
    pad = q.new_zeros(batch, heads, n, EXTRA - 4)
    if bias is None:
        out, lse = _flash(q, k, v, scale)
        key_bias = q.new_zeros(batch, heads, n, 2)
    else:
        # (B, 1, 1, N) log sizes: one per key, the same for every head and query. A token
        # of size 0 (an empty K-Means cluster) has log 0 = -inf: it receives exp(-inf) = 0 as
        # it does there, and -inf would make the low part NaN and the swapped pass's row
        # all -inf (the kernel's log-sum-exp of an empty row is not -inf).
        per_key = (bias.float().clamp_min(EMPTY_LOG_SIZE) / scale).reshape(
            bias.shape[0], 1, n, 1)
        key_bias = _high_low(per_key, dtype).expand(batch, heads, n, 2)
        zeros = q.new_zeros(batch, heads, n, EXTRA - 2)
        out, lse = _flash(torch.cat([q, ones, zeros], dim=-1),
                          torch.cat([k, key_bias, zeros], dim=-1),
                          torch.cat([v, q.new_zeros(batch, heads, n, EXTRA)], dim=-1), scale)
        out = out[..., :head_dim]
    shifted = _high_low((-lse.float() / scale)[..., None], dtype)
    # Queries: the keys j with their bias; keys: the queries i with -lse_i.
    as_queries = torch.cat([k, key_bias, ones, pad], dim=-1)
    as_keys = torch.cat([q, ones, shifted, pad], dim=-1)
    received = _flash(as_queries, as_keys, as_keys, scale)[1]  # (B, H, N): log sum_i P_ij
    scores = received.exp().sum(dim=1)[:, num_prefix:]
    return out.transpose(1, 2), scores.to(dtype)
