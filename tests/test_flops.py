"""The analytic FLOP counter against the paper's Tables 1 and 3 and torch's flop counter."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch", reason="the FLOP counter reads timm models")
timm = pytest.importorskip("timm", reason="the FLOP counter reads timm models")

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from reference_models import flops  # noqa: E402
from tokenpool_ops.timm import patch_timm  # noqa: E402

# Table 1 as printed: GFLOPs per part (two decimals), totals (one decimal).
TABLE1 = {
    "ViT-B/384": (6.18, 12.25, 4.08, 32.67, 55.5),
    "ViT-B": (0.72, 4.18, 1.39, 11.15, 17.6),
    "DeiT-S": (0.36, 1.05, 0.35, 2.79, 4.6),
    "DeiT-Ti": (0.18, 0.26, 0.09, 0.70, 1.3),
}
# Table 3, DeiT-S, PoWER-BERT rows: (schedule, GFLOPs). Level 0 prints 11 entries for 12
# blocks; we read it as keeping all 196 tokens in the first block (the other levels all
# start at 196 or below), which gives 4.33 against the printed 4.3.
TABLE3_POWERBERT = [
    ([196, 196, 196, 195, 194, 189, 180, 173, 173, 173, 173, 173], 4.3),
    ([196, 195, 193, 188, 169, 140, 121, 110, 73, 38, 7, 0], 2.9),
    ([196, 195, 190, 177, 141, 108, 84, 69, 35, 18, 3, 0], 2.5),
    ([196, 194, 187, 163, 118, 85, 58, 47, 20, 12, 2, 0], 2.3),
    ([196, 193, 179, 142, 97, 64, 46, 34, 13, 9, 1, 0], 2.1),
    ([194, 183, 142, 89, 41, 20, 10, 7, 0, 0, 0, 0], 1.5),
    ([186, 162, 102, 56, 13, 4, 2, 2, 0, 0, 0, 0], 1.2),
    ([162, 129, 66, 33, 4, 1, 1, 0, 0, 0, 0, 0], 1.0),
]


@pytest.mark.parametrize("name", TABLE1)
def test_table1_to_its_printed_precision(name):
    _, timm_name, size = next(m for m in flops.TABLE1_MODELS if m[0] == name)
    got = flops.count(flops.shape_of(timm_name, size))
    parts = (got.softmax_attention, got.qkv_projections, got.o_projection, got.mlp)
    assert [round(p, 2) for p in parts] == list(TABLE1[name][:4])
    assert round(got.total, 1) == TABLE1[name][4]


@pytest.mark.parametrize("keep,gflops", TABLE3_POWERBERT)
def test_table3_powerbert_rows_within_five_hundredths(keep, gflops):
    got = flops.count(flops.shape_of("deit_small_patch16_224"), keep, method="topk")
    assert abs(got.total - gflops) <= 0.05
    assert got.clustering == 0.0


def test_clustering_costs_follow_the_documented_formulas():
    shape = flops.ViTShape(depth=2, width=8, heads=2, patches=10)
    medoids = flops.count(shape, [6, 3], method="kmedoids", iterations=4)
    means = flops.count(shape, [6, 3], method="kmeans", iterations=4)
    assert medoids.clustering * 1e9 == pytest.approx(
        10 * 10 * 8 + 4 * (100 + 60) + 6 * 6 * 8 + 4 * (36 + 18))
    assert means.clustering * 1e9 == pytest.approx(4 * (10 * 6 * 8 + 6 * 3 * 8))


@pytest.mark.parametrize("method", flops.CLUSTERING)
def test_a_block_that_keeps_nothing_clusters_nothing(method):
    """pool(x, 0) returns the empty set before any clustering, so 6 -> 0 costs nothing: the
    count equals the first block's alone (the formulas above for 10 -> 6, 4 iterations)."""
    shape = flops.ViTShape(depth=2, width=8, heads=2, patches=10)
    first = {"kmedoids": 10 * 10 * 8 + 4 * (100 + 60), "kmeans": 4 * 10 * 6 * 8}
    got = flops.count(shape, [6, 0], method=method, iterations=4).clustering * 1e9
    assert got == pytest.approx(first[method.removeprefix("w")])


def test_tome_cost_worked_out_by_hand():
    """Width 8, 2 heads: metric D = 4. 10 -> 6 is one round (r = 4 <= 5): keys averaged
    10 * 8, norms 10 * 4, similarities 5 * 5 * 4, merge 10 * 8 = 300; 6 -> 3 (r = 3 <= 3):
    48 + 24 + 3 * 3 * 4 + 48 = 156. 10 -> 2 is three rounds, 10 -> 5 -> 3 -> 2: 80 + 80,
    norms 40 + 20 + 12, similarities 5 * 5 * 4 + 3 * 2 * 4 + 2 * 1 * 4, the metric merged
    after the first two rounds 40 + 20: 424; the block after it, 2 -> 2, costs nothing."""
    shape = flops.ViTShape(depth=2, width=8, heads=2, patches=10)
    assert flops.count(shape, [6, 3], method="tome").clustering * 1e9 == pytest.approx(456)
    assert flops.count(shape, [2, 2], method="tome").clustering * 1e9 == pytest.approx(424)
    plain = flops.count(shape, [6, 3], method="topk")
    assert flops.count(shape, [6, 3], method="tome").total == plain.total
    # A block that keeps no token matches nothing (pool returns the empty set at once):
    # 10 -> 6 as above, then 6 -> 0 costs nothing. (Every searched schedule ends in 0.)
    assert flops.count(shape, [6, 0], method="tome").clustering * 1e9 == pytest.approx(300)


def torch_gflops(model, images) -> float:
    """torch's count; attention through SDPA's math backend, whose products it sees (the
    fused CPU kernel is not counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(images)
    return counter.get_total_flops() / 2 / 1e9  # torch counts a multiply-add as 2


def small_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4,
                             embed_dim=48, num_heads=3).eval()


def test_counter_matches_torch_without_pooling():
    model = small_vit()
    shape = flops.ViTShape.of(model)
    ours = flops.count(shape)
    softmax = shape.depth * (shape.patches + 1) ** 2 * shape.heads * 1e-9  # not a product
    assert torch_gflops(model, torch.randn(1, 3, 64, 64)) == pytest.approx(
        ours.total - softmax, rel=1e-9)


def test_counter_matches_torch_at_a_schedule(monkeypatch):
    """The model part at a schedule: torch's count of the pooled forward, less torch's
    count of each pooling call replayed alone (whatever pooling computes besides the
    clustering: merge, sizes, objective), equals the counter's total."""
    import tokenpool_ops.timm as tp_timm

    keep = [12, 9, 5, 2]
    model = patch_timm(small_vit(), keep, method="kmedoids", fast_paths=False,
                       stop_early=False, max_iter=3)
    calls = []
    original = tp_timm.pool_with_grad

    def recorded(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(tp_timm, "pool_with_grad", recorded)
    whole = torch_gflops(model, torch.randn(1, 3, 64, 64))
    pooling = 0.0
    for args, kwargs in calls:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            original(*args, **kwargs)
        pooling += counter.get_total_flops() / 2 / 1e9
    shape = flops.ViTShape.of(model)
    ours = flops.count(shape, keep, method="kmedoids")
    softmax = sum((n + 1) ** 2 for n in [16, 12, 9, 5]) * shape.heads * 1e-9
    assert len(calls) == 4
    assert whole - pooling == pytest.approx(ours.total - softmax, rel=1e-9)


@pytest.mark.parametrize("n,k,iterations", [(16, 5, 3), (40, 30, 1)])
def test_kmedoids_cost_matches_torch(n, k, iterations):
    """The clustering's products as torch counts them: the distances (n^2 M) and the medoid
    costs (n^2 per iteration); the counter adds the assignment's n k comparisons."""
    import tokenpool_ops

    width = 24
    counter = FlopCounterMode(display=False)
    with counter:
        tokenpool_ops.kmedoids(torch.randn(1, n, width), k, max_iter=iterations,
                               stop_early=False, fast_paths=False)
    ours = flops.clustering_flops("kmedoids", n, k, width, iterations)
    assert counter.get_total_flops() / 2 == ours - iterations * n * k


def test_command_line_prints_table1_and_json(capsys):
    assert flops.main([]) == 0
    table = capsys.readouterr().out
    assert "ViT-B/384" in table and "55.53" in table
    keep = ",".join(map(str, TABLE3_POWERBERT[4][0]))
    assert flops.main(["--model", "deit_small_patch16_224", "--keep", keep,
                       "--method", "kmedoids", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record) == {"softmax_attention", "qkv_projections", "o_projection", "mlp",
                           "embedding_and_head", "clustering", "total"}
    assert abs(record["total"] - 2.1) <= 0.05 and record["clustering"] > 0


def test_command_line_refuses_a_schedule_of_the_wrong_length(capsys):
    with pytest.raises(SystemExit) as exit_info:
        flops.main(["--model", "deit_small_patch16_224", "--keep", "196,98"])
    assert exit_info.value.code == 2
    assert "keep has 2 entries for 12 blocks" in capsys.readouterr().err


def test_paper_schedules_by_name_give_table3(capsys):
    from reference_models.schedules import PAPER_SCHEDULES

    assert len(PAPER_SCHEDULES) == 24 and all(len(k) == 12 for k in PAPER_SCHEDULES.values())
    for level, (keep, _) in enumerate(TABLE3_POWERBERT):
        assert PAPER_SCHEDULES[f"deits-level{level}"] == keep
    assert flops.main(["--model", "deit_small_patch16_224", "--keep", "deits-level4",
                       "--method", "topk", "--json"]) == 0
    assert abs(json.loads(capsys.readouterr().out)["total"] - 2.1) <= 0.05


def test_trainer_keep_takes_paper_schedules():
    from reference_models import models
    from reference_models.errors import ConfigError

    assert models.resolve_keep("deite252-level2", 196, 12)[:3] == [196, 196, 193]
    with pytest.raises(ConfigError, match="schedule for 196 patches in 12 blocks"):
        models.resolve_keep("deits-level4", 64, 4)
