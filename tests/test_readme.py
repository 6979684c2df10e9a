"""The README's usage examples run as written and print what the README quotes.

Each ```pycon block is a doctest session of its own: a change that moves a quoted output
(an iteration count, an objective, a shape) fails here.
"""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```pycon\n(.*?)^```", README.read_text(), re.S | re.M)
FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def test_readme_has_examples():
    assert len(BLOCKS) >= 3
    assert not re.search(r"^```python", README.read_text(), re.M), \
        "write README examples as ```pycon doctest sessions, so their output is checked"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_prints_what_it_quotes(index):
    block = BLOCKS[index]
    for module in ("torch", "timm", "transformers"):
        if f"import {module}" in block:
            pytest.importorskip(module, reason=f"the example needs {module}")
    test = doctest.DocTestParser().get_doctest(block, {}, f"README.md example {index}",
                                               str(README), 0)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    output: list[str] = []
    runner.run(test, out=output.append)
    assert runner.failures == 0, "".join(output)
    assert runner.tries > 0


BENCHMARKS_README = README.parent / "benchmarks" / "README.md"
#: Files the benchmarks write when run (their default output), cited as such, not records.
WRITTEN_WHEN_RUN = {"gpu_check.md", "compare_peers_plane.png"}


def test_every_result_the_benchmarks_readme_cites_is_in_the_checkout():
    # Records under benchmarks/results are ignored by git unless added on purpose: a cited
    # record that was never added is missing from every clone (caught once, by hand).
    cited = set(re.findall(r"results/([\w.-]+\.(?:md|txt|py|log|json|png))",
                           BENCHMARKS_README.read_text()))
    folders = (README.parent / "benchmarks" / "results", README.parent / "reference_models"
               / "results")
    missing = sorted(name for name in cited - WRITTEN_WHEN_RUN
                     if not any((folder / name).is_file() for folder in folders))
    assert cited and not missing, missing
