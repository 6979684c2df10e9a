"""Eq. 5 scores from two flash-attention passes (tokenpool_ops._flash_scores), checked on
the CPU, whose flash kernel returns the same log-sum-exp as CUDA's, against the attention
materialised in float64; and the route a scored block takes."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch", reason="the flash route is PyTorch's")

import tokenpool_ops._flash_scores as flash_scores  # noqa: E402
import tokenpool_ops._patching as tp_patching  # noqa: E402
from tests.conftest import cuda_or_skip  # noqa: E402

SCALE = 0.35


def exact(q, k, v, bias, num_prefix):
    """The attention output (B, N, H, D) and Eq. 5 scores, materialised in float64."""
    logits = (q.double() * SCALE) @ k.double().transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.double()
    attn = logits.softmax(dim=-1)
    return (attn @ v.double()).transpose(1, 2), attn[..., num_prefix:].sum(dim=(1, 2))


def problem(dtype, with_bias, empty_token=False):
    gen = torch.Generator().manual_seed(11)
    # Spread logits (std about 9): each query's log-sum-exp is far from 0, where one
    # bfloat16 would round it by more than the scores' tolerance (the low half is needed).
    q, k, v = (3 * torch.randn(2, 3, 37, 16, generator=gen) for _ in range(3))
    bias = None
    if with_bias:
        sizes = torch.randint(1, 9, (2, 37), generator=gen).float()
        sizes[:, 0] = 1  # the prefix token stands for itself
        if empty_token:
            sizes[1, 5] = 0  # an empty K-Means cluster's token: log 0 = -inf
        bias = sizes.log()[:, None, None, :]
    return q.to(dtype), k.to(dtype), v.to(dtype), bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_two_flash_passes_give_the_materialised_attention_and_scores(dtype, with_bias):
    q, k, v, bias = problem(dtype, with_bias)
    out, scores = flash_scores.flash_attention_with_scores(q, k, v, bias, SCALE, 1)
    want_out, want_scores = exact(q, k, v, bias, 1)
    assert out.shape == (2, 37, 3, 16) and scores.shape == (2, 36)
    assert scores.dtype == dtype
    # The scores' own error is float32's; they come back rounded once to the dtype.
    rounding = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps / 2
    torch.testing.assert_close(scores.double(), want_scores, rtol=2 * rounding, atol=0)
    # The output: the kernel's own half-precision products (P rounded for P @ V).
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want_out, rtol=tolerance, atol=tolerance)


def test_a_token_of_size_zero_receives_nothing_and_poisons_nothing():
    q, k, v, bias = problem(torch.bfloat16, True, empty_token=True)
    out, scores = flash_scores.flash_attention_with_scores(q, k, v, bias, SCALE, 1)
    want_out, want_scores = exact(q, k, v, bias, 1)
    assert torch.isfinite(out).all() and torch.isfinite(scores).all()
    assert scores[1, 4] == 0  # key 5, after the one prefix token
    torch.testing.assert_close(scores.double(), want_scores, rtol=2 ** -7, atol=0)
    torch.testing.assert_close(out.double(), want_out, rtol=2e-2, atol=2e-2)


def test_the_high_and_low_parts_carry_float32s_accuracy():
    values = torch.tensor([[math.pi * 1000], [-27.123456], [1e-3]])
    for dtype in (torch.bfloat16, torch.float16):
        high, low = flash_scores._high_low(values, dtype)
        assert high.dtype == low.dtype == dtype
        # One bfloat16 rounds by up to 2^-9 of the value; the two parts to about 2^-17.
        torch.testing.assert_close(high.float() + low.float(), values, rtol=2 ** -15, atol=0)


def test_scored_blocks_take_the_flash_route_in_half_precision_in_a_graph_capture(monkeypatch):
    calls: list[torch.dtype] = []
    real = tp_patching.flash_attention_with_scores
    monkeypatch.setattr(tp_patching, "flash_attention_with_scores",
                        lambda q, *args: calls.append(q.dtype) or real(q, *args))
    q, k, v, _ = problem(torch.bfloat16, False)
    monkeypatch.setattr(flash_scores, "FLASH_MIN_TOKENS", 37)
    tp_patching.attention_with_scores(q, k, v, None, SCALE, 1)
    assert calls == []  # the CPU is not among FLASH_DEVICES: it materialises
    monkeypatch.setattr(flash_scores, "FLASH_DEVICES", ("cpu",))
    tp_patching.attention_with_scores(q, k, v, None, SCALE, 1)
    assert calls == []  # called eagerly: its launches are not free (no CUDA graph capture)
    monkeypatch.setattr(flash_scores, "_launches_are_free", lambda q: True)
    monkeypatch.setattr(flash_scores, "FLASH_MIN_TOKENS", 38)
    tp_patching.attention_with_scores(q, k, v, None, SCALE, 1)
    assert calls == []  # 37 tokens: fewer than FLASH_MIN_TOKENS
    monkeypatch.setattr(flash_scores, "FLASH_MIN_TOKENS", 37)
    flash_out, flash = tp_patching.attention_with_scores(q, k, v, None, SCALE, 1)
    assert calls == [torch.bfloat16]
    for declined in (q.float(), q[..., :12], q.clone().requires_grad_(),
                     torch.zeros(2, 3, 37, 248, dtype=torch.bfloat16), q[:, :, :36]):
        keys = torch.zeros_like(declined, requires_grad=False)
        tp_patching.attention_with_scores(declined, keys, keys, None, SCALE, 1)
    # float32, D not a multiple of 8, autograd, D + 16 > 256, fewer tokens
    assert calls == [torch.bfloat16]
    out, scores = flash_scores.flash_attention_with_scores(q, k, v, None, SCALE, 1)
    assert torch.equal(flash_out, out) and torch.equal(flash, scores)


def test_gpu_flash_scores_equal_the_materialised_attention(monkeypatch):
    device = cuda_or_skip()
    for with_bias in (False, True):
        q, k, v, bias = (None if t is None else t.to(device)
                         for t in problem(torch.bfloat16, with_bias, empty_token=with_bias))
        monkeypatch.setattr(flash_scores, "FLASH_MIN_TOKENS", 37)
        assert flash_scores.flash_kernel_takes(q) and not flash_scores.flash_scores_apply(q)
        out, scores = flash_scores.flash_attention_with_scores(q, k, v, bias, SCALE, 1)
        want_out, want_scores = exact(q, k, v, bias, 1)
        torch.testing.assert_close(scores.double(), want_scores, rtol=2 ** -7, atol=0)
        torch.testing.assert_close(out.double(), want_out, rtol=2e-2, atol=2e-2)


def test_gpu_a_captured_graph_takes_the_flash_route(monkeypatch):
    device = cuda_or_skip()
    monkeypatch.setattr(flash_scores, "FLASH_MIN_TOKENS", 37)
    q, k, v, bias = (t.to(device) for t in problem(torch.bfloat16, True))
    calls: list[int] = []
    real = tp_patching.flash_attention_with_scores
    monkeypatch.setattr(tp_patching, "flash_attention_with_scores",
                        lambda *args: calls.append(1) or real(*args))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capturing stream: materialised
        tp_patching.attention_with_scores(q, k, v, bias, SCALE, 1)
    torch.cuda.current_stream().wait_stream(side)
    assert calls == []
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, scores = tp_patching.attention_with_scores(q, k, v, bias, SCALE, 1)
    assert calls == [1]
    graph.replay()
    want_out, want_scores = exact(q, k, v, bias, 1)
    torch.testing.assert_close(scores.double(), want_scores, rtol=2 ** -7, atol=0)
    torch.testing.assert_close(out.double(), want_out, rtol=2e-2, atol=2e-2)
