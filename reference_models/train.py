"""``python -m reference_models.train``: train a DeiT with optional token downsampling.

The recipe is DeiT's (``main.py`` of facebookresearch/deit), built from timm's factories:
``create_transform`` (RandAugment, random erasing, bicubic), ``Mixup`` with
``SoftTargetCrossEntropy``, ``create_optimizer_v2`` (AdamW), ``create_scheduler_v2``
(cosine with warm-up, stepped every update), ``ModelEmaV3``, ``RepeatAugSampler``, drop path
and gradient clipping. Defaults are DeiT's for ImageNet, CIFAR and folders; ``--data digits``
has its own (a 16 px model trained in minutes on two CPU cores). Every default is a flag,
and the resolved configuration is printed at start and written to ``OUTPUT/config.json``.

Resume is exact: ``OUTPUT/checkpoint.pt`` (written atomically after every epoch) holds the
model, EMA, optimizer, scheduler, grad scaler, epoch, update count, best accuracy and every
rank's RNG states (Python, NumPy, torch, CUDA). Samplers reshuffle from (seed, epoch) and
data-loader workers are seeded from the torch RNG at the start of each epoch, so a run
killed at any moment and resumed with ``--resume`` replays the interrupted epoch exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from . import data as data_mod
from .cli import (
    dest_of,
    existing_file,
    float_in,
    given_flags,
    int_at_least,
    writable_folder,
)
from .distributed import DistInfo, all_gather_objects, cleanup, init_distributed
from .engine import evaluate, train_one_epoch
from .errors import ConfigError
from .flops import ViTShape
from .flops import count as count_flops
from .models import (
    DEFAULT_KEEP,
    DOWNSAMPLE_PREFIX,
    DOWNSAMPLERS,
    KEEP_PRESETS,
    TOKENPOOL_METHODS,
    apply_downsample,
    build_model,
    downsample_schedule,
    flop_options,
)

__all__ = ["PROFILES", "RUN_FILES", "Parts", "build", "build_parser", "fit", "launch", "main",
           "run", "validate"]

# Defaults that depend on the data. "deit" follows DeiT's main.py (ImageNet, DeiT-S); the
# digits column trades DeiT's 300 ImageNet epochs for a run of a few CPU minutes, and
# drops what does not suit 8x8 digits (horizontal flips turn a 2 into a mirrored 2).
PROFILES: dict[str, dict[str, Any]] = {
    "deit": {
        "model": "deit_small_patch16_224", "epochs": 300, "batch_size": 64,
        "warmup_epochs": 5, "drop_path": 0.1, "model_ema_decay": 0.99996,
        "repeated_aug": True, "hflip": 0.5, "scale": [0.08, 1.0],
        "aa": "rand-m9-mstd0.5-inc1", "color_jitter": 0.3, "reprob": 0.25, "mixup": 0.8,
        "cutmix": 1.0, "smoothing": 0.1, "base_lr": 5e-4, "clip_grad": None,
        "weight_decay": 0.05, "threads": None, "model_ema_warmup": False,
    },
    "digits": {
        "model": "deit_digits_tiny_patch1_8", "epochs": 25, "batch_size": 32,
        "warmup_epochs": 1, "drop_path": 0.0, "model_ema_decay": 0.998,
        "repeated_aug": False, "hflip": 0.0, "scale": [0.7, 1.0],
        "aa": "rand-m3-mstd0.5-inc1", "color_jitter": 0.3, "reprob": 0.0, "mixup": 0.1,
        "cutmix": 0.0, "smoothing": 0.1, "base_lr": 16e-3, "clip_grad": 1.0,
        "weight_decay": 0.05, "threads": 1, "model_ema_warmup": True,
    },
}


# argparse types of the numeric flags (reference_models/cli.py).
_POSITIVE = float_in(0, low_open=True)
_NON_NEGATIVE = float_in(0)
_PROBABILITY = float_in(0, 1)
_RATE = float_in(0, 1, high_open=True)  # dropout, drop path, label smoothing: 1 keeps nothing
# timm schedulers; plateau steps once per epoch, and this trainer steps every update.
SCHEDULERS = ["cosine", "tanh", "step", "multistep", "poly"]
# timm's resize interpolations (random: one of bilinear and bicubic per image).
INTERPOLATIONS = ["bicubic", "bilinear", "nearest", "lanczos", "box", "hamming", "random"]
# What a training run writes into --output; a folder holding any of them holds a run.
RUN_FILES = ("config.json", "log.jsonl", "checkpoint.pt", "best.pt")


def _profile_of(data: str) -> str:
    return "digits" if data == "digits" else "deit"


def _d(key: str) -> str:
    """Help text for a data-dependent default."""
    return f"(default {PROFILES['deit'][key]}; with --data digits {PROFILES['digits'][key]})"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None (those say in their help what they become)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """Every flag of the trainer, with its default in the help text."""
    p = argparse.ArgumentParser(
        prog="python -m reference_models.train",
        description="Train a DeiT (timm ViT) with optional token downsampling through "
                    "tokenpool_ops.timm.patch_timm. Data-dependent defaults: DeiT's for "
                    "ImageNet-like data, small ones for --data digits.",
        formatter_class=_HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="digits",
                   help="digits (scikit-learn, embedded), cifar10, cifar100 (torchvision, "
                        "downloaded into --data-dir), or a folder with train/ and val/ "
                        "ImageFolder trees")
    g.add_argument("--data-dir", default="data",
                   help="where cifar10/cifar100 live (with those only)")
    g.add_argument("--workers", type=int_at_least(0), default=None,
                   help="data-loader processes per rank (default 0 on the CPU, 8 on CUDA)")
    g.add_argument("--input-size", type=int_at_least(1), default=None,
                   help="image side in pixels, a multiple of the patch size (default: the "
                        "model's)")
    g.add_argument("--train-limit", type=int_at_least(1), default=None, metavar="N",
                   help="train on the first N training images only (quick checks)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help=f"timm model name {_d('model')}")
    g.add_argument("--pretrained", action="store_true",
                   help="load timm's pretrained weights (needs the internet or a cache)")
    g.add_argument("--drop", type=_RATE, default=0.0, help="dropout rate")
    g.add_argument("--drop-path", type=_RATE, default=None, help=f"drop path {_d('drop_path')}")
    g = p.add_argument_group("token downsampling (through tokenpool_ops.timm.patch_timm)")
    g.add_argument("--downsample", default="none", choices=list(DOWNSAMPLERS),
                   help="none; tokenpool (clustering, --method); powerbert (top-k "
                        "significance scores); random; importance (sampled by score); conv "
                        "(2x2 stride-2 convolutions after the --conv-depths blocks, the "
                        "paper's Appendix D baseline; not through patch_timm)")
    g.add_argument("--method", default=None, choices=TOKENPOOL_METHODS,
                   help="Token Pooling method (default wkmedoids; --downsample tokenpool only)")
    g.add_argument("--keep", default=DEFAULT_KEEP,
                   help="patch tokens left after each block: a preset "
                        f"({', '.join(KEEP_PRESETS)}), a schedule of the paper's Tables 3-5 "
                        "(deits-, deite318-, deite252-level0 to level7, for 12 blocks of 196 "
                        "patches), one count for all blocks, or one count per block, "
                        "comma-separated, each at most the model's patch tokens; with "
                        "--downsample tokenpool, powerbert, random or importance only")
    g.add_argument("--conv-depths", default=None, metavar="BLOCKS",
                   help="with --downsample conv: the blocks after which a 2x2 stride-2 "
                        "convolution quarters the patch tokens, 1-based, strictly "
                        "increasing, comma-separated (1,3: after blocks 1 and 3; each "
                        "needs an even grid side)")
    g.add_argument("--carry", action=argparse.BooleanOptionalAction, default=True,
                   help="carry each pooled token's size into later blocks' attention "
                        "(log size added to the logits; Appendix E); --no-carry attends a "
                        "merged token as one token; with the --keep downsamplers only")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int_at_least(1), default=None, help=f"epochs {_d('epochs')}")
    g.add_argument("--batch-size", type=int_at_least(1), default=None,
                   help=f"images per rank and step {_d('batch_size')}")
    g.add_argument("--eval-batch-size", type=int_at_least(1), default=None,
                   help="images per rank in evaluation (default 2 x --batch-size)")
    g.add_argument("--lr", type=_POSITIVE, default=None,
                   help="learning rate (default --base-lr x total batch / --lr-base-size)")
    g.add_argument("--base-lr", type=_POSITIVE, default=None,
                   help=f"learning rate at a total batch of --lr-base-size {_d('base_lr')}")
    g.add_argument("--lr-base-size", type=int_at_least(1), default=512, help="batch of --base-lr")
    g.add_argument("--opt", default="adamw", help="timm optimizer name")
    g.add_argument("--opt-eps", type=_POSITIVE, default=1e-8, help="optimizer epsilon")
    g.add_argument("--momentum", type=_PROBABILITY, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=_NON_NEGATIVE, default=None,
                   help=f"weight decay {_d('weight_decay')}")
    g.add_argument("--clip-grad", type=_POSITIVE, default=None,
                   help=f"clip the gradient norm to this {_d('clip_grad')}")
    g.add_argument("--sched", default="cosine", choices=SCHEDULERS,
                   help="timm scheduler (stepped every update, so not plateau)")
    g.add_argument("--warmup-epochs", type=int_at_least(0), default=None,
                   help=f"linear warm-up {_d('warmup_epochs')}")
    g.add_argument("--warmup-lr", type=_NON_NEGATIVE, default=1e-6,
                   help="learning rate warm-up starts at")
    g.add_argument("--min-lr", type=_NON_NEGATIVE, default=1e-5, help="floor of the cosine")
    g = p.add_argument_group("augmentation and regularisation")
    g.add_argument("--aa", default=None,
                   help=f"timm auto-augment policy, '' for none {_d('aa')}")
    g.add_argument("--color-jitter", type=_NON_NEGATIVE, default=None,
                   help=f"colour jitter, used when --aa is empty {_d('color_jitter')}")
    g.add_argument("--hflip", type=_PROBABILITY, default=None,
                   help=f"horizontal flip probability {_d('hflip')}")
    g.add_argument("--scale", type=float_in(0, 1, low_open=True), nargs=2, default=None,
                   metavar=("MIN", "MAX"),
                   help=f"random-resized-crop area range {_d('scale')}")
    g.add_argument("--train-interpolation", default="bicubic", choices=INTERPOLATIONS,
                   help="training resize")
    g.add_argument("--reprob", type=_PROBABILITY, default=None,
                   help=f"random erasing probability {_d('reprob')}")
    g.add_argument("--remode", default="pixel", choices=["pixel", "rand", "const"],
                   help="random erasing fill")
    g.add_argument("--recount", type=int_at_least(1), default=1, help="random erasing count")
    g.add_argument("--repeated-aug", action=argparse.BooleanOptionalAction, default=None,
                   help=f"timm RepeatAugSampler (3 repeats) {_d('repeated_aug')}")
    g.add_argument("--smoothing", type=_RATE, default=None,
                   help=f"label smoothing {_d('smoothing')}")
    g.add_argument("--mixup", type=_NON_NEGATIVE, default=None, help=f"mixup alpha {_d('mixup')}")
    g.add_argument("--cutmix", type=_NON_NEGATIVE, default=None,
                   help=f"cutmix alpha {_d('cutmix')}")
    g.add_argument("--mixup-prob", type=_PROBABILITY, default=1.0, help="chance of mixing a batch")
    g.add_argument("--mixup-switch-prob", type=_PROBABILITY, default=0.5,
                   help="chance of cutmix instead of mixup when both are on")
    g.add_argument("--mixup-mode", default="batch", choices=["batch", "pair", "elem"],
                   help="mix per batch, pair or element")
    g.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=True,
                   help="keep an EMA of the weights (timm ModelEmaV3), evaluated every epoch")
    g.add_argument("--model-ema-decay", type=_PROBABILITY, default=None,
                   help=f"EMA decay {_d('model_ema_decay')}")
    g.add_argument("--model-ema-warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="ModelEmaV3 warm-up: decay 1 - (1 + update)^(-2/3) up to the EMA "
                        f"decay, so a short run's EMA follows the model {_d('model_ema_warmup')}")
    g = p.add_argument_group("running")
    g.add_argument("--output", default="output", help="folder for log, config, checkpoints")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT; bare --resume: OUTPUT/checkpoint.pt if "
                        "it exists, else start afresh")
    g.add_argument("--finetune", default=None, metavar="CHECKPOINT",
                   help="start from the weights of CHECKPOINT (checkpoint.pt or best.pt of "
                        "an earlier run) with a fresh optimizer and schedule, as stages 2-3 "
                        "of the paper's protocol do; modules a downsampler adds "
                        "(model.token_downsample) may be missing from it")
    g.add_argument("--eval", action="store_true",
                   help="only evaluate (the --resume or --finetune checkpoint, or the "
                        "--pretrained model)")
    g.add_argument("--seed", type=int_at_least(0), default=0, help="seed of everything random")
    g.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="mixed precision on CUDA (auto: bf16 where supported, else fp16 with "
                        "a grad scaler); always float32 on the CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--threads", type=int_at_least(1), default=None,
                   help="torch CPU threads per rank (default: CPU cores / ranks per node; "
                        "with --data digits 1, as its small matrices gain nothing from more)")
    g.add_argument("--check-sync", action="store_true",
                   help="after every step, check that all ranks hold identical weights, "
                        "and after every epoch that they drew disjoint shares of the "
                        "training set (debugging aid, slow)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm bars (default: when stderr is a terminal)")
    return p


def resolve_defaults(args: argparse.Namespace, dist: DistInfo) -> argparse.Namespace:
    """Fill data-dependent defaults and derived values (lr, workers, precision)."""
    for key, value in PROFILES[_profile_of(args.data)].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // dist.local_world)
    if args.workers is None:
        args.workers = 8 if dist.device.type == "cuda" else 0
    if args.eval_batch_size is None:
        args.eval_batch_size = 2 * args.batch_size
    args.total_batch_size = args.batch_size * dist.world
    args.lr_from_base = args.lr is None
    if args.lr_from_base:
        args.lr = args.base_lr * args.total_batch_size / args.lr_base_size
    if dist.device.type != "cuda" and args.amp == "auto":
        args.amp = "none"  # float32 on the CPU (validate refuses bf16 and fp16 there)
    elif args.amp == "auto":
        args.amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if args.progress is None:
        args.progress = sys.stderr.isatty()
    args.world_size = dist.world
    args.device_used = str(dist.device)
    return args


# --downsample choices that pool through patch_timm (--keep and --carry apply to them).
POOLING = tuple(name for name, method in DOWNSAMPLERS.items() if method not in (None, "conv"))
_TRAINING_ONLY = (
    "--epochs", "--lr", "--base-lr", "--lr-base-size", "--opt", "--opt-eps", "--momentum",
    "--weight-decay", "--clip-grad", "--sched", "--warmup-epochs", "--warmup-lr", "--min-lr",
    "--aa", "--color-jitter", "--hflip", "--scale", "--train-interpolation", "--reprob",
    "--remode", "--recount", "--repeated-aug/--no-repeated-aug", "--smoothing", "--mixup",
    "--cutmix", "--mixup-prob", "--mixup-switch-prob", "--mixup-mode",
    "--model-ema/--no-model-ema", "--model-ema-decay", "--model-ema-warmup/--no-model-ema-warmup",
    "--train-limit", "--drop", "--drop-path", "--check-sync")
# Flags that mean something only with others: (flags, when they apply, what to say if not).
# Checked on the resolved arguments, for the flags the command line gave.
_APPLIES_ONLY: list[tuple[tuple[str, ...], Callable[[argparse.Namespace], bool], str]] = [
    (("--method",), lambda a: a.downsample == "tokenpool",
     "applies to --downsample tokenpool only, not to --downsample {a.downsample}"),
    (("--keep", "--carry/--no-carry"), lambda a: a.downsample in POOLING,
     f"applies to --downsample {', '.join(POOLING)} only, not to --downsample "
     "{a.downsample}"),
    (("--conv-depths",), lambda a: a.downsample == "conv",
     "applies to --downsample conv only, not to --downsample {a.downsample}"),
    (("--data-dir",), lambda a: a.data in ("cifar10", "cifar100"),
     "applies to --data cifar10 and cifar100 only, not to --data {a.data}"),
    (("--base-lr", "--lr-base-size"), lambda a: a.lr_from_base,
     "sets the default learning rate only, and --lr gives it"),
    (_TRAINING_ONLY, lambda a: not a.eval, "does not apply with --eval, which only evaluates"),
    (("--model-ema-decay", "--model-ema-warmup/--no-model-ema-warmup"), lambda a: a.model_ema,
     "does not apply with --no-model-ema"),
    (("--color-jitter",), lambda a: not a.aa or "3a" in a.aa,
     "applies with --aa '' only: timm leaves colour jitter out under the policy {a.aa}"),
    (("--mixup-prob", "--mixup-mode"), lambda a: a.mixup > 0 or a.cutmix > 0,
     "applies only when --mixup or --cutmix is above 0"),
    (("--mixup-switch-prob",), lambda a: a.mixup > 0 and a.cutmix > 0,
     "applies only when both --mixup and --cutmix are above 0"),
    (("--remode", "--recount"), lambda a: a.reprob > 0, "applies only when --reprob is above 0"),
    (("--warmup-lr",), lambda a: a.warmup_epochs > 0,
     "applies only when --warmup-epochs is above 0"),
]


def _check_flags_apply(args: argparse.Namespace, given: set[str]) -> None:
    for flags, applies, why_not in _APPLIES_ONLY:
        for flag in flags:
            if dest_of(flag) in given and not applies(args):
                raise ConfigError(f"{flag} {why_not.format(a=args)}")
    if args.resume not in (None, "auto") and args.finetune is not None:
        raise ConfigError("--resume CHECKPOINT and --finetune CHECKPOINT both name the "
                          "starting weights; give one (bare --resume continues a finetuning "
                          "run from OUTPUT/checkpoint.pt)")


def _check_values(args: argparse.Namespace, given: set[str]) -> None:
    """Values that are wrong together, or that only timm can judge."""
    if not args.eval and (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise ConfigError(f"--batch-size {args.batch_size}: Mixup needs an even batch (or "
                          "--mixup 0 --cutmix 0)")
    if args.scale[0] > args.scale[1]:
        raise ConfigError(f"--scale {args.scale[0]:g} {args.scale[1]:g}: MIN is above MAX")
    # The next two only for values the user gave: a short run (--epochs 1 on DeiT's
    # defaults) or a small batch (lr below DeiT's floor) should not fail on defaults.
    if "warmup_epochs" in given and args.warmup_epochs > args.epochs:
        raise ConfigError(f"--warmup-epochs {args.warmup_epochs} is longer than the run "
                          f"(--epochs {args.epochs})")
    if "min_lr" in given and args.min_lr > args.lr:
        raise ConfigError(f"--min-lr {args.min_lr:g} is above the learning rate {args.lr:g} "
                          "(--lr, or --base-lr x total batch / --lr-base-size), so the "
                          "schedule would climb to it")
    if args.opt.lower().removeprefix("lookahead_") not in list_optimizers():
        raise ConfigError(f"--opt {args.opt!r} is no timm optimizer (adamw, sgd, lamb, ...: "
                          "timm.optim.list_optimizers())")
    if args.aa:
        try:
            create_transform(8, is_training=True, auto_augment=args.aa)
        except (AssertionError, ValueError, KeyError):
            raise ConfigError(f"--aa {args.aa!r} is no timm auto-augment policy (such as "
                              "rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original; '' for "
                              "none)") from None
    if args.amp in ("bf16", "fp16") and not args.device_used.startswith("cuda"):
        raise ConfigError(f"--amp {args.amp} needs a CUDA device; on {args.device_used} the "
                          "trainer runs float32")


def _check_model(args: argparse.Namespace) -> None:
    """The model, the input size and the downsampling, on a skeleton of the model."""
    with torch.device("meta"):  # shapes only: no weights, no memory, nothing downloaded
        skeleton = build_model(args.model, 1000, img_size=args.input_size)
    patch = tuple(skeleton.patch_embed.patch_size)
    if args.input_size is not None and any(args.input_size % side for side in patch):
        raise ConfigError(f"--input-size {args.input_size}: {args.model} cuts images into "
                          f"{patch[0]}x{patch[1]} px patches; use a multiple of {patch[0]}")
    downsample_schedule(skeleton, args.downsample, args.method, args.keep,
                        conv_depths=args.conv_depths)


def _check_paths(args: argparse.Namespace) -> None:
    """--data and the checkpoints exist; --output can be written and, unless resumed or
    only evaluated, holds no run (a checkpoint's contents are read later, by ``run``)."""
    data_mod.check_data(args.data)
    out = writable_folder("--output", args.output)
    checkpoint = _checkpoint_path(args)
    if args.finetune is not None:
        existing_file("--finetune", args.finetune, "checkpoint file")
    if args.eval and checkpoint is None and args.finetune is None and not args.pretrained:
        raise ConfigError("--eval needs weights to evaluate: --resume CHECKPOINT, "
                          "--finetune CHECKPOINT or --pretrained")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and args.resume is None and not args.eval:
        raise ConfigError(f"--output {args.output!r} holds another run ({', '.join(found)}); "
                          "name a new folder, or add --resume to continue that run")
    if args.data in ("cifar10", "cifar100"):
        writable_folder("--data-dir", args.data_dir)


def validate(args: argparse.Namespace, given: set[str]) -> None:
    """Every check across flags, against the model and on the disk, on the resolved
    ``args``; ``given`` names the flags the command line set (:func:`cli.given_flags`).

    The first failure raises :class:`ConfigError`, before any data is loaded or any file
    is written. A check on one flag alone is its parser ``type=`` or ``choices=``.
    """
    _check_flags_apply(args, given)
    _check_values(args, given)
    _check_model(args)
    _check_paths(args)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: never a half file."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _checkpoint_path(args: argparse.Namespace) -> Path | None:
    """The checkpoint --resume names, None to start afresh; ConfigError if it is missing."""
    if args.resume is None:
        return None
    if args.resume == "auto":
        path = Path(args.output) / "checkpoint.pt"
        return path if path.is_file() else None
    return existing_file("--resume", args.resume, "checkpoint file")


def _read_checkpoint(flag: str, path: Path) -> dict[str, Any]:
    """A checkpoint of this trainer, read on the CPU; ConfigError naming ``flag`` if not."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: any unpickling error
        raise ConfigError(f"{flag} {str(path)!r} is no readable checkpoint ({err})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ConfigError(f"{flag} {str(path)!r} is no checkpoint of this trainer")
    return ckpt


def _load_checkpoint(path: Path, model: nn.Module, *, need_state: bool) -> dict[str, Any]:
    """Load a checkpoint's weights into ``model``; ConfigError if it does not fit."""
    ckpt = _read_checkpoint("--resume", path)
    if need_state and "optimizer" not in ckpt:
        raise ConfigError(f"--resume {str(path)!r} holds weights only (best.pt?); resume "
                          "training from checkpoint.pt, or add --eval")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"--resume {str(path)!r} does not fit --model: {first}") from None
    return ckpt


def _load_finetune(path_text: str, model: nn.Module) -> None:
    """Load a checkpoint's model weights into ``model`` for finetuning.

    Keys may differ only under ``token_downsample.``: the parameters a downsampler adds
    (convolutions, soft-extract retention) are new when finetuning a base model, and left
    over when finetuning from a schedule search.
    """
    ckpt = _read_checkpoint("--finetune", existing_file("--finetune", path_text,
                                                        "checkpoint file"))
    weights = {k: v for k, v in ckpt["model"].items() if not k.startswith(DOWNSAMPLE_PREFIX)}
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"--finetune {path_text!r} does not fit --model: {first}") from None
    missing = [k for k in missing if not k.startswith(DOWNSAMPLE_PREFIX)]
    if missing or unexpected:
        raise ConfigError(f"--finetune {path_text!r} does not fit --model: missing "
                          f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")


def _amp_dtype(args: argparse.Namespace) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)


def _criterion(args: argparse.Namespace) -> tuple[nn.Module, Mixup | None]:
    """DeiT's loss: soft targets under Mixup/CutMix, else label smoothing."""
    if args.mixup > 0 or args.cutmix > 0:  # an even batch: validate checked it
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                      switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                      label_smoothing=args.smoothing, num_classes=args.num_classes)
        return SoftTargetCrossEntropy(), mixup
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing), None
    return nn.CrossEntropyLoss(), None


def _epoch_of(line: str) -> int | None:
    """The epoch of a log line; None for a line torn by a kill in the middle of writing."""
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return None


def _truncate_log(path: Path, epochs_done: int) -> None:
    """Drop log lines of epochs a resumed run will redo (written after the checkpoint)."""
    if not path.is_file():
        return
    lines = []
    for line in path.read_text().splitlines():
        epoch = _epoch_of(line)
        if epoch is not None and epoch < epochs_done:
            lines.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


@dataclass
class Parts:
    """Everything one rank trains with; ``net`` is ``model`` under DDP / compile wrappers."""

    model: nn.Module
    net: nn.Module
    sampler: Any
    train_loader: DataLoader[Any]
    val_loader: DataLoader[Any]
    criterion: nn.Module
    mixup: Mixup | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: ModelEmaV3 | None
    scaler: torch.amp.GradScaler


def build(args: argparse.Namespace, dist: DistInfo,
          prepare: Callable[[nn.Module], list[dict[str, Any]] | None] | None = None) -> Parts:
    """Model (downsampled through patch_timm), data, loss, optimizer, schedule, EMA.

    ``prepare`` (``search_schedule``'s soft-extract layers) changes the model before it is
    moved, optimised and wrapped, and may return the optimizer's parameter groups (None:
    timm's weight-decay groups of the model), so that parameters it adds get their own.
    """
    device = dist.device
    # One seed on every rank for the model (DDP also broadcasts rank 0's weights).
    _seed_all(args.seed)
    model = build_model(args.model, 1000, pretrained=args.pretrained,
                        drop_path=args.drop_path, drop=args.drop, img_size=args.input_size)
    size = {} if args.input_size is None else {"input_size": (3, args.input_size,
                                                              args.input_size)}
    data_config = resolve_data_config(size, model=model)  # --input-size, else the model's
    train_set, val_set, args.num_classes = data_mod.build_datasets(
        args.data, args.data_dir, data_mod.build_transform(args, data_config, True),
        data_mod.build_transform(args, data_config, False))
    if args.train_limit is not None:
        train_set = data_mod.first(train_set, args.train_limit)
    model.reset_classifier(args.num_classes)
    args.keep_schedule = apply_downsample(model, args.downsample, args.method, args.keep,
                                          seed=args.seed, compiled=args.compile,
                                          carry=args.carry, conv_depths=args.conv_depths)
    if args.finetune is not None:
        _load_finetune(args.finetune, model)
    param_groups = prepare(model) if prepare is not None else None
    # The project's FLOP counter (the paper's counting); clustering is logged apart.
    flop_count = count_flops(ViTShape.of(model), args.keep_schedule, **flop_options(model))
    args.gflops, args.gflops_clustering = flop_count.total, flop_count.clustering
    model.to(device)
    criterion, mixup = _criterion(args)

    sampler: Any = data_mod.train_sampler(train_set, world=dist.world, rank=dist.rank,
                                          repeated_aug=args.repeated_aug, seed=args.seed)
    if args.check_sync:
        sampler = data_mod.RecordingSampler(sampler)
    train_loader, val_loader = data_mod.build_loaders(
        train_set, data_mod.val_shard(val_set, world=dist.world, rank=dist.rank), sampler,
        batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        workers=args.workers, pin_memory=device.type == "cuda")
    if len(train_loader) == 0:
        raise ConfigError(f"--batch-size {args.batch_size} exceeds this rank's "
                          f"{len(sampler)} training images")

    optimizer = create_optimizer_v2(model if param_groups is None else param_groups,
                                    opt=args.opt, lr=args.lr, eps=args.opt_eps,
                                    weight_decay=args.weight_decay, momentum=args.momentum)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, step_on_epochs=False,
        updates_per_epoch=len(train_loader))
    ema = (ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
           if args.model_ema else None)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    net: nn.Module = model
    if dist.distributed:
        net = DistributedDataParallel(model, device_ids=[device.index]
                                      if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)  # type: ignore[assignment]
    return Parts(model, net, sampler, train_loader, val_loader, criterion, mixup, optimizer,
                 scheduler, ema, scaler)


def _restore(parts: Parts, ckpt: dict[str, Any]) -> tuple[int, int, float]:
    """Load the training state; return (first epoch to run, updates done, best accuracy)."""
    if parts.ema is not None and ckpt.get("ema") is not None:
        parts.ema.load_state_dict(ckpt["ema"])
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    parts.scheduler.load_state_dict(ckpt["scheduler"])
    parts.scaler.load_state_dict(ckpt["scaler"])
    return ckpt["epoch"] + 1, ckpt["num_updates"], ckpt["best_acc1"]


def run(args: argparse.Namespace, dist: DistInfo) -> None:
    """Build everything from ``args``, then train (or only evaluate)."""
    parts = build(args, dist)
    ckpt_path = _checkpoint_path(args)
    ckpt = (None if ckpt_path is None else
            _load_checkpoint(ckpt_path, parts.model, need_state=not args.eval))
    out = Path(args.output)
    if dist.is_main:
        print(json.dumps(vars(args), indent=1, default=str), flush=True)
        out.mkdir(parents=True, exist_ok=True)
    if args.eval:
        stats = evaluate(parts.net, parts.val_loader, device=dist.device,
                         amp_dtype=_amp_dtype(args), pool_seed=args.seed,
                         progress=args.progress and dist.is_main)
        if dist.is_main:
            print(json.dumps(stats), flush=True)
        return

    start_epoch, num_updates, best_acc1 = 0, 0, -1.0
    # A seed per rank for augmentation, Mixup and drop path (as DeiT), or the saved states.
    _seed_all(args.seed + dist.rank)
    if ckpt is not None:
        start_epoch, num_updates, best_acc1 = _restore(parts, ckpt)
        if len(ckpt["rng"]) == dist.world:
            _set_rng_state(ckpt["rng"][dist.rank], dist.device)
        elif dist.is_main:
            print(f"resume: checkpoint from {len(ckpt['rng'])} ranks, now {dist.world}: RNG "
                  "states reseeded, so the run is no longer bit-exact", flush=True)
        if dist.is_main:
            print(f"resumed from {ckpt_path} after epoch {start_epoch - 1}", flush=True)
    if dist.is_main:
        (out / "config.json").write_text(json.dumps(vars(args), indent=1, default=str) + "\n")
        _truncate_log(out / "log.jsonl", start_epoch)
    fit(args, dist, parts, start_epoch, num_updates, best_acc1)


def fit(args: argparse.Namespace, dist: DistInfo, parts: Parts, start_epoch: int,
        num_updates: int, best_acc1: float) -> None:
    """The epoch loop: train, evaluate (model and EMA), log and checkpoint (rank 0)."""
    device, amp_dtype, out = dist.device, _amp_dtype(args), Path(args.output)
    progress = args.progress and dist.is_main
    ema = parts.ema
    for epoch in range(start_epoch, args.epochs):
        parts.sampler.set_epoch(epoch)
        lr = parts.optimizer.param_groups[0]["lr"]
        train = train_one_epoch(
            parts.net, parts.criterion, parts.train_loader, parts.optimizer, parts.scheduler,
            device=device, num_updates=num_updates, mixup=parts.mixup, amp_dtype=amp_dtype,
            scaler=parts.scaler, clip_grad=args.clip_grad, ema=ema,
            pool_seed=(args.seed * 1_000_003 + dist.rank) * 1_000_003,
            check_sync=args.check_sync, progress=progress, desc=f"epoch {epoch}")
        num_updates = int(train["num_updates"])
        if args.check_sync:
            _check_shares(args, parts.sampler, epoch)
        val = evaluate(parts.net, parts.val_loader, device=device, amp_dtype=amp_dtype,
                       pool_seed=args.seed, progress=progress)
        record: dict[str, Any] = {
            "epoch": epoch, "train_loss": train["train_loss"], "val_loss": val["val_loss"],
            "val_acc1": val["val_acc1"], "lr": lr, "images_per_s": train["images_per_s"],
            "gflops": args.gflops, "gflops_clustering": args.gflops_clustering,
            "train_images": train["train_images"],
            "val_images": val["val_images"]}
        if ema is not None:
            record["val_acc1_ema"] = evaluate(
                ema.module, parts.val_loader, device=device, amp_dtype=amp_dtype,
                pool_seed=args.seed, progress=progress, desc="val ema")["val_acc1"]
        # Every rank's RNG states, gathered before anything below draws again.
        rng = all_gather_objects(_rng_state(device))
        is_best = record["val_acc1"] > best_acc1
        best_acc1 = max(best_acc1, record["val_acc1"])
        if dist.is_main:
            _write_epoch(out, record, is_best, {
                "model": parts.model.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "optimizer": parts.optimizer.state_dict(),
                "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(),
                "epoch": epoch, "num_updates": num_updates, "best_acc1": best_acc1,
                "rng": rng, "config": vars(args)})


def _check_shares(args: argparse.Namespace, sampler: data_mod.RecordingSampler,
                  epoch: int) -> None:
    """--check-sync: the ranks drew disjoint shares of this epoch (every rank raises if not)."""
    one = data_mod.train_sampler(sampler.inner.dataset, world=1, rank=0,
                                 repeated_aug=args.repeated_aug, seed=args.seed)
    one.set_epoch(epoch)
    data_mod.assert_shares_partition(all_gather_objects(sampler.drawn), [int(i) for i in one])


def _write_epoch(out: Path, record: dict[str, Any], is_best: bool,
                 checkpoint: dict[str, Any]) -> None:
    """best.pt, then the log line, then checkpoint.pt: a crash in between loses nothing.

    A resumed run redoes every epoch after its checkpoint and drops their log lines first.
    """
    if is_best:
        _atomic_save({k: checkpoint[k] for k in ("model", "ema", "epoch", "config")}
                     | {"val_acc1": record["val_acc1"]}, out / "best.pt")
    with open(out / "log.jsonl", "a") as log:
        log.write(json.dumps(record) + "\n")
    _atomic_save(checkpoint, out / "checkpoint.pt")
    print(json.dumps(record), flush=True)


def _set_cpu_threads(threads: int) -> None:
    """Give torch and the Numba pooling kernels the same number of CPU threads.

    Numba's parallel kernels otherwise start one thread per core in every rank: with two
    ranks, or any other load, on two cores, a pooled digits epoch ran 13x slower (25
    instead of ~300 images/s, measured) as the threads waited for each other.
    """
    torch.set_num_threads(threads)
    try:
        import numba
    except ImportError:  # the pooling then runs on torch alone
        return
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]


def launch(parser: argparse.ArgumentParser,
           runner: Callable[[argparse.Namespace, DistInfo], object],
           argv: list[str] | None = None, *,
           checks: Callable[[argparse.Namespace, set[str]], None] | None = None) -> int:
    """Parse ``argv``, join torchrun's process group, fill the defaults, check everything
    (``checks``, default :func:`validate`), set the CPU threads and call ``runner``; bad
    input exits with status 2 and one message. Shared by the trainer and the schedule
    search."""
    args = parser.parse_args(argv)
    given = given_flags(parser, argv)
    try:
        dist = init_distributed(args.device)
        args = resolve_defaults(args, dist)
        (checks or validate)(args, given)
        _set_cpu_threads(args.threads)
        runner(args, dist)
    except ConfigError as err:
        parser.error(str(err))
    finally:
        cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, train, return 0; bad input exits with status 2 and one message."""
    return launch(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
