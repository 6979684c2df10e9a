"""Every number in the README's "What the main job measured" comes from the run's results.

``reference_models/results/digits.json`` is the ``results.json`` of the run the README
quotes. The table's cells and each number of the prose are derived here from that file
(rounded as printed, never from rounded values); once they are taken out, no digit may be
left in the section but the paper's figure and appendix references, code names and the
measured times of the commands, which no results.json holds. The claims without numbers
are checked on the same file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = json.loads((ROOT / "reference_models" / "results" / "digits.json").read_text())
README = (ROOT / "README.md").read_text()
SECTION = README.split("### What the main job measured\n", 1)[1].split("\n## ", 1)[0]
CLUSTERING = ("wkmedoids", "wkmeans", "kmedoids", "kmeans")


def _row(budget: str, method: str) -> dict[str, Any]:
    return next(r for r in RESULTS["summary"] if r["budget"] == budget and r["method"] == method)


def _budgets() -> list[str]:
    """The searched budgets, mildest (most tokens kept) first."""
    return [b["name"] for b in sorted(RESULTS["budgets"], key=lambda b: -sum(b["keep"]))]


def _mflops(gflops: float) -> str:
    return f"{gflops * 1e3:.1f}"


def _cell(row: dict[str, Any]) -> str:
    return f"{row['acc_mean']:.1f} ± {row['acc_std']:.1f} @ {_mflops(row['gflops'])}"


def _lead(budget: str, better: str, worse: str, key: str = "acc_mean") -> float:
    return float(_row(budget, better)[key] - _row(budget, worse)[key])


def _larger_sd(budget: str, *methods: str) -> float:
    return max(_row(budget, method)["acc_std"] for method in methods)


def _carry_gain(budget: str, method: str) -> float:
    row = _row(budget, method)
    return float(row["no_finetune_carry"] - row["no_finetune_no_carry"])


def _table() -> tuple[list[str], dict[str, list[str]]]:
    """The README table: its header cells and, per method, its row's cells."""
    lines = [line for line in SECTION.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert split[1] == ["---"] * len(split[0])
    return split[0], {cells[0]: cells[1:] for cells in split[2:]}


def test_the_table_is_results_json_rounded() -> None:
    header, rows = _table()
    keeps = {b["name"]: b["keep"] for b in RESULTS["budgets"]}
    assert header == ["method", *[f"keep {keeps[b]}" for b in _budgets()]]
    assert sorted(rows) == sorted(RESULTS["plan"]["methods"])
    for method, cells in rows.items():
        assert cells == [_cell(_row(budget, method)) for budget in _budgets()], method


def _series(values: list[float], unit: str = "") -> str:
    """``a, b and c`` as the prose writes a number per budget."""
    text = [f"{value:.1f}{unit}" for value in values]
    return ", ".join(text[:-1]) + " and " + text[-1]


def _prose_facts() -> list[str]:
    """Every fragment of the prose that holds a number, written from results.json."""
    base, plan = RESULTS["base"], RESULTS["plan"]
    budgets = _budgets()
    mild, middle, harsh = budgets
    conv = sorted((r for r in RESULTS["summary"] if r["method"] == "conv"),
                  key=lambda r: -r["gflops"])
    depths = [r["budget"].removeprefix("conv") for r in conv]

    def acc(budget: str, method: str) -> str:
        return f"{_row(budget, method)['acc_mean']:.1f}"

    def in_sd(budget: str) -> float:  # importance's lead over random
        return _lead(budget, "importance", "random") / _larger_sd(budget, "importance",
                                                                  "random")

    def versus(budget: str) -> str:
        return f"{acc(budget, 'kmedoids')} against {acc(budget, 'powerbert')}"

    return [
        f"({base['blocks']} blocks, {base['patch_tokens']} patch tokens), "
        f"{base['val_acc1']:.2f}% after the trainer's {base['epochs']} digits epochs, "
        f"{_mflops(base['gflops'])} MFLOPs per image",
        f"after {plan['finetune_epochs']} epochs of finetuning from the base, mean ± standard "
        f"deviation over {len(plan['seeds'])} seeds",
        f"Convolution downsampling after block {', '.join(depths[:-1])} or {depths[-1]}: "
        + ", ".join(_cell(r) for r in conv) + f"; the base finetuned alike: "
        f"{_cell(_row('full', 'none'))}",
        f"({_mflops(_row(mild, 'kmeans')['gflops_clustering'])} MFLOPs per image at the "
        f"mildest budget, K-Medoids {_mflops(_row(mild, 'kmedoids')['gflops_clustering'])})",
        "PoWER-BERT leads importance by "
        + _series([_lead(b, "powerbert", "importance") for b in budgets]) + " points",
        f"importance leads random by {_lead(mild, 'importance', 'random'):.1f} and "
        f"{_lead(middle, 'importance', 'random'):.1f} points at the two milder budgets "
        f"({in_sd(mild):.1f} and {in_sd(middle):.1f} times the larger standard deviation) "
        f"and ties with it at the harshest ({acc(harsh, 'importance')} against "
        f"{acc(harsh, 'random')})",
        "(at the two harsher budgets WK-Medoids by "
        + _series([_carry_gain(b, "wkmedoids") for b in (middle, harsh)]) + " points, WK-Means by "
        + _series([_carry_gain(b, "wkmeans") for b in (middle, harsh)]) + "; K-Medoids by "
        + _series([_carry_gain(b, "kmedoids") for b in budgets]) + " points at the three)",
        f"(WK-Medoids by {-_carry_gain(mild, 'wkmedoids'):.1f} points, WK-Means by "
        f"{-_carry_gain(mild, 'wkmeans'):.1f})",
        *_tome_facts(),
        f"({versus(mild)}, {versus(middle)}) and beat it only at the harshest "
        f"({versus(harsh)})",
        f"This is a {base['blocks']}-block model on {base['train_images']:,} training images "
        f"with {plan['finetune_epochs']}-epoch finetuning",
    ]


def _tome_facts() -> list[str]:
    """The numbers of the paragraph on ToMe."""
    mild, middle, harsh = budgets = _budgets()

    def kflops(method: str) -> str:
        text = [f"{_row(b, method)['gflops_clustering'] * 1e6:.0f}" for b in budgets]
        return ", ".join(text[:-1]) + " and " + text[-1] + " kFLOPs"

    tome_harsh, powerbert_harsh = _row(harsh, "tome"), _row(harsh, "powerbert")
    return [
        "ToMe trails WK-Medoids at every budget, by "
        + _series([_lead(b, "wkmedoids", "tome") for b in budgets]) + " points, while costing "
        + _series([_lead(b, "wkmedoids", "tome", "gflops") * 1e3 for b in budgets])
        + " MFLOPs per image less",
        f"(its matching costs {kflops('tome')} per image, WK-Medoids' clustering "
        f"{kflops('wkmedoids')})",
        "ToMe trails at the two milder budgets by "
        + _series([_lead(b, "powerbert", "tome") for b in (mild, middle)])
        + f" points and leads at the harshest by {_lead(harsh, 'tome', 'powerbert'):.1f} "
        f"({tome_harsh['acc_mean']:.1f} ± {tome_harsh['acc_std']:.1f} against "
        f"{powerbert_harsh['acc_mean']:.1f} ± {powerbert_harsh['acc_std']:.1f})",
        f"it keeps {_row(mild, 'tome')['no_finetune_carry']:.1f}% at the mildest budget "
        f"against WK-Medoids' {_row(mild, 'wkmedoids')['no_finetune_carry']:.1f}% with carry "
        f"and PoWER-BERT's {_row(mild, 'powerbert')['no_finetune_carry']:.1f}%",
    ]


#: What may keep a digit once the facts are taken out: code names (model, files, modules),
#: the paper's figures and appendices, the machine, and the timed commands with the date.
NOT_RESULTS = [r"`[^`]*`", r"Fig\. \d+[a-z]?(, \d+[a-z]?)*", r"Appendix [A-Z]",
               r"\d+-core", r"\(install [^()]*\)"]


def test_every_number_in_the_prose_comes_from_results_json() -> None:
    prose = " ".join(line for line in SECTION.splitlines() if not line.startswith("|"))
    prose = re.sub(r"\s+", " ", prose)
    for fact in _prose_facts():
        assert fact in prose, f"not in the README as results.json gives it: {fact!r}"
        prose = prose.replace(fact, "")
    for allowed in NOT_RESULTS:
        prose = re.sub(allowed, "", prose)
    left = re.findall(r"[^.;:]*\d[^.;:]*", prose)
    assert not left, f"numbers in the prose that no fact accounts for: {left}"


def test_the_claims_without_numbers_hold() -> None:
    mild, middle, harsh = budgets = _budgets()
    methods = RESULTS["plan"]["methods"]
    for budget in budgets:  # WK-Medoids and WK-Means are the two most accurate, tied
        top_two = sorted(methods, key=lambda m: -_row(budget, m)["acc_mean"])[:2]
        assert sorted(top_two) == ["wkmeans", "wkmedoids"], budget
        assert abs(_lead(budget, "wkmeans", "wkmedoids")) < _larger_sd(budget, "wkmeans",
                                                                          "wkmedoids")
    for budget in (mild, middle):  # WK-Means costs more at the two milder budgets
        assert _lead(budget, "wkmeans", "wkmedoids", "gflops") > 0
    for conv in (r for r in RESULTS["summary"] if r["method"] == "conv"):
        assert any(r["gflops"] <= conv["gflops"] and r["acc_mean"] > conv["acc_mean"]
                   for r in RESULTS["summary"] if r["method"] == "wkmedoids"), conv["budget"]
    for budget in budgets:
        assert _lead(budget, "wkmedoids", "kmedoids") > 0  # weighted beat unweighted
        assert _lead(budget, "wkmeans", "kmeans") > 0
        assert _lead(budget, "powerbert", "importance") > 0
        assert _carry_gain(budget, "kmedoids") > 0 and _carry_gain(budget, "kmeans") > 0
        assert _lead(budget, "wkmedoids", "tome") > 0  # ToMe trails WK-Medoids, costs less
        assert _lead(budget, "wkmedoids", "tome", "gflops") > 0
        # PoWER-BERT "costs about as much" as ToMe: within 2%
        assert abs(_lead(budget, "tome", "powerbert", "gflops")) < 0.02 * _row(
            budget, "powerbert")["gflops"]
    for budget in (middle, harsh):  # carry helps every clustering method there ...
        assert all(_carry_gain(budget, method) > 0 for method in CLUSTERING)
    # ... and costs the weighted ones a little at the mildest budget
    assert _carry_gain(mild, "wkmedoids") < 0 and _carry_gain(mild, "wkmeans") < 0
    for budget in (mild, middle):  # ToMe trails PoWER-BERT at the milder budgets ...
        assert _lead(budget, "powerbert", "tome") > 0
    assert _lead(harsh, "tome", "powerbert") > 0  # ... and leads it at the harshest
    assert _lead(mild, "kmeans", "kmedoids", "gflops_clustering") > 0  # K-Means pays
    for budget in (mild, middle):  # importance > random, and plain K-Medoids, K-Means
        assert _lead(budget, "importance", "random") > 0  # trail PoWER-BERT
        assert _lead(budget, "powerbert", "kmedoids") > 0 and \
            _lead(budget, "powerbert", "kmeans") > 0
    assert abs(_lead(harsh, "importance", "random")) < _larger_sd(harsh, "importance", "random")
    assert _lead(harsh, "kmedoids", "powerbert") > 0 and _lead(harsh, "kmeans", "powerbert") > 0
