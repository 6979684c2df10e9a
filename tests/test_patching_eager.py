"""The eager per-block path of the model patches (tokenpool_ops._patching) against the plain
formulas it replaced: the same bits, with fewer operator calls per block (issue 23, batch 1)."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch", reason="the model patches need PyTorch")
timm = pytest.importorskip("timm", reason="the timm patch needs timm (pip install timm)")

import tokenpool_ops._patching as tp_patching  # noqa: E402
import tokenpool_ops.timm as tp_timm  # noqa: E402
from tokenpool_ops.timm import patch_timm  # noqa: E402

SCHEDULE = [150, 90, 40, 40, 12, 12, 3, 3, 1, 0, 0, 0]  # down to one patch token, then none


def _plain_size_bias(state):
    """The formula the size bias had: ones for the prefix, concatenated, then the log."""
    if not state["prop_attn"] or state["sizes"] is None:
        return None
    prefix = state["sizes"].new_ones(state["sizes"].shape[0], state["num_prefix"])
    return torch.cat([prefix, state["sizes"]], dim=1).log()[:, None, None, :]


def _plain_attention_step(q, k, v, bias, scale, num_prefix):
    """The formula the materialised attention step had, each conversion spelt out."""
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits += bias.to(logits.dtype)
    attn = logits.softmax(dim=-1)
    keys = attn[..., num_prefix:]
    summed = keys.float() if keys.dtype in (torch.float16, torch.bfloat16) else keys
    return (attn @ v).transpose(1, 2), summed.sum(dim=(1, 2)).to(attn.dtype)


def _state(sizes, num_prefix, prop_attn=True):
    return {"prop_attn": prop_attn, "sizes": sizes, "num_prefix": num_prefix}


@pytest.mark.parametrize("num_prefix", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kept", [0, 1, 7])  # no patch token left, one, several
def test_size_bias_is_the_log_of_the_prefix_ones_and_the_sizes(num_prefix, dtype, kept):
    sizes = torch.tensor([[3.0, 0.0, 1.0, 5.0, 2.0, 1.0, 9.0],
                          [1.0, 1.0, 4.0, 0.0, 7.0, 2.0, 1.0]], dtype=dtype)[:, :kept]
    state = _state(sizes, num_prefix)
    got = tp_patching.size_bias(state)
    want = _plain_size_bias(state)
    assert got.shape == want.shape == (2, 1, 1, num_prefix + kept) and got.dtype == dtype
    # Bit for bit, the -inf of an empty cluster and the prefix's zeros (log 1) included.
    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())


def test_size_bias_is_none_before_pooling_and_without_prop_attn():
    assert tp_patching.size_bias(_state(None, 1)) is None
    assert tp_patching.size_bias(_state(torch.ones(2, 3), 1, prop_attn=False)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.float64])
def test_attention_step_equals_the_plain_formula(dtype, bias_dtype):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 2, 11, 4, generator=gen).to(dtype) for _ in range(3))
    bias = (None if bias_dtype is None else
            (torch.rand(3, 1, 1, 11, generator=gen) * 3).log().to(bias_dtype))
    out, scores = tp_patching._attention_step(q, k, v, bias, 0.35, 2)
    want_out, want_scores = _plain_attention_step(q, k, v, bias, 0.35, 2)
    assert out.dtype == want_out.dtype and scores.dtype == want_scores.dtype == dtype
    assert torch.equal(out, want_out) and torch.equal(scores, want_scores)


@pytest.mark.parametrize("sizes_dtype, kept_dtype",
                         [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                          (torch.float32, torch.float32), (torch.float64, torch.float64),
                          (torch.int64, torch.float32)])
def test_carried_sizes_are_at_least_float32(sizes_dtype, kept_dtype, monkeypatch):
    """A pool that returns half-precision or integer sizes: the state keeps them in float32
    (exact counts), float64 as they are; float32 sizes are kept as the very tensor."""
    returned = []
    real = tp_timm.pool_with_grad

    def with_sizes_as(x, k, method, **options):
        tokens, result = real(x, k, method, **options)
        result = dataclasses.replace(result, sizes=result.sizes.to(sizes_dtype))
        returned.append(result.sizes)
        return tokens, result

    x = torch.randn(2, 1 + 20, 8, generator=torch.Generator().manual_seed(5))
    state = tp_patching.new_state(1, [9], 1, "kmedoids", True, False, "attn", {})
    tp_patching.pool_patch_tokens(state, x, 9, None, with_sizes_as)
    assert state["sizes"].dtype == kept_dtype
    assert torch.equal(state["sizes"], returned[0].to(kept_dtype))
    assert (state["sizes"] is returned[0]) == (sizes_dtype == kept_dtype)


def test_eager_blocks_never_take_the_traced_operators():
    """Eagerly the answer is no without asking the backends (the Numba kernels may be
    there); traced, the same state and tensor get the backends' answer."""
    from tokenpool_ops.backends import _torch_ops

    state = tp_patching.new_state(1, [9], 1, "wkmedoids", True, False, "attn", {})
    x = torch.randn(2, 5, 8)
    assert not tp_patching.one_op_applies(state, x)
    answers = []

    def traced(t):
        answers.append((tp_patching.one_op_applies(state, t),
                        _torch_ops.plan_applies(t, None, True)))
        return t + 1

    torch.compile(traced, fullgraph=True, backend="eager")(x)
    assert answers and all(ours == backends for ours, backends in answers)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("placement", ["attn", "block"])
def test_patched_model_gives_the_logits_of_the_plain_formulas(batch, placement, monkeypatch):
    """The whole eager forward pass, bit for bit, against the same model whose blocks take
    the size bias and the attention step of the plain formulas."""
    torch.manual_seed(0)
    model = patch_timm(timm.create_model("deit_tiny_patch16_224", pretrained=False).eval(),
                       SCHEDULE, method="wkmedoids", placement=placement)
    images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(images)
        got_sizes = model._tokenpool["sizes"]
        monkeypatch.setattr(tp_timm, "size_bias", _plain_size_bias)
        monkeypatch.setattr(tp_patching, "_attention_step", _plain_attention_step)
        want = model(images)
    assert torch.equal(got, want)
    assert torch.equal(got_sizes, model._tokenpool["sizes"])
