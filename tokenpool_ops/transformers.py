"""Token Pooling inside Hugging Face transformers ViTs: ``patch_transformers`` /
``unpatch_transformers``, the same contract as :func:`tokenpool_ops.timm.patch_timm`.

``patch_transformers(model, keep)`` swaps the class of each encoder layer and of its attention
for subclasses defined here, gives them one shared state dict (``model._tokenpool``) and
registers a forward pre-hook on the first layer that clears the sizes of the previous pass. No
parameter or buffer is added, and the model's own class is kept (transformers finds what a
model can record, ``output_hidden_states`` and ``output_attentions``, by its class), so
``unpatch_transformers`` restores the original model exactly.

Supported: ViT (``ViTModel``, ``ViTForImageClassification``), DeiT (``DeiTModel``,
``DeiTForImageClassification``, ``DeiTForImageClassificationWithTeacher``: class and
distillation tokens), DINOv2 (``Dinov2Model``, ``Dinov2ForImageClassification``; layer scale
and SwiGLU are fine) and DINOv2 with registers (``Dinov2WithRegistersModel``,
``Dinov2WithRegistersForImageClassification``: the registers are prefix tokens), with
``attn_implementation`` "eager" or "sdpa". Prefix tokens are never pooled.

Pooling itself (placement, sizes, ``prop_attn``, scores per original token, ``source``) is
the timm patch's, from :mod:`tokenpool_ops._patching`; read :mod:`tokenpool_ops.timm` for it.
What differs is how a layer gets its guide:

* Eq. 5 scores. A layer that reduces its tokens with a method that needs scores takes them
  from its attention probabilities: those the eager implementation returns; under SDPA, with
  autograd or on the devices of ``MATERIALISED_DEVICES`` (the CPU and CUDA GPUs), those of
  the model's own eager attention function (so eager and SDPA compute the same); otherwise
  (SDPA on another device, inference) SDPA's output plus
  :func:`~tokenpool_ops._patching.received_attention`, so no (B, H, N, N) matrix exists. In
  training with attention dropout, eager's probabilities are the dropped-out ones the model
  used. Traced (``torch.compile``, ``torch.export``) in inference under SDPA where the fused
  kernels serve the device, the attention and its scores are one custom operator,
  ``tokenpool_ops::attention_with_scores``, as in the timm patch.
* ``prop_attn``: log(size) reaches the attention logits as the additive attention mask of
  the model's own attention function (eager or SDPA alike).
* ToMe's metric: the keys averaged over heads.

What the model returns. ``output_hidden_states`` gives each layer's output with the tokens
that layer left (prefix first, then the pooled patch tokens); ``output_attentions`` (eager)
gives each layer's probabilities over the tokens that entered it. ``interpolate_pos_encoding``
works: ``keep`` counts tokens, whatever the image size. An ``attention_mask`` cannot follow the
tokens and is refused, as is gradient checkpointing (its recomputation would pool twice).
``Dinov2*ForImageClassification`` averages the patch tokens left by the last layer (each
pooled token once), so ``keep`` must leave at least one there.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.deit import modeling_deit
from transformers.models.dinov2 import modeling_dinov2
from transformers.models.dinov2_with_registers import modeling_dinov2_with_registers
from transformers.models.vit import modeling_vit

from ._measures import significance_scores
from ._patching import (
    MATERIALISED_DEVICES,
    STATE,
    TokenPoolState,
    guide_kind,
    new_state,
    one_op_applies,
    pool_patch_tokens,
    received_attention,
    reset_state,
    size_bias,
    tome_schedule,
)
from ._pool import Method
from .backends._torch_ops import attention_with_scores
from .nn import PoolOptions, pool_with_grad

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack needs Python 3.11

__all__ = ["SUPPORTED_MODELS", "patch_transformers", "tome_schedule", "unpatch_transformers"]

#: The attention implementations a patched layer runs (others read the mask differently).
IMPLEMENTATIONS = ("eager", "sdpa")
AttentionFunction = Callable[..., tuple[Tensor, Tensor | None]]


class TokenPoolAttention(nn.Module):
    """The attention of a transformers ViT layer, with log(size) as its mask, that also
    returns its layer's guide: ``forward`` returns ``(out, probabilities, guide)``.

    ``probabilities`` is what the configured implementation returns (eager: the attention
    probabilities, for ``output_attentions``; SDPA: None). ``guide`` is, for ``guide="scores"``,
    Eq. 5 (B, N patch tokens) and for ``guide="metric"`` the keys averaged over heads (B, N,
    head_dim), else None.
    """

    _tp_state: TokenPoolState
    _tp_eager: AttentionFunction  # the model's own eager attention function
    config: Any
    head_dim: int
    scaling: float
    attention_dropout: float
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                guide: str | None = None,
                **kwargs: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
        state = self._tp_state
        implementation = self.config._attn_implementation
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        bias = size_bias(state)
        mask = attention_mask if bias is None else bias.to(q.dtype)
        training = torch.is_grad_enabled() and q.requires_grad
        materialise = guide == "scores" and (
            implementation == "eager" or training or q.device.type in MATERIALISED_DEVICES)
        p = state["num_prefix"]
        found = None
        if (materialise and not training and implementation == "sdpa"
                and (attention_mask is None or bias is not None) and self._one_op(q)):
            # SDPA returns no probabilities, so none are lost.
            out, found = attention_with_scores(q, k, v, bias, self.scaling, p)
            probabilities = None
        else:
            attend = (self._tp_eager if materialise else
                      ALL_ATTENTION_FUNCTIONS.get_interface(implementation, self._tp_eager))
            out, probabilities = attend(
                self, q, k, v, mask, dropout=self.attention_dropout if self.training else 0.0,
                scaling=self.scaling, **kwargs)
        if guide == "scores" and found is None:
            found = (significance_scores(cast(Tensor, probabilities)[..., p:]) if materialise
                     else received_attention(q, k, mask, self.scaling)[:, p:])
        elif guide == "metric":
            found = k.mean(dim=1)[:, p:]
        if implementation != "eager":
            probabilities = None  # as the configured implementation would return
        out = self.o_proj(out.reshape(*input_shape, -1).contiguous())
        return out, probabilities, found

    def _one_op(self, q: Tensor) -> bool:
        """Whether a traced layer takes its attention with Eq. 5 scores as the one operator
        ``attention_with_scores``, as timm's blocks do (see ``one_op_applies``): without
        dropout, where the fused kernels serve the device."""
        return ((not self.training or self.attention_dropout == 0)
                and one_op_applies(self._tp_state, q))


class TokenPoolLayer(nn.Module):
    """A transformers ViT encoder layer that pools its patch tokens after attention (or after
    the layer). Its two residual branches are the model family's (see the subclasses)."""

    _tp_state: TokenPoolState
    _tp_keep: int
    attention: TokenPoolAttention
    gradient_checkpointing: bool

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                **kwargs: Any) -> Tensor:
        implementation = self.attention.config._attn_implementation
        if implementation not in IMPLEMENTATIONS:  # (set_attn_implementation after patching)
            raise ValueError(f"a patched layer runs attn_implementation 'eager' or 'sdpa', "
                             f"not {implementation!r}")
        if attention_mask is not None and not torch.compiler.is_exporting():
            # Under torch.export transformers materialises its all-attend mask (it cannot
            # tell it away while tracing); a caller's mask was refused by the model's own
            # pre-hook (_refuse_attention_mask), so the one here can be dropped.
            raise ValueError("Token Pooling changes the number of tokens; a patched model "
                             "takes no attention_mask")
        if self.gradient_checkpointing and self.training:
            raise ValueError("Token Pooling does not support gradient checkpointing (its "
                             "recomputation would pool again); call "
                             "model.activation_checkpointing_disable()")
        state, x = self._tp_state, hidden_states
        guide = guide_kind(state, x, self._tp_keep)
        y, found = self._attention_branch(x, guide, **kwargs)
        x = y + x
        after_attn = state["placement"] == "attn"
        if after_attn:
            x = self._pool(x, found)
        x = self._mlp_branch(x) + x
        return x if after_attn else self._pool(x, found)

    def _pool(self, x: Tensor, guide: Tensor | None) -> Tensor:
        # This module's pool_with_grad, looked up at call time: tests and benchmarks wrap it.
        return pool_patch_tokens(self._tp_state, x, self._tp_keep, guide, pool_with_grad)

    def _attention_branch(self, x: Tensor, guide: str | None,
                          **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def _mlp_branch(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class _ViTBranches(TokenPoolLayer):
    """ViT and DeiT: pre-norm, dropout on each branch."""

    layernorm_before: nn.Module
    layernorm_after: nn.Module
    mlp: nn.Module
    dropout: nn.Module

    def _attention_branch(self, x: Tensor, guide: str | None,
                          **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        y, _, found = self.attention(self.layernorm_before(x), None, guide, **kwargs)
        return self.dropout(y), found

    def _mlp_branch(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.dropout(self.mlp(self.layernorm_after(x))))


class _Dinov2Branches(TokenPoolLayer):
    """DINOv2: pre-norm, layer scale and drop path on each branch."""

    norm1: nn.Module
    norm2: nn.Module
    layer_scale1: nn.Module
    layer_scale2: nn.Module
    drop_path: nn.Module
    mlp: nn.Module

    def _attention_branch(self, x: Tensor, guide: str | None,
                          **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        y, _, found = self.attention(self.norm1(x), None, guide, **kwargs)
        return self.drop_path(self.layer_scale1(y)), found

    def _mlp_branch(self, x: Tensor) -> Tensor:
        return cast(Tensor, self.drop_path(self.layer_scale2(self.mlp(self.norm2(x)))))


@dataclass(frozen=True)
class _Family:
    """Where a model family keeps what the patch needs."""

    layer: type[nn.Module]  # the original layer class
    attention: type[nn.Module]  # the original attention class
    patched_layer: type[nn.Module]
    patched_attention: type[nn.Module]
    layers: str  # where the base model keeps its layers
    num_prefix: Callable[[Any], int]  # from the config: class, distillation, registers


def _family(module: Any, prefix: str, branches: type[TokenPoolLayer], layers: str,
            num_prefix: Callable[[Any], int]) -> _Family:
    layer, attention = getattr(module, f"{prefix}Layer"), getattr(module, f"{prefix}Attention")
    patched_attention = type(f"TokenPool{attention.__name__}", (TokenPoolAttention, attention),
                             {"_tp_eager": staticmethod(module.eager_attention_forward)})
    patched_layer = type(f"TokenPool{layer.__name__}", (branches, layer), {})
    return _Family(layer, attention, patched_layer, patched_attention, layers, num_prefix)


_VIT = _family(modeling_vit, "ViT", _ViTBranches, "layers", lambda c: 1)
_DEIT = _family(modeling_deit, "DeiT", _ViTBranches, "layers", lambda c: 2)
_DINOV2 = _family(modeling_dinov2, "Dinov2", _Dinov2Branches, "encoder.layer", lambda c: 1)
_DINOV2_REGISTERS = _family(modeling_dinov2_with_registers, "Dinov2WithRegisters",
                            _Dinov2Branches, "encoder.layer",
                            lambda c: 1 + c.num_register_tokens)

#: The model classes :func:`patch_transformers` accepts, with their family.
SUPPORTED_MODELS: dict[type[PreTrainedModel], _Family] = {
    modeling_vit.ViTModel: _VIT,
    modeling_vit.ViTForImageClassification: _VIT,
    modeling_deit.DeiTModel: _DEIT,
    modeling_deit.DeiTForImageClassification: _DEIT,
    modeling_deit.DeiTForImageClassificationWithTeacher: _DEIT,
    modeling_dinov2.Dinov2Model: _DINOV2,
    modeling_dinov2.Dinov2ForImageClassification: _DINOV2,
    modeling_dinov2_with_registers.Dinov2WithRegistersModel: _DINOV2_REGISTERS,
    modeling_dinov2_with_registers.Dinov2WithRegistersForImageClassification: _DINOV2_REGISTERS,
}
#: Classification heads that average the patch tokens of the last layer.
_AVERAGING_HEADS = (modeling_dinov2.Dinov2ForImageClassification,
                    modeling_dinov2_with_registers.Dinov2WithRegistersForImageClassification)


def _layers(model: PreTrainedModel, family: _Family) -> nn.ModuleList:
    return cast(nn.ModuleList, model.base_model.get_submodule(family.layers))


def _checked_family(model: PreTrainedModel) -> _Family:
    family = SUPPORTED_MODELS.get(type(model))
    if family is None:
        names = ", ".join(sorted(cls.__name__ for cls in SUPPORTED_MODELS))
        raise TypeError(f"patch_transformers supports {names}; got {type(model).__name__}")
    implementation = model.config._attn_implementation
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be 'eager' or 'sdpa', got "
                         f"{implementation!r}")
    if model.is_activation_checkpointing:
        raise ValueError("Token Pooling does not support gradient checkpointing (its "
                         "recomputation would pool again); call "
                         "model.activation_checkpointing_disable() first")
    for i, layer in enumerate(_layers(model, family)):
        if type(layer) is not family.layer or type(layer.attention) is not family.attention:
            raise TypeError(f"layer {i} is {type(layer).__name__} with "
                            f"{type(layer.attention).__name__}; expected "
                            f"{family.layer.__name__} with {family.attention.__name__}")
    return family


def _reset_before_first_layer(layer: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook of a patched model's first layer: a new pass, no sizes yet. (The
    state is reached through the layer, so a deep copy of the model resets its own.)"""
    reset_state(cast(TokenPoolLayer, layer)._tp_state)


def _reset_after_export(layer: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    """Forward hook of a patched model's last layer: under ``torch.export`` the sizes and
    sources the pass left are fake tensors, forgotten at once (as ``patch_timm`` does)."""
    if torch.compiler.is_exporting():
        reset_state(cast(TokenPoolLayer, layer)._tp_state)


#: Where ``forward`` of each patched model class takes ``attention_mask`` positionally
#: (recorded at patch time: the hook must not inspect signatures under a tracer).
_MASK_POSITION: dict[type, int] = {}


def _mask_position(model_type: type[nn.Module]) -> int:
    parameters = list(inspect.signature(model_type.forward).parameters)
    return parameters.index("attention_mask") - 1 if "attention_mask" in parameters else -1


def _refuse_attention_mask(model: nn.Module, args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> None:
    """Forward pre-hook of a patched model: the caller's ``attention_mask``, by keyword or
    by position, cannot follow the pooled tokens (refused here, before transformers turns
    it into its own mask)."""
    position = _MASK_POSITION.get(type(model), -1)
    by_position = args[position] if 0 <= position < len(args) else None
    if kwargs.get("attention_mask") is not None or by_position is not None:
        raise ValueError("Token Pooling changes the number of tokens; a patched model "
                         "takes no attention_mask")


def patch_transformers(
    model: PreTrainedModel, keep: int | Sequence[int], method: Method = "wkmedoids",
    prop_attn: bool = True, trace_source: bool = False, placement: str = "attn",
    **options: Unpack[PoolOptions],
) -> PreTrainedModel:
    """Add Token Pooling to every layer of a Hugging Face transformers ViT, in place.

    Parameters
    ----------
    model : one of :data:`SUPPORTED_MODELS` (ViT, DeiT, DINOv2, DINOv2 with registers)
        With ``attn_implementation`` "eager" or "sdpa", without gradient checkpointing.
    keep : int or sequence of int
        Patch tokens left after each layer (one int for all layers, or one per layer, e.g.
        ``reference_models.schedules.PAPER_SCHEDULES["deits-level4"]``). A layer whose input
        has no more tokens than that does nothing.
    method, prop_attn, trace_source, placement, **options
        As in :func:`tokenpool_ops.timm.patch_timm`; ``tome_schedule`` gives ToMe's keep list.

    Returns
    -------
    The same model object, patched. :func:`unpatch_transformers` undoes it.

    Examples
    --------
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                    intermediate_size=64, image_size=32, patch_size=8)
    >>> model = patch_transformers(ViTForImageClassification(config).eval(), [10, 4])
    >>> out = model(torch.randn(1, 3, 32, 32), output_hidden_states=True)
    >>> [h.shape[1] for h in out.hidden_states]  # class token + patch tokens
    [17, 11, 5]
    """
    if hasattr(model, STATE):
        raise ValueError("model is already patched; call unpatch_transformers first")
    family = _checked_family(model)
    layers = _layers(model, family)
    state = new_state(family.num_prefix(model.config), keep, len(layers), method, prop_attn,
                      trace_source, placement, options)
    if isinstance(model, _AVERAGING_HEADS) and min(state["keep"]) == 0:
        raise ValueError(f"{type(model).__name__} averages the patch tokens of the last layer; "
                         "keep must leave at least one patch token in every layer")
    for layer, k in zip(layers, state["keep"], strict=True):
        layer.__class__ = family.patched_layer
        layer.attention.__class__ = family.patched_attention
        tp_layer = cast(TokenPoolLayer, layer)
        tp_layer._tp_state = tp_layer.attention._tp_state = state
        tp_layer._tp_keep = k
    layers[0].register_forward_pre_hook(_reset_before_first_layer)
    layers[-1].register_forward_hook(_reset_after_export)
    _MASK_POSITION[type(model)] = _mask_position(type(model))
    model.register_forward_pre_hook(_refuse_attention_mask, with_kwargs=True)
    setattr(model, STATE, state)
    return model


def unpatch_transformers(model: PreTrainedModel) -> PreTrainedModel:
    """Undo :func:`patch_transformers`: original classes, no hook, no added attribute.
    Returns the model."""
    if not hasattr(model, STATE):
        raise ValueError("model is not patched by patch_transformers")
    family = SUPPORTED_MODELS[type(model)]
    layers = _layers(model, family)
    for hooks, added in ((layers[0]._forward_pre_hooks, _reset_before_first_layer),
                         (layers[-1]._forward_hooks, _reset_after_export),
                         (model._forward_pre_hooks, _refuse_attention_mask)):
        for key in [key for key, hook in hooks.items() if hook is added]:
            del hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
    for layer in layers:
        tp_layer = cast(TokenPoolLayer, layer)
        del tp_layer._tp_state, tp_layer._tp_keep, tp_layer.attention._tp_state
        layer.__class__ = family.layer
        layer.attention.__class__ = family.attention
    delattr(model, STATE)
    return model
