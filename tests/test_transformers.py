"""patch_transformers: Token Pooling in Hugging Face ViT, DeiT and DINOv2 (tiny configs built
here, random weights, nothing downloaded)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the transformers patch needs PyTorch")
transformers = pytest.importorskip(
    "transformers", reason="the transformers patch needs transformers (pip install "
    "tokenpool-ops[transformers])")

import copy  # noqa: E402

import tokenpool_ops.transformers as tp_hf  # noqa: E402
from tokenpool_ops._pool import METHODS  # noqa: E402
from tokenpool_ops.transformers import patch_transformers, unpatch_transformers  # noqa: E402

HIDDEN, HEADS, IMAGE, PATCH = 32, 2, 32, 8  # 16 patch tokens
PATCHES = (IMAGE // PATCH) ** 2
SCHEDULE = [12, 6, 3]

#: name -> (model class, config class, prefix tokens, extra config)
MODELS = {
    "vit": ("ViTModel", "ViTConfig", 1, {}),
    "vit_cls": ("ViTForImageClassification", "ViTConfig", 1, {}),
    "deit": ("DeiTModel", "DeiTConfig", 2, {}),
    "deit_cls": ("DeiTForImageClassification", "DeiTConfig", 2, {}),
    "deit_teacher": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", 2, {}),
    "dinov2": ("Dinov2Model", "Dinov2Config", 1, dict(layerscale_value=0.5)),
    "dinov2_cls": ("Dinov2ForImageClassification", "Dinov2Config", 1,
                   dict(layerscale_value=0.5, use_swiglu_ffn=True)),
    "dinov2_registers": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", 4,
                         dict(num_register_tokens=3)),
    "dinov2_registers_cls": ("Dinov2WithRegistersForImageClassification",
                             "Dinov2WithRegistersConfig", 3, dict(num_register_tokens=2)),
}


def make(name: str = "vit_cls", implementation: str = "eager", layers: int = 3,
         image: int = IMAGE, **extra) -> torch.nn.Module:
    model_class, config_class, _, kwargs = MODELS[name]
    options = dict(hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                   intermediate_size=2 * HIDDEN, image_size=image, patch_size=PATCH,
                   num_labels=5, attn_implementation=implementation)
    config = getattr(transformers, config_class)(**{**options, **kwargs, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # DeiT starts its class and position embeddings at zero
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def images(size: int = IMAGE, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def main_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# ---------------------------------------------------------------------------------------------
# Nothing pooled, nothing changed


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", MODELS)
def test_keeping_every_token_is_exact(name: str, implementation: str) -> None:
    model, x = make(name, implementation), images()
    with torch.no_grad():
        expected = main_output(model(x))
        patch_transformers(model, PATCHES, method="wkmedoids")
        assert torch.equal(main_output(model(x)), expected)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["vit_cls", "deit_teacher", "dinov2_registers"])
def test_unpatch_restores_the_model_bit_for_bit(name: str, implementation: str) -> None:
    model, x = make(name, implementation), images()
    classes = [type(m) for m in model.modules()]
    attributes = {id(m): set(vars(m)) - {"_output_capturing_hooks_installed"}
                  for m in model.modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = main_output(model(x))
        patch_transformers(model, SCHEDULE, trace_source=True)
        pooled = main_output(model(x))
        unpatch_transformers(model)
        restored = main_output(model(x))
    assert not torch.equal(pooled, expected)  # the patch did something
    assert torch.equal(restored, expected)
    assert [type(m) for m in model.modules()] == classes
    assert {id(m): set(vars(m)) - {"_output_capturing_hooks_installed"}
            for m in model.modules()} == attributes
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------
# Token counts, outputs, prefix tokens


@pytest.mark.parametrize("placement", ["attn", "block"])
@pytest.mark.parametrize("name", MODELS)
def test_hidden_states_and_attentions_follow_the_schedule(name: str, placement: str) -> None:
    """output_hidden_states: the embeddings, then each layer's output with the tokens it left;
    output_attentions (eager): each layer's probabilities over the tokens that entered it;
    the MLP of a layer sees the pooled tokens with placement 'attn', all of them with 'block'."""
    model, prefix = make(name), MODELS[name][2]
    patch_transformers(model, SCHEDULE, placement=placement)
    mlp_tokens: list[int] = []
    for module in model.modules():
        if type(module).__name__.endswith(("MLP", "SwiGLUFFN")):
            module.register_forward_hook(lambda m, a, out: mlp_tokens.append(out.shape[1]))
    with torch.no_grad():
        out = model(images(), output_hidden_states=True, output_attentions=True)
    entering = [PATCHES, *SCHEDULE[:-1]]
    assert [h.shape[1] - prefix for h in out.hidden_states] == [PATCHES, *SCHEDULE]
    assert [a.shape[-1] - prefix for a in out.attentions] == entering
    assert all(a.shape[-2] == a.shape[-1] for a in out.attentions)
    assert [n - prefix for n in mlp_tokens] == (SCHEDULE if placement == "attn" else entering)
    assert torch.isfinite(main_output(out)).all()


def test_sdpa_returns_no_attentions_as_unpatched() -> None:
    model = make("vit_cls", "sdpa")
    with torch.no_grad():
        plain = model(images(), output_attentions=True).attentions
        patch_transformers(model, SCHEDULE)
        pooled = model(images(), output_attentions=True).attentions
    assert plain == pooled == ()


def test_prefix_tokens_are_never_pooled() -> None:
    """DeiT's class and distillation tokens come out of every layer as the plain layer makes
    them from the same input (placement 'block', no log(size) bias): pooling touches only
    the patch tokens."""
    model = make("deit_teacher")
    reference = copy.deepcopy(model)
    patch_transformers(model, SCHEDULE, placement="block", prop_attn=False)
    with torch.no_grad():
        out = model(images(), output_hidden_states=True)
        for layer, h_in, h_out in zip(reference.deit.layers, out.hidden_states,
                                      out.hidden_states[1:], strict=False):
            torch.testing.assert_close(h_out[:, :2], layer(h_in)[:, :2], rtol=1e-5, atol=1e-6)


def test_sizes_and_source_agree() -> None:
    model = make("dinov2_registers")
    patch_transformers(model, SCHEDULE, trace_source=True)
    with torch.no_grad():
        model(images())
    source, sizes = model._tokenpool["source"], model._tokenpool["sizes"]
    assert source.shape == (2, PATCHES) and sizes.shape == (2, SCHEDULE[-1])
    for b in range(2):
        torch.testing.assert_close(torch.bincount(source[b], minlength=3).float(), sizes[b])


def test_interpolate_pos_encoding_pools_the_larger_grid() -> None:
    """48 x 48 images: 36 patch tokens; keep counts tokens whatever the image size."""
    x = images(48)
    for name, kwargs in (("vit_cls", {"interpolate_pos_encoding": True}), ("dinov2", {})):
        model = patch_transformers(make(name), [30, 20, 5])
        with torch.no_grad():
            out = model(x, output_hidden_states=True, **kwargs)
        assert [h.shape[1] - 1 for h in out.hidden_states] == [36, 30, 20, 5]
        assert torch.isfinite(main_output(out)).all()


def test_the_paper_schedules_apply() -> None:
    """reference_models' presets and the paper's Table 3 schedule, on a 12-layer ViT of 196
    patches; a later entry above an earlier one keeps no more tokens than there are."""
    models = pytest.importorskip("reference_models.models",
                                 reason="reference_models needs its training extras")
    for preset in ("deits-level4", "deite318-level7", "linear"):
        keep = models.resolve_keep(preset, 196, 12)
        model = make("vit_cls", "sdpa", layers=12, image=224, patch_size=16)
        patch_transformers(model, keep)
        with torch.no_grad():
            out = model(images(224, batch=1), output_hidden_states=True)
        counts, n = [], 196
        for k in keep:
            n = min(n, k)
            counts.append(n)
        assert [h.shape[1] - 1 for h in out.hidden_states] == [196, *counts], preset


# ---------------------------------------------------------------------------------------------
# Methods, placements, modes, precision


@pytest.mark.parametrize("placement", ["attn", "block"])
@pytest.mark.parametrize("method", METHODS)
def test_eager_and_sdpa_agree(method: str, placement: str) -> None:
    x = images()
    logits = []
    for implementation in ("eager", "sdpa"):
        model = patch_transformers(make("deit_teacher", implementation), SCHEDULE,
                                   method=method, placement=placement)
        with torch.no_grad():
            logits.append(model(x).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prop_attn", [False, True])
def test_sdpa_score_pass_agrees_with_eager(prop_attn: bool, monkeypatch) -> None:
    """SDPA off the materialising devices (a GPU; forced here on the CPU): its output plus
    received_attention, no probabilities; the same scores and logits as eager."""
    calls: list[int] = []
    real = tp_hf.received_attention

    def counted(*args):
        calls.append(1)
        return real(*args)

    x, logits = images(), []
    for implementation in ("eager", "sdpa"):
        model = patch_transformers(make("vit_cls", implementation), SCHEDULE,
                                   prop_attn=prop_attn)
        if implementation == "sdpa":
            monkeypatch.setattr(tp_hf, "MATERIALISED_DEVICES", ())
            monkeypatch.setattr(tp_hf, "received_attention", counted)
        with torch.no_grad():
            logits.append(model(x).logits)
    assert len(calls) == 3  # the three layers that pool
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("placement", ["attn", "block"])
@pytest.mark.parametrize("method", METHODS)
def test_training_passes_gradients_to_every_parameter(method: str, placement: str) -> None:
    model = make("dinov2_cls", "sdpa")
    patch_transformers(model, SCHEDULE, method=method, placement=placement)
    model.train()
    x = images().requires_grad_(True)
    model(x).logits.logsumexp(-1).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, param in model.named_parameters():
        if name.endswith("mask_token"):
            continue  # used only with bool_masked_pos
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["wkmedoids", "kmeans", "tome"])
def test_bfloat16_autocast(method: str, implementation: str) -> None:
    model = patch_transformers(make("vit_cls", implementation), SCHEDULE, method=method)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(), output_hidden_states=True)
    assert torch.isfinite(out.logits).all()
    assert [h.shape[1] - 1 for h in out.hidden_states] == [PATCHES, *SCHEDULE]


# ---------------------------------------------------------------------------------------------
# What pooling is given: scores, metric, log(size)


def test_scores_are_the_attention_received(monkeypatch) -> None:
    """Eq. 5 from the probabilities eager returns (output_attentions), over all queries, at the
    patch-token keys; without prop_attn they reach pool as they are."""
    model = make("deit_teacher")
    patch_transformers(model, SCHEDULE, prop_attn=False)
    passed = []
    real = tp_hf.pool_with_grad

    def spy(x, k, method, *, scores=None, **options):
        passed.append(scores)
        return real(x, k, method, scores=scores, **options)

    monkeypatch.setattr(tp_hf, "pool_with_grad", spy)
    with torch.no_grad():
        attentions = model(images(), output_attentions=True).attentions
    assert len(passed) == 3
    for scores, probabilities in zip(passed, attentions, strict=True):
        expected = probabilities.double().sum(dim=(1, 2))[:, 2:]
        torch.testing.assert_close(scores.double(), expected, rtol=1e-6, atol=1e-6)


def test_tome_merges_by_the_keys_averaged_over_heads(monkeypatch) -> None:
    model = make("vit_cls", "sdpa")
    keep = tp_hf.tome_schedule(4, 3, PATCHES)
    patch_transformers(model, keep, method="tome")
    passed = []
    real = tp_hf.pool_with_grad

    def spy(x, k, method, *, metric=None, scores=None, **options):
        passed.append((metric, scores))
        return real(x, k, method, metric=metric, scores=scores, **options)

    monkeypatch.setattr(tp_hf, "pool_with_grad", spy)
    with torch.no_grad():
        out = model(images(), output_hidden_states=True)
        for layer, h, (metric, scores) in zip(model.vit.layers, out.hidden_states[:-1], passed,
                                              strict=True):
            keys = layer.attention.k_proj(layer.layernorm_before(h)).view(2, -1, HEADS, 16)
            assert scores is None
            torch.testing.assert_close(metric, keys.mean(dim=2)[:, 1:], rtol=1e-5, atol=1e-6)
    assert [h.shape[1] - 1 for h in out.hidden_states] == [PATCHES, *keep]


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_prop_attn_merged_token_attends_like_its_members(implementation: str) -> None:
    """log(size) through the model's own attention: a token of size 2 is attended exactly as
    two identical tokens of size 1."""
    model = make("vit_cls", implementation)
    plain_attention = copy.deepcopy(model.vit.layers[0].attention)
    patch_transformers(model, PATCHES)
    attention, state = model.vit.layers[0].attention, model._tokenpool
    x = torch.randn(1, 4, HIDDEN, generator=torch.Generator().manual_seed(3))  # cls, a, b, c
    duplicated = torch.cat([x, x[:, 2:3]], dim=1)  # cls, a, b, c, b
    state.update(sizes=torch.tensor([[1.0, 2.0, 1.0]]))
    with torch.no_grad():
        merged, _, _ = attention(x)
        expected, _ = plain_attention(duplicated)
    torch.testing.assert_close(merged, expected[:, :4], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# One pooling, two front doors


def _timm_deit_from(hf_model) -> torch.nn.Module:
    """timm's distilled DeiT with the weights of a HF DeiTForImageClassificationWithTeacher."""
    timm = pytest.importorskip("timm", reason="the comparison with the timm patch needs timm")
    config = hf_model.config
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False,
                              img_size=config.image_size, patch_size=config.patch_size,
                              embed_dim=config.hidden_size, depth=config.num_hidden_layers,
                              num_heads=config.num_attention_heads, mlp_ratio=2.0,
                              num_classes=config.num_labels).eval()
    hf = hf_model.state_dict()
    state = {"cls_token": hf["deit.embeddings.cls_token"],
             "dist_token": hf["deit.embeddings.distillation_token"],
             "pos_embed": hf["deit.embeddings.position_embeddings"],
             "patch_embed.proj.weight": hf["deit.embeddings.patch_embeddings.projection.weight"],
             "patch_embed.proj.bias": hf["deit.embeddings.patch_embeddings.projection.bias"],
             "norm.weight": hf["deit.layernorm.weight"], "norm.bias": hf["deit.layernorm.bias"],
             "head.weight": hf["cls_classifier.weight"], "head.bias": hf["cls_classifier.bias"],
             "head_dist.weight": hf["distillation_classifier.weight"],
             "head_dist.bias": hf["distillation_classifier.bias"]}
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj":
             "attention.o_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(config.num_hidden_layers):
        layer = f"deit.layers.{i}."
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                state[f"blocks.{i}.{ours}.{kind}"] = hf[f"{layer}{theirs}.{kind}"]
        for kind in ("weight", "bias"):
            state[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [hf[f"{layer}attention.{p}_proj.{kind}"] for p in "qkv"])
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("placement", ["attn", "block"])
@pytest.mark.parametrize("method", METHODS)
def test_hf_deit_and_timm_deit_pool_alike(method: str, placement: str) -> None:
    from tokenpool_ops.timm import patch_timm

    hf_model = make("deit_teacher", "sdpa", layer_norm_eps=1e-6)
    timm_model = _timm_deit_from(hf_model)
    x = images()
    with torch.no_grad():  # the same model before pooling
        torch.testing.assert_close(timm_model(x), hf_model(x).logits, rtol=1e-5, atol=1e-5)
        patch_transformers(hf_model, SCHEDULE, method=method, placement=placement,
                           trace_source=True)
        patch_timm(timm_model, SCHEDULE, method=method, placement=placement, trace_source=True)
        expected, got = timm_model(x), hf_model(x).logits
    assert torch.equal(hf_model._tokenpool["source"], timm_model._tokenpool["source"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Errors


def test_other_models_are_refused_naming_the_supported_ones() -> None:
    config = transformers.ViTConfig(hidden_size=HIDDEN, num_hidden_layers=1,
                                    num_attention_heads=HEADS, intermediate_size=64,
                                    image_size=IMAGE, patch_size=PATCH, encoder_stride=PATCH)
    with pytest.raises(TypeError, match=r"supports .*DeiTForImageClassificationWithTeacher.*"
                                        r"got ViTForMaskedImageModeling"):
        patch_transformers(transformers.ViTForMaskedImageModeling(config), 4)
    with pytest.raises(TypeError, match="got Linear"):
        patch_transformers(torch.nn.Linear(2, 2), 4)


def test_rejects_unsupported_input() -> None:
    model = make()
    with pytest.raises(ValueError, match="keep"):
        patch_transformers(model, [4, 4])
    with pytest.raises(ValueError, match="placement"):
        patch_transformers(model, 4, placement="mlp")
    with pytest.raises(ValueError, match="method"):
        patch_transformers(model, 4, method="median")
    with pytest.raises(ValueError, match="not patched"):
        unpatch_transformers(model)
    with pytest.raises(ValueError, match="averages the patch tokens"):
        patch_transformers(make("dinov2_cls"), [8, 4, 0])
    model.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        patch_transformers(model, 4)
    model.activation_checkpointing_disable()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="'eager' or 'sdpa'"):
        patch_transformers(model, 4)
    model.config._attn_implementation = "eager"
    patch_transformers(model, 4)
    with pytest.raises(ValueError, match="already patched"):
        patch_transformers(model, 4)
    mask = torch.ones(2, PATCHES + 1, dtype=torch.bool)
    mask[:, -1] = False  # (an all-True mask is no mask: transformers drops it)
    with pytest.raises(ValueError, match="attention_mask"):
        model(images(), attention_mask=mask)
    model.config._attn_implementation = "flex_attention"  # switched after patching
    with pytest.raises(ValueError, match="'eager' or 'sdpa'"):
        model.vit.layers[0](torch.randn(2, PATCHES + 1, HIDDEN))


# ---------------------------------------------------------------------------------------------
# torch.compile


def test_compiles_as_one_graph() -> None:
    """SLOW (about 30 s): the generic pooling path with fixed iterations (as for patch_timm)
    traces into one graph, the whole patched model included. Dynamo only (backend 'eager'):
    inductor's code generation took 5 minutes here (it agreed within 5e-8)."""
    model = patch_transformers(make("deit_teacher", "sdpa"), SCHEDULE,
                               stop_early=False, check_values=False, fast_paths=False,
                               max_iter=2)
    x = images()
    with torch.no_grad():
        expected = model(x).logits
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x).logits, expected, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# torch.export


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_export_gives_the_eager_outputs_and_leaves_the_state_clean(implementation) -> None:
    # Under export transformers materialises its all-attend mask, which the layers drop; the
    # fake sizes and sources of the traced pass are forgotten (no fake tensor outlives it),
    # and the model and its layers still share one state.
    model = patch_transformers(make("deit_teacher", implementation), SCHEDULE,
                               trace_source=True)
    x = images()
    with torch.no_grad():
        want = model(x).logits
        program = torch.export.export(model, (x,))
        assert model._tokenpool["sizes"] is None and model._tokenpool["source"] is None
        got = program.module()(x).logits
        again = model(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, want, rtol=0, atol=0)
    assert model._tokenpool["source"].shape == (2, PATCHES)  # eager passes keep theirs
    assert all(layer._tp_state is model._tokenpool for layer in model.deit.layers)
    with pytest.raises(ValueError, match="no attention_mask"):
        model(x, attention_mask=torch.ones(2, PATCHES + 2))
    # Under export the layers drop the mask transformers builds, so a caller's mask must be
    # refused before: by position as by keyword (forward(pixel_values,
    # interpolate_pos_encoding, attention_mask)).
    mask = torch.ones(2, PATCHES + 2)
    with pytest.raises(ValueError, match="no attention_mask"):
        torch.export.export(model, (x, False, mask))
    with pytest.raises(ValueError, match="no attention_mask"):
        torch.export.export(model, (x,), {"attention_mask": mask})


def test_export_names_a_dynamic_batch_pixel_values() -> None:
    # The patch leaves the model's forward as it was: a dynamic batch is named as for the
    # plain model, and the program gives the eager logits at other batch sizes too.
    model = patch_transformers(make("deit_teacher", "sdpa"), SCHEDULE)
    batch = torch.export.Dim("batch", min=1, max=16)
    with torch.no_grad():
        program = torch.export.export(model, (images(),),
                                      dynamic_shapes={"pixel_values": {0: batch}})
        for size in (3, 5):
            given = torch.randn(size, *images().shape[1:],
                                generator=torch.Generator().manual_seed(size))
            torch.testing.assert_close(program.module()(given).logits, model(given).logits,
                                       rtol=1e-5, atol=1e-5)
