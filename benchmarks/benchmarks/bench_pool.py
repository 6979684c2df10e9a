"""``tokenpool_ops.pool`` over backends, methods and sizes (time and peak memory)."""

from __future__ import annotations

import tokenpool_ops

from ._common import (
    BACKENDS,
    BATCHES,
    FEATURES,
    K_FRACTIONS,
    METHODS,
    TIMEOUT,
    TOKENS,
    check_fits,
    k_of,
    load_backend,
    make_inputs,
)


class Pool:
    """``pool(x, k, method, scores=s)`` with the default init, max_iter=10 and checks on.

    Every method gets the scores (the clustering methods without 'w' use them only to rank
    the initial centres, init='topk'; 'tome' matches by x itself and ignores them). GPU
    timings wait for the device inside the timed call; ``peakmem_`` is the host process's
    peak RSS (setup included), not device memory.
    """

    params = (BACKENDS, METHODS, BATCHES, TOKENS, FEATURES, K_FRACTIONS)
    param_names = ("backend", "method", "B", "N", "M", "k")
    timeout = TIMEOUT

    def setup(self, backend, method, b, n, m, k):
        self.backend = load_backend(backend)
        check_fits(self.backend, b, n, m)
        x, scores = make_inputs(b, n, m)
        self.x, self.scores = self.backend.put(x), self.backend.put(scores)
        self.k = k_of(n, k)
        self.method = method

    def _run(self):
        out = tokenpool_ops.pool(self.x, self.k, self.method, scores=self.scores)
        self.backend.wait(out)

    def time_pool(self, *params):
        self._run()

    def peakmem_pool(self, *params):
        self._run()


class Gram:
    """One batched ``x @ x^T``: the floor for K-Medoids (its distances cost O(B N^2 M))."""

    params = (BACKENDS, BATCHES, TOKENS, FEATURES)
    param_names = ("backend", "B", "N", "M")
    timeout = TIMEOUT

    def setup(self, backend, b, n, m):
        self.backend = load_backend(backend)
        check_fits(self.backend, b, n, m)
        self.x = self.backend.put(make_inputs(b, n, m)[0])

    def time_gram(self, *params):
        self.backend.wait(self.backend.gram(self.x))

    def peakmem_gram(self, *params):
        self.backend.wait(self.backend.gram(self.x))
