"""Forward time of a Token-Pooling DeiT-S against the plain model, per method.

DeiT-S (random weights), a keep schedule of the paper's Table 3 (PoWER-BERT's sparsity
levels for DeiT-S), eval and no_grad, best of ``--repeats`` after a warm-up, on the CPU or a
CUDA GPU, in float32 or under bfloat16 autocast. For every method it prints the pooled time,
the speed-up over the plain model, the FLOP ratio (torch.utils.flop_counter: matrix products
and attention, the clustering's matrix products included) next to the analytic ratio of the
paper's Table 1 formula (pooling excluded), and the share of the pooled model's time spent
in pooling (the torch profiler's time inside ``tokenpool_ops.timm.pool_with_grad``: device
time on a GPU, CPU time on the CPU).

    python benchmarks/timm_speedup.py [--device cpu|cuda] [--dtype fp32|bf16] [--batch 32]
        [--schedule level1|level2|level3|level4] [--methods wkmedoids,topk] [--repeats 3]
        [--slice] [--cpu-time] [--profile ROWS] [--no-sync] [--cuda-graphs]
        [--compile] [--compile-mode MODE]

``--cpu-time`` times each pass by the process's CPU time (all its threads) instead of the
wall clock: on a machine shared with other jobs, with one thread (``OMP_NUM_THREADS=1
NUMBA_NUM_THREADS=1``), it counts this process's work only.

``--slice`` adds the row "slice": the plain model whose blocks keep their first tokens
where patch_timm pools (after attention), a view that costs nothing: no scores, no
clustering, no merge. Its speed-up is the most any pooling method can reach on this
schedule and machine; the distance from it to a method's is what that method's pooling
costs.

``--profile ROWS`` prints, after the table, each model's busiest ``ROWS`` operators and
kernels in one profiled forward pass (self time on the device on a GPU, on the CPU
otherwise), with the pass's wall time and, on a GPU, its kernel count: kernel time far below
the wall time means the GPU waits for the host's launches.

The patched models run as patch_timm sets them up by default (values unchecked); on a GPU
``--no-sync`` adds ``stop_early=False`` so that a forward pass reads nothing on the host.

``--compile`` adds every model compiled with ``torch.compile(model, fullgraph=True,
mode=--compile-mode)`` (on a GPU ``--compile-mode reduce-overhead`` adds CUDA graphs) and
prints a second table: the first call of each compiled model (compilation plus one pass,
with inductor's caches off, as a first compile anywhere), its best time, its speed-up over
the compiled plain model, and compiled against eager. The eager and compiled models take
turns in the same rounds, so the ratios come from one run.

``--cuda-graphs`` (a GPU, with ``--no-sync``) adds every model captured once as a CUDA graph
and replayed (no compiler: the same kernels without the host's launches) and prints a third
table: its best time, its speed-up over the replayed plain model, eager against replayed,
and the largest difference of its logits from the eager model's.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import tokenpool_ops.timm as tp_timm
from tokenpool_ops.timm import patch_timm

# The profiler's own log (Kineto: "USDT ... profiler_start", and on a CPU-only machine "ERROR
# ... gpuGetDeviceCount failed with code 35") would land among the table: level 6 silences it
# (read when a profile starts). A KINETO_LOG_LEVEL of the caller's own is kept.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

#: Patch tokens left after each of DeiT-S's 12 blocks: the paper's Table 3 sparsity levels.
SCHEDULES = {
    "level1": [196, 195, 193, 188, 169, 140, 121, 110, 73, 38, 7, 0],
    "level2": [196, 195, 190, 177, 141, 108, 84, 69, 35, 18, 3, 0],
    "level3": [196, 194, 187, 163, 118, 85, 58, 47, 20, 12, 2, 0],
    "level4": [196, 193, 179, 142, 97, 64, 46, 34, 13, 9, 1, 0],
}
METHODS = ["kmeans", "kmedoids", "wkmeans", "wkmedoids", "topk", "random", "importance", "tome"]
MODEL = "deit_small_patch16_224"
POOL_SCOPE = "tokenpool_ops.pool"


def block_macs(n: int, m: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """Multiply-adds of a block with n tokens into attention and m into the MLP (pooling
    between them): QKV and projection 4 n d^2, attention 2 n^2 d, MLP 2 r m d^2."""
    return 4 * n * dim**2 + 2 * n * n * dim + 2 * mlp_ratio * m * dim**2


def analytic_ratio(keep: list[int], prefix: int = 1, n: int = 196, dim: int = 384) -> float:
    full = sum(block_macs(n + prefix, n + prefix, dim) for _ in keep)
    pooled, tokens = 0.0, n
    for k in keep:
        after = min(tokens, k)
        pooled += block_macs(tokens + prefix, after + prefix, dim)
        tokens = after
    return pooled / full


class SlicedViT(torch.nn.Module):
    """A plain timm ViT whose blocks keep their prefix and first ``keep[i]`` patch tokens
    between attention and MLP (where ``patch_timm`` pools by default): pooling for free."""

    def __init__(self, model: torch.nn.Module, keep: list[int]) -> None:
        super().__init__()
        self.model, self.keep = model, keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m: Any = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        prefix = m.num_prefix_tokens
        for block, k in zip(m.blocks, self.keep, strict=True):
            x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
            x = x[:, :prefix + k]
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return m.forward_head(m.norm(x))


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def precision(dtype: str, device: torch.device,
              cache: bool = True) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast for "bf16"; ``cache=False`` for a CUDA-graph capture, which must not
    read weights cast before it (autocast frees its cache on exit; the graph would keep
    reading that memory)."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the C++ compiler's runs)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def best_times(models: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor, repeats: int,
               dtype: str, first_calls: dict[str, tuple[float, float]] | None = None,
               clock: Callable[[], float] = time.perf_counter,
               host: dict[str, float] | None = None) -> dict[str, float]:
    """Best seconds of one forward pass per model, by ``clock``. The models take turns, one
    pass each per round, so a machine whose speed drifts (other jobs, clocks) slows them
    alike. The wall-clock and CPU seconds of each model's first call (the warm-up:
    compilation included) go to ``first_calls``; the best seconds until each pass returns,
    before the device is awaited (the host's work: its launches on a GPU), to ``host``."""
    times: dict[str, list[float]] = {name: [] for name in models}
    returned: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad(), precision(dtype, x.device):
        for name, model in models.items():
            start, start_cpu = time.perf_counter(), cpu_seconds()
            model(x)  # warm-up: kernels compiled, caches filled
            synchronise(x.device)
            if first_calls is not None:
                first_calls[name] = (time.perf_counter() - start, cpu_seconds() - start_cpu)
        synchronise(x.device)
        for _ in range(repeats):
            for name, model in models.items():
                start = clock()
                model(x)
                returned[name].append(clock() - start)
                synchronise(x.device)
                times[name].append(clock() - start)
    if host is not None:
        host.update({name: min(seconds) for name, seconds in returned.items()})
    return {name: min(seconds) for name, seconds in times.items()}


def graphed(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dtype: str,
            cuda: Any = torch.cuda) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model``'s forward pass on inputs shaped like ``x``, captured once as a CUDA graph
    and replayed: each call copies its images into the captured input, replays, and returns
    the captured output (overwritten by the next call). What it removes is the host's work,
    every launch included, which bounds a model of many small kernels. The patched models
    must read nothing on the host (``--no-sync``: stop_early=False; their values are
    unchecked by default). ``cuda`` is ``torch.cuda`` (the tests pass a stand-in)."""
    static = x.clone()
    side = cuda.Stream()
    side.wait_stream(cuda.current_stream())
    graph = cuda.CUDAGraph()
    with torch.no_grad(), precision(dtype, x.device, cache=False):
        with cuda.stream(side):  # warm-up off the capturing stream, as capture requires
            for _ in range(2):
                model(static)
        cuda.current_stream().wait_stream(side)
        with cuda.graph(graph):
            output = model(static)

    def replay(images: torch.Tensor) -> torch.Tensor:
        static.copy_(images)
        graph.replay()
        return output

    return replay


def flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops()


@contextlib.contextmanager
def pooling_scoped() -> Iterator[None]:
    """Every pooling call of the patched blocks inside a profiler scope of its own."""
    original: Callable[..., Any] = tp_timm.pool_with_grad

    def scoped(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(POOL_SCOPE):
            return original(*args, **kwargs)

    tp_timm.pool_with_grad = scoped
    try:
        yield
    finally:
        tp_timm.pool_with_grad = original


def profiled_pass(model: Callable[[torch.Tensor], Any], x: torch.Tensor,
                  dtype: str) -> tuple[Any, float]:
    """One forward pass under the profiler (the CPU's activity, and CUDA's on a GPU) inside
    the scope "forward", after a warm-up pass: the profile and the pass's wall seconds."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if x.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.no_grad(), precision(dtype, x.device):
        model(x)
        synchronise(x.device)
        # torch < 2.14 warns that a profile keeps one cycle's events (the one it needs):
        # a notice among the table, silenced.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Profiler clears events")
            with torch.profiler.profile(activities=activities) as profile:
                start = time.perf_counter()
                with torch.profiler.record_function("forward"):
                    model(x)
                synchronise(x.device)
                wall = time.perf_counter() - start
    return profile, wall


def pooling_share(model: torch.nn.Module, x: torch.Tensor, dtype: str) -> float:
    """Fraction of one forward pass's time spent inside pooling, from the profiler."""
    with pooling_scoped():
        profile, _ = profiled_pass(model, x, dtype)
    totals = {event.key: event for event in profile.key_averages()}
    cuda = x.device.type == "cuda"

    def spent(key: str) -> float:  # kernels launched inside the scope on a GPU
        event = totals[key]
        return float(event.device_time_total if cuda else event.cpu_time_total)

    return spent(POOL_SCOPE) / spent("forward")


def print_profile(name: str, model: torch.nn.Module, x: torch.Tensor, dtype: str,
                  rows: int) -> None:
    """``model``'s busiest ``rows`` operators and kernels in one forward pass, by self time
    on its device (PyTorch's profiler table, whose footer totals the CPU and device time),
    after the pass's wall time (profiled) and its kernel count on a GPU. On the CPU the row
    "forward" (the pass's scope) shows as self time the host's work outside operators."""
    cuda = x.device.type == "cuda"
    profile, wall = profiled_pass(model, x, dtype)
    kernels = sum(1 for event in profile.events()
                  if cuda and event.device_type == torch.autograd.DeviceType.CUDA)
    print(f"\nprofile of {name}: wall {wall * 1e3:.1f} ms (profiled)"
          + (f", {kernels} kernels" if cuda else ""))
    print(profile.key_averages().table(
        sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=rows,
        max_name_column_width=48))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="float32, or bfloat16 autocast")
    parser.add_argument("--batch", type=int, default=32, help="images per forward pass")
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="level1",
                        help="DeiT-S keep schedule of the paper's Table 3")
    parser.add_argument("--methods", default="wkmedoids",
                        help="comma-separated methods of tokenpool_ops.pool, or 'all'")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward passes")
    parser.add_argument("--slice", action="store_true",
                        help="add the plain model with free pooling (a slice): the ceiling")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by the process's CPU time instead of the wall clock (on "
                             "a shared machine, with one thread: OMP_NUM_THREADS=1 "
                             "NUMBA_NUM_THREADS=1)")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="print each model's busiest ROWS operators and kernels")
    parser.add_argument("--no-sync", action="store_true",
                        help="stop_early=False: no host read in a forward pass")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also time every model replayed as one captured CUDA graph")
    parser.add_argument("--compile", action="store_true",
                        help="also time every model under torch.compile(fullgraph=True)")
    parser.add_argument("--compile-mode", default="default",
                        choices=("default", "reduce-overhead", "max-autotune",
                                 "max-autotune-no-cudagraphs"),
                        help="torch.compile's mode (reduce-overhead: CUDA graphs on a GPU)")
    args = parser.parse_args()
    args.methods = parse_methods(parser, args.methods, METHODS)
    if args.cuda_graphs and not (args.device.startswith("cuda") and args.no_sync):
        parser.error("--cuda-graphs needs --device cuda and --no-sync (a capture allows no "
                     "host read)")
    return args


def parse_methods(parser: argparse.ArgumentParser, text: str,
                  known: Sequence[str]) -> list[str]:
    """``--methods``: "all" (every one of ``known``) or a comma list of them; anything
    else is the parser's usage error."""
    methods = list(known) if text == "all" else text.split(",")
    unknown = sorted(set(methods) - set(known))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(known)}")
    return methods


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    keep = SCHEDULES[args.schedule]
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    options = {"stop_early": False} if args.no_sync else {}
    models = {"plain": timm.create_model(MODEL, pretrained=False).eval().to(device)}
    if args.slice:
        models["slice"] = SlicedViT(models["plain"], keep)
    for method in args.methods:
        models[method] = patch_timm(timm.create_model(MODEL, pretrained=False).eval().to(device),
                                    keep, method=method, **options)
    first_calls: dict[str, tuple[float, float]] = {}
    clock = time.process_time if args.cpu_time else time.perf_counter
    extra: dict[str, Callable[[torch.Tensor], Any]] = {}
    if args.compile:
        extra.update(compile_models(models, x, args.compile_mode, args.dtype))
    if args.cuda_graphs:
        extra.update({name + GRAPHED: graphed(model, x, args.dtype)
                      for name, model in models.items()})
    host: dict[str, float] = {}
    seconds = best_times({**models, **extra}, x, args.repeats, args.dtype, first_calls, clock,
                         host)
    f_plain = flops(models["plain"], x[:1])
    print(f"torch {torch.__version__}, device {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads), {args.dtype}, batch {args.batch}, "
          f"{MODEL} {args.schedule} {keep}; best of {args.repeats}"
          f"{' by process CPU time' if args.cpu_time else ''}, models in turn")
    print(f"analytic FLOP ratio (Table 1 formula, pooling excluded): {analytic_ratio(keep):.3f}")
    # On a GPU, the host's time of a pass (until it returns, launches queued): a pass whose
    # host time is its whole time waits for the host, not for the device.
    gpu = device.type == "cuda"
    print(f"{'model':<12} {'ms':>9}" + (f" {'host ms':>8}" if gpu else "")
          + f" {'speed-up':>9} {'FLOP ratio':>11} {'pooling share':>14}")
    for name, model in models.items():
        speedup = seconds["plain"] / seconds[name]
        lead = f"{name:<12} {seconds[name] * 1e3:>9.1f}" + (
            f" {host[name] * 1e3:>8.1f}" if gpu else "")
        if name == "plain":
            print(f"{lead} {speedup:>9.2f} {1.0:>11.3f}")
            continue
        ratio = flops(model, x[:1]) / f_plain
        if name == "slice":  # no pooling to share the time
            print(f"{lead} {speedup:>9.2f} {ratio:>11.3f}")
            continue
        share = pooling_share(model, x, args.dtype)
        print(f"{lead} {speedup:>9.2f} {ratio:>11.3f} {share:>13.1%}")
    if args.compile:
        print_compiled(list(models), seconds, first_calls, args.compile_mode)
    if args.cuda_graphs:
        print_graphed(models, extra, x, args.dtype, seconds)
    if args.profile > 0:
        for name, model in models.items():
            print_profile(name, model, x, args.dtype, args.profile)


COMPILED = " compiled"
GRAPHED = " graphed"


def print_graphed(models: dict[str, torch.nn.Module],
                  replays: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor,
                  dtype: str, seconds: dict[str, float]) -> None:
    """The CUDA-graph table: best time of a replay, speed-up over the plain model's replay,
    eager time over replay time, and the largest difference of a replay's logits from the
    eager model's on the same images (the same kernels: zero or rounding)."""
    print("each model captured as one CUDA graph (torch.cuda.graph) and replayed; eager and "
          "replayed models in turn")
    print(f"{'graphed':<12} {'ms':>9} {'speed-up':>9} {'eager/graphed':>14} "
          f"{'max |diff|':>11}")
    plain = seconds["plain" + GRAPHED]
    with torch.no_grad(), precision(dtype, x.device):
        for name, model in models.items():
            key = name + GRAPHED
            diff = (replays[key](x).float() - model(x).float()).abs().max().item()
            print(f"{name:<12} {seconds[key] * 1e3:>9.1f} {plain / seconds[key]:>9.2f} "
                  f"{seconds[name] / seconds[key]:>14.2f} {diff:>11.2e}")


def compile_models(models: dict[str, torch.nn.Module], x: torch.Tensor, mode: str,
                   dtype: str) -> dict[str, Callable[[torch.Tensor], Any]]:
    """Each model compiled as one graph (``fullgraph=True``: a graph break is an error),
    keyed ``name + COMPILED``. Inductor's caches are switched off, so each first call
    compiles as it would the first time anywhere, and one tiny model is compiled first, so
    that inductor's one-off start-up is nobody's compile time. On the CPU inductor compiles
    in this process (one compile thread), so that the CPU time of a first call holds all of
    it. On a GPU it keeps its pool of compile workers: one thread compiling the Triton
    kernels of a pooled DeiT-S took over 100 s on an H200 (then the CPU-time column leaves
    out the workers, which are still running)."""
    import torch._inductor.config as inductor_config

    inductor_config.force_disable_caches = True
    # What those choices make torch print once per process would land among the tables:
    # dynamo's notice that its profile-guided cache is off too, and, on a machine without a
    # CUDA runtime, cpp_extension's log line on import (inductor imports it while compiling).
    warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
    extension_log = logging.getLogger("torch.utils.cpp_extension")
    level = extension_log.level
    extension_log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension
    finally:
        extension_log.setLevel(level)
    if x.device.type == "cpu":
        inductor_config.compile_threads = 1
    with torch.no_grad(), precision(dtype, x.device):
        torch.compile(torch.nn.Linear(4, 4).to(x.device), mode=mode)(
            torch.ones(2, 4, device=x.device))
    return {name + COMPILED: torch.compile(model, mode=mode, fullgraph=True)
            for name, model in models.items()}


def print_compiled(names: list[str], seconds: dict[str, float],
                   first_calls: dict[str, tuple[float, float]], mode: str) -> None:
    """The compiled models' table: first call (compilation and one pass; wall-clock and CPU
    seconds), best time, speed-up over the compiled plain model, and eager time over
    compiled time."""
    print(f"torch.compile(fullgraph=True, mode={mode!r}), inductor caches off; eager and "
          "compiled models in turn")
    print(f"{'compiled':<12} {'first call s':>13} {'(CPU s)':>8} {'ms':>9} {'speed-up':>9} "
          f"{'eager/compiled':>15}")
    plain = seconds["plain" + COMPILED]
    for name in names:
        key = name + COMPILED
        wall, cpu = first_calls[key]
        print(f"{name:<12} {wall:>13.1f} {cpu:>8.1f} {seconds[key] * 1e3:>9.1f} "
              f"{plain / seconds[key]:>9.2f} {seconds[name] / seconds[key]:>15.2f}")


if __name__ == "__main__":
    main()
