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
