"""The edges where a user's mistake used to cost data: a rank started without --dist horovod,
``predict -o`` onto its own inputs, and hostile settings and run-folder files. Each is refused with
one line and exit 2, before anything is written (or loaded), within a bounded time."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from support.data import TINY_2D, run_cli
from trainer.config.settings import TrainSettings
from trainer.errors import UserError
from trainer.runtime.launch_env import check_launch, launch_world

REFUSAL_S = 60  # a refusal comes before TensorFlow or a model: seconds, not minutes


def one_error_line(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    last = result.stderr.strip().splitlines()[-1]  # log lines (INFO) may come before it
    assert errors == [last] and last.startswith("unet-train "), result.stderr[-3000:]
    return last


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative name -> sha256): what must come out unchanged."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- the distributed guard

LAUNCHERS = {
    "horovodrun": {"HOROVOD_RANK": "{rank}", "HOROVOD_SIZE": "{size}"},
    "open-mpi": {"OMPI_COMM_WORLD_RANK": "{rank}", "OMPI_COMM_WORLD_SIZE": "{size}"},
    "hydra-pmi": {"PMI_RANK": "{rank}", "PMI_SIZE": "{size}"},
    "mvapich2": {"MV2_COMM_WORLD_RANK": "{rank}", "MV2_COMM_WORLD_SIZE": "{size}"},
    "srun-pmix": {"PMIX_RANK": "{rank}", "SLURM_STEP_NUM_TASKS": "{size}", "SLURM_PROCID": "{rank}"},
}


def launcher_env(name: str, rank: int, size: int) -> dict[str, str]:
    return {key: value.format(rank=rank, size=size) for key, value in LAUNCHERS[name].items()}


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
@pytest.mark.parametrize("dist", ["single", "ps"])
def test_a_rank_of_two_without_dist_horovod_is_refused_naming_the_variables(name, dist):
    for rank in (0, 1):  # rank 0 too: it would train as chief beside the others
        env = launcher_env(name, rank, 2)
        with pytest.raises(UserError) as refused:
            check_launch(TrainSettings(dist=dist), env)
        message = str(refused.value)
        assert "add --dist horovod" in message and "one of 2 ranks" in message, message
        assert next(iter(env)) + f"={rank}" in message, message


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_a_world_of_two_with_dist_horovod_starts(name):
    assert check_launch(TrainSettings(dist="horovod"), launcher_env(name, 1, 2)).size == 2


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_a_world_of_one_is_a_single_process(name):
    env = launcher_env(name, 0, 1)
    assert check_launch(TrainSettings(dist="single"), env).size == 1
    with pytest.raises(UserError, match="train.allow_single_rank=true"):
        check_launch(TrainSettings(dist="horovod"), env)
    assert check_launch(TrainSettings(dist="horovod", allow_single_rank=True), env).size == 1


def test_no_launcher_single_starts_and_horovod_alone_is_refused_unless_asked():
    assert launch_world({}).size == 1 and launch_world({}).seen == ()
    assert check_launch(TrainSettings(), {}).size == 1
    with pytest.raises(UserError, match="no launcher variables.*horovodrun -np N"):
        check_launch(TrainSettings(dist="horovod"), {})
    assert check_launch(TrainSettings(dist="horovod", allow_single_rank=True), {}).size == 1
    # elastic: the world may start at one rank and grow (horovodrun --min-np 1)
    assert check_launch(TrainSettings(dist="horovod", elastic=True), {"HOROVOD_RANK": "0", "HOROVOD_SIZE": "1"})


def test_slurm_task_variables_alone_are_not_a_launcher():
    """A batch script with --ntasks=4 runs one process; the Slurm PS mode's roles start with
    srun --mpi=none (no PMI variables) and are chief/ps/worker commands, not train."""
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_JOB_ID": "7"}
    assert check_launch(TrainSettings(dist="single"), env).size == 1


def test_a_rank_above_zero_means_two_ranks_even_without_a_size():
    assert launch_world({"PMIX_RANK": "1"}).size == 2
    assert launch_world({"HOROVOD_RANK": "x", "HOROVOD_SIZE": "9"}).size == 1  # not a number: not read


def test_cli_train_as_a_horovodrun_rank_without_dist_horovod_exits_2_and_writes_no_run(prepared_brats, tmp_path):
    """With data to train on: before the guard this rank trained, as chief, into runs/r."""
    started = time.monotonic()
    result = run_cli("train", "--run-name", "r", "--set", f"data.dataset={prepared_brats}", *TINY_2D, cwd=tmp_path,
                     timeout=REFUSAL_S, env={"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2"})
    line = one_error_line(result)
    assert "HOROVOD_RANK=1" in line and "HOROVOD_SIZE=2" in line and "add --dist horovod" in line, line
    assert not (tmp_path / "runs").exists(), sorted(str(p) for p in (tmp_path / "runs").rglob("*"))
    assert time.monotonic() - started < REFUSAL_S


def test_cli_benchmark_as_an_mpirun_rank_without_dist_horovod_exits_2(prepared_brats, tmp_path):
    result = run_cli("benchmark", "--mode", "train", "--steps", "2", "--warmup", "1", "--set",
                     f"data.dataset={prepared_brats}", *TINY_2D, cwd=tmp_path, timeout=REFUSAL_S,
                     env={"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})
    line = one_error_line(result)  # after TensorFlow's banner: the benchmark imports it first
    assert line.startswith("unet-train benchmark: error:") and "OMPI_COMM_WORLD_SIZE=2" in line, line


def test_cli_train_dist_horovod_without_a_launcher_exits_2_and_writes_no_run(prepared_brats, tmp_path):
    env = {key: "" for family in LAUNCHERS.values() for key in family}  # none from the test's own launcher
    result = run_cli("train", "--dist", "horovod", "--run-name", "r", "--set", f"data.dataset={prepared_brats}",
                     *TINY_2D, cwd=tmp_path, timeout=REFUSAL_S, env=env)
    line = one_error_line(result)
    assert "train.allow_single_rank=true" in line, line
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- predict's output folder

@pytest.fixture
def images(decathlon_copy) -> Path:
    """-i: a Decathlon imagesTr folder of 4D cases (the dataset's labelsTr beside it)."""
    return decathlon_copy / "imagesTr"


def refused_predict(tmp_path: Path, inputs: Path, *args) -> str:
    """``predict ARGS`` (or ``evaluate ARGS``) refused: one line, exit 2, nothing around ``inputs`` changed."""
    before = digest(inputs.parent)
    started = time.monotonic()
    command = ["predict", *args] if args[0] != "evaluate" else list(args)
    result = run_cli(*command, "--quiet", cwd=tmp_path, timeout=REFUSAL_S)
    line = one_error_line(result)
    assert time.monotonic() - started < REFUSAL_S
    assert digest(inputs.parent) == before  # the whole dataset, bytes and names
    return line


def test_predict_o_equal_to_i_is_refused(images, tmp_path):
    line = refused_predict(tmp_path, images, "-i", images, "-o", images)
    assert "is the input folder" in line, line


@pytest.mark.parametrize("spelling", ["dotdot", "slashes", "symlink"])
def test_predict_o_spelled_otherwise_is_still_the_input_folder(images, tmp_path, spelling):
    if spelling == "dotdot":
        out = f"{images}/../{images.name}"
    elif spelling == "slashes":
        out = f"{images.parent}//{images.name}/"
    else:
        out = tmp_path / "link"
        out.symlink_to(images, target_is_directory=True)
    line = refused_predict(tmp_path, images, "-i", images, "-o", out)
    assert "is the input folder" in line, line


def test_predict_o_inside_i_is_refused_and_not_created(images, tmp_path):
    line = refused_predict(tmp_path, images, "-i", images, "-o", images / "masks")
    assert "lies inside the input folder" in line, line
    assert not (images / "masks").exists()


def test_predict_o_beside_i_in_its_dataset_is_refused(images, tmp_path):
    """-o labelsTr: CASE.nii.gz would replace the ground truth of the same name."""
    line = refused_predict(tmp_path, images, "-i", images, "-o", images.parent / "labelsTr")
    assert "lies inside the input folder" in line and str(images.parent) in line, line


def test_predict_o_containing_i_is_refused(images, tmp_path):
    line = refused_predict(tmp_path, images, "-i", images, "-o", images.parent.parent)
    assert "contains the input folder" in line, line


def test_predict_o_containing_a_positional_case_is_refused(images, tmp_path):
    case = next(p for p in sorted(images.glob("*.nii.gz")) if not p.name.startswith("."))
    line = refused_predict(tmp_path, images, case, "-o", images.parent.parent)
    assert "contains the input folder" in line, line


def test_predict_output_file_that_is_an_input_file_is_refused(images, tmp_path):
    case = next(p for p in sorted(images.glob("*.nii.gz")) if not p.name.startswith("."))
    out = tmp_path / "out"
    out.mkdir()
    os.link(case, out / case.name)  # -i's CASE.nii.gz would be written to out/CASE.nii.gz: the same file
    line = refused_predict(tmp_path, images, "-i", images, "-o", out)
    assert f"the output {out / case.name} is the input" in line, line


def test_predict_o_an_existing_file_is_refused(images, tmp_path):
    (tmp_path / "masks").write_text("not a folder\n")
    line = refused_predict(tmp_path, images, "-i", images, "-o", tmp_path / "masks")
    assert "exists and is not a folder" in line, line
    assert (tmp_path / "masks").read_text() == "not a folder\n"


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_predict_o_that_cannot_be_written_is_refused(images, tmp_path, where):
    """Root passes every permission bit: a parent that is a file, and /proc (no folder can be made
    there), fail as a read-only folder would."""
    if where == "under-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "masks"
        words = "is not a folder"
    else:
        out = Path("/proc") / f"unet-train-{os.getpid()}"
        words = "cannot be written"
    line = refused_predict(tmp_path, images, "-i", images, "-o", out)
    assert words in line, line


def test_evaluate_out_in_or_at_the_raw_dataset_is_refused(prepared_brats, brats_dataset, tmp_path):
    case = next(p.parent for p in sorted(brats_dataset.rglob("*_seg.nii.gz")) if not p.name.startswith("."))
    for out, words in ((brats_dataset, "is the input folder"), (case, "is the input folder"),
                       (case / "eval", "lies inside the input folder"), (brats_dataset.parent, "contains")):
        line = refused_predict(tmp_path, brats_dataset, "evaluate", "--data", prepared_brats, "--out", out)
        assert line.startswith("unet-train evaluate: error: --out ") and words in line, line
    assert not (case / "eval").exists()


@pytest.mark.slow
def test_predict_i_d_o_d_with_a_trained_run_leaves_every_input_as_it_was(prepared_brats, decathlon_copy,
                                                                           tmp_path):
    """The seen failure, whole: a real model, `predict -i D -o D`, 4D inputs once replaced by masks."""
    trained = run_cli("train", "--run-name", "r", "--epochs", "1", "--set", f"data.dataset={prepared_brats}",
                      "--set", "train.validate_full_volumes=false", *TINY_2D, cwd=tmp_path, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    images = decathlon_copy / "imagesTr"
    line = refused_predict(tmp_path, images, "--run-name", "r", "-i", images, "-o", images)
    assert "is the input folder" in line, line
    done = run_cli("predict", "--run-name", "r", "-i", images, "-o", tmp_path / "masks", "--quiet", cwd=tmp_path,
                   timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]  # the same command into a folder of its own works


# ---------------------------------------------------------------- settings YAML

ALIAS_BOMB = "".join(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9 if prev else ['lol'] * 9)}]\n"
                     for prev, name in zip(["", *"abcdefgh"], "abcdefghi"))  # ~ 400 bytes, 9**9 leaves


@pytest.mark.parametrize("text, words", [
    (ALIAS_BOMB, "anchors and aliases"),
    ("train:\n  epochs: " + "9" * 5000 + "\n", "an integer of 5000 digits"),
    ("train: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 20 levels"),
    ("train:\n  epochs: 0x" + "f" * 40 + "\n", "an integer of 40 digits"),
])
def test_hostile_settings_yaml_is_one_config_error_in_bounded_time(tmp_path, text, words):
    from trainer.config.loader import load_settings
    from trainer.errors import ConfigError

    path = tmp_path / "settings.yaml"
    path.write_text(text)
    started = time.monotonic()
    with pytest.raises(ConfigError) as refused:
        load_settings(path)
    assert time.monotonic() - started < 2.0
    assert str(refused.value).startswith(f"{path}: ") and words in str(refused.value) and "\n" not in str(refused.value)


def test_an_alias_in_a_set_override_is_refused():
    from trainer.config.loader import load_settings
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="--set 'train.epochs=&a 3': YAML anchors and aliases"):
        load_settings(None, ["train.epochs=&a 3"])
    assert load_settings(None, ["train.epochs=3"]).train.epochs == 3


def test_cli_alias_bomb_as_settings_and_as_a_runs_own_settings_exits_2(tmp_path):
    (tmp_path / "bomb.yaml").write_text(ALIAS_BOMB)
    started = time.monotonic()
    shown = run_cli("config", "show", "--settings", tmp_path / "bomb.yaml", cwd=tmp_path, timeout=REFUSAL_S)
    assert "anchors and aliases" in one_error_line(shown)
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "settings.yaml").write_text(ALIAS_BOMB)
    (tmp_path / "in").mkdir()
    predicted = run_cli("predict", "--run-name", "r", "-i", tmp_path / "in", "-o", tmp_path / "out", cwd=tmp_path,
                        timeout=REFUSAL_S)
    line = one_error_line(predicted)
    assert str(Path("runs") / "r" / "settings.yaml") in line and "anchors and aliases" in line, line
    assert time.monotonic() - started < 2 * REFUSAL_S


# ---------------------------------------------------------------- sizes with bounds

@pytest.mark.parametrize("override, words", [
    ("data.crop_size=[1024,1024,64]", "at most 512 per edge"),
    ("data.crop_size=[16384,16384,16]", "at most 512 per edge"),
    ("data.crop_size=[512,512,80]", "16,777,216 voxels"),
    ("data.max_voxels=1000000000000", "less than or equal to 1073741824"),
])
def test_sizes_in_settings_have_an_upper_bound(override, words):
    from trainer.config.loader import load_settings
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match=words):
        load_settings(None, [override])


def test_a_runs_own_crop_size_is_bounded_too(tmp_path):
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "settings.yaml").write_text("data:\n  crop_size: [1024, 1024, 64]\n")
    (tmp_path / "in").mkdir()
    result = run_cli("predict", "--run-name", "r", "-i", tmp_path / "in", "-o", tmp_path / "out", cwd=tmp_path,
                     timeout=REFUSAL_S)
    assert "data.crop_size" in one_error_line(result)


# ---------------------------------------------------------------- run-folder files

def refused_in_bounded_time(code: str, seconds: float = 30) -> str:
    """Run ``code`` (which ends in a call expected to raise UserError) in a child Python, killed after
    ``seconds``: a read blocked on a FIFO inside TensorFlow holds the GIL, so no thread could time it
    out. Returns the refusal's message."""
    import subprocess
    import sys
    import textwrap

    child = ("import os, sys\nfrom pathlib import Path\nfrom trainer.errors import UserError\ntry:\n"
             + textwrap.indent(textwrap.dedent(code).strip(), "    ")
             + "\nexcept UserError as exc:\n    print('REFUSED', exc)\n    sys.exit(0)\nprint('NOT REFUSED')\n")
    try:
        result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=seconds,
                                cwd=Path(__file__).resolve().parents[1],
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    except subprocess.TimeoutExpired:
        pytest.fail(f"still blocked after {seconds} s")
    assert result.returncode == 0 and result.stdout.startswith("REFUSED "), result.stdout + result.stderr[-2000:]
    return result.stdout


def test_a_fifo_as_a_checkpoint_state_file_is_refused_not_waited_on(tmp_path):
    best = tmp_path / "checkpoints" / "best"
    best.mkdir(parents=True)
    os.mkfifo(best / "checkpoint")
    message = refused_in_bounded_time(f"""
        from trainer.runtime.checkpoints import restore_weights
        restore_weights(None, Path({str(tmp_path)!r}))
    """)
    assert "checkpoint state file: not a regular file (a FIFO)" in message, message


def test_a_fifo_as_a_checkpoint_index_is_refused_not_waited_on(tmp_path):
    best = tmp_path / "checkpoints" / "best"
    best.mkdir(parents=True)
    (best / "checkpoint").write_text('model_checkpoint_path: "best-1"\nall_model_checkpoint_paths: "best-1"\n')
    os.mkfifo(best / "best-1.index")
    (best / "best-1.data-00000-of-00001").write_bytes(b"")
    message = refused_in_bounded_time(f"""
        import tensorflow as tf
        from trainer.runtime.checkpoints import restore_weights
        restore_weights(tf.keras.Sequential([tf.keras.layers.Dense(1)]), Path({str(tmp_path)!r}))
    """)
    assert "best-1.index: not a regular file (a FIFO)" in message, message


def test_a_fifo_in_a_resumed_runs_checkpoints_is_refused(tmp_path):
    last = tmp_path / "checkpoints" / "last"
    last.mkdir(parents=True)
    os.mkfifo(last / "checkpoint")
    message = refused_in_bounded_time(f"""
        import tensorflow as tf
        from trainer.runtime.checkpoints import CheckpointStore
        CheckpointStore(Path({str(tmp_path)!r}), tf.Module(), tf.Module(), tf.Module(), 3)
    """)
    assert "not a regular file (a FIFO)" in message, message


def test_a_fifo_as_history_json_is_refused(tmp_path):
    os.mkfifo(tmp_path / "history.json")
    message = refused_in_bounded_time(f"""
        from trainer.training.callbacks import JsonHistory
        JsonHistory(Path({str(tmp_path / "history.json")!r}))
    """)
    assert "history.json: not a regular file (a FIFO)" in message, message


@pytest.mark.parametrize("kind, words", [("fifo", "not a regular file (a FIFO)"),
                                         ("dev-zero", "not a regular file (a character device)"),
                                         ("sparse", "larger than 1,048,576 bytes")])
def test_postprocessing_json_is_regular_and_small(tmp_path, kind, words):
    """Seen: /dev/zero or a 6 GiB sparse file here ran predict out of memory in 9-10 s. The child
    gets 2 GiB of address space at most, so a regression fails without harming the machine."""
    path = tmp_path / "postprocessing.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    else:
        with open(path, "wb") as sparse:
            sparse.truncate(6 << 30)  # no disk used: 6 GiB of zeros to a reader
    message = refused_in_bounded_time(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from trainer.inference import postprocess
        postprocess.load(Path({str(tmp_path)!r}), "c", {{}})
    """)
    assert words in message, message


def test_cli_predict_with_a_fifo_checkpoint_exits_2_instead_of_hanging(decathlon_copy, tmp_path):
    best = tmp_path / "runs" / "r" / "checkpoints" / "best"
    best.mkdir(parents=True)
    os.mkfifo(best / "checkpoint")
    started = time.monotonic()
    result = run_cli("predict", "--run-name", "r", "-i", decathlon_copy / "imagesTr", "-o", tmp_path / "out",
                     "--engine", "tf", "--quiet", cwd=tmp_path, timeout=REFUSAL_S)
    assert "not a regular file (a FIFO)" in one_error_line(result)
    assert time.monotonic() - started < REFUSAL_S


# ---------------------------------------------------------------- addresses and sbatch options

@pytest.mark.parametrize("address", ["2001:3::5", "2001:4:112::1", "2001:20::1", "2001:2f:ffff::1", "2001:30::1",
                                     "2001:3f::1", "100::1", "2001:2::1", "198.18.0.1", "240.0.0.1", "0.1.2.3",
                                     "::ffff:198.18.0.1", "192.88.99.1"])
def test_special_purpose_blocks_are_not_private(address):
    from trainer.runtime.network import is_private

    assert not is_private(address)


def test_private_stays_private():
    from trainer.runtime.network import is_private

    for address in ("10.0.0.1", "172.31.0.1", "192.168.0.1", "100.64.0.1", "fd12::1", "fe80::1%eth0", "127.0.0.1",
                    "::1", "169.254.0.1"):
        assert is_private(address), address
    # documentation ranges: not globally reachable (IANA), and carried by this project's CI machines
    for address in ("192.0.2.2", "198.51.100.7", "203.0.113.7", "2001:db8::1"):
        assert is_private(address), address


@pytest.mark.parametrize("option", ["--wait", "--uid=0", "--gid=0", "--get-user-env", "--container=/img",
                                    "--clusters=other", "--bbf=/tmp/x", "--excl", "--kill-on-invalid-dep=yes"])
def test_extra_sbatch_takes_only_allowed_options(option):
    from trainer.config.loader import load_settings
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="is not one extra_sbatch passes on"):
        load_settings(None, [f"cluster.slurm.extra_sbatch=[{option}]"])


def test_extra_sbatch_documented_options_pass():
    from trainer.config.loader import load_settings

    options = ["--mem=64G", "--exclusive", "--qos=long", "--gres=gpu:2", "--mail-user=a@b.org", "--mail-type=END",
               "--mem-per-cpu=2G", "--reservation=r1"]
    assert load_settings(None, [f"cluster.slurm.extra_sbatch=[{','.join(options)}]"]).cluster.slurm.extra_sbatch \
        == tuple(options)


# ---------------------------------------------------------------- gzip and NIfTI headers

def small_volume(tmp_path: Path) -> bytes:
    """The uncompressed bytes of a valid 20 x 20 x 20 int16 NIfTI (16,352 bytes)."""
    import gzip

    import numpy as np

    from trainer.data.nifti import identity_geometry, write_volume

    write_volume(tmp_path / "v.nii.gz", np.ones((20, 20, 20), np.int16), identity_geometry())
    return gzip.decompress((tmp_path / "v.nii.gz").read_bytes())


def refused_volume(path: Path, words: str, **options) -> None:
    from trainer.data.nifti import read_volume
    from trainer.errors import DataError

    started = time.monotonic()
    with pytest.raises(DataError, match=words):
        read_volume(path, **options)
    assert time.monotonic() - started < 2.0


def test_gzip_with_a_million_empty_members_is_refused_fast(tmp_path):
    import gzip

    raw = small_volume(tmp_path)
    path = tmp_path / "members.nii.gz"
    path.write_bytes(gzip.compress(raw, mtime=0) + gzip.compress(b"", mtime=0) * 1_000_000)
    refused_volume(path, "refusing the padding")


def test_gzip_with_a_few_hundred_empty_members_is_refused(tmp_path):
    import gzip

    raw = small_volume(tmp_path)
    path = tmp_path / "members.nii.gz"
    path.write_bytes(gzip.compress(raw, mtime=0) + gzip.compress(b"", mtime=0) * 300)
    refused_volume(path, "more than 80 gzip members")


def test_gzip_with_a_20_mb_file_name_is_refused_fast(tmp_path):
    import gzip

    raw = gzip.compress(small_volume(tmp_path), mtime=0)
    path = tmp_path / "name.nii.gz"
    path.write_bytes(raw[:3] + bytes([raw[3] | 8]) + raw[4:10] + b"a" * 20_000_000 + b"\0" + raw[10:])
    refused_volume(path, "gzip file name field longer than 4096 bytes")


def test_gzip_size_is_counted_not_read_from_the_trailer(tmp_path):
    """A second member whose trailer carries the header's size: the old check read only the last
    4 bytes and let 16 KiB (or 2**32 k bytes) of extra data through."""
    import gzip

    raw = small_volume(tmp_path)
    path = tmp_path / "trailer.nii.gz"
    path.write_bytes(gzip.compress(raw, mtime=0) + gzip.compress(bytes(len(raw)), mtime=0))
    assert int.from_bytes(path.read_bytes()[-4:], "little") == len(raw)
    refused_volume(path, "compressed data continues past the 16,352 bytes")


def test_an_ni1_header_in_a_nii_file_is_refused(tmp_path):
    header = bytearray(small_volume(tmp_path)[:348])
    header[344:347] = b"ni1"
    (tmp_path / "pair.nii").write_bytes(bytes(header))
    refused_volume(tmp_path / "pair.nii", "header says 'ni1'")


def test_8_byte_voxels_count_twice_against_max_voxels(tmp_path):
    """float64 512 x 512 x 255 x 4 is just under 2**28 voxels, 2.1 GB of data (seen: a 6.9 GB peak)."""
    import gzip
    import struct

    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 4, 512, 512, 255, 4, 1, 1, 1)
    struct.pack_into("<2h", header, 70, 64, 64)  # FLOAT64
    struct.pack_into("<8f", header, 76, *([1.0] * 8))
    struct.pack_into("<f", header, 108, 352.0)
    header[344:348] = b"n+1\0"
    (tmp_path / "f64.nii.gz").write_bytes(gzip.compress(bytes(header), mtime=0))
    refused_volume(tmp_path / "f64.nii.gz", "voxels of 64 bits = 2,139,095,040 bytes, more than data.max_voxels")
