"""The DeiT trainer in reference_models/: learning, exact resume, downsamplers, DDP, errors.

Everything runs on the CPU with the embedded digits and tiny runs: the whole file takes a
few minutes on two cores. Subprocesses run the real command line; the rest calls the
modules in process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the trainer needs PyTorch")
pytest.importorskip("timm", reason="the trainer needs timm")
pytest.importorskip("torchvision", reason="the trainer needs torchvision")
pytest.importorskip("sklearn", reason="--data digits needs scikit-learn")

from tests.conftest import checkout_first  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # reference_models/ is a folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

from reference_models import data, engine, errors, models, train  # noqa: E402

# The digits defaults (tiny model, batch 32), one CPU thread per process, a seed of its own.
FAST = ["--data", "digits", "--model", "deit_digits_tiny_patch1_8", "--threads", "1",
        "--seed", "3"]
# Every random part of the recipe on, so that resume must restore every RNG.
ALL_RANDOM = ["--drop-path", "0.1", "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0",
              "--aa", "rand-m9-mstd0.5-inc1", "--batch-size", "64"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = checkout_first(env.get("PYTHONPATH"))
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _trainer(*args: str) -> list[str]:
    return [sys.executable, "-m", "reference_models.train", *args]


#: The trainer with the network cut off inside its process: every socket connection fails
#: as it does offline, so a test can never download anything (CIFAR-10 is 170 MB).
OFFLINE_TRAINER = """
import runpy, socket, sys

def offline(*args, **kwargs):
    raise OSError(101, "Network is unreachable (cut off by the test)")

socket.socket.connect = offline
socket.create_connection = offline
sys.argv[0] = "reference_models.train"
runpy.run_module("reference_models.train", run_name="__main__", alter_sys=True)
"""


def _offline_trainer(*args: str) -> list[str]:
    return [sys.executable, "-c", OFFLINE_TRAINER, *args]


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    # No timeout: on a loaded machine any limit could be too short, and every run here ends
    # by itself (its epochs and images are few).
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)


def _log(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_state_equal(a: Any, b: Any, where: str = "") -> None:
    """Bit-identical nested state (tensors, numbers, lists, dicts)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, np.ndarray):  # NumPy's RNG state
        assert isinstance(b, np.ndarray) and np.array_equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _assert_state_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_state_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ---------------------------------------------------------------------------------------------
# Learning


def test_tiny_digits_run_learns(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = _run(_trainer(*FAST, "--epochs", "4", "--output", str(out)))
    assert res.returncode == 0, res.stderr[-3000:]
    log = _log(out)
    assert [r["epoch"] for r in log] == [0, 1, 2, 3]
    for key in ("train_loss", "val_loss", "val_acc1", "lr", "images_per_s", "gflops"):
        assert all(key in r for r in log), key
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 0.3
    assert log[-1]["val_acc1"] >= 40.0  # chance is 10%
    assert all(r["val_images"] == data.DIGITS_VAL_SIZE for r in log)
    # gflops comes from the project's FLOP counter; no pooling, so no clustering cost.
    from reference_models import flops

    shape = flops.ViTShape.of(models.build_model("deit_digits_tiny_patch1_8", 10))
    assert log[0]["gflops"] == pytest.approx(flops.count(shape).total)
    assert log[0]["gflops_clustering"] == 0.0
    config = json.loads((out / "config.json").read_text())
    assert config["total_batch_size"] == 32
    assert config["lr"] == pytest.approx(config["base_lr"] * 32 / 512)
    best = _load(out / "best.pt")
    assert best["val_acc1"] == max(r["val_acc1"] for r in log)
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "checkpoint.pt", "config.json",
                                                     "log.jsonl"]


# ---------------------------------------------------------------------------------------------
# Kill and resume


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    # The random downsampler and every augmentation draw random numbers, so any RNG state
    # that resume failed to restore changes the weights.
    args = [*FAST, *ALL_RANDOM, "--epochs", "2", "--downsample", "random",
            "--keep", "48,32,16,8"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    def start(out: Path) -> subprocess.Popen[str]:
        return subprocess.Popen(_trainer(*args, "--output", str(out)), cwd=ROOT, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    victim, reference = start(broken), start(whole)  # side by side: one core each
    # No deadline: the victim either writes its first checkpoint or ends (and fails the
    # test), however slowly the machine runs it.
    while not (broken / "checkpoint.pt").exists():
        assert victim.poll() is None, f"run ended before its first checkpoint: {victim.stderr}"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)  # in epoch 1, after the checkpoint of epoch 0
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert len(_log(broken)) == 1
    _, reference_err = reference.communicate()
    assert reference.returncode == 0, reference_err[-3000:]

    resumed = _run(_trainer(*args, "--output", str(broken), "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = _load(whole / "checkpoint.pt"), _load(broken / "checkpoint.pt")
    for key in ("model", "ema", "optimizer", "scheduler", "scaler", "epoch", "num_updates",
                "rng"):
        _assert_state_equal(a[key], b[key], key)
    assert [r["epoch"] for r in _log(broken)] == [0, 1]
    for ra, rb in zip(_log(whole), _log(broken), strict=True):
        assert ra["val_acc1"] == rb["val_acc1"] and ra["train_loss"] == rb["train_loss"]


def test_resume_drops_log_lines_of_redone_epochs_and_torn_lines(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 0, "val_acc1": 50.0}\n{"epoch": 1, "val_acc1": 60.0}\n'
                   '{"epoch": 2, "val_ac')  # killed while writing epoch 2's line
    train._truncate_log(log, epochs_done=1)  # the checkpoint holds epoch 0
    assert log.read_text() == '{"epoch": 0, "val_acc1": 50.0}\n'


# ---------------------------------------------------------------------------------------------
# Every downsampler through patch_timm: one step and an evaluation, gradients everywhere


DOWNSAMPLE_CASES = [
    ("none", None), ("tokenpool", "kmeans"), ("tokenpool", "kmedoids"),
    ("tokenpool", "wkmeans"), ("tokenpool", "wkmedoids"), ("tokenpool", "tome"),
    ("powerbert", None), ("random", None), ("importance", None)]


@pytest.mark.parametrize(("downsample", "method"), DOWNSAMPLE_CASES)
def test_each_downsampler_trains_a_step_and_evaluates(downsample: str,
                                                      method: str | None) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = models.build_model("deit_digits_tiny_patch1_8", 10, drop_path=0.1)
    keep = [40, 24, 12, 4]
    schedule = models.apply_downsample(model, downsample, method, ",".join(map(str, keep)))
    assert schedule == (None if downsample == "none" else keep)
    if downsample != "none":
        # patch_timm is the only pooling code: the model's state says which method runs.
        expected = method if downsample == "tokenpool" else models.DOWNSAMPLERS[downsample]
        assert model._tokenpool["method"] == expected

    x_train, y_train, x_val, y_val = data.digits_split()
    tf = data.build_transform(None, {"input_size": (3, 8, 8), "interpolation": "bicubic",
                                     "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0},
                              is_training=False)
    train_set = data.DigitsDataset(x_train[:32], y_train[:32], tf)
    val_set = data.DigitsDataset(x_val[:24], y_val[:24], tf)
    loader = torch.utils.data.DataLoader(train_set, batch_size=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = type("NoSchedule", (), {"step_update": lambda self, n: None})()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = engine.train_one_epoch(
        model, torch.nn.CrossEntropyLoss(), loader, optimizer, scheduler,
        device=torch.device("cpu"), num_updates=0, mixup=None, amp_dtype=None,
        scaler=torch.amp.GradScaler("cpu", enabled=False), clip_grad=1.0, ema=None,
        pool_seed=0)
    # Two steps: the digits models start with a zero head (timm's jax init), so the first
    # step reaches the head alone; the gradients below are the second step's.
    assert stats["num_updates"] == 2 and stats["train_images"] == 32
    # With pooling between attention and MLP, every block still attends over the tokens it
    # gets and the class token reaches the head, so no parameter is left without gradient.
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name}: zero gradient"
        assert not torch.equal(param.detach(), before[name]), f"{name} did not move"
    if downsample != "none":
        sizes = model._tokenpool["sizes"]
        assert sizes is not None and tuple(sizes.shape) == (16, keep[-1])
        if downsample == "tokenpool":  # clusters cover every original patch
            assert torch.equal(sizes.sum(dim=1), torch.full((16,), 64.0))

    val = engine.evaluate(model, torch.utils.data.DataLoader(val_set, batch_size=10),
                          device=torch.device("cpu"), amp_dtype=None, pool_seed=0)
    assert val["val_images"] == 24 and 0.0 <= val["val_acc1"] <= 100.0
    assert val["val_loss"] == pytest.approx(val["val_loss"])  # finite, not NaN


def test_mixed_precision_step_with_grad_scaler_on_the_cpu() -> None:
    """The CUDA AMP path's logic (autocast, scaled loss, unscale, clip, scaler step), on the
    CPU: bf16 autocast and an enabled GradScaler, with Token Pooling in every block."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = models.build_model("deit_digits_tiny_patch1_8", 10)
    models.apply_downsample(model, "tokenpool", "wkmedoids", "40,24,12,4")
    x_train, y_train, _, _ = data.digits_split()
    tf = data.build_transform(None, {"input_size": (3, 8, 8), "interpolation": "bicubic",
                                     "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0},
                              is_training=False)
    loader = torch.utils.data.DataLoader(data.DigitsDataset(x_train[:48], y_train[:48], tf),
                                         batch_size=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = type("NoSchedule", (), {"step_update": lambda self, n: None})()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = engine.train_one_epoch(
        model, torch.nn.CrossEntropyLoss(), loader, optimizer, scheduler,
        device=torch.device("cpu"), num_updates=0, mixup=None, amp_dtype=torch.bfloat16,
        scaler=scaler, clip_grad=1.0, ema=None, pool_seed=0)
    assert stats["num_updates"] == 3 and np.isfinite(stats["train_loss"])
    # The scaler ran (its scale is kept, or halved after an overflow) and the weights moved,
    # in float32, finite: the unscaled, clipped gradients reached the optimizer.
    assert 0 < scaler.get_scale() <= 2.0**10
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32 and torch.isfinite(param).all(), name
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_randaugment_posterize_survives_zero_bits() -> None:
    # DeiT's rand-m9-mstd0.5-inc1 sometimes asks timm's posterize to keep 0 bits, which
    # Pillow 13 rejects; data.py maps it to the black image it always meant.
    from PIL import Image
    from timm.data.auto_augment import NAME_TO_OP, rand_augment_transform

    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert NAME_TO_OP["PosterizeIncreasing"](image, 0).getextrema() == ((0, 0),) * 3
    assert NAME_TO_OP["PosterizeIncreasing"](image, 1).getpixel((0, 0)) == (128, 0, 0)
    policy = rand_augment_transform("rand-m10-n1-mstd0-inc1", {"img_mean": (0, 0, 0)})
    for op in policy.ops:
        op.prob = 1.0
        op(image)  # every op at magnitude 10, posterize included


def test_keep_presets_and_lists() -> None:
    assert models.resolve_keep("linear", 64, 4) == [48, 32, 16, 0]
    assert models.resolve_keep("half", 196, 12) == [98] * 12
    assert models.resolve_keep("7", 64, 4) == [7, 7, 7, 7]
    assert models.resolve_keep("5, 4,3 2", 64, 4) == [5, 4, 3, 2]


def test_registered_models() -> None:
    import timm

    for name, width in (("deit_e318_patch16_224", 318), ("deit_e252_patch16_224", 252)):
        model = timm.create_model(name)
        assert model.embed_dim == width and len(model.blocks) == 12
        assert model.blocks[0].attn.num_heads == 6 and model.patch_embed.num_patches == 196
    for name in ("deit_digits_tiny_patch1_8", "deit_digits_small_patch1_8",
                 "deit_digits_tiny_patch2_16"):
        model = timm.create_model(name)
        assert model.patch_embed.num_patches == 64 and len(model.blocks) >= 4


# ---------------------------------------------------------------------------------------------
# Distributed


def test_samplers_give_disjoint_shares() -> None:
    x_train, y_train, x_val, y_val = data.digits_split()
    train_set = data.DigitsDataset(x_train, y_train)
    val_set = data.DigitsDataset(x_val, y_val)
    shares = []
    for rank in range(2):
        sampler = data.train_sampler(train_set, world=2, rank=rank, repeated_aug=False, seed=1)
        sampler.set_epoch(3)
        shares.append(list(sampler))
    assert len(shares[0]) == len(shares[1]) == (len(train_set) + 1) // 2
    # 1437 images: one rank pads with one repeat; otherwise the shares are disjoint.
    assert len(set(shares[0]) & set(shares[1])) <= 1
    assert set(shares[0]) | set(shares[1]) == set(range(len(train_set)))

    val_shares = [i for r in range(3) for i in data.val_shard(val_set, world=3, rank=r).indices]
    assert sorted(val_shares) == list(range(len(val_set)))  # each image exactly once

    repeated = []
    for rank in range(2):
        sampler = data.train_sampler(train_set, world=2, rank=rank, repeated_aug=True, seed=1)
        sampler.set_epoch(0)
        repeated.append(list(sampler))
    # Repeated augmentation: each rank takes its own positions of the 3x repeated order, so
    # an image's repeats are spread over both ranks, and no rank gets the same list.
    assert repeated[0] != repeated[1] and len(repeated[0]) == len(repeated[1])


@pytest.mark.parametrize("repeated_aug", [False, True])
@pytest.mark.parametrize("world", [2, 3])
def test_share_check_accepts_real_deals_and_rejects_overlap(world: int,
                                                            repeated_aug: bool) -> None:
    train_set = data.DigitsDataset(*data.digits_split()[:2])
    samplers = [data.train_sampler(train_set, world=world, rank=r, repeated_aug=repeated_aug,
                                   seed=5) for r in range(world)]
    one = data.train_sampler(train_set, world=1, rank=0, repeated_aug=repeated_aug, seed=5)
    for sampler in [*samplers, one]:
        sampler.set_epoch(2)
    shares, single = [list(map(int, s)) for s in samplers], list(map(int, one))
    data.assert_shares_partition(shares, single)
    # A share rotated by one, shares cut short, every rank drawing rank 0's share: caught.
    # (With 3 repeats on 3 ranks each rank sees every image once, in the same order, with
    # its own augmentation: there, equal shares are the right deal.)
    rotated = [*shares[:-1], shares[-1][1:] + shares[-1][:1]]
    bad = [rotated, [share[: len(share) // 2] for share in shares]]
    if repeated_aug and world == 3:
        assert shares[0] == shares[1] == shares[2]
    else:
        bad.append([shares[0]] * world)
    for wrong in bad:
        with pytest.raises(RuntimeError, match="overlap or miss"):
            data.assert_shares_partition(wrong, single)
    with pytest.raises(RuntimeError, match="ranks drew"):
        data.assert_shares_partition([shares[0], *shares[1:-1], shares[-1][:-1]], single)


def test_torchrun_two_processes_gloo(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29500 + os.getpid() % 1000), "-m", "reference_models.train",
           *FAST, "--epochs", "1", "--batch-size", "32", "--check-sync", "--repeated-aug",
           "--downsample", "tokenpool", "--method", "kmeans", "--keep", "half",
           "--output", str(out)]
    res = _run(cmd)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    # --check-sync compared all parameters of both ranks after every step, and the indices
    # each rank drew with one process's epoch order (disjoint shares; it raises, and the
    # run fails, on any difference). Only rank 0 wrote: one log line, no stray file.
    log = _log(out)
    assert len(log) == 1 and log[0]["epoch"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "checkpoint.pt", "config.json",
                                                     "log.jsonl"]
    assert res.stdout.count('"epoch": 0, "train_loss"') == 1
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["total_batch_size"] == 64
    # RepeatAugSampler: 1437 // 256 * 256 / 2 = 640 images per rank, 20 steps of 32 each.
    assert log[0]["train_images"] == 2 * 20 * 32
    assert log[0]["val_images"] == data.DIGITS_VAL_SIZE  # gathered, no padding
    # Gathered accuracy equals one process evaluating the saved weights on the whole set.
    ckpt = out / "checkpoint.pt"
    single = _run(_trainer(*FAST, "--downsample", "tokenpool", "--method", "kmeans",
                           "--keep", "half", "--eval", "--resume", str(ckpt),
                           "--output", str(tmp_path / "eval")))
    assert single.returncode == 0, single.stderr[-3000:]
    stats = json.loads(single.stdout.strip().splitlines()[-1])
    assert stats["val_images"] == data.DIGITS_VAL_SIZE
    assert stats["val_acc1"] == pytest.approx(log[0]["val_acc1"], abs=1e-9)
    assert len(_load(ckpt)["rng"]) == 2  # every rank's RNG states, for an exact resume


# ---------------------------------------------------------------------------------------------
# Bad input: one argparse-style line and exit status 2


def _png_tree(root: Path, layout: dict[str, list[str]], images: int = 1) -> None:
    from PIL import Image

    for split, classes in layout.items():
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(images):
                Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i}.png")


def _error_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("python -m reference")
             or "error:" in line]
    assert len([line for line in lines if "error:" in line]) == 1, err
    return err.split("error:", 1)[1].strip()


def test_bad_inputs_get_one_clear_error(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--threads", "1", "--output", str(tmp_path / "out")]
    assert "neither digits" in _error_of(["--data", str(tmp_path / "nope"), *base], capsys)
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    assert "neither digits" in _error_of(["--data", str(a_file), *base], capsys)
    (tmp_path / "no_val" / "train" / "a").mkdir(parents=True)
    assert "no val/ folder" in _error_of(["--data", str(tmp_path / "no_val"), *base], capsys)
    empty = tmp_path / "empty"
    for split in ("train", "val"):
        (empty / split / "a").mkdir(parents=True)
    msg = _error_of(["--data", str(empty), *base], capsys)
    assert "train/" in msg and "found no valid file" in msg.lower(), msg
    _png_tree(tmp_path / "mismatch", {"train": ["cat", "dog"], "val": ["cat", "emu"]})
    msg = _error_of(["--data", str(tmp_path / "mismatch"), *base], capsys)
    assert "classes differ" in msg and "dog" in msg and "emu" in msg
    msg = _error_of(["--model", "deit_tiny_patch16_22", *base], capsys)
    assert "unknown model" in msg and "deit_tiny_patch16_224" in msg
    msg = _error_of(["--downsample", "tokenpool", "--keep", "sparsity9", *base], capsys)
    assert "preset" in msg and "linear" in msg
    msg = _error_of(["--downsample", "powerbert", "--keep", "40,30,20", *base], capsys)
    assert "4 of them" in msg and "got 3" in msg
    for downsample in ("random", "none"):
        msg = _error_of(["--downsample", downsample, "--method", "kmeans", *base], capsys)
        assert "--method applies to --downsample tokenpool only" in msg
    assert "no torch device" in _error_of(["--device", "tpu9", *base], capsys)
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in _error_of(["--device", "cuda", *base], capsys)
    msg = _error_of(["--resume", str(tmp_path / "missing.pt"), *base], capsys)
    assert "no such checkpoint" in msg
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert "no readable checkpoint" in _error_of(["--resume", str(garbage), *base], capsys)
    weights_only = tmp_path / "best.pt"
    torch.save({"model": {}, "epoch": 0}, weights_only)
    assert "weights only" in _error_of(["--resume", str(weights_only), *base], capsys)


def test_good_image_folder_trains(tmp_path: Path) -> None:
    # Any ImageFolder tree: a run of one epoch on random 8x8 images in two classes.
    _png_tree(tmp_path / "tree", {"train": ["a", "b"], "val": ["a", "b"]}, images=4)
    res = _run(_trainer("--data", str(tmp_path / "tree"), "--model",
                        "deit_digits_tiny_patch1_8", "--batch-size", "4", "--epochs", "1",
                        "--threads", "1", "--output", str(tmp_path / "out")))
    assert res.returncode == 0, res.stderr[-3000:]
    assert _log(tmp_path / "out")[0]["val_images"] == 8


def test_cifar_offline_is_one_line_and_status_2(tmp_path: Path) -> None:
    # Offline by construction (the trainer's sockets refuse to connect), online machine or
    # not: nothing is downloaded and the error is always there to test.
    res = _run(_offline_trainer("--data", "cifar10", "--data-dir", str(tmp_path / "cifar"),
                                "--model", "deit_digits_tiny_patch1_8", "--threads", "1",
                                "--output", str(tmp_path / "out")))
    assert res.returncode == 2, res.stderr[-3000:]
    assert not (tmp_path / "cifar").exists() or not any((tmp_path / "cifar").rglob("*.gz"))
    assert "Traceback" not in res.stderr
    assert "--data cifar10" in res.stderr and "offline" in res.stderr


def test_help_documents_every_flag() -> None:
    parser = train.build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.option_strings:
            assert action.help, f"{action.option_strings} has no help"
            assert any(opt in text for opt in action.option_strings)


# ---------------------------------------------------------------------------------------------
# Finetuning from a checkpoint, insertion without finetuning (Appendix E)


def _saved_weights(tmp_path: Path, model: Any, extra: dict[str, Any] | None = None) -> Path:
    path = tmp_path / "weights.pt"
    torch.save({"model": {**model.state_dict(), **(extra or {})}}, path)
    return path


def test_finetune_loads_weights_and_forgives_only_downsampler_keys(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = models.build_model("deit_digits_tiny_patch1_8", 10)
    # Left over from a schedule search: a downsampler's parameter the new model lacks.
    path = _saved_weights(tmp_path, source, {"token_downsample.retention": torch.ones(3)})
    torch.manual_seed(2)
    target = models.build_model("deit_digits_tiny_patch1_8", 10)
    target.token_downsample = torch.nn.ModuleDict({"conv1": torch.nn.Linear(2, 2)})
    train._load_finetune(str(path), target)
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name

    smaller = models.build_model("deit_digits_tiny_patch1_8", 10)
    del smaller.head  # a real key missing from the model: no silent partial load
    smaller.head = torch.nn.Identity()
    with pytest.raises(errors.ConfigError, match="does not fit --model: missing \\[\\], "
                                               "unexpected \\['head"):
        train._load_finetune(str(path), smaller)
    with pytest.raises(errors.ConfigError, match="no such checkpoint"):
        train._load_finetune(str(tmp_path / "absent.pt"), target)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(errors.ConfigError, match="no readable checkpoint"):
        train._load_finetune(str(tmp_path / "junk.pt"), target)


def test_insert_without_finetuning_with_and_without_carry(tmp_path: Path) -> None:
    """--eval --finetune BASE --downsample tokenpool: the trained weights, pooled as they are."""
    torch.manual_seed(4)
    model = models.build_model("deit_digits_tiny_patch1_8", 10)
    torch.nn.init.normal_(model.head.weight)  # timm's jax init zeroes the head: loss ln 10
    base = _saved_weights(tmp_path, model)
    results = {}
    for carry in ("--carry", "--no-carry"):
        res = _run(_trainer(*FAST, "--eval", "--finetune", str(base), "--downsample",
                            "tokenpool", "--method", "wkmeans", "--keep", "16", carry,
                            "--output", str(tmp_path / carry)))
        assert res.returncode == 0, res.stderr[-3000:]
        results[carry] = json.loads(res.stdout.strip().splitlines()[-1])
        config = json.loads(res.stdout[: res.stdout.rindex("}\n{") + 1])
        assert config["carry"] is (carry == "--carry") and config["keep_schedule"] == [16] * 4
    assert results["--carry"]["val_images"] == data.DIGITS_VAL_SIZE
    # Carry adds log(size) to later attention logits: the same weights score differently.
    assert results["--carry"]["val_loss"] != results["--no-carry"]["val_loss"]
