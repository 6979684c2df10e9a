"""A DeiT trainer that downsamples tokens with ``tokenpool_ops``.

``python -m reference_models.train --help`` lists every flag. The modules, one concern each:
``train`` (flags, main loop, checkpoint and resume), ``engine`` (one epoch of training,
evaluation), ``data`` (datasets, transforms, samplers), ``models`` (timm registrations,
downsampling through :func:`tokenpool_ops.timm.patch_timm`), ``flops`` (the FLOP counter)
and ``distributed`` (torchrun helpers).
"""

from __future__ import annotations

from .errors import ConfigError

__all__ = ["ConfigError"]
