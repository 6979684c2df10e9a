"""``python -m reference_models.reproduce``: the paper's experiments on the embedded digits.

The protocol of §5 and Appendix C, scaled to scikit-learn's digits and two CPU cores:

1. **Base**: the trainer's default digits run (``OUTPUT/base``).
2. **Schedule search**: PoWER-BERT's soft-extract stage from the base at a few penalty
   weights λ (``reference_models.search_schedule``); each gives one keep schedule, a
   *budget* (``OUTPUT/search/<budget>/schedule.json``).
3. **Finetuning**: for every budget, each downsampler (Token Pooling with the four
   clustering methods, ToMe's bipartite matching, PoWER-BERT's top-k, random and importance
   selection) is finetuned from the base with that schedule, for two epochs and five seeds.
   Convolution
   downsampling (Appendix D) has its own token counts and is finetuned at fixed depths; the
   base itself is finetuned the same way, so every model has the same training (step 4).
4. **Insertion without finetuning** (Appendix E): every downsampler inserted into the base
   and evaluated, with and without carrying the cluster sizes into attention.
5. **Speed**: inference images/s of every finetuned model, one thread, on this machine.
6. **Pictures**: ``accuracy_vs_gflops.png`` (as the paper's Fig. 3, 5 and 9) and
   ``clusters.png`` (one digit through the finetuned WK-Medoids model, coloured by
   ``tokenpool_ops.visualize.render_clusters``).

It writes ``results.json`` (FLOPs in GFLOPs, as the trainer logs them), ``results.md``
(accuracy mean ± standard deviation over seeds, FLOPs from ``reference_models.flops`` with
the clustering's share in the unit that suits the base model, MFLOPs for the digits,
images/s) and the two pictures. Each stage has a numbered progress bar on stderr.

Every run keeps its own folder under ``OUTPUT``: a finished run is reused, an interrupted
one resumes from its checkpoint, so running the command again loses nothing and redoes
nothing. ``--smoke`` runs the whole pipeline on a minimal budget (CI).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

__all__ = ["FULL", "SMOKE", "Plan", "build_parser", "main", "reproduce"]

#: The downsamplers compared at every budget: name -> trainer flags.
METHODS: dict[str, list[str]] = {
    "wkmedoids": ["--downsample", "tokenpool", "--method", "wkmedoids"],
    "kmedoids": ["--downsample", "tokenpool", "--method", "kmedoids"],
    "wkmeans": ["--downsample", "tokenpool", "--method", "wkmeans"],
    "kmeans": ["--downsample", "tokenpool", "--method", "kmeans"],
    # ToMe's bipartite matching (Bolya et al., ICLR 2023): not in the paper, which predates
    # it, but the method most users compare against.
    "tome": ["--downsample", "tokenpool", "--method", "tome"],
    "powerbert": ["--downsample", "powerbert"],
    "importance": ["--downsample", "importance"],
    "random": ["--downsample", "random"],
}
#: The paper's ranking at equal FLOPs (Fig. 3a, 5): best first.
PAPER_RANKING = ["wkmedoids", "kmedoids", "powerbert", "importance", "random"]


@dataclass(frozen=True)
class Plan:
    """How much a reproduction runs."""

    base_epochs: int | None  # None: the trainer's digits default
    search_epochs: int
    finetune_epochs: int
    lams: tuple[float, ...]  # one budget per schedule-search penalty weight
    seeds: tuple[int, ...]
    conv_depths: tuple[str, ...]  # one convolution model per entry, e.g. "1,3"
    train_limit: int | None = None  # training images per epoch (None: all 1,437)
    methods: tuple[str, ...] = tuple(METHODS)


# Search: 5 epochs at a retention lr of 5e-2 (the search's default, 1e-2, is for 25 epochs:
# AdamW moves r by about its lr per step). On the digits base these penalties gave the
# schedules [58, 36, 19, 0], [35, 8, 8, 0] and [4, 4, 2, 0] (of 64 patches; results/digits.json).
FULL = Plan(base_epochs=None, search_epochs=5, finetune_epochs=2, lams=(0.03, 0.3, 3.0),
            seeds=(0, 1, 2, 3, 4), conv_depths=("3", "2", "1"))
SMOKE = Plan(base_epochs=1, search_epochs=1, finetune_epochs=1, lams=(0.3,), seeds=(0,),
             conv_depths=("2",), train_limit=128)
RETENTION_LR = "5e-2"

# Every run: the digits defaults, one thread (the runs go in parallel), no bars in logs.
COMMON = ["--data", "digits", "--threads", "1", "--no-progress"]
# Finetuning (stages 2-3): a fresh cosine schedule without warm-up, no EMA to evaluate.
FINETUNE = ["--warmup-epochs", "0", "--no-model-ema"]


@dataclass(frozen=True)
class Job:
    """One run of the trainer (or the schedule search) in its own folder."""

    kind: str  # "train", "search" or "eval"
    output: str
    argv: tuple[str, ...]
    epochs: int = 0
    tags: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def done(self) -> bool:
        out = Path(self.output)
        if self.kind == "eval":
            return (out / "eval.json").is_file()
        if self.kind == "search":
            return (out / "schedule.json").is_file()
        return _epochs_logged(out) >= self.epochs


def _epochs_logged(out: Path) -> int:
    log = out / "log.jsonl"
    if not log.is_file():
        return 0
    return len([line for line in log.read_text().splitlines() if line.strip()])


def _last_log(out: Path) -> dict[str, Any]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return dict(json.loads(lines[-1]))


def _execute(job: Job) -> Job:
    """Run one job in this (worker) process; its output goes to ``OUTPUT/stdout.txt``."""
    out = Path(job.output)
    out.mkdir(parents=True, exist_ok=True)
    if job.done():
        return job
    if job.kind == "search":
        from .search_schedule import main as entry
        _discard_interrupted_search(out)
    else:
        from .train import main as entry
    argv = [*job.argv, "--output", str(out)]
    if job.kind == "train":
        argv.append("--resume")  # continue an interrupted run (a fresh start otherwise)
    with open(out / "stdout.txt", "w") as log, redirect_stdout(log), redirect_stderr(log):
        try:
            entry(argv)
        except SystemExit as stop:  # argparse's error exit: say which run and why
            if stop.code not in (0, None):
                log.flush()
                tail = (out / "stdout.txt").read_text().strip().splitlines()[-1:]
                raise RuntimeError(f"{job.output}: {' '.join(tail)}") from None
    if job.kind == "eval":
        stats = (out / "stdout.txt").read_text().strip().splitlines()[-1]
        (out / "eval.json").write_text(stats + "\n")
    return job


def _discard_interrupted_search(out: Path) -> None:
    """Delete what an interrupted search left in ``out``: a search cannot resume (it refuses
    --resume) and refuses a folder holding a run, so it starts afresh. Only the files a run
    writes go; anything else in the folder stays."""
    from .train import RUN_FILES

    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Progress: one numbered bar per stage, its own time left, and the whole run's estimate

#: What one unit of each stage costs one worker, in base-training epochs: the stage times of
#: the full run on the 2-core machine, 2026-12-03, --jobs 2 (base 364 s for 25 epochs,
#: search 110 s, finetuning 1308 s, insertion 17 s, speed 119 s, pictures 2 s). Only the
#: whole run's estimate uses them, scaled by the time the units done so far actually took.
UNIT_COST = {"base": 1.0, "search": 1.0, "finetune": 0.7, "insertion": 0.06, "speed": 0.33,
             "pictures": 0.07}


@dataclass(frozen=True)
class Stage:
    """One numbered stage of the run: ``units`` of ``unit``, ``parallel`` at a time."""

    key: str  # a key of UNIT_COST
    title: str
    unit: str
    units: int
    parallel: int

    def cost(self, units: float) -> float:
        """Wall-clock cost of ``units`` of this stage, in base epochs of one worker."""
        return units * UNIT_COST[self.key] / self.parallel


def _stages(plan: Plan, jobs: int) -> list[Stage]:
    """The stages of ``plan``, in order, with the units each will run."""
    budgets = len(plan.lams) * len(plan.methods)
    finetune_runs = len(plan.seeds) * (budgets + len(plan.conv_depths) + 1)  # + the base
    return [
        Stage("base", "base", "epoch", _base_epochs(plan), 1),
        Stage("search", "schedule search", "epoch", len(plan.lams) * plan.search_epochs,
              min(jobs, len(plan.lams))),
        Stage("finetune", "finetuning", "epoch", finetune_runs * plan.finetune_epochs,
              min(jobs, finetune_runs)),
        Stage("insertion", "insertion without finetuning", "run", 2 * budgets,
              min(jobs, 2 * budgets)),
        Stage("speed", "speed", "model", finetune_runs // len(plan.seeds), 1),
        Stage("pictures", "pictures", "picture", 2, 1),
    ]


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}:{secs:02d}"


class Progress:
    """Draws the stage bars and estimates the whole run from the work done in this process.

    Units reused from an earlier run count as done and cost no time; the estimate is the
    elapsed time plus the work left, at the seconds per unit of work measured so far.
    """

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages
        self.start = time.perf_counter()
        self.left = {stage.key: float(stage.units) for stage in stages}
        self.worked = 0.0  # cost of the units this process has run

    def whole_run(self) -> str:
        elapsed = time.perf_counter() - self.start
        work_left = sum(stage.cost(self.left[stage.key]) for stage in self.stages)
        if self.worked == 0.0:
            return f"whole run {_clock(elapsed)} of ?"
        total = elapsed + work_left * elapsed / self.worked
        return f"whole run {_clock(elapsed)} of ~{_clock(total)}"

    @contextmanager
    def stage(self, key: str, done_before: int = 0) -> Iterator[Callable[[int], None]]:
        """A bar for stage ``key``; yields ``advance(units_done)``, called as units finish."""
        number, stage = next((i, s) for i, s in enumerate(self.stages, 1) if s.key == key)
        self.left[key] = stage.units - done_before
        bar = tqdm(total=stage.units, initial=done_before, unit=stage.unit, file=sys.stderr,
                   desc=f"{number}/{len(self.stages)} {stage.title}", dynamic_ncols=True)
        done = done_before

        def advance(units_done: int) -> None:
            nonlocal done
            if units_done > done:
                self.left[key] -= units_done - done
                self.worked += stage.cost(units_done - done)
                bar.update(units_done - done)
                done = units_done
            bar.set_postfix_str(self.whole_run())

        with bar:
            advance(done)
            yield advance


def _units_done(job: Job) -> int:
    """Epochs a training or search run has logged; 1 for a finished evaluation."""
    if job.kind == "eval":
        return int(job.done())
    return min(_epochs_logged(Path(job.output)), job.epochs)


#: Seconds between looks at the runs' logs while a stage runs.
POLL_SECONDS = 0.5


def _run_all(jobs: list[Job], pool: Any, progress: Progress, key: str) -> None:
    """Run ``jobs`` on the worker pool as stage ``key``; the first failure stops all."""
    todo = [job for job in jobs if not job.done()]
    pending = [pool.apply_async(_execute, (job,)) for job in todo]
    with progress.stage(key, sum(_units_done(job) for job in jobs)) as advance:
        while pending:
            pending[0].wait(POLL_SECONDS)
            for result in [r for r in pending if r.ready()]:
                result.get()  # a failed run raises here, and the pool is terminated
                pending.remove(result)
            advance(sum(_units_done(job) for job in jobs))


# ---------------------------------------------------------------------------------------------
# The stages


def _base_epochs(plan: Plan) -> int:
    from .train import PROFILES

    return plan.base_epochs or int(PROFILES["digits"]["epochs"])


def _base_job(out: Path, plan: Plan) -> Job:
    epochs = [] if plan.base_epochs is None else ["--epochs", str(plan.base_epochs)]
    return Job("train", str(out / "base"), (*COMMON, *epochs, *_limit(plan)), _base_epochs(plan))


def _limit(plan: Plan) -> list[str]:
    return [] if plan.train_limit is None else ["--train-limit", str(plan.train_limit)]


def _budget_name(lam: float) -> str:
    return f"lam{lam:g}"


def _search_jobs(out: Path, plan: Plan, base: Path) -> list[Job]:
    return [Job("search", str(out / "search" / _budget_name(lam)),
                (*COMMON, "--finetune", str(base), "--epochs", str(plan.search_epochs),
                 *FINETUNE, "--lam", f"{lam:g}", "--retention-lr", RETENTION_LR,
                 *_limit(plan)), plan.search_epochs,
                {"budget": _budget_name(lam), "lam": lam})
            for lam in plan.lams]


def _finetune_jobs(out: Path, plan: Plan, base: Path,
                   budgets: dict[str, list[int]]) -> list[Job]:
    """Every downsampler at every budget and seed, conv at its depths, and the base."""
    common = (*COMMON, "--finetune", str(base), "--epochs", str(plan.finetune_epochs),
              *FINETUNE, *_limit(plan))
    jobs = []
    for seed in plan.seeds:
        for budget, keep in budgets.items():
            for method in plan.methods:
                jobs.append(Job("train", str(out / "finetune" / budget / method / f"seed{seed}"),
                                (*common, *METHODS[method], "--keep", ",".join(map(str, keep)),
                                 "--seed", str(seed)), plan.finetune_epochs,
                                {"budget": budget, "method": method, "seed": seed}))
        for depths in plan.conv_depths:
            budget = "conv" + depths.replace(",", "-")
            jobs.append(Job("train", str(out / "finetune" / budget / "conv" / f"seed{seed}"),
                            (*common, "--downsample", "conv", "--conv-depths", depths,
                             "--seed", str(seed)), plan.finetune_epochs,
                            {"budget": budget, "method": "conv", "seed": seed}))
        jobs.append(Job("train", str(out / "finetune" / "full" / "none" / f"seed{seed}"),
                        (*common, "--seed", str(seed)), plan.finetune_epochs,
                        {"budget": "full", "method": "none", "seed": seed}))
    return jobs


def _insertion_jobs(out: Path, plan: Plan, base: Path,
                    budgets: dict[str, list[int]]) -> list[Job]:
    """Appendix E: each downsampler put into the base model as it is, with and without carry."""
    jobs = []
    for budget, keep in budgets.items():
        for method in plan.methods:
            for carry in ("carry", "no-carry"):
                jobs.append(Job("eval", str(out / "insert" / budget / method / carry),
                                (*COMMON, "--eval", "--finetune", str(base), *METHODS[method],
                                 "--keep", ",".join(map(str, keep)), f"--{carry}"), 0,
                                {"budget": budget, "method": method, "carry": carry}))
    return jobs


def _read_budgets(jobs: list[Job]) -> dict[str, list[int]]:
    budgets = {}
    for job in jobs:
        found = json.loads((Path(job.output) / "schedule.json").read_text())
        budgets[job.tags["budget"]] = [int(k) for k in found["keep"]]
    return budgets


# ---------------------------------------------------------------------------------------------
# Speed and pictures (in this process)


def _patched_model(run: Path) -> Any:
    """The finetuned model of ``run``, downsampled as it was trained, in eval mode."""
    import torch

    from .models import apply_downsample, build_model

    config = json.loads((run / "config.json").read_text())
    model = build_model(config["model"], config["num_classes"])
    apply_downsample(model, config["downsample"], config["method"], config["keep"],
                     seed=config["seed"], conv_depths=config.get("conv_depths"),
                     carry=config["carry"])
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    return model.eval()


def _images_per_s(model: Any, images: Any, repeats: int = 3) -> float:
    """Inference throughput over ``images`` in batches of 120, best of ``repeats``."""
    import torch

    best = math.inf
    with torch.no_grad():
        model(images[:8])  # first-call costs (kernel compilation) are not throughput
        for _ in range(repeats):
            start = time.perf_counter()
            for batch in images.split(120):
                model(batch)
            best = min(best, time.perf_counter() - start)
    return float(len(images) / best)


def _val_images(model: Any, limit: int | None = None) -> tuple[Any, Any, Any]:
    """The validation images as ``model``'s eval transform gives them, the raw digits and
    their labels."""
    import torch
    from timm.data import resolve_data_config

    from . import data

    _, _, x_val, y_val = data.digits_split()
    tf = data.build_transform(None, resolve_data_config(model=model), is_training=False)
    dataset = data.DigitsDataset(x_val, y_val, tf)
    count = len(dataset) if limit is None else limit
    return (torch.stack([dataset[i][0] for i in range(count)]), x_val[:count],
            y_val[:count])


def _draw_clusters(model: Any, pixels: Any, digit: Any, path: Path, title: str) -> None:
    """One digit through every pooling block of ``model`` (keep > 0), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from tokenpool_ops.visualize import cluster_map, render_clusters

    scale = 24  # 8 px digits drawn as 192 px
    image = Image.fromarray(digit).convert("RGB").resize((8 * scale, 8 * scale),
                                                          Image.Resampling.NEAREST)
    keep = model._tokenpool["keep"]
    blocks = [block for block in range(len(model.blocks)) if keep[block] > 0]
    fig, axes = plt.subplots(1, len(blocks), figsize=(4.6 * len(blocks), 3.1), squeeze=False)
    for ax, block in zip(axes[0], blocks, strict=True):
        labels = cluster_map(model, pixels, block)
        ax.imshow(render_clusters(image, labels, fill="palette", border="red"))
        ax.set_title(f"after block {block + 1}: {count_clusters(labels)} tokens, "
                     f"{count_clusters(labels, merged_only=True)} merged", fontsize=12)
        ax.axis("off")
    fig.suptitle(title, fontsize=14)
    fig.text(0.5, 0.03, "Each pair: left, the digit, merged patches outlined in red; right, "
             "each token of two or more patches in its own colour (its patches need not touch), "
             "single patches gray.", ha="center", fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def count_clusters(labels: Any, merged_only: bool = False) -> int:
    """Clusters left in a cluster map (-1 marks patches no token stands for); with
    ``merged_only``, those of two or more patches."""
    import numpy as np

    _, sizes = np.unique(labels[labels >= 0], return_counts=True)
    return int((sizes > 1).sum() if merged_only else sizes.size)


# ---------------------------------------------------------------------------------------------
# Results


def _base_summary(run: Path, plan: Plan) -> dict[str, Any]:
    """The base model, its accuracy and cost, and the data it learnt from."""
    from . import data
    from .models import build_model

    config = json.loads((run / "config.json").read_text())
    log = _last_log(run)
    model = build_model(config["model"], config["num_classes"])
    x_train, _, x_val, _ = data.digits_split()
    return {"model": config["model"], "val_acc1": log["val_acc1"], "gflops": log["gflops"],
            "epochs": config["epochs"], "blocks": len(model.blocks),
            "patch_tokens": model.patch_embed.num_patches,
            "train_images": min(len(x_train), plan.train_limit or len(x_train)),
            "val_images": len(x_val)}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _summarise(finetuned: list[Job], inserted: list[Job], budgets: dict[str, list[int]],
               speed: dict[tuple[str, str], float]) -> list[dict[str, Any]]:
    """One row per (budget, method): accuracy over seeds, FLOPs, speed, insertion results."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for job in finetuned:
        groups.setdefault((job.tags["budget"], job.tags["method"]), []).append(
            _last_log(Path(job.output)))
    no_ft = {(j.tags["budget"], j.tags["method"], j.tags["carry"]):
             json.loads((Path(j.output) / "eval.json").read_text())["val_acc1"]
             for j in inserted}
    rows = []
    for (budget, method), logs in groups.items():
        mean, std = _mean_std([log["val_acc1"] for log in logs])
        rows.append({
            "budget": budget, "method": method, "keep": budgets.get(budget),
            # The counter's total leaves the clustering out (Table 1's convention); the
            # comparison at equal cost counts it (the paper's Fig. 5b shifts K-Means right).
            "gflops": logs[0]["gflops"] + logs[0]["gflops_clustering"],
            "gflops_model": logs[0]["gflops"], "gflops_clustering": logs[0]["gflops_clustering"],
            "acc_mean": mean, "acc_std": std, "seeds": len(logs),
            "acc_per_seed": [log["val_acc1"] for log in logs],
            "no_finetune_carry": no_ft.get((budget, method, "carry")),
            "no_finetune_no_carry": no_ft.get((budget, method, "no-carry")),
            "images_per_s": speed.get((budget, method))})
    return rows


def _ranking(rows: list[dict[str, Any]], budgets: Sequence[str]) -> list[dict[str, Any]]:
    """Methods by their accuracy averaged over the searched budgets, best first.

    ``margin`` is the gap to the next method in units of its standard error (the spread over
    seeds, averaged over budgets, divided by sqrt(seeds x budgets)); below 2 the order of
    that pair rests on noise.
    """
    stats = {}
    for method in {r["method"] for r in rows if r["budget"] in budgets}:
        mine = [r for r in rows if r["method"] == method and r["budget"] in budgets]
        n = sum(r["seeds"] for r in mine)
        spread = statistics.fmean(r["acc_std"] for r in mine)
        stats[method] = (statistics.fmean(r["acc_mean"] for r in mine), spread / math.sqrt(n))
    order = sorted(stats, key=lambda m: -stats[m][0])
    ranking = []
    for i, method in enumerate(order):
        mean, se = stats[method]
        margin = None
        if i + 1 < len(order):
            nxt_mean, nxt_se = stats[order[i + 1]]
            pooled = math.hypot(se, nxt_se)
            margin = (mean - nxt_mean) / pooled if pooled > 0 else None  # one seed: unknown
        ranking.append({"method": method, "acc_mean": mean, "standard_error": se,
                        "margin_to_next": margin})
    return ranking


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def flops_unit(results: dict[str, Any]) -> tuple[float, str]:
    """The unit that writes the base model's FLOPs between 1 and 1000 (MFLOPs for the
    digits, GFLOPs for DeiT-S): its factor from GFLOPs and its name. The results hold
    GFLOPs, as the trainer's log does."""
    base = results["base"]["gflops"]
    for factor, name in ((1.0, "GFLOPs"), (1e3, "MFLOPs")):
        if base * factor >= 1.0:
            return factor, name
    return 1e6, "kFLOPs"


def _markdown(results: dict[str, Any]) -> str:
    """results.md: the table, the ranking, and how it compares with the paper's."""
    factor, unit = flops_unit(results)
    lines = ["# Token Pooling on digits: the paper's protocol, reproduced", "",
             f"Base model: {results['base']['model']}, validation accuracy "
             f"{results['base']['val_acc1']:.2f}% ({results['base']['gflops'] * factor:.2f} "
             f"{unit}). Seeds: {len(results['plan']['seeds'])}; finetuning "
             f"{results['plan']['finetune_epochs']} epoch(s) per model; accuracy is top-1 on "
             f"the {results['base']['val_images']} validation digits, mean ± standard "
             f"deviation over seeds. {unit} per image from reference_models.flops: the model "
             "plus the clustering or ToMe's matching (its share in parentheses). images/s: "
             "inference, one thread, batches of 120, this machine.",
             ""]
    for budget in results["budgets"]:
        lines += [f"## Budget {budget['name']} (λ = {budget['lam']:g}): keep "
                  f"{budget['keep']}", "",
                  f"| method | {unit} (clustering) | finetuned acc % | inserted, carry % | "
                  "inserted, no carry % | images/s |", "|---|---|---|---|---|---|"]
        for row in sorted((r for r in results["summary"] if r["budget"] == budget["name"]),
                          key=lambda r: -r["acc_mean"]):
            lines.append(
                f"| {row['method']} | {row['gflops'] * factor:.2f} "
                f"({row['gflops_clustering'] * factor:.2f}) | "
                f"{row['acc_mean']:.2f} ± {row['acc_std']:.2f} | "
                f"{_fmt(row['no_finetune_carry'])} | {_fmt(row['no_finetune_no_carry'])} | "
                f"{_fmt(row['images_per_s'], 0)} |")
        lines.append("")
    lines += ["## Convolution downsampling and the finetuned base", "",
              f"| model | {unit} | finetuned acc % | images/s |", "|---|---|---|---|"]
    for row in results["summary"]:
        if row["method"] in ("conv", "none"):
            lines.append(f"| {row['budget']} | {row['gflops'] * factor:.2f} | "
                         f"{row['acc_mean']:.2f} ± "
                         f"{row['acc_std']:.2f} | {_fmt(row['images_per_s'], 0)} |")
    lines += ["", "## Ranking over the searched budgets", "",
              "| rank | method | mean acc % | standard error | gap to next (standard errors) |",
              "|---|---|---|---|---|"]
    for i, entry in enumerate(results["ranking"], 1):
        lines.append(f"| {i} | {entry['method']} | {entry['acc_mean']:.2f} | "
                     f"{entry['standard_error']:.2f} | {_fmt(entry['margin_to_next'])} |")
    lines += ["", "The paper (Fig. 3a, 5): " + " ≥ ".join(PAPER_RANKING[:2]) + " > "
              + " > ".join(PAPER_RANKING[2:]) + ". A gap under 2 standard errors is a tie "
              "here.", ""]
    return "\n".join(lines)


#: Each method's name, colour and marker in the plot, the same in both panels. The markers
#: are open and differ in shape, so that points drawn over each other stay apart.
STYLES = {"wkmedoids": ("WK-Medoids", "tab:blue", "o"), "kmedoids": ("K-Medoids", "tab:cyan", "s"),
          "wkmeans": ("WK-Means", "tab:green", "^"), "kmeans": ("K-Means", "tab:olive", "v"),
          "tome": ("ToMe", "tab:orange", "<"),
          "powerbert": ("PoWER-BERT", "tab:red", "D"),
          "importance": ("importance", "tab:purple", "P"),
          "random": ("random", "tab:brown", "X"), "conv": ("convolution", "tab:gray", "h")}
#: Sideways shift between neighbouring methods, in points: at the harshest budget the four
#: clustering methods cost the same to a thousandth, and importance and random score alike.
DODGE_POINTS = 2.5
#: The methods that merge tokens, whose sizes --carry brings into attention: the clustering
#: methods and ToMe. (The selection methods keep tokens of size 1: carry changes nothing.)
MERGING = ("wkmedoids", "kmedoids", "wkmeans", "kmeans", "tome")


def _plot(results: dict[str, Any], path: Path) -> None:
    """accuracy_vs_gflops.png: finetuned (left) and inserted without finetuning (right)."""
    import matplotlib.pyplot as plt

    fig = _figure(results)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _figure(results: dict[str, Any]) -> Any:
    """The matplotlib figure of accuracy_vs_gflops.png (its two panels are ``fig.axes``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    factor, unit = flops_unit(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 6.6), sharey=True)
    searched = [b["name"] for b in results["budgets"]]
    for i, method in enumerate(STYLES):
        mine = sorted((r for r in results["summary"] if r["method"] == method
                       and (r["budget"] in searched or method == "conv")),
                      key=lambda r: r["gflops"])
        if mine:
            shift = (i - (len(STYLES) - 1) / 2) * DODGE_POINTS
            _plot_method(fig, left, right, method, mine, factor, shift)
    base = results["base"]
    for row in results["summary"]:
        if row["method"] == "none":
            left.errorbar([row["gflops"] * factor], [row["acc_mean"]], yerr=[row["acc_std"]],
                          marker="*", markersize=13, color="black", capsize=3)
    right.plot([base["gflops"] * factor], [base["val_acc1"]], marker="*", markersize=13,
               color="black", linestyle="none")
    seeds = len(results["plan"]["seeds"])
    spread = f"mean ± sd over {seeds} seeds" if seeds > 1 else "one seed: no error bars"
    left.set_title(f"finetuned with the downsampler (Fig. 3a, 5)\n{spread}", fontsize=12)
    right.set_title("inserted into the base without finetuning (Fig. 9)\none evaluation "
                    "each; dashed: cluster sizes not carried", fontsize=12)
    for ax in (left, right):
        ax.set_xlabel(f"{unit} per image (clustering included)", fontsize=11)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=10)
    left.set_ylabel("validation top-1 accuracy (%)", fontsize=11)
    right.tick_params(labelleft=True)
    handles = [Line2D([], [], color=colour, marker=marker, markerfacecolor="none",
                      label=name) for name, colour, marker in STYLES.values()]
    handles += [Line2D([], [], color="black", marker="*", markersize=11, linestyle="none",
                       label="no downsampling"),
                Line2D([], [], color="gray", linestyle="-", label="merging, carry"),
                Line2D([], [], color="gray", linestyle="--", label="merging, no carry")]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=10, frameon=False,
               bbox_to_anchor=(0.5, 0.04))
    widest = DODGE_POINTS * (len(STYLES) - 1) / 2
    fig.text(0.5, 0.01, f"Each method's markers are drawn shifted sideways, by {widest:.0f} pt "
             "at most, so that markers of equal cost stay apart.", ha="center", fontsize=9,
             color="dimgray")
    fig.suptitle(f"Token downsampling on digits ({base['model']}): accuracy against cost",
                 fontsize=13)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    return fig


def _plot_method(fig: Any, left: Any, right: Any, method: str, rows: list[dict[str, Any]],
                 factor: float, shift: float) -> None:
    """One method's points: finetuned with error bars (left), inserted as it is (right)."""
    from matplotlib.transforms import offset_copy

    _, colour, marker = STYLES[method]
    style = {"color": colour, "marker": marker, "markerfacecolor": "none", "markersize": 7}
    # Shifted artists do not widen the axes' limits by themselves: the data does that.
    cost = [r["gflops"] * factor for r in rows]
    mean, std = [r["acc_mean"] for r in rows], [r["acc_std"] for r in rows]
    left.errorbar(cost, mean, yerr=std, capsize=3,
                  transform=offset_copy(left.transData, fig, shift, 0, "points"), **style)
    left.update_datalim([(c, m + s * side) for c, m, s in zip(cost, mean, std, strict=True)
                         for side in (-1, 1)])
    inserted = [r for r in rows if r["no_finetune_carry"] is not None]
    if not inserted:
        return
    moved = offset_copy(right.transData, fig, shift, 0, "points")
    cost = [r["gflops"] * factor for r in inserted]
    # Carry means something only where tokens are merged.
    keys = ["no_finetune_carry", "no_finetune_no_carry"] if method in MERGING else \
        ["no_finetune_carry"]
    for key, line in zip(keys, ["-", "--"], strict=False):
        accuracy = [r[key] for r in inserted]
        right.plot(cost, accuracy, transform=moved, linestyle=line, **style)
        right.update_datalim(list(zip(cost, accuracy, strict=True)))


# ---------------------------------------------------------------------------------------------
# Entry points


def _measure_speed(finetuned: list[Job], limit: int | None,
                   progress: Progress) -> dict[tuple[str, str], float]:
    """Inference images/s of each (budget, method)'s first-seed model."""
    import torch

    torch.set_num_threads(1)
    first_seed = min(job.tags["seed"] for job in finetuned)
    runs = [job for job in finetuned if job.tags["seed"] == first_seed]
    speed = {}
    images = None
    with progress.stage("speed") as advance:
        for count, job in enumerate(runs, 1):
            model = _patched_model(Path(job.output))
            if images is None:  # every run has the base model's input
                images, _, _ = _val_images(model, limit)
            speed[(job.tags["budget"], job.tags["method"])] = _images_per_s(model, images)
            advance(count)
    return speed


def _clusters_picture(out: Path, finetuned: list[Job], budgets: dict[str, list[int]]) -> None:
    """clusters.png: one validation digit through the finetuned WK-Medoids model."""
    import torch

    candidates = [j for j in finetuned if j.tags["method"] == "wkmedoids"]
    if not candidates:
        return
    # The mildest searched budget: the most blocks with tokens left to draw.
    mildest = max(budgets, key=lambda name: sum(budgets[name]))
    job = next(j for j in candidates if j.tags["budget"] == mildest)
    model = _patched_model(Path(job.output))
    pixels, digits, labels = _val_images(model, 1)
    with torch.no_grad():
        predicted = int(model(pixels[:1]).argmax(dim=-1)[0])
    _draw_clusters(model, pixels[:1], digits[0], out / "clusters.png",
                   f"A validation {int(labels[0])}, predicted {predicted}: WK-Medoids "
                   f"finetuned at keep {budgets[mildest]} (seed {job.tags['seed']})")


def reproduce(out: Path, plan: Plan, jobs: int) -> dict[str, Any]:
    """Run (or reuse) every stage, then write the results into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(asdict(plan), indent=1) + "\n")
    # tqdm's default lock is a multiprocessing semaphore, which the spawn context's resource
    # tracker reports as leaked at exit; the bars live in this process only.
    tqdm.set_lock(threading.RLock())
    progress = Progress(_stages(plan, jobs))
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked threads
    with context.Pool(jobs) as pool:
        base_job = _base_job(out, plan)
        _run_all([base_job], pool, progress, "base")
        base = Path(base_job.output) / "checkpoint.pt"
        searches = _search_jobs(out, plan, base)
        _run_all(searches, pool, progress, "search")
        budgets = _read_budgets(searches)
        finetuned = _finetune_jobs(out, plan, base, budgets)
        _run_all(finetuned, pool, progress, "finetune")
        inserted = _insertion_jobs(out, plan, base, budgets)
        _run_all(inserted, pool, progress, "insertion")
        # Let the workers exit on their own: leaving the block terminates them, and a killed
        # worker never releases its semaphores (the resource tracker reports them at exit).
        pool.close()
        pool.join()
    speed = _measure_speed(finetuned, plan.train_limit, progress)
    summary = _summarise(finetuned, inserted, budgets, speed)
    results = {
        "plan": asdict(plan),
        "base": _base_summary(Path(base_job.output), plan),
        "budgets": [{"name": j.tags["budget"], "lam": j.tags["lam"],
                     "keep": budgets[j.tags["budget"]]} for j in searches],
        "summary": summary,
        "ranking": _ranking(summary, list(budgets)),
        "paper_ranking": PAPER_RANKING,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(_markdown(results))
    with progress.stage("pictures") as advance:
        _plot(results, out / "accuracy_vs_gflops.png")
        advance(1)
        _clusters_picture(out, finetuned, budgets)
        advance(2)
    return results


def build_parser() -> argparse.ArgumentParser:
    from .cli import int_at_least  # argparse types shared by the entry points

    p = argparse.ArgumentParser(
        prog="python -m reference_models.reproduce",
        description="The paper's protocol on the embedded digits: base training, PoWER-BERT "
                    "schedule search, finetuning of every downsampler, insertion without "
                    "finetuning, speed; writes results.md/json and two pictures.")
    p.add_argument("--output", default="runs/reproduce",
                   help="folder of every run and of the results (reused when run again "
                        "with the same plan; more or fewer --seeds reuse it too)")
    p.add_argument("--smoke", action="store_true",
                   help="the whole pipeline on a minimal budget (one epoch, one seed, one "
                        "budget, 128 training images): checks that everything runs")
    p.add_argument("--seeds", type=int_at_least(1), default=None,
                   help=f"finetuning seeds per model (default {len(FULL.seeds)})")
    p.add_argument("--jobs", type=int_at_least(1), default=None,
                   help="runs in parallel, one CPU thread each (default: CPU cores)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import writable_folder
    from .errors import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    if args.seeds is not None:
        plan = Plan(**{**asdict(plan), "seeds": tuple(range(args.seeds))})
    try:
        writable_folder("--output", args.output)
    except ConfigError as err:
        parser.error(str(err))
    # Runs are reused by folder: another plan's (a --smoke run's 128-image base, say) would
    # be mixed into this one. The number of seeds may differ: each seed has its own runs.
    earlier, now = Path(args.output) / "plan.json", json.loads(json.dumps(asdict(plan)))
    if earlier.is_file():
        try:
            before = json.loads(earlier.read_text())
        except ValueError:
            before = {}
        differ = [key for key in now if key != "seeds" and before.get(key) != now[key]]
        if differ:
            parser.error(f"--output {args.output!r} holds a reproduction of another plan "
                         f"({', '.join(differ)} differ, as between --smoke and a full run); "
                         "name a new folder")
    jobs = args.jobs or max(1, multiprocessing.cpu_count())
    start = time.perf_counter()
    results = reproduce(Path(args.output), plan, jobs)
    print(_markdown(results))
    print(f"written to {args.output}/ in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
