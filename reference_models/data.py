"""Datasets, DeiT transforms and (distributed) samplers.

``--data`` chooses the images:

- ``digits``: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes),
  nothing downloaded. Fixed split: ``train_test_split(range(1797), test_size=360,
  stratify=labels, random_state=0)``, so 1,437 training and 360 validation images (about
  36 per class). Pixels 0..16 become gray 8-bit RGB images, then take the same timm
  transforms as any other dataset, resized to the model's input size (8 px for the default
  model: no upsampling; 16 px for ``deit_digits_tiny_patch2_16``).
- ``cifar10`` / ``cifar100``: torchvision, downloaded into ``--data-dir`` where online.
- any other value: a folder with ``train/`` and ``val/`` ImageFolder trees (the ImageNet
  layout), the same classes in both.

Validation is sharded without padding (rank r evaluates images r, r + world, ...), so
summing correct counts over ranks gives the accuracy on exactly the whole validation set.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from timm.data import auto_augment, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision import datasets

from .errors import ConfigError

__all__ = [
    "DIGITS_VAL_SIZE",
    "DigitsDataset",
    "build_datasets",
    "build_loaders",
    "build_transform",
    "check_data",
    "digits_split",
    "train_sampler",
    "val_shard",
]

DIGITS_VAL_SIZE = 360
_DIGITS_SEED = 0


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize, with 0 bits kept meaning a black image again.

    Why: RandAugment's increasing posterize keeps 4 - int(m / 10 * 4) bits, 0 at magnitude
    10, which DeiT's ``rand-m9-mstd0.5-inc1`` reaches now and then. Older Pillow turned 0
    bits into a black image; Pillow 13 raises ValueError, which would end a training run.
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return _timm_posterize(img, bits_to_keep, **kwargs)


_timm_posterize = auto_augment.posterize
for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    if auto_augment.NAME_TO_OP.get(_name) is _timm_posterize:
        auto_augment.NAME_TO_OP[_name] = _posterize


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed digits split: ``(train_images, train_labels, val_images, val_labels)``.

    Images are uint8 arrays (n, 8, 8) scaled from scikit-learn's 0..16 to 0..255.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=DIGITS_VAL_SIZE,
                                          stratify=labels, random_state=_DIGITS_SEED)
    return images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]


class DigitsDataset(Dataset[tuple[Any, int]]):
    """8x8 digits as RGB PIL images, so timm's PIL transforms apply unchanged."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Any = None) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform
        self.classes = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image: Any = Image.fromarray(self.images[index], mode="L").convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def build_transform(args: Any, data_config: dict[str, Any], is_training: bool) -> Any:
    """timm's DeiT transform (RandAugment, random erasing, bicubic) or the eval transform."""
    size = data_config["input_size"]
    if not is_training:
        return create_transform(size, is_training=False,
                                interpolation=data_config["interpolation"],
                                mean=data_config["mean"], std=data_config["std"],
                                crop_pct=data_config["crop_pct"])
    return create_transform(
        size, is_training=True, scale=tuple(args.scale), hflip=args.hflip,
        color_jitter=args.color_jitter, auto_augment=args.aa or None,
        interpolation=args.train_interpolation, mean=data_config["mean"],
        std=data_config["std"], re_prob=args.reprob, re_mode=args.remode,
        re_count=args.recount)


def _image_folders(root: Path, train_tf: Any, val_tf: Any) -> tuple[Dataset[Any],
                                                                     Dataset[Any], int]:
    """``root/train`` and ``root/val`` ImageFolders with the same classes, or ConfigError."""
    check_data(str(root))
    folders: dict[str, datasets.ImageFolder] = {}
    for split, tf in (("train", train_tf), ("val", val_tf)):
        path = root / split
        try:
            folders[split] = datasets.ImageFolder(str(path), transform=tf)
        except FileNotFoundError as err:  # no class folders, or no image in any of them
            raise ConfigError(f"--data {split}/ folder {str(path)!r}: {err}") from None
    train_classes, val_classes = folders["train"].classes, folders["val"].classes
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise ConfigError(f"--data {str(root)!r}: train/ and val/ classes differ (only in "
                          f"train: {only_train[:5]}, only in val: {only_val[:5]})")
    return folders["train"], folders["val"], len(train_classes)


def check_data(data: str) -> None:
    """``--data`` names digits, CIFAR, or a folder with ``train/`` and ``val/``; ConfigError
    if not. Looks at the folders only, so the trainer checks it before loading anything."""
    if data in ("digits", "cifar10", "cifar100"):
        return
    root = Path(data)
    if not root.is_dir():
        raise ConfigError(f"--data {data!r} is neither digits, cifar10, cifar100 nor an "
                          "existing folder")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ConfigError(f"--data {data!r} has no {split}/ folder; expected "
                              "train/CLASS/*.jpg and val/CLASS/*.jpg (the ImageNet layout)")


def _cifar(name: str, data_dir: Path, train_tf: Any, val_tf: Any) -> tuple[Dataset[Any],
                                                                          Dataset[Any], int]:
    """torchvision CIFAR, downloaded where online; an offline machine gets a one-line error."""
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        train = cls(str(data_dir), train=True, transform=train_tf, download=True)
        val = cls(str(data_dir), train=False, transform=val_tf, download=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise ConfigError(f"--data {name}: not found in {str(data_dir)!r} and the download "
                          f"failed ({type(err).__name__}: {err}); are you offline? Put the "
                          "torchvision archive there or pass --data-dir") from None
    return train, val, len(train.classes)


def build_datasets(data: str, data_dir: str, train_tf: Any,
                   val_tf: Any) -> tuple[Dataset[Any], Dataset[Any], int]:
    """``(train, val, num_classes)`` for ``--data``."""
    if data == "digits":
        x_train, y_train, x_val, y_val = digits_split()
        return DigitsDataset(x_train, y_train, train_tf), DigitsDataset(x_val, y_val,
                                                                        val_tf), 10
    if data in ("cifar10", "cifar100"):
        return _cifar(data, Path(data_dir), train_tf, val_tf)
    return _image_folders(Path(data), train_tf, val_tf)


def train_sampler(dataset: Dataset[Any], *, world: int, rank: int, repeated_aug: bool,
                  seed: int) -> RepeatAugSampler | DistributedSampler[Any]:
    """Each rank's share of the training set; ``set_epoch`` reshuffles deterministically.

    Both samplers draw from a private generator seeded per epoch, so the data order needs
    no saved RNG state to resume. RepeatAugSampler (DeiT's repeated augmentation) shows
    each image 3 times per epoch, the repeats spread over ranks, and keeps as many images
    per epoch as there are in the dataset (rounded down to 256 per rank); it seeds with
    the epoch only, as DeiT does.
    """
    if repeated_aug:
        return RepeatAugSampler(dataset, num_replicas=world, rank=rank, shuffle=True)
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)


class RecordingSampler(Sampler[int]):
    """A training sampler that keeps the indices this rank drew in the current epoch.

    Used by ``--check-sync`` to prove, inside a distributed run, that the ranks' shares are
    disjoint: see :func:`assert_shares_partition`.
    """

    def __init__(self, inner: RepeatAugSampler | DistributedSampler[Any]) -> None:
        self.inner = inner
        self.drawn: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        self.drawn = []
        for index in self.inner:
            self.drawn.append(int(index))
            yield index

    def __len__(self) -> int:
        return len(self.inner)


def assert_shares_partition(shares: list[list[int]], single: list[int]) -> None:
    """Raise unless the ranks' shares, dealt round-robin, are one process's epoch order.

    Both samplers deal position p of the epoch's (shuffled, for RepeatAugSampler repeated)
    order to rank p mod world, so the shares interleaved must reproduce what one process
    draws (``single``), up to the padding at the end: no position is seen twice or missed.
    """
    world = len(shares)
    if len({len(share) for share in shares}) != 1:
        raise RuntimeError(f"--check-sync: ranks drew {[len(s) for s in shares]} images")
    interleaved = [index for group in zip(*shares, strict=True) for index in group]
    common = min(len(interleaved), len(single))
    if interleaved[:common] != single[:common] or len(interleaved) <= len(single) - world:
        raise RuntimeError("--check-sync: the ranks' training shares overlap or miss images "
                           "of the epoch")


def first(dataset: Dataset[Any], count: int) -> Dataset[Any]:
    """The first ``count`` images of ``dataset`` (``--train-limit``)."""
    if count < 1:
        raise ConfigError(f"--train-limit {count}: needs at least one image")
    return Subset(dataset, range(min(count, len(dataset))))  # type: ignore[arg-type]


def val_shard(dataset: Dataset[Any], *, world: int, rank: int) -> Dataset[Any]:
    """Images rank, rank + world, ... of the validation set: disjoint shares, no padding."""
    return Subset(dataset, range(rank, len(dataset), world))  # type: ignore[arg-type]


def build_loaders(train: Dataset[Any], val: Dataset[Any], sampler: Sampler[int], *,
                  batch_size: int, eval_batch_size: int, workers: int,
                  pin_memory: bool) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """Training loader (full batches only, as Mixup needs even batches) and eval loader.

    Worker processes start afresh every epoch and are seeded from the main process's torch
    RNG, so a resumed run draws the same augmentations as an uninterrupted one.
    """
    train_loader = DataLoader(train, batch_size=batch_size, sampler=sampler,
                              num_workers=workers, pin_memory=pin_memory, drop_last=True)
    val_loader = DataLoader(val, batch_size=eval_batch_size, shuffle=False,
                            num_workers=workers, pin_memory=pin_memory, drop_last=False)
    return train_loader, val_loader

