"""Importing tokenpool_ops from a source checkout, where backends/ lies beside the package.

A subprocess imports a copy of the two source folders from a fresh directory, as Python does
when started in the repository root: the current directory comes first on sys.path, so the
source folder is found before any installed (or editable) copy.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = ("import tokenpool_ops, numpy as np; "
           "print(tokenpool_ops.backends.__file__); "
           "x = np.ones((1, 6, 2)) * np.arange(6)[:, None]; "
           "print(tokenpool_ops.pool(x, 2, fast_paths=False).shape)")


def run_in(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PROGRAM], cwd=folder, capture_output=True,
                          text=True, timeout=300)


def copy_sources(folder: Path, *names: str) -> None:
    for name in names:
        shutil.copytree(ROOT / name, folder / name,
                        ignore=shutil.ignore_patterns("__pycache__"))


def test_source_folder_finds_backends_beside_it(tmp_path):
    copy_sources(tmp_path, "tokenpool_ops", "backends")
    done = run_in(tmp_path)
    assert done.returncode == 0, done.stderr
    backends_file, shape = done.stdout.split()[:1], done.stdout.splitlines()[1]
    assert Path(backends_file[0]) == tmp_path / "backends" / "__init__.py"
    assert shape == "(1, 2, 2)"


def test_source_folder_without_backends_says_what_to_do(tmp_path):
    copy_sources(tmp_path, "tokenpool_ops")
    done = run_in(tmp_path)
    assert done.returncode != 0
    assert "ImportError: tokenpool_ops.backends is missing" in done.stderr
    assert "pip install -e ." in done.stderr


def test_backends_by_its_folder_name_is_refused_before_it_registers_a_second_copy():
    # In the repository root the folder is also a top-level package "backends". A second
    # copy of backends._torch_ops would register the PyTorch custom operators again, freeing
    # the registrations the first copy calls (a use-after-free that crashed CI at random).
    pytest.importorskip("torch", reason="torch is not installed: it has no custom operators")
    program = ("import torch, tokenpool_ops.backends._torch_ops\n"
               "op = torch.ops.tokenpool_ops.weighted_means.default\n"
               "try:\n"
               "    import backends._torch\n"
               "except ImportError as error:\n"
               "    print(error)\n"
               "values = torch.arange(6.0).reshape(1, 3, 2)\n"
               "means = op(values, torch.tensor([[0, 0, 1]]), 2, torch.ones(1, 3),\n"
               "           torch.zeros(1, 1, 2))\n"
               "print(means.tolist())\n")
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    refusal, means = done.stdout.splitlines()
    assert refusal.startswith("import this folder as tokenpool_ops.backends, not as 'backends'")
    assert means == "[[[1.0, 2.0], [4.0, 5.0]]]"  # tokens 0 and 1 averaged; token 2
