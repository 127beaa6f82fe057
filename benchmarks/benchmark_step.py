"""`unet-train benchmark` (the real training step) single and under `horovodrun -np 2`, next to the
old benchmark (train_on_batch on a separately built model, no runtime, no input pipeline), in one
run: one configuration per process, the three alternated, repeated.

The old benchmark runs from a checkout of the commit before the one-loop refactor, given with
--old-checkout (e.g. `git worktree add /tmp/old 9e23545`; it needs a `.venv` link to this one's).
Both sides time the same model (2D, base 32, 128x128x4, no normalisation layers, as the old
default) at global batch 16; the new side also times today's default model (instance norm).

Usage: python benchmarks/benchmark_step.py --old-checkout /tmp/old [--rounds 2]
       -> benchmarks/results/benchmark_step.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from common import CLI, HOROVODRUN, RESULTS, default_data_flags, save, timed

BATCH, STEPS, WARMUP = 16, 10, 3
SAME_MODEL = ["--set", "model.norm_2d=none"]


def configs(old: Path) -> dict[str, tuple[list, dict]]:
    bench = ["benchmark", "--model", "2d", "--steps", str(STEPS), "--warmup", str(WARMUP)]
    new = bench + [*default_data_flags("2d"), "--mode", "train", "--mode", "train_in_memory"]
    return {
        "old_train_on_batch": ([sys.executable, "-m", "trainer.cli", *bench, "--mode", "train", "--batch-size",
                                str(BATCH)], {"cwd": old}),
        "new_single": ([*CLI, *new, "--batch-size", str(BATCH), *SAME_MODEL], {}),
        "new_horovod_2_ranks": ([HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", *CLI, *new, "--dist",
                                 "horovod", "--batch-size", str(BATCH // 2), *SAME_MODEL], {}),
        "new_single_default_model": ([*CLI, *new, "--batch-size", str(BATCH)], {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-checkout", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for name, (cmd, where) in configs(args.old_checkout.resolve()).items():
            out = RESULTS / f"benchmark_step_{name}_{round_}.json"
            if "cwd" in where:  # the old checkout, with its own settings.yaml and package
                timed([*cmd, "--out", out], RESULTS / "benchmark_step.log", cwd=where["cwd"],
                      PYTHONPATH=str(where["cwd"]))
            else:
                timed([*cmd, "--out", out], RESULTS / "benchmark_step.log")
            runs.setdefault(name, []).append(json.loads(out.read_text()))
    summary = {}
    for name, reports in runs.items():
        row = {"images_per_sec": [r["train"]["images_per_sec"] for r in reports]}
        if "input_wait_share" in reports[0]["train"]:
            row.update({"p50_ms": [r["train"]["p50_ms"] for r in reports], "p90_ms": [r["train"]["p90_ms"] for r in reports],
                        "p99_ms": [r["train"]["p99_ms"] for r in reports],
                        "input_wait_share": [r["train"]["input_wait_share"] for r in reports],
                        "share_of_nominal_peak": [r["train"]["share_of_nominal_peak"] for r in reports],
                        "per_worker": [r["train"]["images_per_sec_per_worker"] for r in reports],
                        "in_memory_images_per_sec": [r["train_in_memory"]["images_per_sec"] for r in reports]})
        row["median_images_per_sec"] = statistics.median(row["images_per_sec"])
        summary[name] = row
    base = summary["old_train_on_batch"]["median_images_per_sec"]
    ratios = {f"{name}_vs_old": row["median_images_per_sec"] / base for name, row in summary.items()
              if name != "old_train_on_batch"}
    save("benchmark_step", {"global_batch": BATCH, "steps": STEPS, "warmup": WARMUP, "rounds": args.rounds,
                            "nominal_peak": runs["new_single"][0]["nominal_peak"], "rows": summary,
                            "ratios": ratios})


if __name__ == "__main__":
    main()
