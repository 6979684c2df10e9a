"""Convolution downsampling (the paper's Appendix D baseline) in the trainer: training
through ``train.main``, token counts, a known answer, FLOPs against torch, finetuning and
bad input. CPU only, the embedded digits, tiny runs."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the trainer needs PyTorch")
pytest.importorskip("timm", reason="the trainer needs timm")
pytest.importorskip("torchvision", reason="the trainer needs torchvision")
pytest.importorskip("sklearn", reason="--data digits needs scikit-learn")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # reference_models/ is a folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from reference_models import flops, models, train  # noqa: E402
from reference_models.conv import TokenGridConv  # noqa: E402

MODEL = "deit_digits_tiny_patch1_8"  # 8x8 patch tokens, 4 blocks of width 64
# Two updates per epoch (1,437 images, batch 512): the digits head starts at zero, so only
# the second update's gradients reach the blocks and the convolutions.
TWO_STEPS = ["--data", "digits", "--model", MODEL, "--threads", "1", "--seed", "3",
             "--epochs", "1", "--batch-size", "512", "--eval-batch-size", "512",
             "--no-model-ema"]
CONV = ["--downsample", "conv", "--conv-depths", "1,3"]


def _conv_model(depths: str = "1,3") -> tuple[Any, list[int] | None]:
    torch.manual_seed(0)
    model = models.build_model(MODEL, 10).eval()
    return model, models.apply_downsample(model, "conv", None, models.DEFAULT_KEEP,
                                          conv_depths=depths)


def _capture_built_model(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The model ``train.main`` builds, kept after it returns."""
    built: list[Any] = []
    original = train.build

    def build(args: Any, dist: Any) -> Any:
        parts = original(args, dist)
        built.append(parts.model)
        return parts

    monkeypatch.setattr(train, "build", build)
    return built


def test_conv_trains_through_the_trainer_with_gradients_in_the_convolutions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = _capture_built_model(monkeypatch)
    out = tmp_path / "run"
    assert train.main([*TWO_STEPS, *CONV, "--output", str(out)]) == 0
    model = built[0]
    assert sorted(model.token_downsample) == ["conv1", "conv3"]
    for name, param in model.token_downsample.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert {k for k in state["model"] if k.startswith(models.DOWNSAMPLE_PREFIX)} == {
        f"token_downsample.conv{b}.{p}" for b in (1, 3) for p in ("weight", "bias")}
    assert state["config"]["keep_schedule"] == [16, 16, 4, 4]
    # The log's gflops is the counter's total with the convolutions after blocks 1 and 3.
    expected = flops.count(flops.ViTShape.of(model), [16, 16, 4, 4], method="none",
                           placement="block", conv_after=[1, 3])
    assert state["config"]["gflops"] == pytest.approx(expected.total)
    assert expected.conv_downsampling == pytest.approx((64 + 16) * 64**2 * 1e-9)


def test_token_counts_follow_the_schedule_and_ema_copies_its_own_convolutions() -> None:
    model, schedule = _conv_model()
    assert schedule == [16, 16, 4, 4]
    entering: list[int] = []
    for module in [*model.blocks[1:], model.norm]:  # tokens after blocks 1..4
        module.register_forward_pre_hook(lambda m, args: entering.append(args[0].shape[1]))
    images = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        features = model.forward_features(images)
    assert entering == [1 + k for k in schedule] and features.shape == (2, 1 + 4, 64)
    # timm's EMA deep-copies the model: the copy's hooks must run the copy's convolutions.
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.token_downsample["conv3"].weight.zero_()
        assert torch.equal(model.forward_features(images), features)
        assert not torch.equal(twin.forward_features(images), features)


def test_top_left_weights_pick_token_2i_2j() -> None:
    torch.manual_seed(0)
    rows, cols, width, prefix = 4, 6, 5, 2
    conv = TokenGridConv(width, (rows, cols), prefix, after_block=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 0, 0] = torch.eye(width)  # identity on the window's top-left slot
        conv.bias.zero_()
    tokens = torch.randn(3, prefix + rows * cols, width)
    with torch.no_grad():
        out = conv(tokens)
    assert out.shape == (3, prefix + rows * cols // 4, width)
    assert torch.equal(out[:, :prefix], tokens[:, :prefix])  # prefix tokens unchanged
    grid = tokens[:, prefix:].reshape(3, rows, cols, width)  # row-major, as timm flattens
    for i in range(rows // 2):
        for j in range(cols // 2):
            expected = grid[:, 2 * i, 2 * j]
            assert torch.allclose(out[:, prefix + i * (cols // 2) + j], expected, atol=1e-6)


def test_conv_flops_match_torch_flop_counter() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, schedule = _conv_model()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(torch.randn(1, 3, 8, 8))
    torch_gflops = counter.get_total_flops() / 2 / 1e9  # torch counts a multiply-add as 2
    shape = flops.ViTShape.of(model)
    ours = flops.count(shape, schedule, **models.flop_options(model))
    # Tokens entering each block: 65, then 17 twice, then 5; the softmax normalisation
    # (n^2 H) is no product, so torch does not count it.
    softmax = sum(n * n for n in (65, 17, 17, 5)) * shape.heads * 1e-9
    assert torch_gflops == pytest.approx(ours.total - softmax, rel=1e-9)
    assert ours.conv_downsampling * 1e9 == pytest.approx(64 * 64**2 + 16 * 64**2)
    # Without keep, the counter quarters the patches at each convolution itself.
    assert flops.count(shape, None, method="none", placement="block",
                       conv_after=[1, 3]) == ours


def test_flops_command_line_counts_convolutions(capsys: pytest.CaptureFixture[str]) -> None:
    assert flops.main(["--model", MODEL, "--conv-after", "1,3", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    expected = flops.count(flops.shape_of(MODEL), [16, 16, 4, 4], method="none",
                           placement="block", conv_after=[1, 3])
    assert record["conv_downsampling"] == pytest.approx(expected.conv_downsampling)
    assert record["total"] == pytest.approx(expected.total)
    assert record["clustering"] == 0.0  # the convolutions reduce, no clustering is counted


def test_finetune_from_a_base_checkpoint_into_a_conv_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    base = models.build_model(MODEL, 10)
    checkpoint = tmp_path / "base.pt"
    torch.save({"model": base.state_dict()}, checkpoint)
    built = _capture_built_model(monkeypatch)
    # Only the flags evaluation uses: the training ones are refused with --eval.
    evaluate = ["--data", "digits", "--model", MODEL, "--threads", "1", "--eval-batch-size",
                "512", "--eval"]
    assert train.main([*evaluate, *CONV, "--finetune", str(checkpoint),
                       "--output", str(tmp_path / "eval")]) == 0
    loaded = built[0].state_dict()
    for key, value in base.state_dict().items():  # every base weight, under its own key
        assert torch.equal(loaded[key], value), key
    assert {k for k in loaded if k not in base.state_dict()} == {
        f"token_downsample.conv{b}.{p}" for b in (1, 3) for p in ("weight", "bias")}


def _error_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    return err.split("error:", 1)[1].strip()


@pytest.mark.parametrize(("argv", "message"), [
    (["--downsample", "conv", "--conv-depths", "0,2"], "blocks are numbered 1 to 4"),
    (["--downsample", "conv", "--conv-depths", "3,1"], "strictly increasing"),
    (["--downsample", "conv", "--conv-depths", "2,2"], "strictly increasing"),
    (["--downsample", "conv", "--conv-depths", "1,2,3,4"],
     "after block 4 meets a 1x1 grid"),
    (["--downsample", "conv", "--conv-depths", "one"], "no list of block numbers"),
    (["--downsample", "conv"], "needs --conv-depths"),
    (["--downsample", "conv", "--conv-depths", "1", "--keep", "16"],
     "--keep applies to --downsample tokenpool, powerbert, random, importance only, not to "
     "--downsample conv"),
    (["--downsample", "tokenpool", "--conv-depths", "1"], "--downsample conv only"),
    (["--downsample", "conv", "--conv-depths", "1", "--method", "kmeans"],
     "--method applies to --downsample tokenpool only"),
])
def test_bad_conv_input_gets_one_clear_error(argv: list[str], message: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--model", MODEL, "--threads", "1", "--output", str(tmp_path / "out")]
    assert message in _error_of([*argv, *base], capsys)


def test_odd_grid_side_is_a_config_error() -> None:
    from reference_models.errors import ConfigError

    model = models.build_model("deit_small_patch16_224", 10)  # 14x14 patches: 7x7 after one
    assert models.apply_downsample(model, "conv", None, models.DEFAULT_KEEP,
                                   conv_depths="4") == [196] * 3 + [49] * 9
    with pytest.raises(ConfigError, match="after block 8 meets a 7x7 grid"):
        models.apply_downsample(models.build_model("deit_small_patch16_224", 10), "conv",
                                None, models.DEFAULT_KEEP, conv_depths="4,8")
