"""nn.plan enters no_grad and autocast(enabled=False) only where they would change something
(issue 23, round d): the plan is the same with gradients on or off and under autocast."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

from tokenpool_ops import nn as tp_nn  # noqa: E402


def _plan_fields(x: torch.Tensor, scores: torch.Tensor) -> list[np.ndarray]:
    result = tp_nn.plan(x, 5, "wkmedoids", scores=scores)
    return [getattr(result, f).detach().numpy() for f in
            ("tokens", "assignment", "sizes", "medoids", "objective", "history")]


def test_plan_same_with_grad_without_grad_and_under_autocast():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(2, 17, 6)).astype(np.float32)).requires_grad_()
    scores = torch.from_numpy(rng.random((2, 17)).astype(np.float32))
    with_grad = _plan_fields(x, scores)
    with torch.no_grad():
        without = _plan_fields(x, scores)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = _plan_fields(x, scores)
    for a, b, c in zip(with_grad, without, autocast, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert with_grad[0].dtype == np.float32  # computed in float32 under autocast too


def test_contexts_entered_only_where_they_switch_something():
    x = torch.zeros(2, 3)
    assert tp_nn._autocast_off(x) is tp_nn._NOTHING
    with torch.autocast("cpu", dtype=torch.bfloat16):
        off = tp_nn._autocast_off(x)
        assert isinstance(off, torch.autocast)
        with off:
            assert not torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")
    assert isinstance(tp_nn._grad_off(), torch.no_grad)
    with torch.no_grad():
        assert tp_nn._grad_off() is tp_nn._NOTHING
