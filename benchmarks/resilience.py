"""Cost and recovery of fault tolerance (issue "Survive failures"), 2D model, default size:

* step checkpoints: the time one mid-epoch checkpoint adds (a run saving after every step
  against one saving none), and its share of step time at the default interval (every 10 min)
  and at every 100 steps;
* elastic commits: the time one in-memory commit adds (Horovod elastic, 2 ranks, commit every
  step against plain Horovod), and its share at the default `train.elastic_commit_steps` (10);
* a lost rank: elastic Horovod, 3 ranks (localhost:2 + 127.0.0.1:1), the 127.0.0.1 rank
  SIGKILLed mid-epoch at the default commit interval: seconds from the kill to the next completed
  step, and steps lost (steps done at the kill minus the step the survivors rolled back to).

Each configuration runs in its own processes, alternated, repeated. Needs data/brats_slices.h5.
Usage: python benchmarks/resilience.py [--rounds 2] -> benchmarks/results/resilience.json
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import psutil

from common import CLI, HOROVODRUN, LOCK, ROOT, RESULTS, env, save, timed

RUNS = ROOT / "runs" / "resilience"
STEPS = 12
TRAIN = ["--model", "2d", "--epochs", "2", "--set", f"train.steps_per_epoch={STEPS}", "--set",
         "train.validation_steps=1", "--set", "train.image_every_epochs=0", "--set",
         "train.validate_full_volumes=false", "--set", "train.checkpoint_every_minutes=0", "--quiet"]


def step_seconds(name: str, global_batch: int = 16) -> float:
    """Seconds per training step over the run's second epoch (the first compiles)."""
    history = json.loads((RUNS / name / "history.json").read_text())["epochs"]
    return global_batch / history[-1]["images_per_sec"]


def single(name: str, every_steps: int) -> float:
    shutil.rmtree(RUNS / name, ignore_errors=True)
    timed([*CLI, "train", *TRAIN, "--batch-size", "16", "--run-dir", RUNS, "--run-name", name,
           "--set", f"train.checkpoint_every_steps={every_steps}"], RESULTS / "resilience.log")
    return step_seconds(name)


def horovod(name: str, elastic: bool) -> float:
    shutil.rmtree(RUNS / name, ignore_errors=True)
    discovery = RESULTS / "discover-2.sh"
    discovery.write_text("#!/bin/sh\necho localhost:2\n")
    discovery.chmod(0o755)
    # one host: horovodrun's elastic start needs a named NIC, or it waits for a second host (600 s)
    launch = ([HOROVODRUN, "--gloo", "-np", "2", "--min-np", "2", "--max-np", "2", "--network-interface", "lo",
               "--host-discovery-script", discovery] if elastic else [HOROVODRUN, "--gloo", "-np", "2", "-H", "localhost:2"])
    timed([*launch, *CLI, "train", "--dist", "horovod", *TRAIN, "--batch-size", "8", "--run-dir", RUNS,
           "--run-name", name, *(["--elastic", "--set", "train.elastic_commit_steps=1"] if elastic else [])],
          RESULTS / "resilience.log")
    return step_seconds(name)


def lost_rank(round_: int) -> dict:
    """3 elastic ranks, one SIGKILLed mid-epoch (default commit interval): recovery and steps lost."""
    name = f"lost_rank_{round_}"
    shutil.rmtree(RUNS / name, ignore_errors=True)
    discovery = RESULTS / "discover-3.sh"
    discovery.write_text("#!/bin/sh\necho localhost:2\necho 127.0.0.1:1\n")
    discovery.chmod(0o755)
    log = RESULTS / f"resilience_{name}.log"
    cmd = [HOROVODRUN, "--gloo", "-np", "3", "--min-np", "2", "--max-np", "3", "--host-discovery-script", discovery,
           *CLI, "train", "--dist", "horovod", "--elastic", *TRAIN, "--batch-size", "4", "--run-dir", RUNS,
           "--run-name", name, "--set", "train.checkpoint_every_steps=1"]
    steps_dir = RUNS / name / "checkpoints" / "steps"
    with open(log, "w") as handle:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env(), stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            kill_after = STEPS + 3  # epoch 2, step 3: 5 steps past the commit at global step 10 (default interval)
            while _listed(steps_dir) < kill_after:
                if proc.poll() is not None:
                    raise RuntimeError(f"run ended early: {log}")
                time.sleep(0.05)
            done_at_kill = _listed(steps_dir)
            victim = next(p for p in psutil.process_iter(["cmdline"]) if "trainer.cli" in " ".join(
                p.info["cmdline"] or []) and _environ(p).get("HOROVOD_HOSTNAME") == "127.0.0.1")
            killed_at = time.time()
            victim.kill()
            while _newest_mtime(steps_dir) <= killed_at:  # the next step completed (and was checkpointed)
                if proc.poll() is not None:
                    break
                time.sleep(0.05)
            recovered_at = _newest_mtime(steps_dir)
            proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    change = re.search(r"world size 3 -> 2 at step (\d+)", text)
    committed = int(change.group(1)) if change else None
    return {"steps_done_at_kill": done_at_kill, "rolled_back_to_step": committed,
            "steps_lost": done_at_kill - committed if committed is not None else None,
            "seconds_kill_to_next_step": recovered_at - killed_at, "exit_code": proc.returncode}


def _listed(steps_dir: Path) -> int:
    state = steps_dir / "checkpoint"
    found = re.findall(r'all_model_checkpoint_paths: "step-(\d+)"', state.read_text()) if state.exists() else []
    return max(map(int, found), default=0)


def _newest_mtime(steps_dir: Path) -> float:
    state = steps_dir / "checkpoint"
    return state.stat().st_mtime if state.exists() else 0.0


def _environ(proc) -> dict:
    try:
        return proc.environ()
    except psutil.Error:
        return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {}
    for round_ in range(args.rounds):
        rows.setdefault("single_no_step_checkpoints_s", []).append(single(f"plain_{round_}", 0))
        rows.setdefault("single_checkpoint_every_step_s", []).append(single(f"every_{round_}", 1))
        rows.setdefault("horovod_plain_s", []).append(horovod(f"hvd_{round_}", False))
        rows.setdefault("horovod_elastic_commit_every_step_s", []).append(horovod(f"elastic_{round_}", True))
        if LOCK:
            import fcntl

            with open(LOCK, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                rows.setdefault("lost_rank", []).append(lost_rank(round_))
        else:
            rows.setdefault("lost_rank", []).append(lost_rank(round_))
    median = {k: statistics.median(v) for k, v in rows.items() if k != "lost_rank"}
    checkpoint_s = median["single_checkpoint_every_step_s"] - median["single_no_step_checkpoints_s"]
    commit_s = median["horovod_elastic_commit_every_step_s"] - median["horovod_plain_s"]
    step = median["single_no_step_checkpoints_s"]
    save("resilience", {
        "step_seconds_median": median, "rows": rows,
        "one_step_checkpoint_s": checkpoint_s,
        "checkpoint_share_at_default_10_min": checkpoint_s / 600.0,
        "checkpoint_share_every_100_steps": checkpoint_s / (100 * step),
        "one_elastic_commit_s": commit_s,
        "commit_share_at_default_every_10_steps": commit_s / (10 * median["horovod_plain_s"]),
        "lost_rank": rows["lost_rank"]})


if __name__ == "__main__":
    main()
