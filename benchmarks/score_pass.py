"""Attention with Eq. 5 scores: the materialised way against SDPA + a chunked score pass,
and, in half precision on a GPU, two flash passes (tokenpool_ops._flash_scores, the route
of a block captured in a CUDA graph; timed eagerly here).

Issue #11 §3. A block that pools with significance scores either materialises its
(B, H, N, N) attention probabilities for both its output and the scores, or computes the
output with ``F.scaled_dot_product_attention`` and the scores with ``received_attention``
(chunks of at most ``SCORE_CHUNK`` queries). ``tokenpool_ops.timm`` materialises under
autograd and on the devices of ``MATERIALISED_DEVICES`` (the CPU and CUDA, from these rows),
and takes SDPA plus the score pass elsewhere. This script times both at DeiT-S shapes
(forward: the library's own inference function, ``_patching.attention_with_scores``;
forward and backward: a training block's formula), names the SDPA kernel PyTorch dispatches
to with and without the log-size bias of ``prop_attn`` (any device), and on CUDA reports
the peak memory and which SDPA backends accept the call.

    python benchmarks/score_pass.py [--device cuda] [--dtype bfloat16] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

import tokenpool_ops._flash_scores as flash_scores
from tokenpool_ops._patching import attention_with_scores, received_attention

# The profiler's own log (Kineto's "gpuGetDeviceCount failed" on a CPU-only machine) would land
# among the table: level 6 silences it. A KINETO_LOG_LEVEL of the caller's own is kept.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")


def inference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What a block on a materialising device runs without autograd (no prefix token),
    called eagerly: materialised (the flash route is a CUDA graph capture's, timed in a
    column of its own)."""
    return attention_with_scores(q, k, v, bias, scale, 0)


def two_flash_passes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     bias: torch.Tensor | None, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The half-precision GPU route: the output and the scores from two flash passes."""
    return flash_scores.flash_attention_with_scores(q, k, v, bias, scale, 0)


def materialised(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 bias: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A training block's formula: one attention matrix for the output and the scores."""
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    attn = logits.softmax(dim=-1)
    return attn.to(v.dtype) @ v, attn.sum(dim=(1, 2))


def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA for the output, the chunked pass for the scores."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None
                                         else bias.to(q.dtype), scale=scale)
    return out, received_attention(q, k, bias, scale)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``step`` after two warm-up calls."""
    for _ in range(2):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _peak_mib(step: Callable[[], object], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _inputs(args: argparse.Namespace, device: torch.device, grad: bool
            ) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.heads, args.tokens, args.head_dim)
    dtype = getattr(torch, args.dtype)
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype)
               .requires_grad_(grad) for _ in range(3))
    sizes = torch.randint(1, 4, (args.batch, 1, 1, args.tokens), generator=gen, device=device)
    return q, k, v, sizes.float().log()


def _step(path: Callable[..., tuple[torch.Tensor, torch.Tensor]], inputs: tuple[torch.Tensor, ...],
          bias: bool, backward: bool, scale: float) -> Callable[[], object]:
    q, k, v, log_sizes = inputs

    def run() -> object:
        out, scores = path(q, k, v, log_sizes if bias else None, scale)
        if backward:
            (out.float().sum() + scores.sum()).backward()
        return out

    return run


def _backends(inputs: tuple[torch.Tensor, ...], scale: float) -> None:
    """Which SDPA backends take the call, with and without the log-size bias (CUDA only)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, log_sizes = (t.detach() for t in inputs)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        for bias in (None, log_sizes.to(q.dtype)):
            try:
                with sdpa_kernel([backend]):
                    seconds = _time(lambda b=bias: F.scaled_dot_product_attention(
                        q, k, v, attn_mask=b, scale=scale), q.device, 10)
                verdict = f"{seconds * 1e3:8.3f} ms"
            except RuntimeError as err:  # this backend refuses these inputs
                verdict = "refused: " + str(err).strip().splitlines()[0][:60]
            print(f"  {backend.name:20s} {'bias' if bias is not None else 'no bias':8s} "
                  f"{verdict}")


def _dispatched(inputs: tuple[torch.Tensor, ...], scale: float) -> None:
    """The SDPA kernel PyTorch picks by itself, with and without the bias (profiler names)."""
    q, k, v, log_sizes = (t.detach() for t in inputs)
    for bias in (None, log_sizes.to(q.dtype)):
        with warnings.catch_warnings():  # torch < 2.14: "Profiler clears events ..."
            warnings.filterwarnings("ignore", message=".*Profiler clears events")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        kernels = sorted({event.key for event in prof.key_averages()
                          if event.key.startswith("aten::_") and "attention" in event.key})
        print(f"  {'bias' if bias is not None else 'no bias':8s} "
              f"{', '.join(kernels) or 'no fused kernel (math path)'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    device = torch.device(args.device)
    scale = args.head_dim ** -0.5
    print(f"B={args.batch} H={args.heads} N={args.tokens} D={args.head_dim} {args.dtype} "
          f"on {device}; median of {args.repeats}")
    print(f"{'pass':10s} {'bias':8s} {'materialised ms':>16s} {'sdpa+scores ms':>15s} "
          f"{'speed-up':>9s} {'peak MiB (mat / fused)':>24s} {'flash ms':>9s}")
    for backward in (False, True):
        inputs = _inputs(args, device, grad=backward)
        for bias in (False, True):
            old = _step(materialised if backward else inference, inputs, bias, backward, scale)
            new = _step(fused, inputs, bias, backward, scale)
            t_old, t_new = (_time(s, device, args.repeats) for s in (old, new))
            peaks = [_peak_mib(s, device) for s in (old, new)]
            peak = ("-" if peaks[0] is None else f"{peaks[0]:.0f} / {peaks[1]:.0f}")
            # Inference in half precision on a GPU: the route a captured CUDA graph takes.
            flash = "-"
            if not backward and flash_scores.flash_kernel_takes(inputs[0]):
                step = _step(two_flash_passes, inputs, bias, False, scale)
                flash = f"{_time(step, device, args.repeats) * 1e3:.3f}"
            print(f"{'fwd+bwd' if backward else 'forward':10s} {'yes' if bias else 'no':8s} "
                  f"{t_old * 1e3:16.3f} {t_new * 1e3:15.3f} {t_old / t_new:8.2f}x {peak:>24s} "
                  f"{flash:>9s}")
    print("SDPA kernel dispatched by default:")
    _dispatched(_inputs(args, device, grad=False), scale)
    if device.type == "cuda":
        print("SDPA backends (forced one at a time):")
        _backends(_inputs(args, device, grad=False), scale)


if __name__ == "__main__":
    main()
