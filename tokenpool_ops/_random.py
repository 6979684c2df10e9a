"""Seeded random numbers computed on the array's own device, the same on every library.

A counter-based generator: the number of (seed, problem b, token i) is a hash of those three
integers, so no state is kept, nothing is drawn on the host and nothing is copied to the
device, and every library computes the very same bits with plain integer operations of the
array API. The hash is the "lowbias32" finaliser (Wellons' hash prospector: xor-shift 16,
multiply by 0x7FEB352D, xor-shift 15, multiply by 0x846CA68B, xor-shift 16), applied as

    h(b, i) = mix(mix(mix(key ^ b) ^ i) + b)         (all modulo 2^32)

where ``key`` mixes the seed's 64 bits. The multiplications run on 16-bit halves of the
constant in int64, so no product exceeds 2^48 and no library's overflow rule matters. The
top 24 bits of h, j, give a uniform ``(j + 1) / 2^24`` in (0, 1], exact in float32 and
float64 alike, so a float32 and a float64 run draw the same tokens.
"""

from __future__ import annotations

from ._compat import Array, Namespace, device

MASK32 = 0xFFFFFFFF
MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
UNIFORM_BITS = 24


def _mul32(xp: Namespace, x: Array, constant: int) -> Array:
    """``x * constant mod 2^32`` for int64 ``x`` in [0, 2^32), by 16-bit halves of the
    constant (each partial product stays below 2^48)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & MASK32


def _mix(xp: Namespace, x: Array) -> Array:
    """The lowbias32 finaliser on int64 values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(xp, x, MULTIPLIERS[0])
    x = x ^ (x >> 15)
    x = _mul32(xp, x, MULTIPLIERS[1])
    return x ^ (x >> 16)


def _mix_int(value: int) -> int:
    """The same finaliser on a Python int (for the seed, on the host: no array involved)."""
    value ^= value >> 16
    value = (value * MULTIPLIERS[0]) & MASK32
    value ^= value >> 15
    value = (value * MULTIPLIERS[1]) & MASK32
    return value ^ (value >> 16)


def seed_key(seed: int) -> int:
    """32 bits that depend on all 64 bits of ``seed`` (any Python int, taken modulo 2^64)."""
    seed %= 1 << 64
    return _mix_int(_mix_int(seed & MASK32) ^ (seed >> 32))


def uniforms(xp: Namespace, seed: int, shape: tuple[int, int], like: Array) -> Array:
    """(B, N) uniforms in (0, 1], in ``like``'s dtype and on its device.

    Number (b, i) depends only on the seed, b and i, so a problem's draw depends on its
    position in the batch, and never on the library, the device or the batch size.
    """
    if "int64" not in xp.__array_namespace_info__().dtypes(kind="signed integer"):
        # JAX without x64: the same numbers, made by NumPy and moved to the device.
        import numpy as np

        host = uniforms(np, seed, shape, np.empty(0, dtype=np.float64))
        return xp.asarray(host, dtype=like.dtype, device=device(like))
    problems = xp.arange(shape[0], dtype=xp.int64, device=device(like))[:, None]
    tokens = xp.arange(shape[1], dtype=xp.int64, device=device(like))[None, :]
    per_problem = _mix(xp, problems ^ seed_key(seed))
    h = _mix(xp, (_mix(xp, per_problem ^ tokens) + problems) & MASK32)
    top = xp.astype(h >> (32 - UNIFORM_BITS), like.dtype)
    return (top + 1) * (0.5 ** UNIFORM_BITS)
