"""The pieces of ``pool``'s pipeline on their own: the token weights, the flattened batch and
its way back, and where the deferred value checks are made and read."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import tokenpool_ops
from tokenpool_ops._batching import flatten
from tokenpool_ops._merge import token_weights
from tokenpool_ops._results import PoolResult

PACKAGE = Path(tokenpool_ops.__file__).parent


def test_token_weights_follow_the_rules_written_in_pool():
    """Independent expectations, written out: sizes default to ones; the w-methods weigh by
    scores times sizes; a fallback (the sizes) exists wherever the weights can sum to zero."""
    x = np.zeros((1, 3, 2))
    scores, sizes = np.array([[0.0, 2.0, 0.5]]), np.array([[1.0, 3.0, 2.0]])

    plain = token_weights(np, x, None, None)
    assert plain.carried.tolist() == [[1.0, 1.0, 1.0]]
    assert plain.weights.tolist() == [[1.0, 1.0, 1.0]] and plain.fallback is None

    scored = token_weights(np, x, scores, None)
    assert scored.carried.tolist() == [[1.0, 1.0, 1.0]]
    assert scored.weights.tolist() == [[0.0, 2.0, 0.5]]
    assert scored.fallback.tolist() == [[1.0, 1.0, 1.0]]

    sized = token_weights(np, x, None, sizes)
    assert sized.weights.tolist() == [[1.0, 3.0, 2.0]]
    assert sized.fallback.tolist() == [[1.0, 3.0, 2.0]]

    both = token_weights(np, x, scores, sizes)
    assert both.carried.tolist() == [[1.0, 3.0, 2.0]]
    assert both.weights.tolist() == [[0.0, 6.0, 1.0]]
    assert both.fallback.tolist() == [[1.0, 3.0, 2.0]]


def test_to_caller_undoes_flatten():
    x = np.arange(2 * 3 * 5 * 4, dtype=np.float16).reshape(2, 3, 5, 4)
    batch = flatten(np, x)
    assert batch.x.shape == (6, 5, 4) and batch.x.dtype == np.float32 and batch.n == 5
    assert batch.ones().shape == (6, 5)
    flat = PoolResult(batch.x[:, :2], np.zeros((6, 5), dtype=np.int64), batch.ones()[:, :2],
                      None, np.zeros(6), np.zeros((6, 1)), 0)
    back = batch.to_caller(flat)
    assert back.tokens.shape == (2, 3, 2, 4) and back.tokens.dtype == np.float16
    np.testing.assert_array_equal(back.tokens, x[:, :, :2])
    assert back.assignment.shape == (2, 3, 5) and back.objective.shape == (2, 3)
    assert back.medoids is None and back.n_iter == 0


def _calls(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / module).read_text())
    return {node.func.id if isinstance(node.func, ast.Name) else node.func.attr
            for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Name, ast.Attribute))}


def test_deferred_checks_are_made_in_one_place_and_read_in_one_place():
    """The design's contract: ``value_checks`` (in _validation) makes the deferred checks and
    ``guarded`` (in _overflow) reads them; no other module of the package does either."""
    makers = {"finite_tokens_deferred", "token_values_deferred", "Deferred", "value_checks"}
    readers = {"settle", "settle_counting", "without_overflow"}
    for path in sorted(PACKAGE.glob("*.py")):
        calls = _calls(path.name)
        if path.name not in ("_validation.py", "_pool.py"):
            assert not calls & makers, (path.name, calls & makers)
        if path.name != "_overflow.py":
            assert not calls & readers, (path.name, calls & readers)
    # _pool only asks for the checks and hands them to guarded.
    assert _calls("_pool.py") & makers == {"value_checks"}
    assert {"value_checks", "guarded"} <= _calls("_pool.py")


@pytest.mark.parametrize("bad", ["x", "scores"])
@pytest.mark.parametrize("k", [0, 4, 12])
def test_trivial_and_computed_calls_raise_the_same_value_errors(bad, k):
    """k = 0 and k >= N answer without computing, yet settle the same checks."""
    rng = np.random.default_rng(0)
    x, scores = rng.normal(size=(2, 12, 3)), rng.random((2, 12))
    if bad == "x":
        x[1, 2, 0] = np.inf
    else:
        scores[0, 5] = -1.0
    message = "x contains NaN or infinity" if bad == "x" else "scores must be finite"
    with pytest.raises(ValueError, match=message):
        tokenpool_ops.pool(x, k, "wkmedoids", scores=scores)
