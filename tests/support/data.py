"""Tiny datasets' shapes and counts, and running the CLI the way a user does (a subprocess).

Everything is small (48 x 40 x 32 volumes, a handful of cases) and single-process so
the whole suite stays light on a shared 2-core machine. No TensorFlow is imported.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHAPE = (48, 40, 32)  # x != y != z, so a transposed axis changes the shape and fails loudly
BRATS_CASES = 6
BRATS_SEED = 3
DECATHLON_CASES = 4
DECATHLON_TEST_CASES = 1
DECATHLON_SEED = 5
CLI_TIMEOUT_S = 120
# The smallest real training runs: a few filters, two steps an epoch, one validation batch.
TINY_2D = ["--set", "model.base_filters_2d=4", "--set", "train.batch_size=4", "--set", "train.steps_per_epoch=2",
           "--set", "train.validation_steps=1", "--quiet"]
# float32: at 2-4 filters, mixed bf16 3D training turned NaN within 2 steps on an AVX-512 bf16 EPYC
# (16 filters, the default, did not); bf16 3D at real sizes is measured by benchmarks/quality_targets.py.
TINY_3D = ["--set", "train.precision=fp32", "--set", "model.base_filters_3d=2", "--set", "train.batch_size=1",
           "--set", "train.steps_per_epoch=2", "--set", "train.validation_steps=1",
           "--set", "data.crop_size=[32,32,32]", "--quiet"]


def run_cli(*args, cwd, timeout: float = CLI_TIMEOUT_S, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m trainer.cli ARGS`` in ``cwd`` (``env`` added to this one's); the CompletedProcess."""
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "trainer.cli", *(str(a) for a in args)], cwd=str(cwd),
                          capture_output=True, text=True, timeout=timeout, env=env)


def brats_case_folders(root: Path) -> list[Path]:
    """Case folders (those holding a *_seg file), sorted by case id."""
    return sorted({p.parent for p in Path(root).rglob("*_seg.nii*") if not p.name.startswith("._")},
                  key=lambda p: p.name)


def prepare_brats_cli(src: Path, out: Path, cwd: Path, *extra) -> subprocess.CompletedProcess:
    return run_cli("prepare", "--format", "brats", "--src", src, "--out", out, "--workers", "1", "--quiet",
                   *extra, cwd=cwd)


def write_prepared(source: Path, out: Path, split: dict[str, list[str]]) -> Path:
    """A prepared dataset folder with this split and nothing prepared for a model yet (3D reads the
    NIfTI source then): for library tests that need one split exactly."""
    from trainer.data.datasets import RawDataset
    from trainer.data.prepared import PreparedDataset, source_fingerprint

    dataset = RawDataset.open(source)
    out.mkdir(parents=True, exist_ok=True)
    PreparedDataset(root=out.absolute(), source=Path(source).absolute(), layout=dataset.layout,
                    split={part: list(split.get(part, [])) for part in ("train", "val", "test")},
                    split_settings={"val_fraction": 0.0, "test_fraction": 0.0, "seed": 0},
                    fingerprint=source_fingerprint(dataset)).save()
    return out
