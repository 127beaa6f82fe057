"""Shared fixtures: tiny synthetic BraTS / Decathlon datasets, prepared once per session.

Helpers live in tests/support/ (``from support.data import run_cli`` ...).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from support.data import (BRATS_CASES, BRATS_SEED, DECATHLON_CASES, DECATHLON_SEED, DECATHLON_TEST_CASES, SHAPE,
                          prepare_brats_cli, run_cli)
from trainer.data.synth.writers import (BRATS_ROOT_NAME, DECATHLON_ROOT_NAME, SynthRequest, write_brats,
                                        write_decathlon)


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


@pytest.fixture(scope="session")
def prepared_brats(brats_dataset, tmp_path_factory) -> Path:
    """The tiny BraTS dataset prepared once through the CLI for the 2D model; returns the prepared
    dataset folder (read-only: copy it before changing anything)."""
    work = tmp_path_factory.mktemp("prepared")
    out = work / "out" / "brats"
    result = prepare_brats_cli(brats_dataset, out, work)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def brats_slices(prepared_brats) -> Path:
    """The slices file inside the prepared tiny BraTS dataset (128 x 128)."""
    return prepared_brats / "slices-128.h5"
