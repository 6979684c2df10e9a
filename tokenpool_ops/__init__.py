"""Token Pooling for transformers, written once against the Python array API standard.

Marin et al., "Token Pooling in Vision Transformers": replace the N tokens of a transformer
block by K tokens that minimise the reconstruction error (Eq. 9, weighted Eq. 13), found by
(weighted) K-Means or K-Medoids. Works on NumPy, PyTorch, JAX, CuPy and array-api-strict
arrays alike; the result stays in the caller's library, device and dtype.

>>> import numpy as np, tokenpool_ops
>>> x = np.random.default_rng(0).normal(size=(2, 8, 4))
>>> tokenpool_ops.pool(x, 3, "kmedoids").shape
(2, 3, 4)
"""

from ._checkout import attach_backends

attach_backends()  # before any import below needs tokenpool_ops.backends

from ._measures import reconstruction_error, significance_scores  # noqa: E402
from ._pool import Clustering, PoolResult, kmeans, kmedoids, pool, unpool  # noqa: E402

__all__ = [
    "Clustering",
    "PoolResult",
    "kmeans",
    "kmedoids",
    "pool",
    "reconstruction_error",
    "significance_scores",
    "unpool",
]

__version__ = "0.1.0"
