"""A second security probe, replayed: each attack as it was reproduced, now without harm.

(The control channel's slowloris is in test_control.py, beside the other handshake tests.)
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from launcher.ssh.protect import mirror_excludes
from trainer.config.loader import load_settings
from trainer.errors import UserError


def settings_with(*overrides: str):
    return load_settings(None, overrides)


@pytest.fixture
def mirror(tmp_path):
    """A checkout (the rsync source) and a host's workdir at /…/srv/unet-train with a run inside."""
    source = tmp_path / "checkout"
    (source / "trainer").mkdir(parents=True)
    (source / "trainer" / "cli.py").write_text("code\n")
    workdir = tmp_path / "srv" / "unet-train"
    checkpoint = workdir / "experiments" / "exp1" / "ckpt"
    checkpoint.mkdir(parents=True)
    (checkpoint / "weights").write_text("precious\n")
    (workdir / "prep").mkdir()
    (workdir / "prep" / "s.h5").write_text("prepared\n")
    return source, workdir


def sync(source: Path, workdir: Path, excludes: list[str]) -> None:
    """The code sync as playbooks/sync.yml runs it: rsync -a --delete, the excludes first."""
    subprocess.run(["rsync", "-a", "-s", *[f"--exclude={e}" for e in excludes], "--delete", "--",
                    f"{source}/", f"{workdir}/"], check=True, timeout=60)


@pytest.mark.parametrize("spelling", ["../unet-train/experiments", "//{workdir}/experiments",
                                      "{workdir}/./x/../experiments", "link"])
def test_run_dir_spelt_any_way_survives_the_real_rsync_delete(mirror, tmp_path, spelling):
    source, workdir = mirror
    (tmp_path / "link").symlink_to(workdir / "experiments")
    run_dir = (str(tmp_path / "link") if spelling == "link"
               else spelling.replace("{workdir}", str(workdir).lstrip("/") if spelling.startswith("//")
                                     else str(workdir)))
    settings = settings_with(f"train.run_dir={run_dir}", "data.dataset=../unet-train/prep")
    excludes = mirror_excludes(settings, str(workdir), source)
    assert "/experiments/" in excludes and "/prep/" in excludes, excludes
    sync(source, workdir, excludes)
    assert (workdir / "experiments" / "exp1" / "ckpt" / "weights").read_text() == "precious\n"
    assert (workdir / "prep" / "s.h5").read_text() == "prepared\n"
    assert (workdir / "trainer" / "cli.py").is_file()


def test_without_the_excludes_the_same_rsync_deletes_the_run(mirror):
    """The control: the sync really would delete what the excludes keep."""
    source, workdir = mirror
    sync(source, workdir, [])
    assert not (workdir / "experiments").exists()


@pytest.mark.parametrize("run_dir", ["../unet-train", "{workdir}", "//{workdir}/", "{workdir}/runs/.."])
def test_the_workdir_itself_as_a_run_dir_is_refused(mirror, run_dir):
    source, workdir = mirror
    text = run_dir.replace("//{workdir}", "/" + str(workdir)).replace("{workdir}", str(workdir))
    with pytest.raises(UserError, match="is the workdir itself"):
        mirror_excludes(settings_with(f"train.run_dir={text}"), str(workdir), source)
    assert os.path.isdir(workdir / "experiments")


def test_a_symlink_to_the_workdir_is_the_workdir(mirror, tmp_path):
    source, workdir = mirror
    (tmp_path / "alias").symlink_to(workdir)
    with pytest.raises(UserError, match="is the workdir itself"):
        mirror_excludes(settings_with(f"train.run_dir={tmp_path / 'alias'}"), str(workdir), source)


def test_paths_outside_the_workdir_need_no_exclude(mirror, tmp_path):
    source, workdir = mirror
    settings = settings_with(f"train.run_dir={tmp_path / 'elsewhere'}", "data.dataset=../other/ds",
                             f"data.source={tmp_path / 'raw'}", f"cluster.token_file={shutil.which('rsync')}")
    # prepare's default home, and the hosts' environment of the default cluster.python (.venv/bin/python)
    assert mirror_excludes(settings, str(workdir), source) == ["/data/prepared/", "/.venv"]


# ---------------------------------------------------------------- inputs that are not regular files

def bounded(call, seconds: float):
    """Run ``call`` in a thread; return (exception or result, elapsed), failing if it hangs."""
    import threading
    import time

    box = {}

    def target():
        try:
            box["result"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["result"] = exc
    thread = threading.Thread(target=target, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s (a FIFO or device read hangs)"
    return box["result"], time.monotonic() - start


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "case_flair.nii.gz"
    os.mkfifo(path)
    return path


@pytest.fixture
def zero_device(tmp_path):
    path = tmp_path / "zeros.nii.gz"
    path.symlink_to("/dev/zero")
    return path


@pytest.mark.parametrize("special", ["fifo", "zero_device"])
def test_a_fifo_or_device_as_a_nifti_input_is_one_line_within_a_second(special, request):
    from trainer.data.nifti import read_volume
    from trainer.inference.inputs import case_from_path

    path = request.getfixturevalue(special)
    for call in (lambda: read_volume(path), lambda: case_from_path(path).load()):
        error, seconds = bounded(call, 5)
        assert isinstance(error, UserError) and seconds < 1.0, (error, seconds)
        assert str(path) in str(error) and "not a regular file" in str(error) and "\n" not in str(error)


def test_prepare_with_a_fifo_modality_exits_2_and_leaves_nothing(brats_copy, tmp_path):
    from support.data import brats_case_folders, prepare_brats_cli

    case = brats_case_folders(brats_copy)[0]
    flair = case / f"{case.name}_flair.nii.gz"
    flair.unlink()
    os.mkfifo(flair)
    out = tmp_path / "prep" / "ds"
    result = prepare_brats_cli(brats_copy, out, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(flair) in result.stderr and "a FIFO" in result.stderr and "Traceback" not in result.stderr
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


@pytest.mark.parametrize("special", ["fifo", "zero_device"])
def test_a_fifo_or_device_as_the_token_file_is_refused_within_a_second(special, request):
    from trainer.runtime.ps.token import read_token

    path = request.getfixturevalue(special)
    error, seconds = bounded(lambda: read_token(path), 5)
    assert isinstance(error, UserError) and seconds < 1.0, (error, seconds)
    assert "not a regular file" in str(error) and f"cluster.token_file {path}" in str(error)


# ---------------------------------------------------------------- gzip bomb

def test_compressed_data_past_the_headers_size_is_refused_at_once(tmp_path):
    """Seen: a valid 4D block followed by 8 GiB of compressed zeros (an 8 MB file) took 21-25 s in
    prepare, and predict accepted it. Gzip members may follow each other in one file."""
    import gzip
    import time

    import numpy as np

    from trainer.data.nifti import identity_geometry, read_volume, write_volume

    plain = tmp_path / "case.nii"
    write_volume(plain, np.ones((48, 40, 32, 4), np.float32), identity_geometry(), compress=False)
    zeros = gzip.compress(bytes(16 << 20), compresslevel=9)  # one member: 16 MiB of zeros
    bomb = tmp_path / "bomb.nii.gz"
    with open(bomb, "wb") as handle:
        handle.write(gzip.compress(plain.read_bytes()))
        for _ in range(512):  # 8 GiB once unpacked
            handle.write(zeros)
    assert bomb.stat().st_size < 16 << 20  # about 8 MB
    start = time.monotonic()
    # refused by the compressed size before anything is unpacked, or by what follows the image
    with pytest.raises(UserError, match="continues past the .* bytes the header describes|compressed bytes for"):
        read_volume(bomb)
    assert time.monotonic() - start < 2.0
    honest = tmp_path / "honest.nii.gz"
    honest.write_bytes(gzip.compress(plain.read_bytes()))
    assert read_volume(honest).array.shape == (48, 40, 32, 4)  # the same block alone reads


def test_a_bind_mount_of_the_workdir_is_the_workdir(mirror, tmp_path):
    """Issue 40: a run folder reached through a bind mount of the workdir survives the real rsync
    --delete, and so does the hosts' environment named by an absolute or ../ cluster.python."""
    source, workdir = mirror
    bind = tmp_path / "bind"
    bind.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(workdir), str(bind)], capture_output=True, text=True, timeout=30)
    assert mounted.returncode == 0, f"mount --bind (root, as CI runs) failed: {mounted.stderr}"
    try:
        (workdir / "venv" / "bin").mkdir(parents=True)
        (workdir / "venv" / "bin" / "python").write_text("#!/bin/sh\n")
        for python in (f"{workdir}/venv/bin/python", f"{bind}/venv/bin/python"):
            settings = settings_with(f"train.run_dir={bind / 'experiments'}", f"cluster.python={python}")
            excludes = mirror_excludes(settings, str(workdir), source)
            assert "/experiments/" in excludes and "/venv" in excludes, excludes
        sync(source, workdir, excludes)
        assert (workdir / "experiments" / "exp1" / "ckpt" / "weights").read_text() == "precious\n"
        assert (workdir / "venv" / "bin" / "python").is_file()
    finally:
        subprocess.run(["umount", str(bind)], capture_output=True, timeout=30)


def test_prepared_data_that_are_not_regular_files_neither_hang_nor_flood(run_cli, prepared_brats, decathlon_dataset,
                                                                         tmp_path):
    """Issue 40: every prepared-data file goes through the regular-file check before h5py, numpy or
    json opens it. A FIFO as the slices file is one line (exit 2) within seconds; FIFOs in the 3D
    cache make those cases stale (read from their NIfTI), with no hang."""
    import time

    from trainer.data.datasets import RawDataset
    from trainer.data.volumes import case_arrays

    folder = Path(shutil.copytree(prepared_brats, tmp_path / "ds"))
    (folder / "slices-128.h5").unlink()
    os.mkfifo(folder / "slices-128.h5")
    started = time.monotonic()
    result = run_cli("train", "--data", folder, "--run-name", "f", "--quiet", cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "not a regular file" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 60 and not (tmp_path / "runs").exists()

    prepared = run_cli("prepare", "--src", decathlon_dataset, "--out", tmp_path / "dec", "--quiet", cwd=tmp_path,
                       timeout=120)
    assert prepared.returncode == 0, prepared.stderr
    cache = tmp_path / "dec" / "volumes"
    for name in ("BRATS_001.image.npy", "BRATS_002.source.json"):
        (cache / name).unlink()
        os.mkfifo(cache / name)
    arrays = bounded(lambda: case_arrays(RawDataset.open(decathlon_dataset), cache), 30)[0]
    assert arrays["BRATS_001"].image_file is None and arrays["BRATS_002"].image_file is None
    assert arrays["BRATS_003"].image_file == cache / "BRATS_003.image.npy"
