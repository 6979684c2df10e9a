"""Attention and its Eq. 5 scores from two flash-attention passes, without the (B, H, N, N)
probabilities: the half-precision inference route of a scored block captured in a CUDA
graph.

Eq. 5 scores key j by the attention it receives, sum_h sum_i P_hij, with
P_ij = exp(s q_i . k_j + b_j - lse_i) and lse_i = log sum_j exp(s q_i . k_j + b_j) (scale s,
the optional log-size bias b of proportional attention).

* Pass 1 is the attention itself: its output, and lse per query, which the flash kernel
  computes anyway (it keeps it for the backward pass).
* Pass 2 swaps the roles: each key j is a query, each query i a key, and the logits are
  s k_j . q_i + b_j - lse_i = log P_ij. The log-sum-exp the kernel returns for "query" j is
  then log sum_i P_ij: the head's Eq. 5 sum for key j, in float32, from logits the kernel
  forms in float32. Its output is not needed.

The kernel takes only feature vectors, so what is not a product of q and k travels as
extra feature columns, divided by s (the kernel multiplies every product by s). -lse_i is
split into a high and a low half-precision part, whose sum keeps float32's accuracy: lse is
of the order of log N plus the largest logit, where one bfloat16 alone would round it by up
to 2^-9 of itself. The bias is one column in q's dtype in pass 1, as it enters the
materialised logits and SDPA; pass 2 adds it afterwards. The head dimension grows by 16 in
pass 2 (two blocks of 8, the kernel's multiple): D + 16 <= 256.

Where it pays (``benchmarks/results/gpu_run5_issue25.log``, an H200, B=256, H=6, D=64,
N=197, bfloat16): the passes take about 18 operators against the materialised route's 10,
and each is a launch that the host pays for (some 30 us there). Called eagerly they lost,
the host's launches setting the pace: 0.75 against 0.66 ms per call, 1.22 against 0.86 ms
with the bias (``benchmarks/score_pass.py``, wall clock). Inside a CUDA graph the launches
cost nothing and the device time decides: the whole pooled DeiT-S replayed as one graph took
16.2 ms with wkmedoids and 12.8 ms with topk, against 17.1 and 13.7 ms materialised (run 4);
a first prototype, timed by CUDA events, took 0.53 against 0.81 ms at N=197 and 0.26 against
0.28 ms at N=98. So the route is taken while a CUDA graph is being captured (``graphed``
models, ``torch.compile(mode="reduce-overhead")``) and from ``FLASH_MIN_TOKENS`` tokens. The
scores' largest relative error against float32's was 2.8e-6 against 3.2e-3 (the
materialised probabilities are rounded to bfloat16 before they are summed).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Device types whose flash kernel the passes call (the tests add "cpu", whose flash kernel
#: returns the same log-sum-exp).
FLASH_DEVICES = ("cuda",)
#: The kernel's head dimensions: a multiple of 8, at most 256 (with the 16 extra columns).
MAX_HEAD_DIM = 256
EXTRA = 8
#: Fewest tokens for the two passes: their device time was measured to pay on long
#: sequences only (0.53 against 0.81 ms at N=197, 0.26 against 0.28 ms at N=98).
FLASH_MIN_TOKENS = 128


def flash_kernel_takes(q: Tensor) -> bool:
    """Whether the two passes serve queries ``q`` (B, H, N, D): inference in half precision
    on a device of ``FLASH_DEVICES``, outside a trace, at least ``FLASH_MIN_TOKENS`` tokens,
    and D + 16 a head dimension the flash kernel takes."""
    head_dim = q.shape[-1]
    return (q.device.type in FLASH_DEVICES and q.shape[-2] >= FLASH_MIN_TOKENS
            and q.dtype in (torch.float16, torch.bfloat16)
            and head_dim % EXTRA == 0 and head_dim + 2 * EXTRA <= MAX_HEAD_DIM
            and not q.requires_grad and not torch.compiler.is_compiling())


def _launches_are_free(q: Tensor) -> bool:
    """Whether ``q``'s device is capturing a CUDA graph, whose replays launch without the
    host (the tests substitute this to run the route on the CPU)."""
    return q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def flash_scores_apply(q: Tensor) -> bool:
    """Whether a scored block takes :func:`flash_attention_with_scores`: where the kernel
    takes ``q`` (:func:`flash_kernel_takes`) and its launches are free (see the module
    docstring: called eagerly, the passes' launches cost more than they save)."""
    return flash_kernel_takes(q) and _launches_are_free(q)


def _flash(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The flash kernel's output (B, H, N, D) and log-sum-exp (B, H, N), float32."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, False, False, scale=scale)[:2]
    return out, lse


def _high_low(values: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """float32 ``values`` as two tensors of ``dtype`` whose sum is ``values`` to about 2^-16
    of itself (one bfloat16 alone rounds by up to 2^-9)."""
    high = values.to(dtype)
    return high, (values - high).to(dtype)  # the difference in float32, exact


def flash_attention_with_scores(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                                scale: float, num_prefix: int) -> tuple[Tensor, Tensor]:
    """``attention_with_scores`` by two flash passes (see the module docstring): the output
    (B, N, H, D) as a view, and the Eq. 5 scores of the keys after the ``num_prefix`` first
    (B, N - num_prefix), in ``q``'s dtype as the materialised route gives them.

    Few operators, each a launch that the host pays for: the extra columns are one
    concatenation per operand, the bias enters pass 1 as one column in ``q``'s dtype (as it
    enters the materialised logits and SDPA), and pass 2 leaves it out: b_j is the same for
    every logit of "query" j, so it adds to that row's log-sum-exp afterwards, in float32. A
    token of size 0 (log 0 = -inf, an empty K-Means cluster) so receives exp(-inf) = 0.
    """
    batch, heads, n, head_dim = q.shape
    wide = (batch, heads, n, EXTRA)
    unit = torch.eye(1, EXTRA, dtype=q.dtype, device=q.device).reshape(1, 1, 1, EXTRA)
    zeros = unit[..., 1:].expand(batch, heads, n, EXTRA - 1)  # (1, 0, ..., 0) less its 1
    if bias is None:
        out, lse = _flash(q, k, v, scale)
    else:
        # (B, 1, 1, N) log sizes, one per key: a column of k against q's column of ones.
        column = (bias / scale).to(q.dtype).reshape(bias.shape[0], 1, n, 1)
        out, lse = _flash(torch.cat([q, unit.expand(wide)], dim=-1),
                          torch.cat([k, column.expand(batch, heads, n, 1), zeros], dim=-1),
                          torch.cat([v, unit.expand(wide)], dim=-1), scale)
        out = out[..., :head_dim]
    # Pass 2: "queries" k_j with two ones, "keys" q_i with -lse_i / s in two parts (each
    # part in a block of 8 columns, which keeps the head dimension a multiple of 8).
    high, low = _high_low((lse * (-1 / scale))[..., None], q.dtype)
    as_queries = torch.cat([k, unit.expand(wide), unit.expand(wide)], dim=-1)
    as_keys = torch.cat([q, high, zeros, low, zeros], dim=-1)
    received = _flash(as_queries, as_keys, as_keys, scale)[1]  # (B, H, N): log sum_i P_ij
    if bias is not None:
        received = received + bias.reshape(bias.shape[0], 1, n)
    scores = received.exp().sum(dim=1)[:, num_prefix:]
    return out.transpose(1, 2), scores.to(q.dtype)
