"""Forward time of a Token-Pooling Hugging Face ViT against the plain model (``hf_speedup``).

The sibling of ``timm_speedup.py`` for :func:`tokenpool_ops.transformers.patch_transformers`:
a DeiT-S-sized transformers config (the shape of ``facebook/deit-small-patch16-224``, which
transformers loads as ``ViTForImageClassification``; random weights, nothing downloaded), a
keep schedule of the paper's Table 3, eval and no_grad, on the CPU or a CUDA GPU, in float32
or under bfloat16 autocast. The plain and the pooled models take turns, one forward pass each
per round, so that a machine whose speed drifts (other jobs, clocks) slows both alike; it
prints the best and the median time of each, the median of the per-round speed-ups, and the
median CPU time (all threads of this process) with its speed-up.

    PYTHONPATH=. python benchmarks/hf_speedup.py [--device cpu|cuda] [--dtype fp32|bf16]
        [--batch 32] [--schedule deits-level4] [--methods wkmedoids,topk] [--attn sdpa|eager]
        [--repeats 5] [--model vit|deit]

Measured on 2026-12-03 on the idle 2-core machine (no other job), level 4, batch 32, SDPA, 3
rounds: plain 2219 ms, wkmedoids 1170 ms best wall clock: 1.90x (1.93x median of rounds,
1.76x CPU time). Earlier the same day, 2 CPU threads shared with other jobs (load average 15
to 200), so ratios only: level 4, batch 32, SDPA: wkmedoids 1.58x and 1.67x best wall clock,
1.27x and 1.30x CPU time; tome 1.82x wall, 1.74x CPU. In one interleaved run of all four,
CPU time, the HF and timm patches gave 1.48x and 1.43x: the two front doors cost the same.

``--model deit`` takes DeiTForImageClassificationWithTeacher (class and distillation tokens).
On a GPU ``--no-sync`` adds ``stop_early=False`` so that a forward pass reads nothing on the
host.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

# timm_speedup: this script's sibling (benchmarks/)
from timm_speedup import parse_methods, precision, synchronise

from reference_models.schedules import PAPER_SCHEDULES
from tokenpool_ops._pool import METHODS

#: DeiT-S: 12 layers of width 384, 6 heads, MLP 1536, 224 x 224 images of 16 x 16 patches.
DEIT_S = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
              intermediate_size=1536, image_size=224, patch_size=16, layer_norm_eps=1e-6,
              num_labels=1000)
MODELS = {"vit": ("ViTConfig", "ViTForImageClassification"),
          "deit": ("DeiTConfig", "DeiTForImageClassificationWithTeacher")}


def build(model: str, attn: str, device: torch.device) -> torch.nn.Module:
    import transformers  # here, so that --help needs no transformers

    config_class, model_class = MODELS[model]
    config = getattr(transformers, config_class)(**DEIT_S, attn_implementation=attn)
    torch.manual_seed(0)
    return getattr(transformers, model_class)(config).eval().to(device)


def interleaved_times(models: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int,
                      dtype: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and CPU seconds of each forward pass per model, the models taking turns.
    (CPU time, of all this process's threads, is what a loaded machine disturbs least.)"""
    times: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad(), precision(dtype, x.device):
        for model in models.values():
            model(x)  # warm-up: kernels compiled, caches filled
        synchronise(x.device)
        for _ in range(repeats):
            for name, model in models.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                model(x)
                synchronise(x.device)
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return times, cpu


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="float32, or bfloat16 autocast")
    parser.add_argument("--batch", type=int, default=32, help="images per forward pass")
    parser.add_argument("--schedule", choices=[n for n in PAPER_SCHEDULES if "deits" in n],
                        default="deits-level4", help="DeiT-S keep schedule of the paper's Table 3")
    parser.add_argument("--methods", default="wkmedoids",
                        help="comma-separated methods of tokenpool_ops.pool, or 'all'")
    parser.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa",
                        help="attn_implementation of both models")
    parser.add_argument("--model", choices=sorted(MODELS), default="vit",
                        help="vit: ViTForImageClassification (DeiT-S as transformers loads "
                             "it); deit: the distilled DeiT with its teacher head")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-sync", action="store_true",
                        help="stop_early=False: no host read in a forward pass")
    args = parser.parse_args()
    args.methods = parse_methods(parser, args.methods, METHODS)
    return args


def main() -> None:
    args = parse_args()
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    from tokenpool_ops.transformers import patch_transformers

    device = torch.device(args.device)
    keep = PAPER_SCHEDULES[args.schedule]
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    options = {"stop_early": False} if args.no_sync else {}
    models = {"plain": build(args.model, args.attn, device)}
    for method in args.methods:
        models[method] = patch_transformers(build(args.model, args.attn, device), keep,
                                            method=method, **options)
    times, cpu = interleaved_times(models, x, args.repeats, args.dtype)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, device {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads), {args.dtype}, batch {args.batch}, "
          f"{MODELS[args.model][1]} DeiT-S sized, attn {args.attn}, {args.schedule} {keep}; "
          f"{args.repeats} rounds, models in turn")
    print(f"{'model':<12} {'best ms':>9} {'median ms':>10} {'speed-up':>9} "
          f"{'median of rounds':>17} {'CPU ms':>9} {'CPU speed-up':>13}")
    for name, seconds in times.items():
        best = min(times["plain"]) / min(seconds)
        per_round = statistics.median(p / s for p, s in zip(times["plain"], seconds, strict=True))
        cpu_ms = statistics.median(cpu[name])
        print(f"{name:<12} {min(seconds) * 1e3:>9.1f} {statistics.median(seconds) * 1e3:>10.1f} "
              f"{best:>9.2f} {per_round:>17.2f} {cpu_ms * 1e3:>9.1f} "
              f"{statistics.median(cpu['plain']) / cpu_ms:>13.2f}")


if __name__ == "__main__":
    main()
