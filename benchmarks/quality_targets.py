"""Issue targets: held-out WT Dice of the 2D model (>= 0.90) and the 3D model at 64^3 crops
(>= 0.85) on the synthetic default data, each trained on this CPU within 20 minutes.

Usage: python benchmarks/quality_targets.py [2d] [3d]   -> benchmarks/results/quality_<model>.json
"""
from __future__ import annotations

import json
import sys

from common import CLI, ROOT, RESULTS, save, timed

DATA = ROOT / "data"
PLAN = {
    "2d": {"synth": ["synth", "--format", "brats", "--out", DATA / "raw/MICCAI_BraTS_2019_Data_Training",
                     "--cases", "20", "--seed", "0"],
           "prepare": ["prepare", "--format", "brats", "--src", DATA / "raw/MICCAI_BraTS_2019_Data_Training",
                       "--out", DATA / "brats_slices.h5"],
           "train": ["--model", "2d", "--epochs", "5", "--batch-size", "16", "--set", "train.steps_per_epoch=40",
                     "--set", "train.validation_steps=10"]},
    "3d": {"synth": ["synth", "--format", "decathlon", "--out", DATA / "raw/Task01_BrainTumour", "--cases", "20",
                     "--seed", "0"],
           "prepare": ["prepare", "--format", "decathlon", "--src", DATA / "raw/Task01_BrainTumour",
                       "--out", DATA / "cache/decathlon"],
           "train": ["--model", "3d", "--epochs", "10", "--batch-size", "2", "--set", "train.steps_per_epoch=30",
                     "--set", "train.validation_steps=5", "--set", "data.crop_size=[64,64,64]"]},
}


def run(model: str) -> None:
    plan = PLAN[model]
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = RESULTS / f"quality_{model}.log"
    result = {"model": model}
    out_dir = plan["synth"][plan["synth"].index("--out") + 1]
    if not out_dir.exists():
        result["synth_s"] = timed(CLI + plan["synth"] + ["--quiet"], log)
    if model == "2d" and not (DATA / "brats_slices.h5").exists() or model == "3d" and not (
            DATA / "decathlon.split.json").exists():
        result["prepare_s"] = timed(CLI + plan["prepare"] + ["--quiet"], log)
    run_flags = ["--run-name", f"quality_{model}", "--set", "train.run_dir=runs"]
    # evaluate takes the model/data settings, not the training-only flags (--epochs, --batch-size)
    model_flags = [f for i, f in enumerate(plan["train"]) if f not in ("--epochs", "--batch-size")
                   and plan["train"][i - 1] not in ("--epochs", "--batch-size")]
    run_path = ROOT / "runs" / f"quality_{model}"
    if not (run_path / "summary.json").exists():  # a finished run is evaluated, not retrained
        result["train_s"] = timed(CLI + ["train"] + plan["train"] + run_flags, log)
    result["evaluate_s"] = timed(CLI + ["evaluate"] + model_flags + run_flags + ["--quiet", "--no-predictions"], log)
    summary = json.loads((run_path / "evaluation" / "summary.json").read_text())
    history = json.loads((run_path / "history.json").read_text())["epochs"]
    result["sum_of_epoch_wall_s"] = sum(e["epoch_seconds"] for e in history)
    result.update({"train_minutes": result.get("train_s", result["sum_of_epoch_wall_s"]) / 60,
                   "test_cases": summary["cases"],
                   "test_dice": summary["dice"], "test_hd95": summary["hd95"],
                   "steps": history[-1]["step"], "final_val_dice": history[-1].get("val_dice"),
                   "images_per_sec_last_epoch": history[-1].get("images_per_sec")})
    save(f"quality_{model}", result)


if __name__ == "__main__":
    for name in sys.argv[1:] or ["2d", "3d"]:
        run(name)
