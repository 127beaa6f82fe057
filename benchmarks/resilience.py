"""Cost and recovery of fault tolerance (issue "Survive failures"), 2D model, default size:

* step checkpoints: the time one mid-epoch checkpoint adds (a run saving after every step
  against one saving none), and its share of step time at the default interval (every 10 min)
  and at every 100 steps;
* elastic commits: the time one in-memory commit adds (Horovod elastic, 2 ranks, commit every
  step against plain Horovod), and its share at the default `train.elastic_commit_steps` (10);
* a lost rank: elastic Horovod, 3 ranks (localhost:2 + 127.0.0.1:1), the 127.0.0.1 rank
  SIGKILLed mid-epoch at the default commit interval: seconds from the kill to the next completed
  step, and steps lost (steps done at the kill minus the step the survivors rolled back to);
* Slurm time limits and preemption (``slurm_preemption``): a job on the tests' single-node Slurm
  (Horovod 2 tasks, PS chief + 1 PS + 2 workers) gets SIGUSR1 in its batch shell (what
  ``--signal=B:USR1@s`` sends before the time limit) after the periodic checkpoint at step 3:
  seconds from the signal to the complete step checkpoint, steps lost (steps applied before the
  exit minus the step the requeued job resumed from), and the requeued job's wait (Slurm holds
  a requeued job until the old job credentials expire: AuthInfo cred_expire, 20 s on this
  cluster, 120 s by default, then the benchmark starts it at once instead of at the scheduler's
  next pass).

Each configuration runs in its own processes, alternated, repeated. Needs the 2D synthetic default,
data/prepared/brats-default (run_all.py makes it; the Slurm part prepares synthetic cases when it
is absent, as slurm_overhead.py does).
Usage: python benchmarks/resilience.py [--rounds 2] [--only slurm_preemption]
       -> benchmarks/results/resilience.json (--only: that key replaced, the others kept)
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from common import CLI, HOROVODRUN, LOCK, ROOT, RESULTS, default_data_flags, env, save, timed

RUNS = ROOT / "runs" / "resilience"
STEPS = 12
TRAIN = ["--model", "2d", *default_data_flags("2d"), "--epochs", "2", "--set", f"train.steps_per_epoch={STEPS}",
         "--set", "train.validation_steps=1", "--set", "train.image_every_epochs=0", "--set",
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


CRED_EXPIRE_S = 20
SLURM_STEPS = 12


def slurm_preemption(rounds: int) -> dict:
    """SIGUSR1 to the batch shell mid-epoch, then checkpoint, exit 75, requeue, resume, finish."""
    import tempfile

    sys.path.insert(0, str(ROOT / "tests"))
    import support.slurm_cluster as cluster_module
    from slurm_overhead import prepared_data

    work = Path(tempfile.mkdtemp(prefix="unet-preempt-bench-"))
    data = prepared_data(work)
    config = cluster_module._config
    cluster_module._config = lambda *a: re.sub(r"^(AuthInfo=\S+)$", rf"\1,cred_expire={CRED_EXPIRE_S}",
                                               config(*a), flags=re.M)
    cluster = cluster_module.start_slurm_cluster()
    cluster_module._config = config
    rows: dict[str, list] = {"horovod": [], "ps": []}
    try:
        for round_ in range(rounds):
            for mode, tasks in (("horovod", 2), ("ps", 4)):
                rows[mode].append(_preempted_job(cluster, data, work, mode, tasks, round_))
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    summary = {mode: {key: statistics.median(values) if (values := [r[key] for r in runs if r[key] is not None])
                      else None for key in ("signal_to_checkpoint_s", "steps_lost", "requeue_wait_s")}
               | {"runs": len(runs), "completed": sum(r["exit_code"] == 0 for r in runs)}
               for mode, runs in rows.items() if runs}
    return {"cluster": f"single-node slurm-wlm 22.05 on 127.0.0.1 (tests/support/slurm_cluster.py), "
                       f"AuthInfo cred_expire={CRED_EXPIRE_S}", "data": str(data),
            "training": f"2D default model, 2 epochs x {SLURM_STEPS} steps, global batch 16, signal after the "
                        f"periodic checkpoint at step 3", "median": summary, "rows": rows}


def _preempted_job(cluster, data: Path, work: Path, mode: str, tasks: int, round_: int) -> dict:
    from slurm_overhead import free_base

    name = f"preempt_{mode}_{round_}"
    runs = work / "runs"
    base = free_base(tasks + 1)
    cmd = [*CLI, "distributed", "--scheduler", "slurm", "--mode", mode, "--nodes", "1", "--ntasks-per-node",
           str(tasks), "--run-name", name, "--model", "2d", "--epochs", "2", "--set", "train.batch_size=8",
           "--time", "30:00", "--set", "cluster.slurm.signal_s=60", "--set", f"data.dataset={data}",
           "--set", f"train.steps_per_epoch={SLURM_STEPS}", "--set", "train.validation_steps=1",
           "--set", "train.image_every_epochs=0", "--set", "train.validate_full_volumes=false",
           "--set", "train.checkpoint_every_steps=3", "--set", "train.checkpoint_every_minutes=0", "--quiet",
           "--set", f"train.run_dir={runs}", "--set", f"cluster.python={sys.executable}",
           "--set", f"cluster.slurm.port_base={base}", "--set", f"cluster.control_port={base + tasks}",
           "--set", "cluster.slurm.poll_s=0.5"]
    log = RESULTS / f"resilience_{name}.log"
    run = runs / name
    with open(log, "w") as handle:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=work, env=env(**cluster.env),
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while not (run / "checkpoints" / "steps" / "step-3.index").exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"run ended early: {log}")
                time.sleep(0.1)
            job_id = json.loads((run / "slurm" / "job.json").read_text())["job_id"]
            signalled = time.time()
            cluster.client("scancel", "--signal=USR1", "--batch", job_id, timeout=60)
            requeued = running_again = nudged = None
            while proc.poll() is None:
                record = cluster.client("scontrol", "show", "job", "-o", job_id).stdout
                if requeued is None and re.search(r"\bRestarts=1\b", record):
                    requeued = time.time()
                if requeued and running_again is None and "JobState=RUNNING" in record:
                    running_again = time.time()
                if requeued and not nudged and time.time() > requeued + CRED_EXPIRE_S + 2:
                    cluster.client("scontrol", "update", f"JobId={job_id}", "StartTime=now")  # eligible: start now
                    nudged = time.time()
                time.sleep(0.25)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    [entry] = json.loads((run / "preemptions.json").read_text())
    resumed = re.search(r"resuming from \S+: epoch \d+, step (\d+)", text)
    resumed_step = int(resumed.group(1)) if resumed else None
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    return {"exit_code": proc.returncode, "signal_to_checkpoint_s": entry["signal_to_checkpoint_s"],
            "checkpoint_save_s": entry["save_s"], "checkpoint_step": entry["global_step"],
            "step_in_epoch": entry["step_in_epoch"], "resumed_from_step": resumed_step,
            "steps_lost": entry["global_step"] - resumed_step if resumed_step is not None else None,
            "final_step": summary.get("step"), "expected_final_step": 2 * SLURM_STEPS,
            "signal_to_requeue_s": requeued - signalled if requeued else None,
            "requeue_wait_s": running_again - requeued if requeued and running_again else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", choices=["slurm_preemption"], help="run one part and replace only its key in "
                                                                     "the existing results")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.only == "slurm_preemption":
        path = RESULTS / "resilience.json"
        results = json.loads(path.read_text()) if path.exists() else {}
        results["slurm_preemption"] = slurm_preemption(args.rounds)
        save("resilience", results)
        return
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
        "lost_rank": rows["lost_rank"],
        "slurm_preemption": slurm_preemption(args.rounds)})


if __name__ == "__main__":
    main()
