"""``python -m reference_models.search_schedule``: PoWER-BERT's search for a keep schedule.

Stage 2 of the paper's training protocol (§5 "Training protocol", Appendix C): finetune the
base model with PoWER-BERT's soft-extract layers (Goyal et al. 2020, §3) and read the keep
schedule ``K = (K_1, ..., K_L)`` off them. Stage 3 trains with ``--keep OUTPUT/schedule.json``.
Everything else (flags, data, recipe, epoch loop, checkpoints) is the trainer's.

Soft extract, as we read PoWER-BERT §3. In block ``l`` (1-based), between attention and MLP
(where ``patch_timm`` pools by default), the patch tokens are sorted by their significance
scores in decreasing order, Eq. 5: ``s = sum_h A_h^T 1``, the attention a patch token
receives, summed over heads and over every query, the class query included (as
``patch_timm`` scores). Ties keep the lower index first. The token of rank ``j`` is
multiplied by ``r_l[j]``, a retention parameter in [0, 1], initialised to 1 (the finetuning
starts from the base model's function) and clamped to [0, 1] after every optimizer step.
Prefix tokens (``model.num_prefix_tokens``: the class token) are never touched. Nothing is
pooled: a token multiplied by 0 still takes part in later blocks, as in PoWER-BERT.

Loss (PoWER-BERT's, with our normalisation)::

    L = L_task + lambda / N * sum_l l * mass(l),    mass(l) = sum_j r_l[j]

PoWER-BERT weighs block ``l``'s mass by its index ``l`` so that later blocks drop more. The
``1 / N`` (N patch tokens) is our choice: ``lambda`` is then the penalty per block index for
keeping every token, so one value means the same for 64 or 196 patches.

Schedule: ``K_l = ceil(mass(l))`` (PoWER-BERT's retention configuration), then the cumulative
minimum over blocks (a token removed cannot come back) clipped to [0, N].
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, cast

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn

from tokenpool_ops import significance_scores

from . import train
from .cli import dest_of, float_in, new_file
from .distributed import DistInfo
from .errors import ConfigError

__all__ = ["Retention", "RetentionPenalty", "SoftExtractBlock", "add_soft_extract",
           "build_parser", "keep_schedule", "main", "soft_extract", "validate"]

# Where the forward hook on ``attn.attn_drop`` leaves the attention probabilities for the block.
_PROBS = "_soft_extract_probs"


class Retention(nn.Module):
    """PoWER-BERT's retention parameters: ``weight[l, j]`` multiplies block l's token of rank j.

    Lives in ``model.token_downsample["retention"]``, so its state_dict key
    (``token_downsample.retention.weight``) is one ``train.py --finetune`` skips.
    """

    def __init__(self, depth: int, num_patches: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(depth, num_patches))

    @torch.no_grad()
    def clamp_(self) -> None:
        """Back into [0, 1], after every optimizer step."""
        self.weight.clamp_(0.0, 1.0)

    def masses(self) -> Tensor:
        """``mass(l) = sum_j r_l[j]``, one per block."""
        return self.weight.sum(dim=1)


def soft_extract(patches: Tensor, scores: Tensor, retention: Tensor) -> Tensor:
    """Multiply the patch token of rank j (by decreasing score) by ``retention[j]``.

    ``patches`` (B, N, M), ``scores`` (B, N), ``retention`` (N,). Equal scores keep the lower
    index first.

    Examples
    --------
    >>> patches = torch.ones(1, 3, 1)
    >>> soft_extract(patches, torch.tensor([[0.2, 0.7, 0.1]]), torch.tensor([1.0, 0.5, 0.0]))
    tensor([[[0.5000],
             [1.0000],
             [0.0000]]])
    """
    order = scores.argsort(dim=-1, descending=True, stable=True)
    factors = torch.zeros_like(scores, dtype=retention.dtype).scatter(
        -1, order, retention.expand_as(order))
    return patches * factors.unsqueeze(-1).to(patches.dtype)


class SoftExtractBlock(Block):
    """timm ``Block`` with a soft-extract layer between attention and MLP.

    A block forward, not a hook: the MLP's residual must add to the multiplied tokens, and
    no hook on ``attn`` or ``mlp`` sees that sum. The attention itself stays timm's; with
    ``fused_attn`` off its probabilities pass ``attn_drop``, whose forward hook hands them
    over (:func:`_keep_probabilities`).
    """

    _se_layer: int
    _se_prefix: int
    _se_retention: Retention  # not a submodule: registered once, in model.token_downsample

    def forward(self, x: Tensor, attn_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        y = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop_path1(self.ls1(y))
        probs = self.attn.attn_drop.__dict__.pop(_PROBS)
        p = self._se_prefix
        scores = significance_scores(probs.detach()[..., p:])  # Eq. 5, patch keys only
        patches = soft_extract(x[:, p:], scores, self._se_retention.weight[self._se_layer])
        x = torch.cat([x[:, :p], patches], dim=1)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _keep_probabilities(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
    """Forward hook on ``attn.attn_drop``: its input is the attention probabilities.

    It stores them on the module that ran, never in a closure, so the EMA's deep copy of the
    model hands its own probabilities to its own blocks.
    """
    module.__dict__[_PROBS] = args[0]


def add_soft_extract(model: VisionTransformer) -> Retention:
    """Give every block of a timm ViT a soft-extract layer; return the retention module."""
    blocks = list(model.blocks)
    for i, block in enumerate(blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            raise ConfigError(f"block {i} is {type(block).__name__}; the schedule search needs "
                              "timm Block with Attention (a DeiT or ViT)")
    retention = Retention(len(blocks), model.patch_embed.num_patches)
    if not hasattr(model, "token_downsample"):
        model.token_downsample = nn.ModuleDict()
    cast(nn.ModuleDict, model.token_downsample)["retention"] = retention
    for layer, block in enumerate(blocks):
        block.__class__ = SoftExtractBlock
        extract = cast(SoftExtractBlock, block)
        attn = cast(Attention, extract.attn)
        attn.fused_attn = False  # type: ignore[misc]  # probabilities then pass attn_drop
        attn.attn_drop.register_forward_hook(_keep_probabilities)
        extract._se_layer, extract._se_prefix = layer, model.num_prefix_tokens
        object.__setattr__(block, "_se_retention", retention)  # no second registration
    return retention


def _param_groups(model: nn.Module, retention: Retention,
                  args: argparse.Namespace) -> list[dict[str, Any]]:
    """timm's weight-decay groups for the model's own parameters, and the retention in a
    group of its own: ``--retention-lr``, no weight decay. The scheduler's warm-up and
    cosine scale every group's peak alike."""
    no_decay: set[str] = getattr(model, "no_weight_decay", set)()
    groups = param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=no_decay)
    for group in groups:
        group["params"] = [p for p in group["params"] if p is not retention.weight]
    return [*groups, {"params": [retention.weight], "lr": args.retention_lr,
                      "weight_decay": 0.0}]


def _prepare(model: nn.Module, args: argparse.Namespace) -> list[dict[str, Any]]:
    """``train.build``'s hook: soft extract in, the optimizer's parameter groups out."""
    assert isinstance(model, VisionTransformer)  # train.build_model ensures it
    return _param_groups(model, add_soft_extract(model), args)


class RetentionPenalty(nn.Module):
    """The task loss plus ``lam / N * sum_l l * mass(l)`` (PoWER-BERT, see the docstring)."""

    def __init__(self, task: nn.Module, retention: Retention, lam: float) -> None:
        super().__init__()
        self.task, self.retention, self.lam = task, retention, lam

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        weight = self.retention.weight
        depth, num_patches = weight.shape
        index = torch.arange(1, depth + 1, device=weight.device, dtype=weight.dtype)
        penalty = (index * self.retention.masses()).sum() * (self.lam / num_patches)
        return self.task(logits, targets) + penalty


def keep_schedule(masses: list[float], num_patches: int) -> list[int]:
    """``ceil(mass(l))``, made non-increasing (cumulative minimum) and clipped to [0, N].

    >>> keep_schedule([63.2, 64.0, 20.5, 30.0], 64)
    [64, 64, 21, 21]
    """
    keep, smallest = [], num_patches
    for mass in masses:
        smallest = min(smallest, max(0, math.ceil(mass)))
        keep.append(smallest)
    return keep


def build_parser() -> argparse.ArgumentParser:
    """The trainer's flags, plus λ, the retention learning rate and the schedule file."""
    p = train.build_parser()
    p.prog = "python -m reference_models.search_schedule"
    p.description = ("PoWER-BERT's schedule search (stage 2 of the paper's protocol): "
                     "finetune with soft-extract layers (start from a base model with "
                     "--finetune), then write the keep schedule for --keep. Every trainer "
                     "flag applies but the downsampling ones, --resume and --eval.")
    g = p.add_argument_group("schedule search (PoWER-BERT soft extract)")
    g.add_argument("--lam", type=float_in(0), default=0.03,
                   help="λ: weight of the retention penalty λ / N Σ_l l · mass(l); larger "
                        "keeps fewer tokens (README: a digits sweep)")
    g.add_argument("--retention-lr", type=float_in(0, low_open=True), default=1e-2,
                   help="peak learning rate of the retention parameters (their own AdamW "
                        "group, no weight decay, the same warm-up and cosine); chosen on "
                        "digits (README)")
    g.add_argument("--schedule-out", default=None,
                   help="where the schedule JSON goes, a new file (default "
                        "OUTPUT/schedule.json)")
    return p


# Trainer flags the search refuses: it finetunes with its own soft-extract layers, afresh.
_NOT_FOR_SEARCH = ("--downsample", "--method", "--keep", "--carry/--no-carry", "--conv-depths",
                   "--resume", "--eval")


def validate(args: argparse.Namespace, given: set[str]) -> None:
    """The trainer's checks (:func:`train.validate`), the flags the search refuses, and a
    schedule file that overwrites nothing; ConfigError for the first that fails."""
    for flag in _NOT_FOR_SEARCH:
        if dest_of(flag) in given:
            raise ConfigError(f"{flag} does not apply to the schedule search (it finetunes "
                              "with soft-extract layers; start from a base model with "
                              "--finetune)")
    train.validate(args, given)
    new_file("--schedule-out", args.schedule_out or str(Path(args.output) / "schedule.json"))


def run(args: argparse.Namespace, dist: DistInfo) -> dict[str, Any]:
    """Finetune with soft extract (the trainer's loop); write and return the schedule."""
    parts = train.build(args, dist, lambda model: _prepare(model, args))
    retention = cast(Retention, parts.model.get_submodule("token_downsample.retention"))
    parts.criterion = RetentionPenalty(parts.criterion, retention, args.lam)
    parts.optimizer.register_step_post_hook(lambda *_: retention.clamp_())
    out = Path(args.output)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        config = json.dumps(vars(args), indent=1, default=str)
        print(config, flush=True)
        (out / "config.json").write_text(config + "\n")
    train._seed_all(args.seed + dist.rank)  # as train.run: augmentation differs per rank
    train.fit(args, dist, parts, 0, 0, -1.0)
    masses = retention.masses().tolist()
    schedule = {"keep": keep_schedule(masses, retention.weight.shape[1]), "masses": masses,
                "lam": args.lam, "model": args.model, "epochs": args.epochs,
                "val_acc1": _last_val_acc1(out) if dist.is_main else None}
    if dist.is_main:
        path = Path(args.schedule_out or out / "schedule.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(schedule) + "\n")
        print(json.dumps(schedule), flush=True)
    return schedule


def _last_val_acc1(out: Path) -> float:
    """The final epoch's ``val_acc1`` from the trainer's log."""
    lines = (out / "log.jsonl").read_text().splitlines()
    return float(json.loads(lines[-1])["val_acc1"])


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, search, return 0; bad input exits with status 2 and one message."""
    return train.launch(build_parser(), run, argv, checks=validate)


if __name__ == "__main__":
    sys.exit(main())
