"""How good is ``unet-train plan``? Predicted against measured peak memory, speed, and the choice
of ranks x threads, on this machine. One configuration per process (``unet-train benchmark
--mode train``: the real training step and input pipeline), so no run inherits another's memory.

    python benchmarks/plan_accuracy.py [--data DIR] [--out benchmarks/results/plan_accuracy.json]
    python benchmarks/plan_accuracy.py --fit      # the memory constants, from other configurations

DIR (default data/plan) holds a Decathlon-layout set of 6 full-size cases (DIR/Task01_BrainTumour)
and its prepared dataset folder (DIR/prepared: 3D volumes and 2D slices, one split); both are made
on the first run (``synth --format decathlon``, ``prepare`` for 3D and for 2D).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("UNET_BENCH_RESULTS") or ROOT / "benchmarks" / "results").resolve()
sys.path.insert(0, str(ROOT))

from trainer.config.loader import load_settings  # noqa: E402
from trainer.config.settings import ModelSettings  # noqa: E402
from trainer.commands import calibration  # noqa: E402
from trainer.planning.memory import ModelShape, predict_peak, unet_tensors  # noqa: E402

# (kind, edge, batch): the targets, and the configurations the constants are fitted on
TARGETS = [("2d", 128, 16), ("3d", 64, 2), ("3d", 128, 1), ("3d", 144, 1)]
FIT = [("2d", 128, 4), ("2d", 128, 32), ("3d", 48, 2), ("3d", 96, 1), ("3d", 112, 2)]
PRECISIONS = ("fp32", "bf16")


def measure(data: Path, kind: str, edge: int, batch: int, precision: str, steps: int, extra=(),
            ranks: int = 1, warmup: int = 2) -> dict:
    """One benchmark process (or ``ranks`` under horovodrun): the chief's peak RSS and the images/s."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "b.json"
        command = [sys.executable, "-m", "trainer.cli", "benchmark", "--model", kind, "--mode", "train",
                   "--steps", str(steps), "--warmup", str(warmup), "--batch-size", str(batch), "--out", str(out),
                   "--data", str(prepared_folder(data)), "--set", f"train.precision={precision}",
                   "--set", f"data.crop_size=[{edge},{edge},{edge}]", "--set",
                   f"train.steps_per_epoch={calibration.STEADY_STEPS_PER_EPOCH}", "--quiet", *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
        if ranks > 1:
            command = [str(Path(sys.executable).parent / "horovodrun"), "-np", str(ranks), "-H",
                       f"localhost:{ranks}", "--gloo", *command]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=3600)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command)}\n{result.stderr[-3000:]}")
        report = json.loads(out.read_text())
    return {"peak_rss_mib": report["peak_rss_mib_per_worker"][0], "peak_anon_mib": report["peak_anon_mib_per_worker"][0],
            "images_per_sec": report["train"]["images_per_sec"],
            "sustained_images_per_sec": report["train"]["sustained_images_per_sec"],
            "seconds": time.perf_counter() - started}


def prepared_folder(data: Path) -> Path:
    """The prepared dataset folder of ``data`` (3D volumes and 2D slices side by side, one split)."""
    return data / "prepared"


def ensure_data(data: Path) -> None:
    """6 full-size synthetic Decathlon cases, prepared as 3D volumes and as 2D slices into one
    dataset folder (made once)."""
    from trainer.data.prepared import PreparedDataset
    from trainer.errors import DataError

    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    cli = [sys.executable, "-m", "trainer.cli"]
    raw, prepared = data / "Task01_BrainTumour", prepared_folder(data)
    if not raw.exists():
        subprocess.run([*cli, "synth", "--format", "decathlon", "--out", str(raw), "--cases", "6", "--test-cases",
                        "0", "--quiet"], check=True, env=env, cwd=str(ROOT), timeout=3600)
    for model in ("3d", "2d"):
        try:
            done = model in PreparedDataset.open(prepared).prepared_for()
        except DataError:
            done = False
        if not done:
            subprocess.run([*cli, "prepare", "--src", str(raw), "--model", model, "--out", str(prepared), "--quiet"],
                           check=True, env=env, cwd=str(ROOT), timeout=3600)


def shape(kind: str, edge: int, batch: int, precision: str) -> ModelShape:
    spatial = (edge, edge) if kind == "2d" else (edge,) * 3
    return ModelShape(kind, spatial, 4, 1, batch, ModelSettings(), precision)


def fit(data: Path, steps: int) -> dict:
    """Least squares: peak - 16 x params - pipeline = base[kind] + k[kind, precision] x activation bytes."""
    rows = []
    for kind, edge, batch in FIT:
        for precision in PRECISIONS:
            found = measure(data, kind, edge, batch, precision, steps)
            s = shape(kind, edge, batch, precision)
            estimate = predict_peak(s)
            elements, _ = unet_tensors(s)
            activation_mib = elements * (4 if precision == "fp32" else 2) * batch / 2 ** 20
            rows.append({"kind": kind, "edge": edge, "batch": batch, "precision": precision, **found,
                         "activation_mib": activation_mib,
                         "rest_mib": found["peak_anon_mib"] - estimate.parameters_mib - estimate.pipeline_mib})
            print(json.dumps(rows[-1]), flush=True)
    constants = {"base_mib": {}, "activation_factor": {}}
    for kind in ("2d", "3d"):
        mine = [r for r in rows if r["kind"] == kind]
        # one base per kind, one factor per (kind, precision): columns [1, a_fp32, a_bf16]
        matrix = np.array([[1.0, r["activation_mib"] * (r["precision"] == "fp32"),
                            r["activation_mib"] * (r["precision"] == "bf16")] for r in mine])
        solution, *_ = np.linalg.lstsq(matrix, np.array([r["rest_mib"] for r in mine]), rcond=None)
        constants["base_mib"][kind] = round(float(solution[0]), 1)
        constants["activation_factor"][f"{kind},fp32"] = round(float(solution[1]), 3)
        constants["activation_factor"][f"{kind},bf16"] = round(float(solution[2]), 3)
    return {"fitted_on": rows, "constants": constants}


def accuracy(data: Path, steps: int, calibration_steps: int) -> dict:
    """Each target: predicted peak and the plan's calibration (a few seconds on 4 cases prepared in
    scratch) against a longer run of the real training step on the prepared set, sustained images/s."""
    rows = []
    for kind, edge, batch in TARGETS:
        for precision in PRECISIONS:
            found = measure(data, kind, edge, batch, precision, steps)
            predicted = predict_peak(shape(kind, edge, batch, precision)).total_mib
            settings = load_settings(None, [f"train.model={kind}", f"train.precision={precision}",
                                            f"data.crop_size=[{edge},{edge},{edge}]"])
            calibrated = calibration.predict_speed(settings, data / "Task01_BrainTumour", batch,
                                                   steps=calibration_steps)
            rows.append({"kind": kind, "edge": edge, "batch": batch, "precision": precision,
                         "predicted_peak_mib": round(predicted, 1), "measured_peak_mib": round(found["peak_anon_mib"], 1),
                         "measured_peak_rss_mib": round(found["peak_rss_mib"], 1),
                         "peak_error": round(predicted / found["peak_anon_mib"] - 1, 4),
                         "predicted_images_per_sec": round(calibrated["images_per_sec"], 4),
                         "calibration_steps": calibrated["timed_steps"],
                         "calibration_s": round(calibrated["seconds"], 1),
                         "measured_images_per_sec": round(found["sustained_images_per_sec"], 4),
                         "measured_steps": steps,
                         "speed_error": round(calibrated["images_per_sec"] / found["sustained_images_per_sec"] - 1, 4)})
            print(json.dumps(rows[-1]), flush=True)
    return {"memory_and_speed": rows, "worst_peak_error": max(abs(r["peak_error"]) for r in rows),
            "worst_speed_error": max(abs(r["speed_error"]) for r in rows)}


def ranks_grid(data: Path, steps: int) -> dict:
    """The plan's ranks x threads for this node against every split of its cores (2D 128^2, 16 a rank)."""
    from trainer.planning.node import probe_node
    from trainer.planning.planner import make_plan
    from trainer.planning.fingerprint import DatasetFingerprint

    node = probe_node()
    cores = node.physical_cores
    stub = DatasetFingerprint("", "brats", 1, 1, {}, {}, {a: [0, 128, 0] for a in "xyz"}, {}, [], {})
    plan = make_plan(load_settings(None, []), stub, node, "2d")
    chosen = (plan.ranks_per_node, next(c.value for c in plan.choices if c.key == "cpu.intra_op_threads"))
    precision = next(c.value for c in plan.choices if c.key == "train.precision")
    grid = []
    for ranks in sorted({r for r in range(1, cores + 1) if cores % r == 0}):
        threads = cores // ranks
        extra = ["--set", f"cpu.intra_op_threads={threads}"]
        if ranks == 1:
            found = measure(data, "2d", 128, 16, precision, steps, extra)
        else:
            found = measure(data, "2d", 128, 16, precision, steps, ["--dist", "horovod", *extra], ranks=ranks)
        grid.append({"ranks": ranks, "threads": threads, "images_per_sec": round(found["sustained_images_per_sec"], 3)})
        print(json.dumps(grid[-1]), flush=True)
    best = max(grid, key=lambda g: g["images_per_sec"])
    planned = next(g for g in grid if (g["ranks"], g["threads"]) == chosen)
    return {"grid": grid, "planned": planned, "best": best,
            "planned_to_best": round(planned["images_per_sec"] / best["images_per_sec"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "plan",
                        help="folder of the raw cases and their prepared dataset (default data/plan)")
    parser.add_argument("--fit", action="store_true", help="fit the memory constants (other configurations)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps of each measured configuration")
    parser.add_argument("--calibration-steps", type=int, default=3, help="the plan's minimum of timed steps")
    parser.add_argument("--quick", action="store_true", help="2 steps")
    parser.add_argument("--out", type=Path, default=RESULTS / "plan_accuracy.json")
    args = parser.parse_args()
    steps = 2 if args.quick else args.steps
    args.data = args.data.absolute()  # each measurement runs in a scratch folder
    ensure_data(args.data)
    report = fit(args.data, steps) if args.fit else {**accuracy(args.data, steps, args.calibration_steps), "ranks_x_threads":
                                                      ranks_grid(args.data, steps)}
    out = args.out.with_name("plan_fit.json") if args.fit else args.out
    from trainer.fsutil import write_json

    write_json(out, {"host_cpu": _cpu(), **report})
    print(f"wrote {out}")


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
