"""The one exception type the trainer shows to the user as a one-line message."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """Bad command-line input: a path, a model, a preset, a keep list.

    ``train.main`` turns it into an argparse-style ``error:`` line and exit status 2, so the
    user never sees a traceback from deep inside timm or torchvision.
    """
