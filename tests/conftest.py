"""Shared fixtures: tiny synthetic BraTS / Decathlon datasets and a CLI runner.

Everything is small (48 x 40 x 32 volumes, a handful of cases) and single-process so
the whole suite stays light on a shared 2-core machine. No TensorFlow is imported.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.data.synth.writers import (BRATS_ROOT_NAME, DECATHLON_ROOT_NAME, SynthRequest, write_brats,
                                        write_decathlon)

REPO_ROOT = Path(__file__).resolve().parent.parent
SHAPE = (48, 40, 32)  # x != y != z, so a transposed axis changes the shape and fails loudly
BRATS_CASES = 6
BRATS_SEED = 3
DECATHLON_CASES = 4
DECATHLON_TEST_CASES = 1
DECATHLON_SEED = 5
CLI_TIMEOUT_S = 120


def run_cli(*args, cwd, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``python -m trainer.cli ARGS`` in ``cwd``; returns the CompletedProcess (text, captured)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "trainer.cli", *(str(a) for a in args)], cwd=str(cwd),
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(name="run_cli")
def run_cli_fixture():
    return run_cli


@pytest.fixture(scope="session")
def brats_dataset(tmp_path_factory) -> Path:
    """A tiny BraTS 2019-layout dataset (read-only: copy it before changing anything)."""
    out = tmp_path_factory.mktemp("brats-src") / BRATS_ROOT_NAME
    write_brats(SynthRequest(out=out, cases=BRATS_CASES, seed=BRATS_SEED, shape=SHAPE, workers=1),
                progress=False)
    return out


@pytest.fixture(scope="session")
def decathlon_dataset(tmp_path_factory) -> Path:
    """A tiny Decathlon Task01 dataset (read-only: copy it before changing anything)."""
    out = tmp_path_factory.mktemp("decathlon-src") / DECATHLON_ROOT_NAME
    write_decathlon(SynthRequest(out=out, cases=DECATHLON_CASES, seed=DECATHLON_SEED, shape=SHAPE,
                                 test_cases=DECATHLON_TEST_CASES, workers=1), progress=False)
    return out


@pytest.fixture
def brats_copy(brats_dataset, tmp_path) -> Path:
    """A private, writable copy of the tiny BraTS dataset."""
    return Path(shutil.copytree(brats_dataset, tmp_path / "src" / BRATS_ROOT_NAME))


@pytest.fixture
def decathlon_copy(decathlon_dataset, tmp_path) -> Path:
    """A private, writable copy of the tiny Decathlon dataset."""
    return Path(shutil.copytree(decathlon_dataset, tmp_path / "src" / DECATHLON_ROOT_NAME))


def brats_case_folders(root: Path) -> list[Path]:
    """Case folders (those holding a *_seg file), sorted by case id."""
    return sorted({p.parent for p in Path(root).rglob("*_seg.nii*") if not p.name.startswith("._")},
                  key=lambda p: p.name)


def prepare_brats_cli(src: Path, out: Path, cwd: Path, *extra) -> subprocess.CompletedProcess:
    return run_cli("prepare", "--format", "brats", "--src", src, "--out", out, "--workers", "1", "--quiet",
                   *extra, cwd=cwd)


@pytest.fixture(scope="session")
def prepared_brats(brats_dataset, tmp_path_factory) -> Path:
    """The tiny BraTS dataset prepared once through the CLI; returns the .h5 path."""
    work = tmp_path_factory.mktemp("prepared")
    out = work / "out" / "slices.h5"
    result = prepare_brats_cli(brats_dataset, out, work)
    assert result.returncode == 0, result.stderr
    return out
