"""What every model patch shares: its state, the keep schedule, Eq. 5 without the attention
matrix, the log(size) bias and the per-block pooling step.

One implementation of pooling, two front doors: :mod:`tokenpool_ops.timm` and
:mod:`tokenpool_ops.transformers` each find the blocks, the attention and the prefix tokens of
their library, compute the block's guide (Eq. 5 scores, or ToMe's metric) and call
:func:`pool_patch_tokens`; everything here is independent of the model library. The
conventions (sizes per token, scores per original token, ``source``) are described in the
docstring of :mod:`tokenpool_ops.timm`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypedDict, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from ._compat import refuse_jit_trace
from ._flash_scores import flash_attention_with_scores, flash_scores_apply
from ._methods import EMPTY_CLUSTER_METHODS
from ._pool import (
    DEFAULT_MAX_ITER,
    MATCHING_METHODS,
    METHODS,
    USES_SCORES,
    Method,
    PoolResult,
)
from .nn import PoolOptions, guard_or_false, merge, pool_with_grad

__all__ = [
    "ATTENTION_CHUNK",
    "MATERIALISED_DEVICES",
    "PLACEMENTS",
    "SCORE_CHUNK",
    "STATE",
    "TokenPoolState",
    "attention_with_scores",
    "guide_kind",
    "keep_schedule",
    "new_state",
    "one_op_applies",
    "pool_patch_tokens",
    "received_attention",
    "reset_state",
    "size_bias",
    "tome_schedule",
]

#: The attribute of a patched model that holds its :class:`TokenPoolState`.
STATE = "_tokenpool"
PLACEMENTS = ("attn", "block")

#: Queries per chunk of the score pass, at most: its float32 working set is (B, H, chunk, N).
SCORE_CHUNK = 128

#: Elements of the (b, H, N, N) attention probabilities that one step of
#: :func:`attention_with_scores` holds at most per PyTorch thread (float32: 1 MiB, about a
#: core's L2 cache).
#: Materialised for a whole batch they went through main memory three times (logits,
#: probabilities, scores): DeiT-S's attention at B=32, N=197 took 76 ms against SDPA's 35 ms,
#: one batch element at a time 40 ms (one CPU thread, benchmarks/results/model_issue23c.md).
ATTENTION_CHUNK = 2**18

#: Device types on which a block that needs scores materialises its attention probabilities
#: even without autograd: there one softmax serving the output and the scores beats SDPA plus
#: the score pass, which computes the logits and their softmax a second time
#: (``benchmarks/score_pass.py``):
#:
#: * CPU, 2 threads, B=32, H=6, N=197, float32: 21 vs 32 ms per block;
#: * CUDA, an H200, B=256, H=6, N=197, bfloat16: 0.58 vs 0.78-0.81 ms forward, 0.73-0.77 vs
#:   1.14-1.18 ms with the size bias, and less peak memory (265 vs 323 MiB): SDPA alone
#:   took 0.11-0.29 ms, the score pass the rest (benchmarks/results/gpu_check_run{1,2}.md).
#:
#: Other devices, unmeasured, take SDPA's fused kernels and the score pass. In half
#: precision inside a CUDA graph capture, :func:`attention_with_scores` takes two flash
#: passes instead (``_flash_scores``).
MATERIALISED_DEVICES = ("cpu", "cuda")

#: The signature of :func:`tokenpool_ops.nn.pool_with_grad`, which each front door passes to
#: :func:`pool_patch_tokens` from its own module (so a test or benchmark can wrap one door).
PoolFunction = Callable[..., tuple[Tensor, PoolResult]]


class TokenPoolState(TypedDict):
    """The state dict shared by a patched model and its blocks (``model._tokenpool``)."""

    num_prefix: int
    method: Method
    prop_attn: bool
    trace_source: bool
    placement: str
    options: PoolOptions
    keep: list[int]
    sizes: Tensor | None
    source: Tensor | None


class _SharedState(dict):  # type: ignore[type-arg]
    """The runtime type of :class:`TokenPoolState`: a dict subclass, which ``torch.export``
    leaves alone. Export snapshots every module's attributes as a pytree and puts the
    snapshot back afterwards, which copies plain dicts: each block would then hold its own
    state, and the sizes would no longer reach the later blocks. A subclass is a pytree
    leaf, so the model and its blocks keep sharing one object."""


def reset_state(state: TokenPoolState) -> None:
    """Forget the sizes and sources of the previous forward pass."""
    state["sizes"] = None
    state["source"] = None


def keep_schedule(keep: int | Sequence[int], depth: int) -> list[int]:
    """``keep`` as one non-negative int per block (one int is repeated)."""
    schedule = [keep] * depth if isinstance(keep, int) else list(keep)
    if len(schedule) != depth or any(not isinstance(k, int) or k < 0 for k in schedule):
        raise ValueError(f"keep must be a non-negative int or {depth} of them (one per "
                         f"block), got {keep!r}")
    return schedule


def new_state(num_prefix: int, keep: int | Sequence[int], depth: int, method: Method,
              prop_attn: bool, trace_source: bool, placement: str,
              options: PoolOptions) -> TokenPoolState:
    """The checked state of a model with ``depth`` blocks; ``check_values`` defaults to False
    (activations inside a model are not user input, and each check is a host read)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be 'attn' or 'block', got {placement!r}")
    schedule = keep_schedule(keep, depth)
    options = cast(PoolOptions, {"check_values": False, **options})
    return cast(TokenPoolState, _SharedState(
        num_prefix=num_prefix, method=method, prop_attn=prop_attn, trace_source=trace_source,
        placement=placement, options=options, keep=schedule, sizes=None, source=None))


def tome_schedule(r: int | Sequence[int], depth: int, num_patches: int) -> list[int]:
    """ToMe's schedule as a ``keep`` list for ``patch_timm`` and ``patch_transformers``:
    block i merges ``r``
    patch tokens away (ToMe's constant r, e.g. 13 for DeiT-S: 196 to 40 over 12 blocks),
    or ``r[i]`` with one r per block.

    As in ToMe, a block merges at most floor(n / 2) of the n patch tokens it gets (one
    round of bipartite matching; prefix tokens are never merged), so the list saturates
    instead of running out: ``tome_schedule(100, 3, 196)`` is [98, 49, 25].

    Examples
    --------
    >>> tome_schedule(13, 12, 196)[:3], tome_schedule(13, 12, 196)[-1]
    ([183, 170, 157], 40)
    """
    per_block = [r] * depth if isinstance(r, int) else list(r)
    if len(per_block) != depth or any(not isinstance(v, int) or v < 0 for v in per_block):
        raise ValueError(f"r must be a non-negative int or {depth} of them (one per block), "
                         f"got {r!r}")
    keep, n = [], num_patches
    for merged in per_block:
        n -= min(merged, n // 2)
        keep.append(n)
    return keep


def guide_kind(state: TokenPoolState, x: Tensor, keep: int) -> str | None:
    """What a block that gets the sequence ``x`` (B, prefix + N, C) and keeps ``keep`` of
    its N patch tokens needs from its attention: 'scores' (Eq. 5), 'metric' (ToMe's keys)
    or None (it pools without, or does not reduce). Traced, N may be a size known by its
    range only (see :func:`pool_patch_tokens`): undecided means the block reduces."""
    refuse_jit_trace(x)  # before the sizes below, which torch.jit.trace makes tensors
    if guard_or_false(keep >= x.shape[1] - state["num_prefix"]):
        return None
    if state["method"] in MATCHING_METHODS:
        return "metric"
    return "scores" if state["method"] in USES_SCORES else None


def received_attention(q: Tensor, k: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """Eq. 5 for every token, (B, N) float32, without the (B, H, N, N) attention matrix.

    Recomputes the logits of at most ``SCORE_CHUNK`` queries at a time (equal chunks) in
    the compute dtype, normalises them in float32 and sums them over heads and queries.
    Differentiable, but meant for passes without autograd (see ``TokenPoolAttention``).
    """
    if torch.compiler.is_compiling():
        # Traced, the token count after a CPU plan operator is a size known by its range
        # only (backends._torch_ops._sequence_size), which a Python loop cannot step over:
        # one step, whose memory the compiler plans (it fuses the softmax and the sums).
        return _received_by_queries(q, k, bias, scale)
    n = q.shape[-2]
    chunk = -(-n // -(-n // SCORE_CHUNK))  # ceil(n / number of chunks): no tiny last chunk
    total = torch.zeros(q.shape[0], k.shape[-2], dtype=torch.float32, device=q.device)
    for start in range(0, n, chunk):
        total = total + _received_by_queries(q[:, :, start:start + chunk], k, bias, scale)
    return total


def _received_by_queries(q: Tensor, k: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """Each key's attention from the queries ``q``, summed over heads and queries, (B, N)."""
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    return logits.softmax(dim=-1, dtype=torch.float32).sum(dim=(1, 2))  # no float32 copy


def attention_with_scores(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                          scale: float, num_prefix: int) -> tuple[Tensor, Tensor]:
    """``softmax(scale q k^T + bias) v`` with the heads merged, (B, N, H, D) (a transposed
    view for a batch done in one step), and the Eq. 5 scores of the keys after the
    ``num_prefix`` first, (B, N - num_prefix), from the attention probabilities.

    In half precision inside a CUDA graph capture, two flash-attention passes give the
    output and the scores without the probabilities (``_flash_scores``). Elsewhere they are
    materialised: on the CPU a few batch elements at a time (at most ``ATTENTION_CHUNK``
    elements per PyTorch thread), so they stay in cache; each batch element's products,
    softmax and sums are the ones the whole batch would compute. For inference: training
    materialises the whole matrix, which its backward pass keeps (``TokenPoolAttention``).
    """
    if flash_scores_apply(q):  # half precision in a CUDA graph: no attention matrix at all
        return flash_attention_with_scores(q, k, v, bias, scale, num_prefix)
    if torch.compiler.is_compiling() or q.device.type != "cpu":
        # Traced without the operator (see one_op_applies): one step, as an unrolled loop
        # would be graph nodes per image; the compiler plans the memory itself. On a GPU:
        # one step, whose kernels fill the device (the steps are for a CPU core's cache).
        return _attention_step(q, k, v, bias, scale, num_prefix)
    batch, heads, n = q.shape[:3]
    # ATTENTION_CHUNK per thread: PyTorch splits a step's products and softmax over its
    # threads, and fewer, larger steps are fewer parallel regions to fork and join.
    per_image = max(1, heads * n * k.shape[-2])
    step = max(1, ATTENTION_CHUNK * torch.get_num_threads() // per_image)
    if step >= batch:
        return _attention_step(q, k, v, bias, scale, num_prefix)
    steps = [_attention_step(q[rows], k[rows], v[rows],
                             None if bias is None else bias[rows if bias.shape[0] > 1 else
                                                            slice(None)],
                             scale, num_prefix)
             for rows in (slice(start, start + step) for start in range(0, batch, step))]
    return torch.cat([out for out, _ in steps]), torch.cat([scores for _, scores in steps])


def _attention_step(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float,
                    num_prefix: int) -> tuple[Tensor, Tensor]:
    """One step of :func:`attention_with_scores`: the output as a (b, N, H, D) view."""
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:  # in place: the step's own temporary
        logits += bias if bias.dtype == logits.dtype else bias.to(logits.dtype)
    # The probabilities in the logits' dtype, autocast or not: CUDA's autocast runs a softmax
    # without a dtype in float32, a (b, H, N, N) float32 matrix that the product with v then
    # casts back (the scores below sum half precision in float32 anyway).
    attn = logits.softmax(dim=-1, dtype=logits.dtype)
    # significance_scores (Eq. 5) on the view, without its array-API layer and its copy:
    # half precision summed in float32, as there, converted as it is read (no float32 copy
    # of the probabilities). The dtype tests in Python, not no-op conversions: at batch 1
    # each operator call is a share of a small block's attention.
    keys = attn[..., num_prefix:]
    if keys.dtype in (torch.float16, torch.bfloat16):
        scores = keys.sum(dim=(1, 2), dtype=torch.float32).to(attn.dtype)
        return (attn @ v).transpose(1, 2), scores
    return (attn @ v).transpose(1, 2), keys.sum(dim=(1, 2))


def size_bias(state: TokenPoolState) -> Tensor | None:
    """log(size) of every token, (B, 1, 1, N), to add to the attention logits (prop_attn);
    None before the first pooling or without prop_attn."""
    sizes = state["sizes"]
    if not state["prop_attn"] or sizes is None:
        return None
    # Prefix tokens stand for themselves: log(1) = 0 exactly, padded in front of the patch
    # tokens' logs (one operator where ones, a concatenation and a log were three). Padded,
    # not sliced from the sizes: once a block has pooled to no patch token, the sizes are
    # (B, 0).
    return F.pad(sizes.log(), (state["num_prefix"], 0))[:, None, None, :]


def pool_patch_tokens(state: TokenPoolState, x: Tensor, keep: int, guide: Tensor | None,
                      pool: PoolFunction = pool_with_grad) -> Tensor:
    """One block's pooling: the patch tokens of ``x`` (B, prefix + N, C) to ``keep`` (if
    fewer than N), guided by the block's Eq. 5 scores or ToMe's metric (patch tokens only);
    updates the state's sizes (and source). ``pool`` is ``pool_with_grad``."""
    refuse_jit_trace(x)  # before the sizes below, which torch.jit.trace makes tensors
    matching = state["method"] in MATCHING_METHODS
    scores, metric = (None, guide) if matching else (guide, None)
    p = state["num_prefix"]
    patches = x[:, p:]
    n, k = patches.shape[1], keep
    # Traced after a plan operator, n is a size known by its range [1, previous keep] only
    # (backends._torch_ops._sequence_size): undecided means keep < previous keep = n, so pool.
    if guard_or_false(k >= n):
        return x
    sizes = state["sizes"]
    if scores is not None and sizes is not None and state["prop_attn"]:
        # Per original token (see tokenpool_ops.timm's docstring), in the counts' precision:
        # the counts go on to the pooled tokens' counts, and in half precision they would
        # round above 256. An empty K-Means cluster left a token of size 0: it stands for
        # nothing, so it weighs 0 (not 0 / 0).
        if scores.dtype != sizes.dtype:
            scores = scores.to(torch.promote_types(scores.dtype, sizes.dtype))
        if state["method"] in EMPTY_CLUSTER_METHODS:
            scores = torch.where(sizes > 0, scores / sizes.clamp_min(1e-30), 0.0)
        else:  # every token stands for at least one: one operator where there were five
            scores = scores / sizes
    planned = _plan_in_one_op(x, p, k, state, scores, sizes, metric)
    if planned is None:
        tokens, pooled = pool(patches, k, state["method"], scores=scores, sizes=sizes,
                              metric=metric, lean=not state["trace_source"], **state["options"])
        planned = torch.cat([x[:, :p], tokens], dim=1), pooled
    sequence, result = planned
    # Counts stay exact: at least float32 (half types would round sizes above 256), and the
    # model's float64 where it computes in it, so log(size) is taken at its precision.
    counts = result.sizes
    if counts.dtype not in (torch.float32, torch.float64):
        counts = counts.to(torch.promote_types(counts.dtype, torch.float32))
    state["sizes"] = counts
    if state["trace_source"]:
        source = state["source"]
        if source is None:
            source = torch.arange(n, device=x.device).expand(x.shape[0], n)
        state["source"] = (torch.full_like(source, -1) if k == 0 else
                           torch.gather(result.assignment, 1, source))
    return sequence


def _plan_in_one_op(x: Tensor, p: int, k: int, state: TokenPoolState, scores: Tensor | None,
                    sizes: Tensor | None, metric: Tensor | None
                    ) -> tuple[Tensor, PoolResult] | None:
    """The new sequence (the ``p`` prefix tokens of ``x``, then the pooled ones) and what
    ``pool_with_grad`` returns, with the plan as one custom operator
    (``torch.ops.tokenpool_ops.plan``) where a traced model can take it (see
    ``backends._torch_ops.plan_applies``: the fused kernels at hand); else None. The merge
    that carries gradients (training) stays traced: it is :func:`tokenpool_ops.nn.merge`."""
    if not one_op_applies(state, x):
        return None
    from .backends import _torch_ops

    options, method, lean = state["options"], state["method"], not state["trace_source"]
    fast_paths = options.get("fast_paths", True)
    given = [None if t is None else t.detach() for t in (x, scores, sizes, metric)]
    sequence, sizes_out, assignment, medoids = _torch_ops.plan(  # no autograd: a plan
        given[0], k, method, *given[1:], lean, cast(str | None, options.get("init")),
        options.get("max_iter", DEFAULT_MAX_ITER), options.get("seed", 0), fast_paths, p)
    has_assignment, has_medoids = _torch_ops.plan_fields(method, k, lean)
    result = PoolResult(sequence[:, p:], assignment if has_assignment else None, sizes_out,
                        medoids if has_medoids else None, None, None, 0)
    live = (x, scores, sizes)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in live)):
        return sequence, result
    tokens = merge(x[:, p:], result, method, scores=scores, sizes=sizes, fast_paths=fast_paths)
    return torch.cat([x[:, :p], tokens], dim=1), result


def one_op_applies(state: TokenPoolState, x: Tensor) -> bool:
    """Whether a traced block (``torch.compile``, ``torch.export``) computes its plan, and in
    inference its attention with Eq. 5 scores, as one custom operator each
    (``backends._torch_ops.plan`` and ``attention_with_scores``) rather than as the traced
    PyTorch code: where the fused kernels serve ``x``'s device (``plan_applies``).

    The traced code of a block's pooling is hundreds of graph nodes that inductor compiles
    into a dozen kernels per block, anew for every block (each has its own token count: no
    kernel is shared); as operators they cost the compiler nothing and run as they do
    eagerly. Without the kernels (no Numba on the CPU, no CuPy on CUDA) the code is traced.
    """
    if not torch.compiler.is_compiling():
        return False  # eager: every block asks twice a pass, so no import for the answer
    from .backends import _torch_ops

    options = state["options"]
    return _torch_ops.plan_applies(x, options.get("init"), options.get("fast_paths", True))
