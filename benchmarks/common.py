"""Helpers for benchmark scripts: run the CLI, time it, write JSON results."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CLI = [sys.executable, "-m", "trainer.cli"]


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    out.update(extra)
    return out


def timed(cmd: list, log: Path | None = None, **extra_env: str) -> float:
    """Run a command to completion (raising on failure); return wall seconds."""
    start = time.perf_counter()
    with open(log or os.devnull, "a") as handle:
        subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env(**extra_env), check=True,
                       stdout=handle, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data, indent=2))
    return path
