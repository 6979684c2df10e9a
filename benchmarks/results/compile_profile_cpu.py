"""Issue 25, CPU: where eager and compiled DeiT-S (plain, and level-4 wkmedoids pooled)
spend a pass. Torch profiler with inductor's kernel profile (each inductor kernel its own
event): per operator, the least self CPU time over 6 profiled passes; then 10 unprofiled
rounds of the four models in turn, wall clock, and the speed-ups by least and median time.

    PYTHONPATH=. python benchmarks/results/compile_profile_cpu.py THREADS BATCH

Run 2026-12-05 01:57 UTC as ``... 2 8`` (load average 0.2; inductor caches warm):
benchmarks/results/compile_profile_cpu.log.
"""

import collections
import statistics
import sys
import time

import timm
import torch
import torch._inductor.config as inductor_config
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "benchmarks")
from timm_speedup import MODEL, SCHEDULES

from tokenpool_ops.timm import patch_timm

PROFILED, ROUNDS, SHOWN = 6, 10, 22


def build(pooled: bool) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights for every model
    model = timm.create_model(MODEL, pretrained=False).eval()
    return patch_timm(model, SCHEDULES["level4"], method="wkmedoids") if pooled else model


def main() -> None:
    threads, batch = (int(v) for v in sys.argv[1:3])
    torch.set_num_threads(threads)
    inductor_config.cpp.enable_kernel_profile = True
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    models = {}
    for pooled in (False, True):
        kind = "pooled" if pooled else "plain"
        models[f"{kind} eager"] = build(pooled)
        models[f"{kind} compiled"] = torch.compile(build(pooled), fullgraph=True)
    self_times = {name: collections.defaultdict(list) for name in models}
    profiled = {name: [] for name in models}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(x), model(x)  # compiled, warm
        for _ in range(PROFILED):
            for name, model in models.items():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    start = time.perf_counter()
                    model(x)
                    profiled[name].append(time.perf_counter() - start)
                per_op: dict[str, float] = collections.defaultdict(float)
                for event in prof.events():
                    per_op[event.name] += event.self_cpu_time_total
                for op, total in per_op.items():
                    self_times[name][op].append(total)
        for _ in range(ROUNDS):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    for name in models:
        print(f"== {name}: profiled min {min(profiled[name]) * 1e3:.1f} ms; unprofiled min "
              f"{min(times[name]) * 1e3:.1f} median {statistics.median(times[name]) * 1e3:.1f}")
        rows = sorted(((min(v) / 1e3, op) for op, v in self_times[name].items()), reverse=True)
        for ms, op in rows[:SHOWN]:
            print(f"   {ms:8.2f} ms  {op[:90]}")
    for label, statistic in (("min", min), ("median", statistics.median)):
        eager = statistic(times["plain eager"]) / statistic(times["pooled eager"])
        compiled = statistic(times["plain compiled"]) / statistic(times["pooled compiled"])
        print(f"{label} speed-up eager {eager:.3f} compiled {compiled:.3f}")


if __name__ == "__main__":
    main()
