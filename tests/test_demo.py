"""The demo's table says what it measures."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn", reason="the demo's photo ships with scikit-learn")
pytest.importorskip("PIL", reason="the demo resizes its photo with pillow")

from tokenpool_ops import demo


def test_demo_table_says_lower_is_better_and_what_each_method_minimises(capsys):
    assert demo.main(["--k", "49", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "lower is better" in out
    header = next(line for line in out.splitlines() if line.startswith("method"))
    assert header.split()[:2] == ["method", "minimises"]
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines()
            if line.split() and line.split()[0] in demo.METHODS}
    assert rows["kmedoids"][:2] == ["Eq.", "9"] and rows["wkmedoids"][:2] == ["Eq.", "13"]
    assert rows["random"][0] == "(none)"
