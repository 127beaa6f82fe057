"""The CPU/GPU choice of scripts/setup.sh and the Dockerfile (scripts/stack-choice.sh), checked
cheaply: --dry-run prints the plan and changes nothing. A GPU build itself cannot run here."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def setup_plan(*args: str, **env: str) -> dict[str, str]:
    result = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh"), "--dry-run", *args], capture_output=True,
                            text=True, timeout=60, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    plan = {}
    for line in result.stdout.splitlines():
        key, _, value = line.removeprefix("[setup] ").partition(": ")
        plan[key] = value
    return plan


def test_cpu_is_the_default_and_unchanged():
    plan = setup_plan(UNET_TRAIN_GPU="0")
    assert plan["variant"] == "cpu"
    assert plan["tensorflow"].startswith("tensorflow-cpu==2.15.1")
    assert "HOROVOD_CPU_OPERATIONS=GLOO" in plan["horovod 0.28.1 build"]
    assert "NCCL" not in plan["horovod 0.28.1 build"]


def test_gpu_flag_and_environment_variable_pick_tensorflow_and_nccl():
    for plan in (setup_plan("--gpu"), setup_plan(UNET_TRAIN_GPU="1")):
        assert plan["variant"] == "gpu"
        assert plan["tensorflow"].startswith("tensorflow[and-cuda]==2.15.1 (removed if present: tensorflow-cpu)")
        assert "HOROVOD_GPU_OPERATIONS=NCCL" in plan["horovod 0.28.1 build"]


def test_bad_choice_is_refused():
    for args, env in ((["--gpus"], {}), ([], {"UNET_TRAIN_GPU": "yes"})):
        result = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh"), "--dry-run", *args],
                                capture_output=True, text=True, timeout=60, env={**os.environ, **env})
        assert result.returncode == 2 and "setup.sh:" in result.stderr


def requirements_for(gpu: str) -> list[str]:
    """What the Dockerfile's RUN line installs for --build-arg GPU=<gpu> (POSIX sh, as in the image)."""
    script = f'. scripts/stack-choice.sh && stack_choice "{gpu}" && stack_requirements requirements.txt'
    result = subprocess.run(["sh", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line and not line.startswith("#")]


def test_requirements_differ_only_in_the_tensorflow_line():
    cpu, gpu = requirements_for("0"), requirements_for("1")
    original = [line for line in (REPO / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert cpu == original
    assert [a for a, b in zip(cpu, gpu) if a != b] == ["tensorflow-cpu==2.15.1"]
    assert "tensorflow[and-cuda]==2.15.1" in gpu and "tensorflow-cpu==2.15.1" not in gpu
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "ARG GPU=0" in dockerfile and 'stack_choice "$GPU"' in dockerfile and "$HOROVOD_BUILD_ENV" in dockerfile


# ---------------------------------------------------------------- login nodes: --no-system, the site's Slurm and MPI

def path_without(tmp_path: Path, *hidden: str, extra: dict[str, str] | None = None) -> str:
    """A PATH of links to every command of /usr/bin and /bin except ``hidden``, plus ``extra``
    stand-in scripts (name -> shell body) in front."""
    links = tmp_path / "bin"
    links.mkdir(exist_ok=True)
    for folder in (Path("/usr/bin"), Path("/bin")):
        for tool in folder.iterdir():
            if tool.name not in hidden and not (links / tool.name).exists():
                (links / tool.name).symlink_to(tool)
    front = tmp_path / "front"
    front.mkdir(exist_ok=True)
    for tool, body in (extra or {}).items():
        (front / tool).write_text(f"#!/bin/sh\n{body}\n")
        (front / tool).chmod(0o755)
    return f"{front}:{links}"


def test_no_system_plans_nothing_that_needs_root():
    plan = setup_plan("--no-system")
    assert plan["apt"].startswith("skipped (--no-system") and plan["apt wanted"] == "none"
    assert plan["python packages"] == "requirements/cpu.lock (pip install --require-hashes)"


def test_slurm_and_munge_come_from_apt_only_where_no_sbatch_is_on_path(tmp_path):
    without = setup_plan(PATH=path_without(tmp_path, "sbatch"))
    assert "slurm-wlm munge" in without["apt wanted"] and without["slurm"].startswith("none on PATH")
    site = setup_plan(PATH=path_without(tmp_path, "sbatch", extra={"sbatch": "exit 0"}))
    assert "slurm" not in site["apt wanted"] and "munge" not in site["apt wanted"]
    assert site["slurm"].startswith("sbatch on PATH") and "not installed" in site["slurm"]


def test_horovod_builds_against_the_mpi_on_path_and_the_plan_names_it(tmp_path):
    module = {"mpirun": 'echo "mpirun (Site MPI) 9.9"', "mpicc": "exit 0"}  # a loaded MPI module, first on PATH
    plan = setup_plan(PATH=path_without(tmp_path, extra=module))
    assert plan["mpi"].startswith("mpirun (Site MPI) 9.9 (") and f"{tmp_path}/front/mpirun" in plan["mpi"]
    script = (REPO / "scripts" / "setup.sh").read_text()
    assert 'log "horovod: building $HOROVOD_VERSION from source against $MPI' in script
    assert '.horovod-mpi' in script  # a different MPI on PATH later means a rebuild


def test_no_system_never_calls_apt_or_sudo_and_names_what_is_missing(tmp_path):
    """For real, not --dry-run: with no MPI on PATH it stops before touching anything, and the
    stand-ins for apt-get, sudo and dpkg-query record that none of them ran."""
    calls = tmp_path / "calls"
    record = f'echo "$0 $*" >> {calls}; exit 1'
    path = path_without(tmp_path, "mpicc", "mpirun", "sbatch",
                        extra={"apt-get": record, "sudo": record, "dpkg-query": record})
    result = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh"), "--no-system"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PATH": path})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "not found on PATH: mpicc mpirun" in result.stderr and "module load" in result.stderr
    assert not calls.exists(), calls.read_text()
    assert "[setup] apt: skipped (--no-system)" in result.stdout
