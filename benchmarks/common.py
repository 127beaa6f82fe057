"""Helpers for benchmark scripts: run the CLI, time it, write JSON results."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# UNET_BENCH_RESULTS redirects every result (run_all.py --quick uses it, so that a smoke run never
# replaces the stored figures in benchmarks/results).
RESULTS = Path(os.environ.get("UNET_BENCH_RESULTS") or ROOT / "benchmarks" / "results").resolve()
CLI = [sys.executable, "-m", "trainer.cli"]


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    out.update(extra)
    return out


# A machine shared with other heavy jobs: UNET_BENCH_LOCK=/path/to/lockfile makes every timed
# command wait for that flock(1) lock, so no two heavy jobs overlap (the wait is not timed).
LOCK = os.environ.get("UNET_BENCH_LOCK")


def timed(cmd: list, log: Path | None = None, cwd: Path = ROOT, **extra_env: str) -> float:
    """Run a command to completion (raising on failure); return wall seconds (lock wait excluded)."""
    if LOCK:
        import fcntl

        with open(LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return _timed(cmd, log, cwd, **extra_env)
    return _timed(cmd, log, cwd, **extra_env)


def _timed(cmd: list, log: Path | None, cwd: Path, **extra_env: str) -> float:
    start = time.perf_counter()
    with open(log or os.devnull, "a") as handle:
        subprocess.run([str(c) for c in cmd], cwd=cwd, env=env(**extra_env), check=True,
                       stdout=handle, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def save(name: str, data: dict) -> Path:
    """Write results/<name>.json whole or not at all (an interrupted run keeps the previous file)."""
    from trainer.fsutil import write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    text = json.dumps(data, indent=2)
    write_text(path, text + "\n")
    print(text)
    return path


HOROVODRUN = str(ROOT / ".venv" / "bin" / "horovodrun")


def free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def ps_job(chief_args: list, extra: list, log: Path, workers: int = 2, **extra_env: str) -> float:
    """1 PS + ``workers`` workers + the chief on 127.0.0.1 (free ports); wall seconds of the job."""
    if LOCK:
        import fcntl

        with open(LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return _ps_job(chief_args, extra, log, workers, **extra_env)
    return _ps_job(chief_args, extra, log, workers, **extra_env)


def _ps_job(chief_args: list, extra: list, log: Path, workers: int, **extra_env: str) -> float:
    ports = free_ports(workers + 3)
    ps, worker_ports, (chief, control) = ports[0], ports[1:1 + workers], ports[1 + workers:]
    cluster = ["--set", f"cluster.ps_hosts=[127.0.0.1:{ps}]",
               "--set", "cluster.worker_hosts=[" + ",".join(f"127.0.0.1:{p}" for p in worker_ports) + "]",
               "--set", f"cluster.chief_host=127.0.0.1:{chief}", "--set", f"cluster.control_port={control}"] + extra
    start = time.perf_counter()
    with open(log, "a") as handle:
        roles = [subprocess.Popen([str(c) for c in CLI + [role, "--index", str(i)] + cluster], cwd=ROOT,
                                  env=env(**extra_env), stdout=handle, stderr=subprocess.STDOUT)
                 for role, i in [("ps", 0)] + [("worker", w) for w in range(workers)]]
        try:
            subprocess.run([str(c) for c in CLI + ["chief"] + chief_args + cluster], cwd=ROOT, env=env(**extra_env),
                           stdout=handle, stderr=subprocess.STDOUT, check=True)
            for role in roles:
                role.wait(timeout=120)
        finally:
            for role in roles:
                if role.poll() is None:
                    role.kill()
                    role.wait()
    return time.perf_counter() - start


DATA = ROOT / "data"
PREPARED = DATA / "prepared"
# The synthetic default per model (20 full-size cases, seed 0): its synth command, its prepare
# command, and the prepared dataset folder a run reads (``--data``).
DATASETS = {
    "2d": (["synth", "--format", "brats", "--out", DATA / "raw/MICCAI_BraTS_2019_Data_Training", "--cases", "20",
            "--seed", "0"],
           ["prepare", "--format", "brats", "--src", DATA / "raw/MICCAI_BraTS_2019_Data_Training", "--model", "2d",
            "--out", PREPARED / "brats-default"], PREPARED / "brats-default"),
    "3d": (["synth", "--format", "decathlon", "--out", DATA / "raw/Task01_BrainTumour", "--cases", "20",
            "--seed", "0"],
           ["prepare", "--format", "decathlon", "--src", DATA / "raw/Task01_BrainTumour", "--model", "3d",
            "--out", PREPARED / "decathlon-default"], PREPARED / "decathlon-default"),
}


def prepared_for(folder: Path) -> list[str]:
    """The models a prepared dataset folder holds data for ([] when it is not one yet)."""
    from trainer.data.prepared import PreparedDataset
    from trainer.errors import DataError

    try:
        return PreparedDataset.open(folder).prepared_for()
    except DataError:
        return []


def default_data_flags(model: str) -> list:
    """``--data`` for `model`'s synthetic default, without making it (see ensure_data)."""
    return ["--data", DATASETS[model][2]]


HARD = DATA / "hard"  # one BraTS-layout hard set, prepared for both models (the dataset seam)
HARD_CASES = 24
HARD_SPLIT = ["--set", "data.split.val_fraction=0.17", "--set", "data.split.test_fraction=0.25"]
HARD_PREPARED = HARD / "prepared"  # 2D slices and the 3D cache side by side, one split
HARD_DATA_FLAGS = ["--data", HARD_PREPARED]


def ensure_hard_data(log: Path | None = None) -> list:
    """The hard phantom (24 full-size BraTS-layout cases, seed 0: 14 to train, 4 to validate, 6 held
    out, one split for both models), prepared as 2D slices and 3D volumes into one dataset folder;
    returns the flags that point a run at it."""
    raw = HARD / "raw" / "MICCAI_BraTS_2019_Data_Training"
    if not raw.exists():
        timed(CLI + ["synth", "--format", "brats", "--out", raw, "--cases", str(HARD_CASES), "--seed", "0",
                     "--difficulty", "hard", "--quiet"], log)
    for model in ("2d", "3d"):
        if model not in prepared_for(HARD_PREPARED):
            timed(CLI + ["prepare", "--src", raw, "--model", model, "--out", HARD_PREPARED, *HARD_SPLIT, "--quiet"],
                  log)
    return HARD_DATA_FLAGS


def ensure_data(model: str, log: Path | None = None) -> list:
    """The synthetic default (20 full-size cases, seed 0, the demo's) for `model`, made once; returns
    the flags that point a run at it."""
    synth, prepare, folder = DATASETS[model]
    if model not in prepared_for(folder):
        if not synth[synth.index("--out") + 1].exists():
            timed(CLI + synth + ["--quiet"], log)
        timed(CLI + prepare + ["--quiet"], log)
    return default_data_flags(model)
