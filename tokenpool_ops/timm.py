"""Token Pooling inside timm VisionTransformers: ``patch_timm`` / ``unpatch_timm``.

``patch_timm(model, keep)`` swaps the classes of the model, of each ``Block`` and of each
``Attention`` for subclasses defined here, and gives them one shared state dict
(``model._tokenpool``). No parameter or buffer is added, so the state_dict is untouched and
``unpatch_timm`` restores the original classes exactly.

Where pooling sits. With ``placement="attn"`` (the default) a block computes
``x = x + attn(norm1(x))``, pools the patch tokens, then runs its MLP on the pooled tokens,
as PoWER-BERT and ToMe reduce tokens. ``placement="block"`` pools after the whole block.
Prefix tokens (class, distillation, registers: ``model.num_prefix_tokens``) are never pooled.

Significance scores (Eq. 5). Blocks compute their attention output with
``F.scaled_dot_product_attention``. A block whose method needs scores (w-methods, 'topk',
'importance') and that actually reduces its tokens adds, without autograd (inference), a
second pass, :func:`received_attention`, that sums the attention probabilities a chunk of
queries at a time, so no (B, H, N, N) matrix exists. Under autograd, and on the devices of
``MATERIALISED_DEVICES`` (the CPU and CUDA GPUs, where it is faster), it materialises its
attention probabilities instead: they serve the output, the scores (which stay
differentiable: the w-methods' means depend on them) and the backward pass; without autograd
on the CPU a few images at a time, so that they stay in cache (``attention_with_scores`` in
``tokenpool_ops._patching``). The score of a
patch token is the attention it receives from *every* query, the class and distillation
queries included (Eq. 5 sums over all queries), restricted to patch-token keys.

ToMe (``method="tome"``; Bolya et al., ICLR 2023). A block that merges takes ToMe's metric
instead of scores: the keys of its attention (after timm's ``k_norm``) averaged over heads,
(B, N, head_dim), patch tokens only; no attention matrix is materialised for it (SDPA). The
plan is ToMe's bipartite soft matching (see :func:`tokenpool_ops.pool`), merged with
autograd in training as the clustering methods are. :func:`tome_schedule` turns ToMe's
constant r (tokens merged per block) into a ``keep`` list.

Sizes (Appendix E, "carry"). After pooling, each token knows how many original patches it
stands for (prefix tokens count 1). With ``prop_attn=True`` later blocks add ``log(size)``
to their attention logits, so a merged token receives the attention its members would have
received together. Its Eq. 5 score then already counts its size; since the core weighs
token i by ``scores[i] * sizes[i]`` (scores per original token), the scores are divided by
the sizes before pooling. Without ``prop_attn`` a merged token is attended as one token, so
its raw score is taken as the per-original-token score and multiplied by its size.

``trace_source=True`` keeps ``model._tokenpool["source"]``: (B, N_original_patches) integer
map from each original patch to the patch token (0-based, prefix excluded) that stands for it
now; -1 once no patch token is left.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor

from ._measures import significance_scores
from ._patching import (
    MATERIALISED_DEVICES,
    STATE,
    TokenPoolState,
    new_state,
    one_op_applies,
    pool_patch_tokens,
    received_attention,
    reset_state,
    size_bias,
    tome_schedule,
)
from ._patching import attention_with_scores as materialised_attention
from ._pool import MATCHING_METHODS, USES_SCORES, Method
from .backends._torch_ops import attention_with_scores
from .nn import PoolOptions, pool_with_grad

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack needs Python 3.11

__all__ = ["patch_timm", "tome_schedule", "unpatch_timm"]

class TokenPoolAttention(Attention):
    """timm ``Attention`` that adds log(size) to its logits and can return what its block's
    pooling needs: Eq. 5 scores, or ToMe's metric.

    ``forward`` returns ``(out, guide)``: the scores (B, N) where the block needs them, the
    keys averaged over heads (B, N, head_dim) where it merges with 'tome', else None (patch
    tokens only).
    """

    _tp_state: TokenPoolState
    _tp_needs_scores: bool
    _tp_needs_metric: bool

    # Returning the scores too is the point of this subclass; only TokenPoolBlock calls it.
    def forward(  # type: ignore[override]
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        if attn_mask is not None or is_causal:
            raise ValueError("Token Pooling changes the number of tokens; attention masks "
                             "and is_causal are not supported by patched blocks")
        state = self._tp_state
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)

        bias = size_bias(state)

        scores = None
        training = torch.is_grad_enabled() and q.requires_grad
        materialise = training or q.device.type in MATERIALISED_DEVICES
        if (self._tp_needs_scores and materialise and not training
                and (not self.training or self.attn_drop.p == 0)):
            # Inference: the probabilities a few batch elements at a time. Traced, the same
            # computation is one operator (see one_op_applies).
            with_scores = (attention_with_scores if one_op_applies(state, q)
                           else materialised_attention)
            x, scores = with_scores(q, k, v, bias, self.scale, state["num_prefix"])
            x = x.transpose(1, 2)  # the heads come merged: (B, N, H, D) in memory
        elif self._tp_needs_scores and materialise:
            # One attention matrix serves the output, the scores and the backward pass (SDPA
            # plus a checkpointed score pass measured 2x slower in training on the CPU).
            logits = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                logits = logits + bias.to(logits.dtype)
            attn = logits.softmax(dim=-1)
            scores = significance_scores(attn[..., state["num_prefix"]:])
            x = self.attn_drop(attn) @ v
        else:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                dropout_p=self.attn_drop.p if self.training else 0.0)
            if self._tp_needs_scores:  # inference: no attention matrix at all
                scores = received_attention(q, k, bias, self.scale)[:, state["num_prefix"]:]

        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        if self._tp_needs_metric:  # ToMe's metric: the keys, averaged over heads
            return self.proj_drop(self.proj(x)), k.mean(dim=1)[:, state["num_prefix"]:]
        return self.proj_drop(self.proj(x)), scores


class TokenPoolBlock(Block):
    """timm ``Block`` that pools its patch tokens after attention (or after the block)."""

    _tp_state: TokenPoolState
    _tp_keep: int

    def forward(self, x: Tensor, attn_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        y, guide = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop_path1(self.ls1(y))
        after_attn = self._tp_state["placement"] == "attn"
        if after_attn:
            x = self._pool(x, guide)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x if after_attn else self._pool(x, guide)

    def _pool(self, x: Tensor, guide: Tensor | None) -> Tensor:
        # This module's pool_with_grad, looked up at call time: tests and benchmarks wrap it.
        return pool_patch_tokens(self._tp_state, x, self._tp_keep, guide, pool_with_grad)


#: The patched subclass of each model class (see _model_class).
_MODEL_CLASSES: dict[type[VisionTransformer], type[VisionTransformer]] = {}


def _model_class(original: type[VisionTransformer]) -> type[VisionTransformer]:
    """A subclass of the model's class whose forward starts from fresh sizes and sources.
    Its forward has the original's signature (``functools.wraps``): ``torch.export``
    names the inputs by it (``dynamic_shapes={"x": ...}``). One subclass per class, shared
    by every patched model of it: dynamo guards a compiled forward on the model's class, so
    a new class per patch made each model compiled in a process a recompilation of the same
    code, and the ninth hit dynamo's recompile limit."""
    known = _MODEL_CLASSES.get(original)
    if known is not None:
        return known

    @functools.wraps(original.forward)
    def forward(self: VisionTransformer, *args: Any, **kwargs: Any) -> Tensor:
        state = _state_of(self)
        reset_state(state)
        logits = original.forward(self, *args, **kwargs)
        if torch.compiler.is_exporting():  # its sizes and sources are fake tensors
            reset_state(state)
        return logits

    patched = type(f"TokenPool{original.__name__}", (original,),
                   {"forward": forward, "_tp_original_class": original})
    _MODEL_CLASSES[original] = patched
    return patched


def _state_of(model: VisionTransformer) -> TokenPoolState:
    """The shared state of a model patched by :func:`patch_timm`."""
    return cast(TokenPoolState, getattr(model, STATE))


def patch_timm(
    model: VisionTransformer, keep: int | Sequence[int], method: Method = "wkmedoids",
    prop_attn: bool = True, trace_source: bool = False, placement: str = "attn",
    **options: Unpack[PoolOptions],
) -> VisionTransformer:
    """Add Token Pooling to every block of a timm VisionTransformer, in place.

    Parameters
    ----------
    model : timm VisionTransformer (or a subclass such as the distilled DeiT)
        Its blocks must be timm ``Block`` with timm ``Attention`` (LayerScale, qk-norm and
        any number of prefix tokens are fine).
    keep : int or sequence of int
        Patch tokens left after each block (one int for all blocks, or one per block). A
        block whose input has no more tokens than that does nothing.
    method : str
        Any method of :func:`tokenpool_ops.pool`. 'tome' is ToMe (Bolya et al., ICLR 2023):
        its metric is the block's keys averaged over heads, and it needs no attention
        matrix; pass ``keep=tome_schedule(r, depth, num_patches)`` for ToMe's constant r.
    prop_attn : bool
        Add log(size) to later blocks' attention logits (Appendix E, "carry").
    trace_source : bool
        Record which original patch each token stands for in ``model._tokenpool["source"]``.
    placement : {'attn', 'block'}
        Pool between attention and MLP (default) or after the block.
    **options
        Passed to :func:`tokenpool_ops.pool` (``max_iter``, ``init``, ``seed``,
        ``check_values``, ``stop_early``, ``fast_paths``). ``check_values`` defaults to
        False here: activations inside a model are not user input, and each check is a
        host synchronisation. With ``stop_early=False`` as well, an eager forward pass
        reads no value on the host (for CUDA graphs captured by hand).

    Under ``torch.compile`` (``fullgraph=True`` works, in inference and training) and
    ``torch.export`` the defaults are fine: the clustering runs its ``max_iter`` iterations
    without host reads; where the fused kernels serve the device (Numba on the CPU, CUDA
    with CuPy) each block's plan, and in inference its attention with scores, is one custom
    operator inside the graph (``backends/_torch_ops.py``); the whole model is one graph.

    Returns
    -------
    The same model object, patched. ``unpatch_timm`` undoes it.
    """
    if hasattr(model, STATE):
        raise ValueError("model is already patched; call unpatch_timm first")
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"expected a timm VisionTransformer, got {type(model).__name__}")
    blocks = list(model.blocks)
    for i, block in enumerate(blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            raise TypeError(f"block {i} is {type(block).__name__} with "
                            f"{type(block.attn).__name__}; only timm Block with Attention "
                            "is supported")
    state = new_state(model.num_prefix_tokens, keep, len(blocks), method, prop_attn,
                      trace_source, placement, options)
    schedule = state["keep"]
    n = model.patch_embed.num_patches
    for block, k in zip(blocks, schedule, strict=True):
        reduces = k < n
        block.__class__ = TokenPoolBlock
        block.attn.__class__ = TokenPoolAttention
        tp_block, tp_attn = cast(TokenPoolBlock, block), cast(TokenPoolAttention, block.attn)
        tp_block._tp_state = tp_attn._tp_state = state
        tp_block._tp_keep = k
        tp_attn._tp_needs_scores = reduces and method in USES_SCORES
        tp_attn._tp_needs_metric = reduces and method in MATCHING_METHODS
        n = min(n, k)
    model.__class__ = _model_class(type(model))
    setattr(model, STATE, state)
    return model


def unpatch_timm(model: VisionTransformer) -> VisionTransformer:
    """Undo :func:`patch_timm`: original classes, no added attributes. Returns the model."""
    if not hasattr(model, STATE):
        raise ValueError("model is not patched by patch_timm")
    for block in model.blocks:
        tp_block, tp_attn = cast(TokenPoolBlock, block), cast(TokenPoolAttention, block.attn)
        block.__class__ = Block
        block.attn.__class__ = Attention
        del tp_block._tp_state, tp_block._tp_keep, tp_attn._tp_state, tp_attn._tp_needs_scores
        del tp_attn._tp_needs_metric
    model.__class__ = cast(type[VisionTransformer], model._tp_original_class)
    delattr(model, STATE)
    return model

