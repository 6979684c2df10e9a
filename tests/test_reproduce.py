"""``python -m reference_models.reproduce``: the whole pipeline on its smoke budget.

The smoke run trains on 128 images for one epoch, so its accuracies mean nothing; this file
checks that every stage runs, every file is written and parses, a second run reuses every
run, and the ranking arithmetic on numbers worked out by hand.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch", reason="the reproduction needs PyTorch")
pytest.importorskip("timm", reason="the reproduction needs timm")
pytest.importorskip("sklearn", reason="the reproduction trains on scikit-learn's digits")
pytest.importorskip("matplotlib", reason="the reproduction draws accuracy_vs_gflops.png")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # reference_models/ is a folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

from reference_models import reproduce  # noqa: E402


def _reproduce(out: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "reference_models.reproduce", "--smoke",
                           "--jobs", "2", "--output", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


#: The stages in the order they run, as their bars name them.
STAGES = ["base", "schedule search", "finetuning", "insertion without finetuning", "speed",
          "pictures"]


def _stderr_lines(stderr: str) -> list[str]:
    """What a terminal would have shown, line by line (a bar redraws itself after \\r)."""
    return [line.strip() for line in re.split(r"[\r\n]+", stderr) if line.strip()]


def _units_on_disk(out: Path, results: dict[str, Any]) -> list[int]:
    """Each stage's units, counted from what the run left behind: epochs logged, runs
    evaluated, models timed, pictures drawn."""
    def epochs(pattern: str) -> int:
        return sum(len(log.read_text().splitlines()) for log in out.glob(pattern))

    return [epochs("base/log.jsonl"), epochs("search/*/log.jsonl"),
            epochs("finetune/*/*/*/log.jsonl"), len(list(out.glob("insert/*/*/*/eval.json"))),
            sum(row["images_per_s"] is not None for row in results["summary"]),
            len(list(out.glob("*.png")))]


def _assert_numbered_stages_only(stderr: str, units: list[int], estimated: bool) -> None:
    """stderr holds the stage bars and nothing else (no warning at all); each stage is
    numbered in order and ends with all its units done and the whole run's elapsed time
    and (where ``estimated``; a run that reuses every stage has nothing to go by until it
    measures the speed) its estimated total."""
    lines = _stderr_lines(stderr)
    bar = rf"\d/{len(STAGES)} [a-z ]+: +\d+%\|[^|]*\| \d+/\d+ \[[^\]]*\]"
    strays = [line for line in lines if not re.fullmatch(bar, line)]
    assert not strays, "stderr holds more than the progress bars:\n" + "\n".join(strays)
    first_seen = []
    for number, (title, count) in enumerate(zip(STAGES, units, strict=True), 1):
        mine = [i for i, line in enumerate(lines)
                if line.startswith(f"{number}/{len(STAGES)} {title}:")]
        assert mine, f"no bar for stage {number}, {title}"
        first_seen.append(mine[0])
        last = lines[mine[-1]]
        assert f" {count}/{count} " in last, last
        total = r"~\d+:\d\d" if estimated else r"(~\d+:\d\d|\?)"
        assert re.search(rf"whole run \d+:\d\d of {total}\]$", last), last
    assert first_seen == sorted(first_seen)


def test_smoke_run_writes_every_result_and_a_second_run_reuses_them(tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "smoke"
    first = _reproduce(out)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    plan = reproduce.SMOKE
    budgets = [b["name"] for b in results["budgets"]]
    assert len(budgets) == len(plan.lams)
    for budget in results["budgets"]:  # a searched schedule: monotone, within the patches
        keep = budget["keep"]
        assert len(keep) == 4 and all(0 <= k <= 64 for k in keep)
        assert all(a >= b for a, b in itertools.pairwise(keep))
    rows = {(r["budget"], r["method"]) for r in results["summary"]}
    expected = {(b, m) for b in budgets for m in plan.methods}
    expected |= {("conv" + d.replace(",", "-"), "conv") for d in plan.conv_depths}
    expected |= {("full", "none")}
    assert rows == expected
    for row in results["summary"]:
        assert 0.0 <= row["acc_mean"] <= 100.0 and row["seeds"] == len(plan.seeds)
        assert row["gflops"] > 0 and row["images_per_s"] > 0
        if row["budget"] in budgets:
            assert row["no_finetune_carry"] is not None
            assert row["no_finetune_no_carry"] is not None
    # The model's FLOPs shrink with the schedule; the clustering's own cost comes on top
    # (after a one-epoch smoke search the schedule may save less than the clustering costs).
    full = next(r["gflops"] for r in results["summary"] if r["method"] == "none")
    for row in results["summary"]:
        if row["budget"] in budgets:
            assert min(row["keep"]) < 64 and row["gflops_model"] < full
            assert row["gflops"] == row["gflops_model"] + row["gflops_clustering"]
    assert {r["method"] for r in results["ranking"]} == set(plan.methods)

    units = _units_on_disk(out, results)
    assert all(count > 0 for count in units)
    _assert_numbered_stages_only(first.stderr, units, estimated=True)

    markdown = (out / "results.md").read_text()
    assert "MFLOPs (clustering)" in markdown and "GFLOPs" not in markdown  # the digits' unit
    for method in plan.methods:
        assert f"| {method} |" in markdown
    for picture in ("accuracy_vs_gflops.png", "clusters.png"):
        with Image.open(out / picture) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 200

    logs = sorted(out.glob("finetune/**/log.jsonl"))
    stamps = [p.stat().st_mtime_ns for p in logs]
    second = _reproduce(out)
    assert second.returncode == 0, second.stderr[-3000:]
    _assert_numbered_stages_only(second.stderr, units, estimated=False)  # starts complete
    assert [p.stat().st_mtime_ns for p in logs] == stamps  # nothing trained again
    # Speed is measured afresh; the accuracies come from the runs, unchanged.
    again = json.loads((out / "results.json").read_text())
    assert [r["acc_per_seed"] for r in again["summary"]] == \
        [r["acc_per_seed"] for r in results["summary"]]


def test_ranking_orders_by_mean_and_measures_gaps_in_standard_errors() -> None:
    rows = [
        {"budget": "a", "method": "x", "acc_mean": 90.0, "acc_std": 2.0, "seeds": 2},
        {"budget": "b", "method": "x", "acc_mean": 80.0, "acc_std": 4.0, "seeds": 2},
        {"budget": "a", "method": "y", "acc_mean": 70.0, "acc_std": 0.0, "seeds": 2},
        {"budget": "b", "method": "y", "acc_mean": 70.0, "acc_std": 0.0, "seeds": 2},
        {"budget": "conv2", "method": "conv", "acc_mean": 99.0, "acc_std": 0.0, "seeds": 2},
    ]
    ranking = reproduce._ranking(rows, ["a", "b"])
    assert [r["method"] for r in ranking] == ["x", "y"]  # conv is no searched budget
    # x: mean 85, spread (2 + 4) / 2 = 3 over 4 runs: standard error 3 / 2 = 1.5.
    assert ranking[0]["acc_mean"] == 85.0 and ranking[0]["standard_error"] == 1.5
    # gap 15 over hypot(1.5, 0) = 1.5: 10 standard errors; the last has no next.
    assert math.isclose(ranking[0]["margin_to_next"], 10.0)
    assert ranking[1]["margin_to_next"] is None


def test_flops_are_written_in_the_unit_of_the_base_models_magnitude() -> None:
    def unit(base_gflops: float) -> str:
        return reproduce.flops_unit({"base": {"gflops": base_gflops}})[1]

    assert unit(0.015) == "MFLOPs"  # the digits model: 15 MFLOPs
    assert unit(4.6) == "GFLOPs"  # DeiT-S
    assert unit(1.0) == "GFLOPs" and unit(0.999) == "MFLOPs"
    assert unit(5e-4) == "kFLOPs"
    assert reproduce.flops_unit({"base": {"gflops": 0.015}})[0] == 1e3
