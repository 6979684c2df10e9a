"""PoWER-BERT's schedule search (reference_models/search_schedule.py) and ``--keep FILE``.

CPU only: two one-epoch searches of the tiny digits model (4 blocks, 64 patches), in
process, shared by the tests of this file.
"""

from __future__ import annotations

import copy
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the search needs PyTorch")
pytest.importorskip("timm", reason="the search needs timm")
pytest.importorskip("torchvision", reason="the trainer needs torchvision")
pytest.importorskip("sklearn", reason="--data digits needs scikit-learn")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # reference_models/ is a folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

from reference_models import flops, models, train  # noqa: E402
from reference_models.search_schedule import (  # noqa: E402
    add_soft_extract,
    keep_schedule,
    main,
    soft_extract,
)
from tokenpool_ops import significance_scores  # noqa: E402

# One epoch of the digits model without warm-up or EMA; a large retention learning rate so
# that one epoch (44 steps) can move r from 1 to 0.
FAST = ["--data", "digits", "--model", "deit_digits_tiny_patch1_8", "--threads", "1",
        "--seed", "3", "--epochs", "1", "--warmup-epochs", "0", "--no-model-ema",
        "--retention-lr", "0.05"]
TINY_LAM, STRONG_LAM = 1e-4, 10.0
PATCHES, BLOCKS = 64, 4


def _search(out: Path, lam: float) -> dict[str, Any]:
    assert main([*FAST, "--lam", str(lam), "--output", str(out)]) == 0
    return {"out": out, "schedule": json.loads((out / "schedule.json").read_text()),
            "retention": torch.load(out / "checkpoint.pt", map_location="cpu",
                                    weights_only=False)["model"]
            ["token_downsample.retention.weight"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _search(tmp_path_factory.mktemp("tiny"), TINY_LAM)


@pytest.fixture(scope="module")
def strong(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _search(tmp_path_factory.mktemp("strong"), STRONG_LAM)


def test_search_writes_a_schedule_that_keep_accepts(tiny: dict[str, Any]) -> None:
    schedule, path = tiny["schedule"], tiny["out"] / "schedule.json"
    assert set(schedule) == {"keep", "masses", "lam", "model", "epochs", "val_acc1"}
    assert schedule["lam"] == TINY_LAM and schedule["epochs"] == 1
    assert schedule["model"] == "deit_digits_tiny_patch1_8"
    keep = schedule["keep"]
    assert len(keep) == BLOCKS and len(schedule["masses"]) == BLOCKS
    assert all(0 <= k <= PATCHES for k in keep)
    assert all(a >= b for a, b in itertools.pairwise(keep)), keep
    log = [json.loads(line) for line in (tiny["out"] / "log.jsonl").read_text().splitlines()]
    assert schedule["val_acc1"] == log[-1]["val_acc1"]
    # The trainer and the FLOP counter take the file as --keep.
    assert models.resolve_keep(str(path), PATCHES, BLOCKS) == keep
    assert flops.parse_keep(str(path)) == keep


def test_strong_lambda_keeps_far_fewer_tokens(tiny: dict[str, Any],
                                              strong: dict[str, Any]) -> None:
    # Same seed and data; only λ differs. In blocks 1-3 a tiny λ barely moves r off 1 in one
    # epoch and a strong one drives nearly all of it to 0: the margin is most of 192 tokens.
    kept_tiny, kept_strong = tiny["schedule"]["keep"], strong["schedule"]["keep"]
    assert sum(kept_tiny[:-1]) >= 0.75 * (BLOCKS - 1) * PATCHES, kept_tiny
    assert sum(kept_strong[:-1]) <= 0.1 * (BLOCKS - 1) * PATCHES, kept_strong
    # The last block's patch tokens reach nothing after its MLP (the head reads the class
    # token only), so their r get no task gradient and any λ > 0 drives them to 0.
    assert kept_tiny[-1] == kept_strong[-1] == 0
    # The penalty weighs block l by l: the masses fall over the blocks.
    masses = strong["schedule"]["masses"]
    assert masses[0] > masses[-1], masses


def test_retention_stays_in_unit_interval(tiny: dict[str, Any],
                                          strong: dict[str, Any]) -> None:
    # Both ends of the clamp are reached: the task pushes some r above 1 and the strong
    # penalty pushes some below 0; after every step they are back in [0, 1].
    for run in (tiny, strong):
        r = run["retention"]
        assert r.shape == (BLOCKS, PATCHES)
        assert float(r.min()) >= 0.0 and float(r.max()) <= 1.0
    assert float(tiny["retention"].max()) == 1.0
    assert float(strong["retention"].min()) == 0.0
    masses = strong["retention"].sum(dim=1).tolist()
    assert strong["schedule"]["masses"] == pytest.approx(masses)
    assert strong["schedule"]["keep"] == keep_schedule(masses, PATCHES)


def test_soft_extract_multiplies_rank_j_by_r_j() -> None:
    patches = torch.arange(1.0, 17.0).reshape(2, 4, 2)
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.9],   # ranks: token 3, 1, 2, 0
                           [2.0, 2.0, 5.0, 0.0]])  # ranks: token 2, 0, 1 (tie: lower first), 3
    r = torch.tensor([1.0, 0.75, 0.5, 0.25])
    factors = torch.tensor([[0.25, 0.75, 0.5, 1.0],
                            [0.75, 0.5, 1.0, 0.25]])
    got = soft_extract(patches, scores, r)
    torch.testing.assert_close(got, patches * factors[..., None], rtol=0, atol=0)


def test_keep_schedule_is_ceil_then_cumulative_minimum() -> None:
    assert keep_schedule([64.0, 63.01, 63.5, 0.2, 0.0], 64) == [64, 64, 64, 1, 0]
    assert keep_schedule([70.0, 40.0, 50.0, -0.0], 64) == [64, 40, 40, 0]


def _digits_model() -> Any:
    torch.manual_seed(0)
    return models.build_model("deit_digits_tiny_patch1_8", 10).eval()


def test_soft_extract_block_placement_and_scores() -> None:
    plain = _digits_model()
    model = copy.deepcopy(plain)
    retention = add_soft_extract(model).weight
    images = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        # r = 1 everywhere: the base model's function.
        torch.testing.assert_close(model(images), plain(images), rtol=1e-5, atol=1e-5)
        # Block 0 keeps its 24 best-scored patch tokens; the other 40 enter its MLP as 0.
        # The scores are Eq. 5 of the probabilities that block 0's attention computes.
        retention[0] = torch.tensor([1.0] * 24 + [0.0] * 40)
        seen: dict[str, Any] = {}
        block = model.blocks[0]
        hooks = [block.attn.attn_drop.register_forward_hook(
                     lambda m, a, o: seen.setdefault("probs", a[0])),
                 block.norm2.register_forward_pre_hook(
                     lambda m, a: seen.setdefault("mlp_in", a[0])),
                 block.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))]
        model(images)
        for hook in hooks:
            hook.remove()
        x = seen["x"]
        after_attn = x + plain.blocks[0].attn(plain.blocks[0].norm1(x))
        scores = significance_scores(seen["probs"][..., 1:])  # patch keys (1 class token)
        best = scores.argsort(dim=-1, descending=True)[:, :24]
        kept = torch.zeros(3, 64).scatter(1, best, 1.0)
        expected = torch.cat([after_attn[:, :1], after_attn[:, 1:] * kept[..., None]], dim=1)
        torch.testing.assert_close(seen["mlp_in"], expected, rtol=1e-5, atol=1e-5)
        # A constant row c scales every patch token before the MLP; the class token never.
        retention[0] = 0.5
        after = block(x)
        mid = torch.cat([after_attn[:, :1], 0.5 * after_attn[:, 1:]], dim=1)
        torch.testing.assert_close(after, mid + plain.blocks[0].mlp(plain.blocks[0].norm2(mid)),
                                   rtol=1e-5, atol=1e-5)
    assert [k for k in model.state_dict() if k.startswith(models.DOWNSAMPLE_PREFIX)] == [
        "token_downsample.retention.weight"]
    # The EMA's deep copy multiplies by its own retention, not the model's.
    ema = copy.deepcopy(model)
    assert ema.blocks[2]._se_retention is ema.token_downsample["retention"]
    assert ema.blocks[2]._se_retention is not model.token_downsample["retention"]


def _error_of(entry: Any, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        entry(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
    return err.split("error:", 1)[1].strip()


def test_bad_schedule_file_gets_one_clear_error(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--threads", "1", "--output", str(tmp_path / "out"), "--downsample", "powerbert"]
    missing = tmp_path / "missing.json"
    msg = _error_of(train.main, ["--keep", str(missing), *base], capsys)
    assert "cannot read the schedule file" in msg and "missing.json" in msg
    cases = {"garbage.json": "{not json", "list.json": "[1, 2, 3, 4]",
             "nokeep.json": '{"masses": [1, 2, 3, 4]}', "floats.json": '{"keep": [1.5, 2, 3, 4]}'}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        msg = _error_of(train.main, ["--keep", str(tmp_path / name), *base], capsys)
        assert "is no schedule file" in msg and name in msg, msg
    (tmp_path / "three.json").write_text('{"keep": [40, 30, 20]}')
    msg = _error_of(train.main, ["--keep", str(tmp_path / "three.json"), *base], capsys)
    assert "4 of them" in msg and "got 3" in msg
    (tmp_path / "negative.json").write_text('{"keep": [40, 30, -1, 0]}')
    msg = _error_of(train.main, ["--keep", str(tmp_path / "negative.json"), *base], capsys)
    assert "non-negative" in msg
    msg = _error_of(flops.main, ["--model", "deit_digits_tiny_patch1_8", "--keep",
                                 str(tmp_path / "garbage.json")], capsys)
    assert "is no schedule file" in msg
    msg = _error_of(main, ["--threads", "1", "--downsample", "powerbert"], capsys)
    assert "--downsample does not apply to the schedule search" in msg
