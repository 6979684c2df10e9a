"""Models for the trainer: timm registrations and token downsampling.

Registered here (``timm.create_model`` knows them once this module is imported):

- ``deit_e318_patch16_224`` and ``deit_e252_patch16_224``: the paper's DeiT-S variants with
  embedding width 318 and 252. The paper gives only the width; everything else is DeiT-S
  (12 blocks, 6 heads, so head widths 53 and 42, MLP ratio 4, 224 px, patch 16).
- ``deit_digits_tiny_patch1_8``, ``deit_digits_small_patch1_8`` and
  ``deit_digits_tiny_patch2_16``: CPU-sized DeiTs for scikit-learn's 8x8 digits, kept at 8 px
  (patch 1) or upsampled to 16 px (patch 2); 64 patch tokens either way, so pooling has
  tokens to work on.

DeiT-Ti/S/B are timm's own ``deit_{tiny,small,base}_patch16_224``.

Pooling never has a second implementation: every ``--downsample`` choice but ``conv`` is a
method of :func:`tokenpool_ops.timm.patch_timm`; ``conv`` is the paper's convolution baseline
(Appendix D, :mod:`reference_models.conv`), a learned layer rather than a pooling.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from tokenpool_ops._pool import MERGING_METHODS
from tokenpool_ops.timm import patch_timm

from .conv import add_conv_downsampling, conv_after, conv_plan, parse_conv_depths
from .errors import ConfigError
from .schedules import PAPER_SCHEDULES

__all__ = [
    "DEFAULT_KEEP",
    "DOWNSAMPLERS",
    "DOWNSAMPLE_PREFIX",
    "KEEP_PRESETS",
    "TOKENPOOL_METHODS",
    "apply_downsample",
    "build_model",
    "downsample_schedule",
    "flop_options",
    "pool_method",
    "read_keep_file",
    "resolve_keep",
    "set_pool_seed",
]

# Parameters a downsampler adds to a model live in ``model.token_downsample`` (a ModuleDict),
# so their state_dict keys start with this and a base model's weights load around them.
DOWNSAMPLE_PREFIX = "token_downsample."
# The pooling methods of --downsample tokenpool, those of pool that merge tokens: the
# clustering methods and ToMe's matching ('tome'). The other choices are fixed methods.
TOKENPOOL_METHODS = MERGING_METHODS
# --downsample choice -> patch_timm method (None: no patching; "tokenpool": --method;
# "conv": no patch_timm method but the convolutions of reference_models/conv.py).
DOWNSAMPLERS: dict[str, str | None] = {
    "none": None,
    "tokenpool": "tokenpool",
    "powerbert": "topk",
    "random": "random",
    "importance": "importance",
    "conv": "conv",
}
# The trainer's --keep default; --downsample conv refuses any other (its convolutions set
# the token counts).
DEFAULT_KEEP = "linear"


def _cfg(**kwargs: Any) -> dict[str, Any]:
    """A pretrained cfg without weights: it tells resolve_data_config the input and norm."""
    return {"num_classes": 1000, "input_size": (3, 224, 224), "crop_pct": 0.875,
            "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj",
            "classifier": "head", **kwargs}


# Digits are gray strokes on black; 0.5/0.5 maps them to [-1, 1]. crop_pct 1: no border to
# crop at 8 px.
_DIGITS = {"num_classes": 10, "crop_pct": 1.0, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
default_cfgs = generate_default_cfgs({
    "deit_e318_patch16_224": _cfg(),
    "deit_e252_patch16_224": _cfg(),
    "deit_digits_tiny_patch2_16": _cfg(input_size=(3, 16, 16), **_DIGITS),
    "deit_digits_tiny_patch1_8": _cfg(input_size=(3, 8, 8), **_DIGITS),
    "deit_digits_small_patch1_8": _cfg(input_size=(3, 8, 8), **_DIGITS),
})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> VisionTransformer:
    """Build a registered variant through timm's builder (so pretrained cfgs resolve)."""
    return build_model_with_cfg(VisionTransformer, variant, pretrained, **kwargs)


@register_model
def deit_e318_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-e318: DeiT-S with embedding width 318 (the paper's appendix)."""
    args = {"patch_size": 16, "embed_dim": 318, "depth": 12, "num_heads": 6}
    return _create("deit_e318_patch16_224", pretrained, **{**args, **kwargs})


@register_model
def deit_e252_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-e252: DeiT-S with embedding width 252 (the paper's appendix)."""
    args = {"patch_size": 16, "embed_dim": 252, "depth": 12, "num_heads": 6}
    return _create("deit_e252_patch16_224", pretrained, **{**args, **kwargs})


def _digits(variant: str, pretrained: bool, args: dict[str, Any],
            kwargs: dict[str, Any]) -> VisionTransformer:
    """A digits model: timm's ``jax`` init and a positional embedding of std 0.5.

    Why: DeiT's init (std 0.02 for every linear layer and the positional embedding) starts
    at a saddle where q, k, v and the projections are all near zero; ImageNet's 300 epochs
    leave it, 1,437 digits sit at loss ln 10 for hundreds of steps. Xavier-initialised
    linear layers (``weight_init="jax"``) start off the saddle. And a patch of one gray
    pixel carries one number, so tokens differ almost only by position: std 0.5 makes
    position visible from the first step.
    """
    model = _create(variant, pretrained,
                    **{"num_classes": 10, "weight_init": "jax", **args, **kwargs})
    if not pretrained and model.pos_embed is not None:
        nn.init.trunc_normal_(model.pos_embed, std=0.5)
    return model


@register_model
def deit_digits_tiny_patch1_8(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """4 blocks of width 64 (4 heads) on the native 8 px digits, patch 1: 64 patch tokens."""
    args = {"img_size": 8, "patch_size": 1, "embed_dim": 64, "depth": 4, "num_heads": 4}
    return _digits("deit_digits_tiny_patch1_8", pretrained, args, kwargs)


@register_model
def deit_digits_small_patch1_8(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """6 blocks of width 128 (4 heads) on the native 8 px digits, patch 1: 64 patch tokens."""
    args = {"img_size": 8, "patch_size": 1, "embed_dim": 128, "depth": 6, "num_heads": 4}
    return _digits("deit_digits_small_patch1_8", pretrained, args, kwargs)


@register_model
def deit_digits_tiny_patch2_16(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """4 blocks of width 64 on digits upsampled to 16 px, patch 2: 64 patch tokens."""
    args = {"img_size": 16, "patch_size": 2, "embed_dim": 64, "depth": 4, "num_heads": 4}
    return _digits("deit_digits_tiny_patch2_16", pretrained, args, kwargs)


def build_model(name: str, num_classes: int, *, pretrained: bool = False,
                drop_path: float = 0.0, drop: float = 0.0,
                img_size: int | None = None) -> VisionTransformer:
    """Create a registered timm ViT, or raise :class:`ConfigError` for an unknown name.

    Only ``VisionTransformer`` models are accepted, since ``patch_timm`` patches those.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"--model {name!r}: unknown model{hint}")
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_path_rate": drop_path,
                              "drop_rate": drop}
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (RuntimeError, OSError) as err:
        # Offline pretrained downloads and models without weights end here.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--model {name!r}: cannot create the model: {first}") from err
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"--model {name!r} is a {type(model).__name__}; the trainer needs a "
                          "timm VisionTransformer (DeiT, ViT)")
    return model


def _linear(num_patches: int, depth: int) -> list[int]:
    """Block l (1-based) keeps N (L - l) / L patch tokens: the last keeps only the class."""
    return [round(num_patches * (depth - layer) / depth) for layer in range(1, depth + 1)]


def _half(num_patches: int, depth: int) -> list[int]:
    """Every block keeps half of the patch tokens: one halving, in the first block."""
    return [num_patches // 2] * depth


def _full(num_patches: int, depth: int) -> list[int]:
    """No block reduces: the patched model computes what the plain one does."""
    return [num_patches] * depth


# Keep presets: name -> f(patch tokens, depth) -> patch tokens left after each block.
# The paper's per-model schedules (its Tables 3-5) join this table in a later issue.
KEEP_PRESETS: dict[str, Callable[[int, int], list[int]]] = {
    "linear": _linear,
    "half": _half,
    "full": _full,
}


def read_keep_file(path: str) -> list[int]:
    """The ``"keep"`` list of a schedule file (``search_schedule`` writes them).

    A missing or malformed file is a one-line :class:`ConfigError`; lengths and values are
    the caller's to check.
    """
    try:
        keep = json.loads(Path(path).read_text())["keep"]
    except OSError as err:
        raise ConfigError(f"--keep {path!r}: cannot read the schedule file "
                          f"({err.strerror or type(err).__name__})") from None
    except (ValueError, KeyError, TypeError):  # not JSON, not an object, no "keep"
        keep = None
    if not isinstance(keep, list) or not all(
            isinstance(k, int) and not isinstance(k, bool) for k in keep):
        raise ConfigError(f"--keep {path!r} is no schedule file: JSON with a \"keep\" list "
                          "of integers")
    return keep


def resolve_keep(keep: str, num_patches: int, depth: int) -> list[int]:
    """Turn ``--keep`` into a schedule: a preset name, a paper schedule, a schedule file
    (``search_schedule``'s JSON, its ``"keep"`` list), one count, or one count per block.

    Examples
    --------
    >>> resolve_keep("linear", 64, 4)
    [48, 32, 16, 0]
    >>> resolve_keep("32", 64, 4)
    [32, 32, 32, 32]
    >>> resolve_keep("60,40,20,10", 64, 4)
    [60, 40, 20, 10]
    """
    text = keep.strip()
    if text in KEEP_PRESETS:
        return KEEP_PRESETS[text](num_patches, depth)
    if text in PAPER_SCHEDULES:  # the paper's Tables 3-5, for 12 blocks of 196 patches
        schedule = PAPER_SCHEDULES[text]
        if (num_patches, depth) != (196, len(schedule)):
            raise ConfigError(f"--keep {text} is a schedule for 196 patches in 12 blocks; "
                              f"this model has {num_patches} patches in {depth} blocks")
        return list(schedule)
    if text.endswith(".json") or Path(text).is_file():
        counts = read_keep_file(text)
    else:
        try:
            counts = [int(p) for p in text.replace(",", " ").split()]
        except ValueError:
            raise ConfigError(f"--keep {keep!r} is neither a preset ({', '.join(KEEP_PRESETS)}"
                              ", or a paper schedule such as deits-level4), nor a schedule "
                              "file, nor a list of integers") from None
    if len(counts) == 1:
        counts = counts * depth
    if len(counts) != depth or any(c < 0 for c in counts):
        raise ConfigError(f"--keep needs one non-negative count or {depth} of them (one per "
                          f"block), got {len(counts)}: {keep!r}")
    if max(counts) > num_patches:  # more than there are: a schedule for another model
        raise ConfigError(f"--keep {keep!r}: this model has {num_patches} patch tokens, so "
                          f"each count is 0 to {num_patches}")
    return counts


def downsample_schedule(model: VisionTransformer, downsample: str, method: str | None,
                        keep: str, *, conv_depths: str | None = None) -> list[int] | None:
    """Check the downsampling arguments against ``model`` without changing it; return the
    patch tokens left after each block (None: no downsampling).

    :func:`apply_downsample` starts with it; the trainer also runs it on a skeleton of the
    model on the meta device, so a bad schedule stops a run before any data is loaded.
    """
    if downsample not in DOWNSAMPLERS:
        raise ConfigError(f"unknown --downsample {downsample!r}; choose from "
                          f"{', '.join(DOWNSAMPLERS)}")
    fixed = DOWNSAMPLERS[downsample]
    if fixed != "tokenpool" and method is not None:
        raise ConfigError(f"--method applies to --downsample tokenpool only (--downsample "
                          f"{downsample} {'pools nothing' if fixed is None else 'uses ' + fixed})")
    if fixed != "conv" and conv_depths is not None:
        raise ConfigError("--conv-depths applies to --downsample conv only")
    if fixed == "conv":
        if keep != DEFAULT_KEEP:
            raise ConfigError(f"--keep {keep} does not apply to --downsample conv: each "
                              "convolution quarters the patch tokens; --conv-depths says where")
        rows, cols = model.patch_embed.grid_size
        # No --conv-depths parses to no blocks, which conv_plan refuses with its own line.
        return conv_plan((rows, cols), len(model.blocks),
                         parse_conv_depths(conv_depths or ""))[0]
    if fixed is None:
        return None
    _patch_method(downsample, method)
    return resolve_keep(keep, model.patch_embed.num_patches, len(model.blocks))


def _patch_method(downsample: str, method: str | None) -> str:
    """The ``patch_timm`` method of a pooling ``--downsample`` choice (``--method`` for
    tokenpool, wkmedoids by default)."""
    fixed = str(DOWNSAMPLERS[downsample])
    if fixed != "tokenpool":
        return fixed
    method = method or "wkmedoids"
    if method not in TOKENPOOL_METHODS:
        raise ConfigError(f"--method {method!r} is not a Token Pooling method; choose "
                          f"from {', '.join(TOKENPOOL_METHODS)}")
    return method


def apply_downsample(model: VisionTransformer, downsample: str, method: str | None,
                     keep: str, *, seed: int = 0, compiled: bool = False,
                     carry: bool = True, conv_depths: str | None = None) -> list[int] | None:
    """Patch the model's blocks with ``patch_timm``; return the keep schedule (None: none).

    ``compiled`` selects the pooling options the ``tokenpool_ops`` README gives for
    ``torch.compile`` (no value read on the host, a fixed number of iterations).
    ``carry`` is ``patch_timm``'s ``prop_attn`` (Appendix E). ``downsample="conv"`` adds
    convolutions after the blocks ``conv_depths`` names (``"1,3"``, 1-based) instead, and
    ``keep`` must be :data:`DEFAULT_KEEP`: the convolutions set the token counts. Bad
    arguments raise :class:`ConfigError` (:func:`downsample_schedule`).
    """
    schedule = downsample_schedule(model, downsample, method, keep, conv_depths=conv_depths)
    if DOWNSAMPLERS[downsample] == "conv":
        return add_conv_downsampling(model, parse_conv_depths(conv_depths or ""))
    if schedule is None:
        return None
    options: dict[str, Any] = {"seed": seed}
    if compiled:
        options.update(check_values=False, stop_early=False)
    patch_timm(model, schedule, method=_patch_method(downsample, method),  # type: ignore[arg-type]
               prop_attn=carry, **options)
    return schedule


def flop_options(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments of :func:`reference_models.flops.count` for how ``model``
    downsamples: its pooling method, and for convolutions the blocks they follow (the
    convolution runs after the block, so ``placement="block"``)."""
    after = conv_after(model)
    if not after:
        return {"method": pool_method(model)}
    return {"method": pool_method(model), "placement": "block", "conv_after": after}


def pool_method(model: nn.Module) -> str:
    """The ``tokenpool_ops.pool`` method a patched model runs ("none" when unpatched)."""
    state = getattr(model, "_tokenpool", None)
    return "none" if state is None else str(state["method"])


def set_pool_seed(model: nn.Module, seed: int) -> None:
    """Give the random downsamplers of a patched model a new seed (no-op when unpatched).

    ``pool`` draws random and importance selections from ``seed``; a fixed seed would pick
    the same token positions at every step, so training moves it on step by step.
    """
    state = getattr(model, "_tokenpool", None)
    if state is not None:
        state["options"]["seed"] = seed

