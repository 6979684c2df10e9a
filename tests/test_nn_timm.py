"""TokenPooling module, the timm patch and the cluster drawing (random weights only)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="TokenPooling and the timm patch need PyTorch")
timm = pytest.importorskip("timm", reason="the timm patch needs timm (pip install timm)")

import copy  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import numpy as np  # noqa: E402

import tokenpool_ops  # noqa: E402
import tokenpool_ops._patching as tp_patching  # noqa: E402
import tokenpool_ops.timm as tp_timm  # noqa: E402
from tests.conftest import cuda_or_skip  # noqa: E402
from tokenpool_ops._pool import METHODS  # noqa: E402
from tokenpool_ops.nn import TokenPooling, merge, plan, pool_with_grad  # noqa: E402
from tokenpool_ops.timm import patch_timm, unpatch_timm  # noqa: E402

SCHEDULE = [196, 195, 193, 188, 169, 140, 121, 110, 73, 38, 7, 0]
MODELS = {
    "deit_tiny": ("deit_tiny_patch16_224", {}),
    "vit_small_layerscale_qknorm": ("vit_small_patch16_224", dict(init_values=1e-5, qk_norm=True)),
    "deit_tiny_distilled": ("deit_tiny_distilled_patch16_224", {}),
}


def make(name: str = "deit_tiny") -> torch.nn.Module:
    arch, kwargs = MODELS[name]
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, **kwargs).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------
# TokenPooling


@pytest.mark.parametrize("method", ["kmeans", "wkmeans", "kmedoids", "wkmedoids", "topk", "tome"])
def test_module_matches_pool_and_passes_gradients(method: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, 8, generator=gen, requires_grad=True)
    scores, sizes = torch.rand(2, 30, generator=gen), torch.randint(1, 4, (2, 30), generator=gen)
    y = TokenPooling(7, method)(x, scores, sizes.float())
    expected = tokenpool_ops.pool(x.detach(), 7, method, scores=scores, sizes=sizes.float())
    torch.testing.assert_close(y, expected)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def _plan_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 30, 8, generator=gen)
    return x, torch.rand(2, 30, generator=gen), torch.randint(1, 4, (2, 30), generator=gen).float()


@pytest.mark.parametrize("method", METHODS)
def test_lean_plan_is_the_full_plan_without_objective(method: str) -> None:
    x, scores, sizes = _plan_inputs()
    full = plan(x, 7, method, scores=scores, sizes=sizes)
    lean = plan(x, 7, method, scores=scores, sizes=sizes, lean=True)
    assert lean.objective is None and full.objective is not None
    selection = method in ("topk", "random", "importance")
    clustering = not selection and method != "tome"  # tome's history is its objective
    kept = (["tokens", "sizes", "medoids"] + ([] if selection else ["assignment"])
            + (["history"] if clustering else []))
    for name in kept:
        want = getattr(full, name)
        if want is None:  # K-Means has no medoids
            assert getattr(lean, name) is None
        else:
            assert torch.equal(getattr(lean, name), want), name
    if selection:  # their assignment is a pass over every token that merge does not need
        assert lean.assignment is None and lean.history is None
    if not clustering:
        assert lean.history is None
    live = x.clone().requires_grad_(True)
    torch.testing.assert_close(merge(live, lean, method, scores=scores, sizes=sizes),
                               merge(live, full, method, scores=scores, sizes=sizes),
                               rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_pool_with_grad_without_autograd_returns_the_merged_tokens(method: str) -> None:
    x, scores, sizes = _plan_inputs()
    with torch.no_grad():
        planned, _ = pool_with_grad(x, 7, method, scores=scores, sizes=sizes, lean=True)
    merged, _ = pool_with_grad(x.clone().requires_grad_(True), 7, method, scores=scores,
                               sizes=sizes, lean=True)
    assert merged.requires_grad and not planned.requires_grad
    torch.testing.assert_close(planned, merged.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_module_under_autocast(dtype: torch.dtype) -> None:
    x = torch.randn(2, 30, 8, requires_grad=True)
    linear = torch.nn.Linear(8, 8)
    with torch.autocast("cpu", dtype=dtype):
        h = linear(x)
        y = TokenPooling(5, "wkmedoids")(h, torch.rand(2, 30))
    assert y.dtype == h.dtype == dtype and torch.isfinite(y).all()
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_module_compiles_without_graph_breaks() -> None:
    """torch.compile, generic path, fixed iterations: the pooling step is one graph."""
    layer = TokenPooling(6, "wkmedoids", stop_early=False, check_values=False, fast_paths=False)
    x, scores = torch.randn(2, 30, 8), torch.rand(2, 30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explanation = torch._dynamo.explain(layer)(x, scores)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    # Tracing our namespace detection must not make Dynamo warn (it did at every
    # lru_cache-wrapped helper of array-api-compat: about 60 lines of test summary).
    assert not [w for w in caught if "Dynamo" in str(w.message)], caught[0].message
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, scores), layer(x, scores))


# ---------------------------------------------------------------------------------------------
# patch_timm


@pytest.mark.parametrize("name", MODELS)
def test_keeping_every_token_changes_nothing(name: str, images: torch.Tensor) -> None:
    model = make(name)
    x = images[:1]
    with torch.no_grad():
        expected = model(x)
        patch_timm(model, 196)
        torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("placement", ["attn", "block"])
def test_token_counts_follow_schedule(placement: str, images: torch.Tensor) -> None:
    model = make("deit_tiny_distilled")
    patch_timm(model, SCHEDULE, placement=placement, trace_source=True)
    seen: list[tuple[int, int]] = []
    for block in model.blocks:
        block.register_forward_hook(
            lambda m, args, out: seen.append((args[0].shape[1], out.shape[1])))
        block.mlp.register_forward_hook(lambda m, args, out: seen.append((-1, out.shape[1])))
    with torch.no_grad():
        logits = model(images)
    prefix = model.num_prefix_tokens
    mlp_tokens = [seen[i][1] for i in range(0, len(seen), 2)]
    block_out = [seen[i][1] for i in range(1, len(seen), 2)]
    assert block_out == [k + prefix for k in SCHEDULE]
    before = [196, *SCHEDULE[:-1]]
    expected_mlp = SCHEDULE if placement == "attn" else before
    assert mlp_tokens == [k + prefix for k in expected_mlp]
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["wkmedoids", "tome"])
def test_source_and_sizes_agree(method: str, images: torch.Tensor) -> None:
    model = make()
    patch_timm(model, [196, 150, 100, 60, 60, 60, 60, 60, 60, 60, 60, 20], method=method,
               trace_source=True)
    with torch.no_grad():
        model(images)
    state = model._tokenpool
    source, sizes = state["source"], state["sizes"]
    assert source.shape == (2, 196)
    for b in range(2):
        counts = torch.bincount(source[b], minlength=20).float()
        torch.testing.assert_close(counts, sizes[b])


def test_backward_reaches_every_parameter(images: torch.Tensor) -> None:
    model = make()
    patch_timm(model, SCHEDULE)
    model(images).logsumexp(-1).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


def test_attention_needs_scores_only_where_pooling_uses_them() -> None:
    model = make()
    patch_timm(model, SCHEDULE)
    assert [b.attn._tp_needs_scores for b in model.blocks] == [False] + [True] * 11
    unpatch_timm(model)
    patch_timm(model, SCHEDULE, method="kmedoids")
    assert not any(b.attn._tp_needs_scores for b in model.blocks)


def test_tome_merges_by_the_keys_averaged_over_heads(images: torch.Tensor,
                                                     monkeypatch) -> None:
    """ToMe's metric: the block's keys (B, H, N, d) averaged over heads, patch tokens only;
    no scores are computed for it. With a keep list of ToMe's constant r, each block gets
    it and merges its r tokens, or half its tokens where fewer than 2 r are left."""
    model = make("deit_tiny_distilled")  # two prefix tokens
    keep = tp_timm.tome_schedule(16, 12, 196)
    patch_timm(model, keep, method="tome")
    assert not any(b.attn._tp_needs_scores for b in model.blocks)
    assert all(b.attn._tp_needs_metric for b in model.blocks)
    attn_inputs: list[torch.Tensor] = []
    for block in model.blocks:
        block.attn.register_forward_pre_hook(lambda m, args: attn_inputs.append(args[0]))
    passed = []
    real = tp_timm.pool_with_grad

    def spy(x, k, method, *, scores=None, sizes=None, metric=None, **options):
        passed.append((x.shape[1], k, scores, metric))
        return real(x, k, method, scores=scores, sizes=sizes, metric=metric, **options)

    monkeypatch.setattr(tp_timm, "pool_with_grad", spy)
    with torch.no_grad():
        model(images)
    assert [(n, k) for n, k, _, _ in passed] == list(zip([196, *keep[:-1]], keep, strict=True))
    assert [n - k for n, k, _, _ in passed] == [16] * 11 + [10]  # 20 tokens: at most 10
    for block, h, (_, _, scores, metric) in zip(model.blocks, attn_inputs, passed, strict=True):
        attn = block.attn
        qkv = attn.qkv(h).reshape(h.shape[0], h.shape[1], 3, attn.num_heads, attn.head_dim)
        keys = qkv[:, :, 1]  # (B, N, H, d); deit's k_norm is the identity
        assert scores is None
        torch.testing.assert_close(metric, keys.mean(dim=2)[:, 2:], rtol=1e-5, atol=1e-6)


def test_tome_schedule_is_r_per_block_capped_at_half() -> None:
    assert tp_timm.tome_schedule(13, 12, 196) == [196 - 13 * i for i in range(1, 13)]
    assert tp_timm.tome_schedule(100, 3, 196) == [98, 49, 25]  # floor(n / 2) per block
    assert tp_timm.tome_schedule([0, 5, 1], 3, 7) == [7, 4, 3]
    with pytest.raises(ValueError, match="one per block"):
        tp_timm.tome_schedule([1, 2], 3, 196)
    with pytest.raises(ValueError, match="non-negative"):
        tp_timm.tome_schedule(-1, 3, 196)


def test_prop_attn_with_unit_sizes_changes_nothing(images: torch.Tensor) -> None:
    """'topk' keeps tokens of size 1, so log(size) = 0 must leave the logits as they are."""
    outputs = []
    for prop_attn in (False, True):
        model = make()
        patch_timm(model, SCHEDULE, method="topk", prop_attn=prop_attn)
        with torch.no_grad():
            outputs.append(model(images))
        assert model._tokenpool["sizes"] is not None
    torch.testing.assert_close(outputs[1], outputs[0])


def test_prop_attn_merged_token_attends_like_its_members() -> None:
    """A token of size 2 is attended exactly as two identical tokens of size 1."""
    model = make()
    patch_timm(model, 196)
    attn, state = model.blocks[0].attn, model._tokenpool
    x = torch.randn(1, 4, 192)  # cls, a, b, c
    duplicated = torch.cat([x, x[:, 2:3]], dim=1)  # cls, a, b, c, b
    state.update(sizes=None)
    with torch.no_grad():
        out_dup, _ = attn(duplicated)
        state.update(sizes=torch.tensor([[1.0, 2.0, 1.0]]))
        out_merged, _ = attn(x)
    torch.testing.assert_close(out_merged, out_dup[:, :4])


@pytest.mark.parametrize("prop_attn", [False, True])
def test_scores_are_per_original_token(prop_attn: bool, images: torch.Tensor, monkeypatch) -> None:
    """With prop_attn, scores / sizes reach the core, so its weight scores * sizes is the Eq. 5
    score; without, the Eq. 5 score itself is the per-token score."""
    model = make()
    patch_timm(model, [196, 120, 60] + [60] * 9, prop_attn=prop_attn)
    raw, passed = [], []
    for block in model.blocks[1:3]:
        block.attn.register_forward_hook(lambda m, args, out: raw.append(out[1]))
    pool_with_grad = tp_timm.pool_with_grad

    def recording(x, k, method, *, scores, sizes, **options):
        passed.append((scores, sizes))
        return pool_with_grad(x, k, method, scores=scores, sizes=sizes, **options)

    monkeypatch.setattr(tp_timm, "pool_with_grad", recording)
    with torch.no_grad():
        model(images)
    (_, first_sizes), (scores, sizes) = passed
    assert first_sizes is None
    expected = raw[1] / sizes if prop_attn else raw[1]
    torch.testing.assert_close(scores, expected)


def test_a_token_of_size_zero_weighs_nothing(images: torch.Tensor, monkeypatch) -> None:
    """An empty K-Means cluster leaves a token of size 0; with prop_attn its score was
    0 / 0 = NaN in the next block (and the loss NaN). It must weigh 0 instead."""
    model = make()
    patch_timm(model, [196, 120, 60] + [60] * 9, method="wkmeans")
    passed = []
    pool_with_grad = tp_timm.pool_with_grad

    def emptying(x, k, method, *, scores, sizes, **options):
        passed.append(scores)
        tokens, result = pool_with_grad(x, k, method, scores=scores, sizes=sizes, **options)
        result.sizes[:, 0] = 0  # as if cluster 0 had emptied
        return tokens, result

    monkeypatch.setattr(tp_timm, "pool_with_grad", emptying)
    with torch.no_grad():
        logits = model(images)
    assert torch.isfinite(passed[1]).all() and (passed[1][:, 0] == 0).all()
    assert torch.isfinite(logits).all()


def test_round_trip_restores_the_model(images: torch.Tensor) -> None:
    model = make("vit_small_layerscale_qknorm")
    classes = [type(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = set(vars(model)) | {a for b in model.blocks for a in vars(b)}
    with torch.no_grad():
        expected = model(images[:1])
        patch_timm(model, SCHEDULE, trace_source=True)
        model(images[:1])
        unpatch_timm(model)
        logits = model(images[:1])
    assert [type(m) for m in model.modules()] == classes
    assert set(vars(model)) | {a for b in model.blocks for a in vars(b)} == attributes
    assert not hasattr(model.blocks[0].attn, "_tp_state")
    assert model.state_dict().keys() == state.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(logits, expected)


def test_rejects_unsupported_input() -> None:
    model = make()
    with pytest.raises(ValueError, match="keep"):
        patch_timm(model, [196] * 3)
    with pytest.raises(ValueError, match="placement"):
        patch_timm(model, 196, placement="mlp")
    patch_timm(model, 196)
    with pytest.raises(ValueError, match="already patched"):
        patch_timm(model, 196)


def test_bfloat16_autocast_gives_finite_logits(images: torch.Tensor) -> None:
    model = make()
    patch_timm(model, SCHEDULE)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
    assert torch.isfinite(logits).all()


def test_compile_patched_deit_tiny(images: torch.Tensor) -> None:
    """torch.compile (inductor) of a patched DeiT-Ti cut to three blocks, the generic
    pooling path traced: three pooling blocks of different sizes, the last keeping only the
    class token, as the full schedule's does. (All twelve blocks took inductor about two
    minutes and covered no more.)

    fullgraph=False: the model's own forward is not required to be one graph; the pooling
    step alone is checked for graph breaks in test_module_compiles_without_graph_breaks.
    """
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=3).eval()
    patch_timm(model, [169, 73, 0], stop_early=False, check_values=False, fast_paths=False,
               max_iter=2)  # fewer unrolled iterations: compile time, not coverage
    with torch.no_grad():
        expected = model(images[:1])
        compiled = torch.compile(model)
        torch.testing.assert_close(compiled(images[:1]), expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Visualisation


def test_visualisation_draws_k_clusters(tmp_path) -> None:
    from PIL import Image

    from tokenpool_ops.visualize import CAPTION_HEIGHT, cluster_map, draw_clusters, prepare_image

    model = make()
    patch_timm(model, SCHEDULE)
    photo = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    image, pixels = prepare_image(photo)
    labels = cluster_map(model, pixels, block=8)
    assert labels.shape == (14, 14) and len(np.unique(labels)) == SCHEDULE[8]
    path = tmp_path / "clusters.png"
    assert draw_clusters(image, labels, str(path)) == SCHEDULE[8]
    assert path.stat().st_size > 0
    with Image.open(path) as drawn:
        assert drawn.size == (448, 224)
    assert model._tokenpool["trace_source"] is False
    captioned = tmp_path / "captioned.png"
    draw_clusters(image, labels, str(captioned), caption="block 8: a caption")
    with Image.open(captioned) as drawn:  # the caption gets a strip of its own underneath
        assert drawn.size == (448, 224 + CAPTION_HEIGHT)
        strip = np.asarray(drawn)[224:]
        assert (strip < 128).any() and (strip == 255).any()  # dark text on white


def test_visualize_help_describes_every_option() -> None:
    from tokenpool_ops.visualize import build_parser

    parser = build_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in options} == {"model", "method", "block", "keep", "seed", "out"}
    assert all(a.help for a in options), [a.dest for a in options if not a.help]
    assert "caption" in parser.format_help()


@pytest.mark.parametrize("fast_paths", [True, False])
def test_merge_sums_in_float32_under_autocast(fast_paths: bool) -> None:
    """The generic path merges with a matrix product, which autocast would run in bfloat16."""
    x = torch.randn(2, 40, 8) * 100 + 1000
    layer = TokenPooling(10, "kmeans", fast_paths=fast_paths)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-4)


def _materialised_scores(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None,
                         scale: float) -> torch.Tensor:
    """Eq. 5 the plain way, in float64: the whole attention matrix, summed over H and Nq."""
    logits = (q.double() * scale) @ k.double().transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.double()
    return logits.softmax(dim=-1).sum(dim=(1, 2))


@pytest.mark.parametrize("n", [1, 63, 64, 65, 197])  # one chunk, its edges, several chunks
@pytest.mark.parametrize("with_bias", [False, True])
def test_received_attention_equals_the_materialised_scores(n: int, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(n)
    q, k = (torch.randn(2, 3, n, 8, generator=gen) for _ in range(2))
    bias = (torch.rand(2, 1, 1, n, generator=gen) * 3).log() if with_bias else None
    got = tp_timm.received_attention(q, k, bias, 0.35)
    assert got.dtype == torch.float32 and got.shape == (2, n)
    torch.testing.assert_close(got.double(), _materialised_scores(q, k, bias, 0.35),
                               rtol=1e-5, atol=1e-5)
    # Every query's probabilities sum to 1: the scores of a problem sum to H x N.
    torch.testing.assert_close(got.sum(dim=1), torch.full((2,), 3.0 * n), rtol=1e-5, atol=0)


@pytest.mark.parametrize("images", [1, 2, 5])  # per step: one, two of five (2, 2, 1), all
@pytest.mark.parametrize("bias_batch", [None, 1, 5])
def test_attention_with_scores_in_steps_equals_the_whole_matrix(
        images: int, bias_batch: int | None, monkeypatch) -> None:
    """The materialised inference attention, a few batch elements at a time: the output (heads
    merged) and the scores of the keys after the prefix, against the whole matrix in float64."""
    per_image, threads = 3 * 9 * 9, torch.get_num_threads()  # the chunk counts per thread
    monkeypatch.setattr(tp_patching, "ATTENTION_CHUNK", -(-per_image * images // threads))
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(5, 3, 9, 4, generator=gen) for _ in range(3))
    bias = (None if bias_batch is None else
            (torch.rand(bias_batch, 1, 1, 9, generator=gen) * 3).log())
    out, scores = tp_patching.attention_with_scores(q, k, v, bias, 0.35, 2)
    logits = (q.double() * 0.35) @ k.double().transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.double()
    attn = logits.softmax(dim=-1)
    assert out.shape == (5, 9, 3, 4) and scores.shape == (5, 7)
    torch.testing.assert_close(out.double(), (attn @ v.double()).transpose(1, 2),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores.double(), attn.sum(dim=(1, 2))[:, 2:], rtol=1e-5,
                               atol=1e-6)
    empty_out, empty_scores = tp_patching.attention_with_scores(
        q[:0], k[:0], v[:0], None if bias is None else bias[:0 if bias_batch == 5 else 1],
        0.35, 2)
    assert empty_out.shape == (0, 9, 3, 4) and empty_scores.shape == (0, 7)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_attention_with_scores_steps_through_the_batch_on_the_cpu_only(device: str,
                                                                      monkeypatch) -> None:
    """The steps are for a CPU core's cache: on another device (the meta device stands in
    for a GPU) the whole batch is one step, whose kernels fill the device."""
    monkeypatch.setattr(tp_patching, "ATTENTION_CHUNK", 1)  # the CPU: one image a step
    steps: list[int] = []
    real = tp_patching._attention_step
    monkeypatch.setattr(tp_patching, "_attention_step",
                        lambda q, *args: steps.append(q.shape[0]) or real(q, *args))
    q, k, v = (torch.ones(4, 3, 9, 4, device=device) for _ in range(3))
    out, scores = tp_patching.attention_with_scores(q, k, v, None, 0.35, 2)
    assert out.shape == (4, 9, 3, 4) and scores.shape == (4, 7)
    assert steps == ([1, 1, 1, 1] if device == "cpu" else [4])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scores_are_float32_sums_of_the_probabilities(dtype) -> None:
    # Eq. 5's sums over heads and queries in float32, then rounded once to the dtype. The
    # float64 sums of the same half-precision probabilities round to the same values here: a
    # float32 sum's error is far below half precision's rounding (a sum in the half dtype,
    # or rounded between heads and queries, is not: checked by mutation).
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 40, 8, generator=gen).to(dtype) for _ in range(3))
    _, scores = tp_patching.attention_with_scores(q, k, v, None, 0.35, 1)
    attn = ((q * 0.35) @ k.transpose(-2, -1)).softmax(dim=-1)  # the same half rounding
    exact = attn[..., 1:].double().sum(dim=(1, 2))
    assert scores.dtype == dtype
    torch.testing.assert_close(scores, exact.to(dtype), rtol=0, atol=0)


def _assert_inference_equals_training(model: torch.nn.Module, batch: torch.Tensor,
                                      monkeypatch) -> None:
    """The scores the three pooling blocks pass to pool, and the logits, are the same
    without autograd as with it (the path that materialises the whole attention matrix)."""
    seen: list[torch.Tensor] = []
    real = tp_timm.pool_with_grad

    def spy(x, k, method, *, scores=None, sizes=None, **options):
        seen.append(scores.detach().clone())
        return real(x, k, method, scores=scores, sizes=sizes, **options)

    monkeypatch.setattr(tp_timm, "pool_with_grad", spy)
    with torch.no_grad():
        inferred = model(batch)
    without_grad, seen[:] = list(seen), []
    trained = model(batch.clone().requires_grad_(True))
    assert len(seen) == len(without_grad) == 3
    for got, want in zip(without_grad, seen, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inferred, trained.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prop_attn", [False, True])
def test_inference_scores_equal_the_training_path(prop_attn: bool, images: torch.Tensor,
                                                  monkeypatch) -> None:
    """Without autograd a block off ``MATERIALISED_DEVICES`` scores by received_attention
    (forced here on the CPU, which materialises by default); with autograd, by its
    attention matrix."""
    monkeypatch.setattr(tp_timm, "MATERIALISED_DEVICES", ())
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    patch_timm(model, [150, 90, 40] + [40] * 9, method="wkmedoids", prop_attn=prop_attn)
    _assert_inference_equals_training(model, images, monkeypatch)


def test_inference_in_steps_equals_the_training_path(images: torch.Tensor, monkeypatch) -> None:
    """On the CPU without autograd a block materialises its attention one image at a time
    (forced here by a one-element chunk); each image keeps its own sizes' bias and scores."""
    monkeypatch.setattr(tp_patching, "ATTENTION_CHUNK", 1)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    patch_timm(model, [150, 90, 40] + [40] * 9, method="wkmedoids")
    # 4 images, each its own pooling
    _assert_inference_equals_training(model, torch.cat([images, images.flip(0)]), monkeypatch)


@pytest.mark.parametrize("materialised", [("cpu",), ()])
def test_inference_uses_the_score_pass_off_the_materialised_devices(
        materialised: tuple[str, ...], images: torch.Tensor, monkeypatch) -> None:
    calls: list[int] = []
    real = tp_timm.received_attention

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(tp_timm, "MATERIALISED_DEVICES", materialised)
    monkeypatch.setattr(tp_timm, "received_attention", counted)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    patch_timm(model, [150, 90, 40] + [40] * 9, method="wkmedoids")
    with torch.no_grad():
        model(images)
    assert len(calls) == (0 if materialised else 3)  # the three blocks that pool


def test_gpu_blocks_materialise_their_attention_and_equal_the_score_pass(
        images: torch.Tensor, monkeypatch) -> None:
    """On CUDA, without autograd, the blocks that pool materialise their attention (faster
    there: MATERIALISED_DEVICES) and give the logits of SDPA plus the score pass. The CPU
    tests above check both routes against the training path."""
    device = cuda_or_skip()
    calls: list[int] = []
    real = tp_timm.received_attention
    monkeypatch.setattr(tp_timm, "received_attention",
                        lambda *args: calls.append(1) or real(*args))
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval().to(device)
    patch_timm(model, [150, 90, 40] + [40] * 9, method="wkmedoids")
    batch = images.to(device)
    with torch.no_grad():
        materialised = model(batch)
        assert calls == []
        monkeypatch.setattr(tp_timm, "MATERIALISED_DEVICES", ())
        score_pass = model(batch)
    assert len(calls) == 3  # the three blocks that pool
    torch.testing.assert_close(materialised, score_pass, rtol=1e-4, atol=1e-4)


def test_received_attention_under_bfloat16_autocast_within_rounding() -> None:
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 6, 197, 64, generator=gen) for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = tp_timm.received_attention(q.bfloat16(), k.bfloat16(), None, 64 ** -0.5)
    want = _materialised_scores(q.bfloat16().float(), k.bfloat16().float(), None, 64 ** -0.5)
    # bf16 logits (8 significant bits): each score within bf16's relative rounding, 2^-8;
    # the sum over heads and queries averages the errors down (6e-4 measured).
    torch.testing.assert_close(got.double(), want, rtol=2 ** -8, atol=0)


@pytest.fixture
def cuda_softmax_rule() -> Iterator[None]:
    """CPU autocast with CUDA autocast's rule for softmax, which CPU autocast lacks: softmax is
    on CUDA's float32 list, so without a ``dtype`` argument half-precision input is computed
    and returned in float32 ("Ops called with an explicit dtype=... argument are not
    eligible", torch.amp's op reference). Undone after the test."""
    autocast_cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def widened_softmax(x: torch.Tensor, dim: int, dtype: torch.dtype | None = None):
        with torch._C._ExcludeDispatchKeyGuard(autocast_cpu):
            if dtype is None and x.dtype in (torch.float16, torch.bfloat16):
                dtype = torch.float32
            return torch.ops.aten.softmax.int(x, dim, dtype)

    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():  # "Overriding a previously registered kernel"
        warnings.simplefilter("ignore")
        lib.impl("softmax.int", widened_softmax, "AutocastCPU")
    yield
    lib._destroy()


def test_scored_attention_keeps_its_probabilities_half_under_cuda_autocast(
        cuda_softmax_rule) -> None:
    """A block's scored attention (inference) under bf16 autocast with CUDA's softmax rule:
    no (b, H, N, N) float32 matrix (on an H200 at B=256 a copy there and another back to
    bfloat16, each block), and the results of the same bf16 inputs without autocast."""
    from torch.utils._python_dispatch import TorchDispatchMode

    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 20, 8, generator=gen).bfloat16() for _ in range(3))
    bias = (torch.rand(2, 1, 1, 20, generator=gen) * 3 + 1).log()
    wide: list[tuple[int, ...]] = []

    class Outputs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.ndim == 4 \
                        and tuple(t.shape[1:]) == (3, 20, 20):
                    wide.append(tuple(t.shape))
            return out

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q.softmax(-1).dtype == torch.float32  # the rule is in force
        with Outputs():
            out, scores = tp_patching.attention_with_scores(q, k, v, bias, 0.35, 1)
    assert wide == []
    want_out, want_scores = tp_patching.attention_with_scores(q, k, v, bias, 0.35, 1)
    assert torch.equal(out, want_out) and torch.equal(scores, want_scores)


@pytest.mark.parametrize("method", ["wkmedoids", "wkmeans"])
@pytest.mark.parametrize("precision", ["bfloat16 model", "bfloat16 autocast",
                                       "bfloat16 autocast, CUDA's softmax rule"])
def test_counts_stay_exact_above_256_patches_in_half_precision(
        method: str, precision: str, request: pytest.FixtureRequest) -> None:
    """A 384-pixel ViT has 576 patches, so a pooled token can stand for more than 256, which
    bfloat16 cannot count (8 significant bits): after every block the counts are whole
    numbers that sum to 576. Half-precision scores once pulled the counts down to their
    dtype before pooling (a sum of 575 in this test); under CUDA's autocast the scores are
    half precision too (the probabilities stay in the logits' dtype)."""
    if precision.endswith("rule"):
        request.getfixturevalue("cuda_softmax_rule")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=384,
                              depth=3).eval()
    images = torch.randn(2, 3, 384, 384, generator=torch.Generator().manual_seed(2))
    if precision == "bfloat16 model":
        model, images = model.bfloat16(), images.bfloat16()
    patch_timm(model, [5, 3, 2], method=method)
    counts: list[torch.Tensor] = []
    for block in model.blocks:
        block.register_forward_hook(
            lambda *_: counts.append(model._tokenpool["sizes"].clone()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                         enabled=precision != "bfloat16 model"):
        model(images)
    assert len(counts) == 3
    assert max(c.max().item() for c in counts) > 256  # the case this test is about
    for c in counts:
        assert c.dtype == torch.float32 and torch.equal(c, c.round())
        assert c.sum(dim=1).tolist() == [576.0, 576.0]


# ---------------------------------------------------------------------------------------------
# Schedules that empty a block before the last


EMPTYING_SCHEDULES = {"zero_everywhere": [0, 0, 0], "empty_at_two": [6, 0, 0],
                      "empty_at_three": [10, 6, 0]}


@pytest.fixture(scope="module")
def tiny_vit() -> torch.nn.Module:
    """A 3-block DeiT on 64x64 images: 16 patch tokens plus the class token."""
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64, depth=3,
                             num_classes=5).eval()


def _head_from_prefix(model: torch.nn.Module, x: torch.Tensor, first_block: int) -> torch.Tensor:
    """The unpatched model's blocks ``first_block:`` and head on prefix-only tokens ``x``."""
    for block in model.blocks[first_block:]:
        x = block(x)
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("mode", ["eval_materialised", "eval_sdpa", "train"])
@pytest.mark.parametrize("placement", ["attn", "block"])
@pytest.mark.parametrize("schedule", EMPTYING_SCHEDULES)
@pytest.mark.parametrize("method", METHODS)
def test_blocks_after_an_emptied_block_see_the_prefix_alone(
        method: str, schedule: str, placement: str, mode: str, tiny_vit, monkeypatch) -> None:
    """A block that keeps no patch token leaves the prefix alone to the blocks after it.

    Those blocks must compute exactly what the unpatched blocks compute on the prefix tokens
    (log(size) adds nothing to a prefix token: it stands for itself), in every mode.
    """
    keep = EMPTYING_SCHEDULES[schedule]
    reference, model = tiny_vit, copy.deepcopy(tiny_vit)
    if mode == "eval_sdpa":
        monkeypatch.setattr(tp_timm, "MATERIALISED_DEVICES", ())
    patch_timm(model, keep, method=method, placement=placement, trace_source=True)
    model.train(mode == "train")
    model.drop_rate = 0.0  # keeps dropout out of the comparison (the DeiT has none anyway)
    emptied = keep.index(0)
    prefix_in: list[torch.Tensor] = []
    if emptied + 1 < len(keep):
        model.blocks[emptied + 1].register_forward_pre_hook(
            lambda m, args: prefix_in.append(args[0].detach()))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.set_grad_enabled(mode == "train"):
        logits = model(images.requires_grad_(mode == "train"))
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    assert model._tokenpool["sizes"].shape == (2, 0)
    assert (model._tokenpool["source"] == -1).all()
    if prefix_in:
        assert prefix_in[0].shape == (2, 1, 192)  # the class token alone
        with torch.no_grad():
            expected = _head_from_prefix(reference, prefix_in[0], emptied + 1)
        torch.testing.assert_close(logits.detach(), expected, rtol=1e-5, atol=1e-5)
    if mode == "train":
        logits.logsumexp(-1).sum().backward()
        assert images.grad is not None and torch.isfinite(images.grad).all()
        assert images.grad.abs().sum() > 0
