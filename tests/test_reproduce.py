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
from tests.conftest import checkout_first  # noqa: E402


def _reproduce(out: Path) -> subprocess.CompletedProcess[str]:
    # No timeout: the smoke run ends by itself (few epochs and images), and any limit could be
    # too short on a loaded machine (with ToMe added it took 9 minutes under a load of 100+).
    env = dict(os.environ, PYTHONPATH=checkout_first(os.environ.get("PYTHONPATH")),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "reference_models.reproduce", "--smoke",
                           "--jobs", "2", "--output", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True)


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
    _assert_tome_counted_as_patched(results)

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


def _tome_multiply_adds(n: int, k: int, width: int, heads: int) -> int:
    """ToMe's cost from n to k patch tokens, as the issue and flops.py's text state it: the
    keys averaged over heads (n x width) and the tokens' size-weighted merge (n x width);
    per round of at most floor(n'/2) merges, the norms (n' x D) and the similarities
    (ceil(n'/2) x floor(n'/2) x D), D = width / heads; the metric merged between rounds
    (n' x D). Nothing where no token is removed or none is kept."""
    if k == 0 or k >= n:
        return 0
    d = width // heads
    total = 2 * n * width
    while n > k:
        removed = min(n - k, n // 2)
        total += n * d + -(-n // 2) * (n // 2) * d
        if n - removed > k:  # another round follows: the metric is merged first
            total += n * d
        n -= removed
    return total


def _assert_tome_counted_as_patched(results: dict[str, Any]) -> None:
    """ToMe's rows cost the model of its schedule, as PoWER-BERT's at the same budget do
    (both keep the same tokens in every block), plus its matching, counted here by hand."""
    from reference_models.models import build_model

    model = build_model(results["base"]["model"], 10)
    width, heads = model.embed_dim, model.blocks[0].attn.num_heads
    for budget in results["budgets"]:
        tome = next(r for r in results["summary"]
                    if r["budget"] == budget["name"] and r["method"] == "tome")
        powerbert = next(r for r in results["summary"]
                         if r["budget"] == budget["name"] and r["method"] == "powerbert")
        assert tome["gflops_model"] == powerbert["gflops_model"]
        assert powerbert["gflops_clustering"] == 0.0
        n, cost = results["base"]["patch_tokens"], 0
        for k in budget["keep"]:
            cost += _tome_multiply_adds(n, min(n, k), width, heads)
            n = min(n, k)
        assert cost > 0 and tome["gflops_clustering"] == pytest.approx(cost * 1e-9)


def test_tome_cost_by_hand_agrees_with_the_flops_tests_worked_example() -> None:
    """The hand count above on test_flops.py's worked example (width 8, 2 heads)."""
    assert _tome_multiply_adds(10, 6, 8, 2) == 300
    assert _tome_multiply_adds(10, 2, 8, 2) == 424  # three rounds: 10 -> 5 -> 3 -> 2
    assert _tome_multiply_adds(6, 0, 8, 2) == 0 and _tome_multiply_adds(6, 6, 8, 2) == 0


def _results_with_tome() -> dict[str, Any]:
    """A hand-made results.json of one budget: ToMe between WK-Medoids and PoWER-BERT."""
    def row(method: str, gflops: float, clustering: float, acc: float, std: float,
            carry: float | None, no_carry: float | None, budget: str = "lam0.3",
            keep: list[int] | None = None) -> dict[str, Any]:
        return {"budget": budget, "method": method, "keep": keep or [35, 9, 9, 0],
                "gflops": gflops + clustering, "gflops_model": gflops,
                "gflops_clustering": clustering, "acc_mean": acc, "acc_std": std, "seeds": 2,
                "acc_per_seed": [acc - std, acc + std], "no_finetune_carry": carry,
                "no_finetune_no_carry": no_carry, "images_per_s": 1000.0}

    summary = [row("wkmedoids", 0.0046, 0.0004, 92.0, 1.0, 80.0, 75.0),
               row("tome", 0.0046, 0.0001, 90.5, 0.5, 70.25, 60.75),
               row("powerbert", 0.0046, 0.0, 88.0, 2.0, 65.0, 65.0),
               row("conv", 0.0095, 0.0, 92.1, 1.4, None, None, "conv2", [16, 16, 4, 4]),
               row("none", 0.015, 0.0, 95.4, 0.9, None, None, "full", [64] * 4)]
    return {"plan": {"seeds": [0, 1], "finetune_epochs": 2},
            "base": {"model": "deit_digits_tiny_patch1_8", "val_acc1": 95.83, "gflops": 0.015,
                     "val_images": 360},
            "budgets": [{"name": "lam0.3", "lam": 0.3, "keep": [35, 9, 9, 0]}],
            "summary": summary, "ranking": reproduce._ranking(summary, ["lam0.3"])}


def test_tome_has_its_row_in_results_md() -> None:
    markdown = reproduce._markdown(_results_with_tome())
    # Between WK-Medoids and PoWER-BERT by accuracy, at its own MFLOPs, matching in brackets.
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[1:4] == [
        "| wkmedoids | 5.00 (0.40) | 92.00 ± 1.00 | 80.0 | 75.0 | 1000 |",
        "| tome | 4.70 (0.10) | 90.50 ± 0.50 | 70.2 | 60.8 | 1000 |",
        "| powerbert | 4.60 (0.00) | 88.00 ± 2.00 | 65.0 | 65.0 | 1000 |"]
    # Ranking: its standard error is 0.5 over sqrt(2 seeds x 1 budget) = 0.354.
    assert "| 2 | tome | 90.50 | 0.35 |" in markdown


def test_tome_is_drawn_in_both_panels() -> None:
    import matplotlib.pyplot as plt
    from matplotlib.colors import same_color

    fig = reproduce._figure(_results_with_tome())
    try:
        left, right = fig.axes

        def tome_lines(ax: Any) -> list[Any]:
            return [line for line in ax.get_lines() if line.get_marker() == "<"
                    and same_color(line.get_color(), "tab:orange")]

        # Finetuned: one point at its MFLOPs (matching included) and mean accuracy, with an
        # error bar of one standard deviation either side.
        (finetuned,) = tome_lines(left)
        assert list(finetuned.get_xdata()) == pytest.approx([4.7])
        assert list(finetuned.get_ydata()) == [90.5]
        bars = [c for c in left.collections
                if same_color(c.get_colors()[0], "tab:orange")]
        (segment,) = bars[0].get_segments()
        assert [y for _, y in segment] == pytest.approx([90.0, 91.0])
        # Inserted: carry solid and no carry dashed, as the clustering methods (tokens that
        # ToMe merged have sizes); PoWER-BERT's selected tokens have none: one line.
        inserted = {line.get_linestyle(): list(line.get_ydata()) for line in tome_lines(right)}
        assert inserted == {"-": [70.25], "--": [60.75]}
        powerbert = [line for line in right.get_lines() if line.get_marker() == "D"]
        assert len(powerbert) == 1
        legend = [text.get_text() for text in fig.legends[0].get_texts()]
        assert "ToMe" in legend and "merging, no carry" in legend
    finally:
        plt.close(fig)


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


def test_a_search_interrupted_midway_starts_afresh_where_it_was(tmp_path: Path,
                                                                 monkeypatch) -> None:
    """The search refuses --resume and a folder holding a run (train's check), so the files an
    interrupted search left must be gone when the rerun starts; other files stay."""
    from reference_models import search_schedule, train

    out = tmp_path / "search-lam0.3"
    out.mkdir()
    for name in ("config.json", "log.jsonl", "checkpoint.pt"):
        (out / name).write_text("left by an interrupted run\n")
    (out / "notes.txt").write_text("the user's\n")
    seen: list[list[str]] = []

    def search(argv: list[str]) -> int:
        seen.append(sorted(p.name for p in out.iterdir()))
        (out / "schedule.json").write_text('{"keep": [1]}\n')
        return 0

    monkeypatch.setattr(search_schedule, "main", search)
    job = reproduce.Job("search", str(out), ("--lam", "0.3"))
    assert not job.done()
    reproduce._execute(job)
    assert seen == [["notes.txt", "stdout.txt"]]
    assert not any((out / name).exists() for name in train.RUN_FILES)
    assert job.done() and (out / "notes.txt").read_text() == "the user's\n"
