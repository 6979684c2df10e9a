"""Host time of pooled DeiT-S (bf16, B=256) with the view exchange, and where ToMe waits for
the GPU: a 100 ms sleep queued first, then one pass under cProfile (the waiting call's own
time holds the sleep)."""
import cProfile, io, pstats, sys, time
sys.path.insert(0, ".")
import torch, timm
from tokenpool_ops.timm import patch_timm

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

def top(profile, rows, key="tottime"):
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats(key).print_stats(rows)
    return "\n".join("  " + l[:160] for l in out.getvalue().splitlines() if l.strip())

for name, model in models.items():
    run(model); run(model); torch.cuda.synchronize()
    hs, ws, qs = [], [], []
    for _ in range(5):
        t0 = time.perf_counter(); run(model); t1 = time.perf_counter()
        torch.cuda.synchronize(); t2 = time.perf_counter()
        hs.append(t1 - t0); ws.append(t2 - t0)
        torch.cuda._sleep(200_000_000)
        t0 = time.perf_counter(); run(model); qs.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    print(f"{name}: host {min(hs)*1e3:.1f} ms, wall {min(ws)*1e3:.1f} ms, host behind a queued sleep {min(qs)*1e3:.1f} ms", flush=True)
    if name in ("tome", "wkmedoids"):
        torch.cuda._sleep(200_000_000)
        profile = cProfile.Profile(); profile.enable(); run(model); profile.disable()
        torch.cuda.synchronize()
        print(top(profile, 8).split("ncalls")[-1][:3000])
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out); stats.sort_stats("tottime").print_callers(3)
        print("\n".join("  " + l[:200] for l in out.getvalue().splitlines() if l.strip())[-2500:])
