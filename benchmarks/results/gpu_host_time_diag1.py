"""Host-time diagnosis of pooled DeiT-S on a GPU, and a prototype of Eq. 5 scores from two
flash-attention passes (the second with queries and keys swapped)."""
import cProfile, io, pstats, statistics, sys, time, warnings
sys.path.insert(0, ".")
import torch, timm
import torch.nn.functional as F
from tokenpool_ops.timm import patch_timm
from tokenpool_ops._patching import _attention_step

dev = torch.device("cuda"); B = 256
keep = [196, 193, 179, 142, 97, 64, 46, 34, 13, 9, 1, 0]
torch.manual_seed(0)
x = torch.randn(B, 3, 224, 224, device=dev)
models = {"plain": timm.create_model("deit_small_patch16_224").eval().to(dev)}
for m in ["wkmedoids", "topk", "tome"]:
    models[m] = patch_timm(timm.create_model("deit_small_patch16_224").eval().to(dev), keep,
                           method=m, stop_early=False)

def run(model):
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        return model(x)

for name, model in models.items():
    run(model); run(model); torch.cuda.synchronize()
    hs, ws, qs = [], [], []
    for _ in range(5):
        t0 = time.perf_counter(); run(model); t1 = time.perf_counter()
        torch.cuda.synchronize(); t2 = time.perf_counter()
        hs.append(t1 - t0); ws.append(t2 - t0)
        torch.cuda._sleep(200_000_000)  # ~100 ms of GPU work queued first: a sync waits for it
        t0 = time.perf_counter(); run(model); qs.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    print(f"{name}: host {min(hs)*1e3:.1f} ms, wall {min(ws)*1e3:.1f} ms, host behind a queued sleep {min(qs)*1e3:.1f} ms")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1); run(model); torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message)[:90] for w in caught if "ynchroniz" in str(w.message)]
    print(f"  torch sync warnings: {len(syncs)} {syncs[:2]}")
    torch.cuda.synchronize()
    profile = cProfile.Profile(); profile.enable()
    for _ in range(3):
        run(model)
    profile.disable(); torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(16)
    lines = [l for l in out.getvalue().splitlines() if l.strip()][-17:]
    print("\n".join("  " + l[:150] for l in lines))

# Prototype: Eq. 5 from the LSE of the real pass and the LSE of the swapped pass.
flash = torch.ops.aten._scaled_dot_product_flash_attention
def swapped_scores(q, k, v, scale):
    out, lse = flash(q, k, v, 0.0, False, False, scale=scale)[:2]
    shifted = -lse.float() / scale
    hi = shifted.to(q.dtype); lo = (shifted - hi.float()).to(q.dtype)
    b, h, n, d = q.shape
    pad = 8
    qk = torch.zeros(b, h, n, d + pad, dtype=q.dtype, device=q.device)
    kq = torch.zeros_like(qk)
    kq[..., :d] = k; kq[..., d] = 1; kq[..., d + 1] = 1            # queries: the keys j
    qk[..., :d] = q; qk[..., d] = hi; qk[..., d + 1] = lo           # keys: the queries i
    lse2 = flash(kq, qk, qk, 0.0, False, False, scale=scale)[1]      # (b, h, n): log sum_i P_ij
    return out, lse2.float().exp().sum(1)

def timed(f, reps=20):
    ts = []
    for _ in range(reps):
        a, b_ = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); f(); b_.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b_))
    return statistics.median(ts)

for n in (197, 98):
    qkv = torch.randn(B, n, 3, 6, 64, device=dev, dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    scale = 64 ** -0.5
    with torch.no_grad():
        ref_out, ref_scores = _attention_step(q, k, v, None, scale, 0)
        exact = (q.float() * scale @ k.float().transpose(-2, -1)).softmax(-1).sum((1, 2))
        out, scores = swapped_scores(q, k, v, scale)
        err_new = ((scores - exact).abs() / exact).max().item()
        err_old = ((ref_scores.float() - exact).abs() / exact).max().item()
        out_diff = (out.transpose(1, 2).float() - ref_out.float()).abs().max().item()
        t_mat = timed(lambda: _attention_step(q, k, v, None, scale, 0))
        t_new = timed(lambda: swapped_scores(q, k, v, scale))
        t_sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v))
    print(f"N={n}: materialised {t_mat:.3f} ms, two flash passes {t_new:.3f} ms, sdpa alone {t_sdpa:.3f} ms;"
          f" max rel err of scores vs float32: swapped {err_new:.2e}, materialised {err_old:.2e}; out diff {out_diff:.2e}")
