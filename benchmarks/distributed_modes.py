"""Issues 4 and 5 figures, one run, equal global batch: single process (2 threads) vs
Horovod 2 ranks (1 thread each, Gloo) vs parameter server (1 PS + 2 workers, 1 thread
each); steady-state step time and images/s (second epoch), bytes moved per step on
loopback, and Horovod's allreduce time per step for the 2D and 3D models.

Needs the 2D synthetic default, data/prepared/brats-default (run_all.py makes it). Usage:
    python benchmarks/distributed_modes.py -> benchmarks/results/distributed_modes.json
"""
from __future__ import annotations

import json
import subprocess
import sys

from common import CLI, HOROVODRUN, ROOT, RESULTS, default_data_flags, env, ps_job, save, timed

GLOBAL_BATCH, STEPS = 8, 8
COMMON = ["--model", "2d", *default_data_flags("2d"), "--epochs", "2", "--set", f"train.steps_per_epoch={STEPS}", "--set",
          "train.validation_steps=1", "--set", "train.image_every_epochs=0", "--set", "train.run_dir=runs/bench",
          "--quiet"]
ONE_THREAD = ["--set", "cpu.intra_op_threads=1"]  # compute threads; inter-op stays at its default 2


def loopback_bytes() -> int:
    """Bytes sent over loopback (received bytes are the same bytes again: count one direction)."""
    for line in open("/proc/net/dev"):
        if line.strip().startswith("lo:"):
            return int(line.split(":", 1)[1].split()[8])
    return 0


def steady(run: str) -> dict:
    history = json.loads((ROOT / "runs" / "bench" / run / "history.json").read_text())["epochs"]
    last = history[-1]
    return {"images_per_sec": last["images_per_sec"], "step_s": GLOBAL_BATCH / last["images_per_sec"]}


def measure(name: str, cmd_or_fn) -> dict:
    subprocess.run(["rm", "-rf", str(ROOT / "runs" / "bench" / name)], check=True)
    before = loopback_bytes()
    wall = cmd_or_fn() if callable(cmd_or_fn) else timed(cmd_or_fn, RESULTS / "distributed_modes.log")
    moved = loopback_bytes() - before
    # Whole-run traffic (start-up, rendezvous, validation included) over the run's training steps:
    # an upper bound for the per-step traffic; see analytic_bytes_per_step for the gradient exchange.
    return {**steady(name), "wall_s": wall, "loopback_bytes_per_step_upper_bound": moved / (2 * STEPS)}


def ps_run() -> float:
    return ps_job(["--run-name", "ps", "--batch-size", str(GLOBAL_BATCH // 2)] + COMMON, ONE_THREAD,
                  RESULTS / "distributed_modes.log")


def result_params_bytes() -> int:
    """float32 bytes of the 2D model's trainable weights (= one gradient)."""
    out = subprocess.run([sys.executable, "-c", "from trainer.models import UNet2D; from trainer.config.settings "
                          "import ModelSettings; import numpy as np; m = UNet2D(ModelSettings(), 4); "
                          "print(sum(int(np.prod(v.shape)) for v in m.trainable_variables) * 4)"],
                         cwd=ROOT, env=env(), capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"global_batch": GLOBAL_BATCH, "steps_per_epoch": STEPS, "model": "2d, 32 base filters, 128x128x4"}
    result["single_2_threads"] = measure("single", CLI + ["train", "--run-name", "single", "--batch-size",
                                                           str(GLOBAL_BATCH), "--set", "cpu.intra_op_threads=2"] + COMMON)
    result["horovod_2_ranks"] = measure("hvd", [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo"] + CLI + [
        "train", "--dist", "horovod", "--run-name", "hvd", "--batch-size", str(GLOBAL_BATCH // 2)] + COMMON + ONE_THREAD)
    result["ps_1ps_2workers"] = measure("ps", ps_run)
    base = result["single_2_threads"]["step_s"]
    result["horovod_step_time_ratio_vs_single"] = result["horovod_2_ranks"]["step_s"] / base
    result["ps_step_time_ratio_vs_single"] = result["ps_1ps_2workers"]["step_s"] / base
    result["ps_step_time_ratio_vs_horovod"] = result["ps_1ps_2workers"]["step_s"] / result["horovod_2_ranks"]["step_s"]
    gradient_bytes = result_params_bytes()
    # Ring allreduce: each of N ranks sends 2 (N-1)/N x G. PS (sync): each worker reads the weights
    # (G) and writes its gradient slot (G); the average and update stay on the PS.
    result["analytic_bytes_per_step"] = {"gradient_bytes_G": gradient_bytes,
                                         "horovod_ring_2_ranks_total": 2 * 2 * (2 - 1) / 2 * gradient_bytes,
                                         "ps_2_workers_total": 2 * 2 * gradient_bytes}
    allreduce = RESULTS / "allreduce_time.json"
    timed([HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable,
           str(ROOT / "benchmarks" / "allreduce_time.py"), allreduce], RESULTS / "distributed_modes.log")
    result["allreduce"] = json.loads(allreduce.read_text())
    result["allreduce_share_of_horovod_step_2d"] = (result["allreduce"]["2d"]["allreduce_ms_median"] / 1000
                                                    / result["horovod_2_ranks"]["step_s"])
    save("distributed_modes", result)


if __name__ == "__main__":
    main()
