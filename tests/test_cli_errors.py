"""Every bad flag of the four entry points: one ``error:`` line, exit status 2, no work done.

"One error line" means what argparse's own ``parser.error`` prints: zero or more usage
lines (the first starts with ``usage:``, the rest are indented), then one last line
``PROG: error: MESSAGE``, and nothing else: no traceback, no second line with ``error:``.
The message names the flag.

"No work done": each case runs in an empty temporary folder that must stay as it was (an
existing run folder byte for byte), and in process the data loading and the reproduction
are replaced by functions that fail the test if they are reached. Most cases call
``main(argv)`` in process (fast); a few run the real command line in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the entry points need PyTorch")
pytest.importorskip("timm", reason="the entry points need timm")
pytest.importorskip("torchvision", reason="the trainer needs torchvision")

from tests.conftest import checkout_first  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # reference_models/ is a folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

from reference_models import cli, data, flops, reproduce, search_schedule, train  # noqa: E402

ENTRIES: dict[str, Callable[[list[str]], int]] = {
    "train": train.main, "search_schedule": search_schedule.main,
    "reproduce": reproduce.main, "flops": flops.main}
DIGITS = "deit_digits_tiny_patch1_8"  # 64 patch tokens, 4 blocks
POOLING = "applies to --downsample tokenpool, powerbert, random, importance only"

# (entry point, argv, the flag the message names, a part of the message). Paths are
# relative to the case's folder, which holds `held/` (a finished run) and `a_file`.
CASES: list[tuple[str, list[str], str, str]] = [
    # train: the three
    ("train", ["--keep", "70,10"], "--keep", f"{POOLING}, not to --downsample none"),
    ("train", ["--epochs", "-1"], "--epochs", "expected an integer >= 1, got '-1'"),
    ("train", ["--batch-size", "0"], "--batch-size", "expected an integer >= 1, got '0'"),
    # train: one flag alone (argparse types and choices)
    ("train", ["--epochs", "ten"], "--epochs", "expected an integer >= 1, got 'ten'"),
    ("train", ["--lr", "-0.1"], "--lr", "expected a number > 0"),
    ("train", ["--lr", "nan"], "--lr", "expected a number > 0, got 'nan'"),
    ("train", ["--drop-path", "1"], "--drop-path", "expected a number in [0, 1), got '1'"),
    ("train", ["--hflip", "1.5"], "--hflip", "expected a number in [0, 1]"),
    ("train", ["--scale", "0", "1"], "--scale", "expected a number in (0, 1], got '0'"),
    ("train", ["--workers", "-1"], "--workers", "expected an integer >= 0"),
    ("train", ["--threads", "0"], "--threads", "expected an integer >= 1"),
    ("train", ["--seed", "-1"], "--seed", "expected an integer >= 0"),
    ("train", ["--train-limit", "0"], "--train-limit", "expected an integer >= 1"),
    ("train", ["--input-size", "0"], "--input-size", "expected an integer >= 1"),
    ("train", ["--sched", "plateau"], "--sched", "invalid choice: 'plateau'"),
    ("train", ["--remode", "zero"], "--remode", "invalid choice: 'zero'"),
    # train: flags that need another flag, or contradict one
    ("train", ["--keep", "linear"], "--keep", POOLING),  # given at its default: still given
    ("train", ["--method", "kmeans"], "--method", "applies to --downsample tokenpool only"),
    ("train", ["--no-carry"], "--carry/--no-carry", POOLING),
    ("train", ["--downsample", "conv", "--conv-depths", "1", "--keep", "16"], "--keep",
     f"{POOLING}, not to --downsample conv"),
    ("train", ["--conv-depths", "1"], "--conv-depths", "applies to --downsample conv only"),
    ("train", ["--downsample", "conv"], "--conv-depths", "needs --conv-depths"),
    ("train", ["--data-dir", "elsewhere"], "--data-dir", "cifar10 and cifar100 only"),
    ("train", ["--lr", "1e-3", "--base-lr", "1e-2"], "--base-lr", "--lr gives it"),
    ("train", ["--eval", "--pretrained", "--epochs", "3"], "--epochs",
     "does not apply with --eval"),
    ("train", ["--eval"], "--eval", "needs weights to evaluate"),
    ("train", ["--no-model-ema", "--model-ema-decay", "0.9"], "--model-ema-decay",
     "does not apply with --no-model-ema"),
    ("train", ["--color-jitter", "0.4"], "--color-jitter", "applies with --aa '' only"),
    ("train", ["--reprob", "0", "--recount", "2"], "--recount", "--reprob is above 0"),
    ("train", ["--warmup-epochs", "0", "--warmup-lr", "1e-5"], "--warmup-lr",
     "--warmup-epochs is above 0"),
    ("train", ["--mixup", "0", "--cutmix", "0", "--mixup-mode", "pair"], "--mixup-mode",
     "--mixup or --cutmix is above 0"),
    ("train", ["--batch-size", "33"], "--batch-size", "Mixup needs an even batch"),
    ("train", ["--scale", "0.9", "0.5"], "--scale", "MIN is above MAX"),
    ("train", ["--warmup-epochs", "30"], "--warmup-epochs", "longer than the run (--epochs 25)"),
    ("train", ["--epochs", "3", "--warmup-epochs", "4"], "--warmup-epochs",
     "longer than the run (--epochs 3)"),
    ("train", ["--min-lr", "1"], "--min-lr", "above the learning rate 0.001"),
    ("train", ["--opt", "nosuchopt"], "--opt", "no timm optimizer"),
    ("train", ["--aa", "nonsense"], "--aa", "no timm auto-augment policy"),
    ("train", ["--amp", "bf16"], "--amp", "needs a CUDA device"),
    # train: against the model (64 patch tokens in 4 blocks)
    ("train", ["--downsample", "tokenpool", "--keep", "70"], "--keep",
     "this model has 64 patch tokens, so each count is 0 to 64"),
    ("train", ["--downsample", "powerbert", "--keep", "48,32"], "--keep",
     "4 of them (one per block), got 2"),
    ("train", ["--downsample", "random", "--keep", "deits-level3"], "--keep",
     "schedule for 196 patches in 12 blocks"),
    ("train", ["--downsample", "conv", "--conv-depths", "0,2"], "--conv-depths",
     "numbered 1 to 4"),
    ("train", ["--model", "deit_small_patch16_224", "--input-size", "100"], "--input-size",
     "use a multiple of 16"),
    ("train", ["--model", "deit_tiny_patch16_22"], "--model", "unknown model"),
    # train: paths
    ("train", ["--data", "nowhere"], "--data", "neither digits"),
    ("train", ["--output", "a_file"], "--output", "is a file"),
    ("train", ["--output", "a_file/run"], "--output", "no folder can be made inside it"),
    ("train", ["--output", "held"], "--output", "holds another run"),
    ("train", ["--resume", "missing.pt"], "--resume", "no such checkpoint file"),
    ("train", ["--finetune", "missing.pt"], "--finetune", "no such checkpoint file"),
    ("train", ["--resume", "held/checkpoint.pt", "--finetune", "held/best.pt"], "--finetune",
     "both name the starting weights"),
    ("train", ["--data", "cifar10", "--data-dir", "a_file"], "--data-dir", "is a file"),
    # search_schedule: its own flags, the trainer's it refuses, and the trainer's checks
    ("search_schedule", ["--lam", "-1"], "--lam", "expected a number >= 0"),
    ("search_schedule", ["--retention-lr", "0"], "--retention-lr", "expected a number > 0"),
    ("search_schedule", ["--keep", "40"], "--keep", "does not apply to the schedule search"),
    ("search_schedule", ["--downsample", "none"], "--downsample", "does not apply"),
    ("search_schedule", ["--resume"], "--resume", "does not apply"),
    ("search_schedule", ["--eval"], "--eval", "does not apply"),
    ("search_schedule", ["--epochs", "-1"], "--epochs", "expected an integer >= 1"),
    ("search_schedule", ["--output", "held"], "--output", "holds another run"),
    ("search_schedule", ["--schedule-out", "held/best.pt"], "--schedule-out",
     "exists; name a new file"),
    # reproduce
    ("reproduce", ["--seeds", "0"], "--seeds", "expected an integer >= 1, got '0'"),
    ("reproduce", ["--jobs", "0"], "--jobs", "expected an integer >= 1, got '0'"),
    ("reproduce", ["--jobs", "two"], "--jobs", "expected an integer >= 1, got 'two'"),
    ("reproduce", ["--output", "a_file"], "--output", "is a file"),
    ("reproduce", ["--output", "smoke"], "--output", "holds a reproduction of another plan"),
    # flops
    ("flops", ["--keep", "1,2"], "--keep", "applies with --model only"),
    ("flops", ["--model", DIGITS, "--keep", "70,10,5,0"], "--keep", "each count is 0 to 64"),
    ("flops", ["--model", DIGITS, "--keep", "48,32"], "--keep", "2 entries for 4 blocks"),
    ("flops", ["--model", DIGITS, "--keep", "nine"], "--keep", "integers separated by commas"),
    ("flops", ["--model", DIGITS, "--method", "kmeans"], "--method", "with --keep only"),
    ("flops", ["--model", DIGITS, "--keep", "32", "--method", "foo"], "--method",
     "invalid choice: 'foo'"),
    ("flops", ["--model", DIGITS, "--keep", "32,16,8,0", "--method", "topk", "--iterations",
               "3"], "--iterations", "clustering methods only"),
    ("flops", ["--model", DIGITS, "--keep", "32,16,8,0", "--iterations", "0"],
     "--iterations", "expected an integer >= 1"),
    ("flops", ["--model", DIGITS, "--conv-after", "1", "--placement", "attn"],
     "--conv-after", "needs --placement block"),
    ("flops", ["--model", DIGITS, "--conv-after", "0"], "--conv-after", "numbered 1 to 4"),
    ("flops", ["--model", DIGITS, "--conv-after", "1,2,3,4"], "--conv-after", "1x1 grid"),
    ("flops", ["--model", "deit_small_patch16_224", "--img-size", "100"], "--img-size",
     "multiple"),
    ("flops", ["--model", "nope"], "--model", "unknown model"),
]
# A few cases as a user runs them: the three, an existing run, one per entry point.
_AS_A_USER = {("train", "--keep 70,10"), ("train", "--epochs -1"), ("train", "--batch-size 0"),
              ("train", "--output held"), ("search_schedule", "--lam -1"),
              ("reproduce", "--output smoke"), ("flops", f"--model {DIGITS} --keep 70,10,5,0")}
SUBPROCESS_CASES = [case for case in CASES if (case[0], " ".join(case[1])) in _AS_A_USER]
assert len(SUBPROCESS_CASES) == len(_AS_A_USER)


def _make_case_folder(folder: Path) -> None:
    """A finished run (`held/`), a plain file, and a smoke reproduction (`smoke/`)."""
    held = folder / "held"
    held.mkdir()
    (held / "config.json").write_text('{"model": "deit_digits_tiny_patch1_8"}\n')
    (held / "log.jsonl").write_text('{"epoch": 0, "val_acc1": 50.0}\n')
    (held / "checkpoint.pt").write_bytes(b"\x80\x02 weights of an earlier run")
    (held / "best.pt").write_bytes(b"\x80\x02 the best weights")
    (folder / "a_file").write_text("not a folder\n")
    (folder / "smoke").mkdir()
    (folder / "smoke" / "plan.json").write_text(
        reproduce.json.dumps(reproduce.asdict(reproduce.SMOKE)) + "\n")


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def _check_one_error_line(stderr: str, prog: str, flag: str, expected: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.rstrip("\n").split("\n")
    last = lines[-1]
    assert last.startswith(f"{prog}: error: "), stderr
    assert [line for line in lines if "error:" in line] == [last], stderr
    for line in lines[:-1]:  # argparse's usage lines only
        assert line.startswith("usage: ") or line.startswith(" "), stderr
    message = last.split(": error: ", 1)[1]
    assert flag in message, f"the flag {flag} is not named: {message}"
    assert expected in message, message


def _fail_if_reached(what: str) -> Callable[..., Any]:
    def reached(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{what} was reached: the check came too late")

    return reached


@pytest.fixture
def case_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _make_case_folder(tmp_path)
    monkeypatch.chdir(tmp_path)  # the default --output lands here, if anything is written
    monkeypatch.setattr(data, "build_datasets", _fail_if_reached("loading the data"))
    monkeypatch.setattr(reproduce, "reproduce", _fail_if_reached("the reproduction"))
    return tmp_path


@pytest.mark.parametrize(("entry", "argv", "flag", "expected"), CASES,
                         ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_bad_flag_is_one_error_line_before_any_work(
        entry: str, argv: list[str], flag: str, expected: str, case_folder: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    if argv[:2] == ["--amp", "bf16"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA, where --amp bf16 is valid")
    before = _snapshot(case_folder)
    with pytest.raises(SystemExit) as stop:
        ENTRIES[entry](argv)
    assert stop.value.code == 2
    _check_one_error_line(capsys.readouterr().err, f"python -m reference_models.{entry}",
                          flag, expected)
    assert _snapshot(case_folder) == before  # nothing written, the run in held/ untouched


@pytest.mark.parametrize(("entry", "argv", "flag", "expected"), SUBPROCESS_CASES,
                         ids=[f"{c[0]} {' '.join(c[1])}" for c in SUBPROCESS_CASES])
def test_bad_flag_on_the_command_line(entry: str, argv: list[str], flag: str, expected: str,
                                      tmp_path: Path) -> None:
    _make_case_folder(tmp_path)
    before = _snapshot(tmp_path)
    env = dict(os.environ, PYTHONPATH=checkout_first(os.environ.get("PYTHONPATH")),
               OMP_NUM_THREADS="1")
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", f"reference_models.{entry}", *argv],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    print(f"{entry} {' '.join(argv)}: exit {res.returncode} in "
          f"{time.perf_counter() - start:.1f} s")
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stdout == ""
    _check_one_error_line(res.stderr, f"python -m reference_models.{entry}", flag, expected)
    assert _snapshot(tmp_path) == before


def test_unwritable_output_is_one_error_line(case_folder: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    locked = case_folder / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):  # root writes anyway: let os.access say what it would
        with capsys.disabled():
            print("running as root: os.access made to report locked/ read-only")
        real_access = os.access
        monkeypatch.setattr(cli.os, "access", lambda path, mode: (
            Path(path) != locked.absolute() and real_access(path, mode)))
    try:
        for entry in ("train", "reproduce"):
            with pytest.raises(SystemExit) as stop:
                ENTRIES[entry](["--output", "locked/run"])
            assert stop.value.code == 2
            _check_one_error_line(capsys.readouterr().err,
                                  f"python -m reference_models.{entry}", "--output",
                                  "is not writable")
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("argv", [
    # --resume and --eval may use an existing run folder
    ["--output", "held", "--resume"],
    ["--output", "held", "--resume", "held/checkpoint.pt"],
    ["--output", "held", "--eval", "--resume", "held/checkpoint.pt"],
    ["--output", "held", "--eval", "--resume", "held/checkpoint.pt", "--batch-size", "33"],
    ["--output", "held", "--eval", "--finetune", "held/best.pt", "--downsample", "tokenpool",
     "--keep", "48,32,16,0", "--no-carry"],
    # DeiT's defaults on a short run with a small batch: warm-up longer than the run and
    # lr below --min-lr, but the user gave neither
    ["--data", "cifar10", "--epochs", "1", "--batch-size", "4"],
    # a paper schedule whose count rises from 5 to 7 (patch_timm keeps the minimum)
    ["--model", "deit_e252_patch16_224", "--downsample", "powerbert", "--keep",
     "deite252-level4"],
])
def test_legitimate_use_passes_every_check(argv: list[str], case_folder: Path) -> None:
    # Every check passes: the run goes on to load the data, which the fixture stops.
    with pytest.raises(AssertionError, match="loading the data was reached"):
        train.main(argv)
