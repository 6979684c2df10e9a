"""Issue 25, CPU: what inductor's freezing gives a compiled plain and a compiled pooled
DeiT-S (level 4, wkmedoids, inference, float32), against eager and a default compile.

    PYTHONPATH=. python benchmarks/results/timm_freezing_cpu.py THREADS BATCH ROUNDS

Seven models, each first called once (compiled), then timed in turns for ROUNDS rounds by
the wall clock; best and median per model. "frozen" compiles with
``torch._inductor.config.freezing = True`` (weights as constants: prepacked linear layers);
"frozen dynamic" adds ``dynamic=True`` (symbolic batch and token counts), which the pooled
model's blocks have anyway after their first pooling (the plan operator's length).
"""

import statistics
import sys
import time

import timm
import torch
import torch._inductor.config as inductor_config

sys.path.insert(0, "benchmarks")
from timm_speedup import MODEL, SCHEDULES  # noqa: E402

from tokenpool_ops.timm import patch_timm  # noqa: E402


def build(pooled: bool) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights for every model
    model = timm.create_model(MODEL, pretrained=False).eval()
    return patch_timm(model, SCHEDULES["level4"], method="wkmedoids") if pooled else model


def main() -> None:
    threads, batch, rounds = (int(v) for v in sys.argv[1:4])
    torch.set_num_threads(threads)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    variants = [("eager", None, False), ("compiled", False, False), ("frozen", False, True),
                ("frozen dynamic", True, True)]
    models, reference = {}, {}
    with torch.no_grad():
        for pooled in (False, True):
            kind = "pooled" if pooled else "plain"
            reference[kind] = build(pooled)(x)
            for label, dynamic, frozen in variants:
                if pooled and label == "frozen dynamic":
                    continue  # the pooled blocks' counts are symbolic already
                model = build(pooled)
                if dynamic is not None:
                    inductor_config.freezing = frozen
                    model = torch.compile(model, fullgraph=True, dynamic=dynamic or None)
                start = time.process_time()
                out = model(x)
                inductor_config.freezing = False
                diff = (out - reference[kind]).abs().max().item()
                print(f"{kind} {label}: first call {time.process_time() - start:.1f} CPU s, "
                      f"max |logits - eager| {diff:.1e}", flush=True)
                models[f"{kind} {label}"] = model
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    print(f"torch {torch.__version__}, {threads} threads, batch {batch}, {rounds} rounds in turns")
    print(f"{'model':<24} {'best ms':>8} {'median ms':>10}")
    for name, values in times.items():
        print(f"{name:<24} {min(values) * 1e3:>8.1f} {statistics.median(values) * 1e3:>10.1f}")
    for stat, pick in (("best", min), ("median", statistics.median)):
        t = {name: pick(values) for name, values in times.items()}
        print(f"{stat}: speed-up eager {t['plain eager'] / t['pooled eager']:.3f}, compiled "
              f"{t['plain compiled'] / t['pooled compiled']:.3f}, frozen "
              f"{t['plain frozen'] / t['pooled frozen']:.3f}, frozen against the frozen "
              f"dynamic plain {t['plain frozen dynamic'] / t['pooled frozen']:.3f}")


if __name__ == "__main__":
    main()
