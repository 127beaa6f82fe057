"""Held-out quality as a distribution: seeds x oneDNN ISA paths x execution modes.

Every run trains through the CLI in its own process(es) on the synthetic default data
(20 cases at the real 240x240x155, the demo's; prepared into data/prepared/brats-default for 2D,
data/prepared/decathlon-default for 3D, and every run gets --data), then `unet-train evaluate` scores the
held-out test split on full volumes. Per configuration the JSON holds every run (test Dice
per case and region, HD95, the logged best validation Dice and its gap to the test Dice,
wall time) and the summary: mean and min per (mode, ISA), and for distributed modes the
difference of means against single with its seed-to-seed spread.

ISA paths: "native" is oneDNN's choice on this CPU; "avx2" sets ONEDNN_MAX_CPU_ISA=AVX2,
which reproduces an AVX2-only CPU's kernels (and rounding).

Precision is settings.yaml's (`auto`: bf16 where the CPU has it natively), recorded per run; pin it
with --set train.precision=fp32|bf16 to compare the two.

Usage (results land in benchmarks/results/quality_<tag>.json; finished runs are reused):
    python benchmarks/quality_targets.py --model 2d --seeds 1,2,3 --isas native,avx2 --set train.precision=fp32
    python benchmarks/quality_targets.py --model 2d --seeds 1,2 --isas native --tag bf16_2d --set train.precision=bf16
    python benchmarks/quality_targets.py --model 2d --seeds 1,2,3 --modes single,horovod,ps --tag dist2d
    python benchmarks/quality_targets.py --model 3d --seeds 1,2 --isas native,avx2
    python benchmarks/quality_targets.py --model 2d --seeds 1,2 --isas native --regions wt,tc,et --epochs 10 \
        --tag regions2d_e10
    python benchmarks/quality_targets.py --model 2d --difficulty hard --regions wt,tc,et --epochs 10 --seeds 1,2 \
        --isas native --tag hard_2d_k2 --set model.context_slices_2d=2
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from common import CLI, HOROVODRUN, ROOT, RESULTS, ensure_data, ensure_hard_data, ps_job, save, timed
from trainer.inference import postprocess

RUNS = ROOT / "runs" / "quality"
ISA_ENV = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"}}
# The demo's recipe (scripts/demo.sh) and the budgets: 2D 5 x 40 steps at batch 16,
# 3D 10 x 30 steps at batch 2 on 64^3 crops. Everything else is settings.yaml's default.
RECIPES = {
    "2d": {"epochs": 5, "steps": 40, "batch": 16, "extra": []},
    "3d": {"epochs": 10, "steps": 30, "batch": 2, "extra": ["--set", "data.crop_size=[64,64,64]"]},
}


def recipe_for(model: str, epochs: int | None, steps: int | None = None) -> dict:
    return {**RECIPES[model], "epochs": epochs or RECIPES[model]["epochs"], "steps": steps or RECIPES[model]["steps"]}


def run_one(model: str, mode: str, isa: str, seed: int, args, log) -> dict:
    """Train and evaluate one configuration (or reuse its finished result)."""
    name = f"{args.tag}_{mode}_{isa}_s{seed}"
    record = RUNS / f"{name}.result.json"
    previous = json.loads(record.read_text()) if record.exists() else None
    if previous and not args.reevaluate:
        return previous
    recipe = recipe_for(model, args.epochs, args.steps)
    workers = 1 if mode == "single" else 2
    model_flags = ["--model", model, "--run-dir", RUNS, "--run-name", name, *recipe["extra"],
                   "--set", f"model.regions=[{','.join(args.regions)}]", *args.data_flags, *args.set_flags]
    train_flags = [*model_flags, "--epochs", str(recipe["epochs"]), "--batch-size", str(recipe["batch"] // workers),
                   "--set", f"train.steps_per_epoch={recipe['steps']}", "--set", f"train.seed={seed}",
                   "--set", "train.scale_lr=false", "--quiet"]  # same global batch and LR in every mode
    isa_env = ISA_ENV[isa]
    if previous:  # --reevaluate: the trained run as it is, scored by today's evaluate
        train_s = previous["train_s"]
    else:
        train_s = train(mode, train_flags, log, isa_env)
    timed(CLI + ["evaluate", *model_flags, "--quiet", "--no-predictions"], log, **isa_env)
    result = collect(RUNS / name, name, mode, isa, seed, train_s)
    if previous:
        result["reevaluated"] = True
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
    return result


def train(mode: str, train_flags: list, log, isa_env: dict) -> float:
    """Train one run in its mode; its wall time in seconds."""
    started = time.perf_counter()
    if mode == "single":
        timed(CLI + ["train", *train_flags], log, **isa_env)
    elif mode == "horovod":
        timed([HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", *CLI, "train", "--dist", "horovod",
               *train_flags, "--set", "cpu.intra_op_threads=1"], log, **isa_env)
    else:
        ps_job(train_flags, ["--set", "cpu.intra_op_threads=1"], log, **isa_env)
    return time.perf_counter() - started


def collect(run_path, name: str, mode: str, isa: str, seed: int, train_s: float) -> dict:
    """One run's record: its held-out evaluation, and the validation figures of the post-processing
    that evaluation applied (postprocessing.json, decided on the whole validation volumes)."""
    summary = json.loads((run_path / "evaluation" / "summary.json").read_text())
    trained = json.loads((run_path / "summary.json").read_text())
    validation = postprocess.validation_figures(json.loads((run_path / "postprocessing.json").read_text()))
    history = json.loads((run_path / "history.json").read_text())["epochs"]
    regions = summary["regions"]
    per_region = {region: {key: summary[f"{key}_{region}"]["mean"] for key in ("dice", "hd95", "dice_raw", "hd95_raw")}
                  for region in regions} if len(regions) > 1 else None
    if per_region:
        for region in regions:
            per_region[region]["dice_min_case"] = summary[f"dice_{region}"]["min"]
            per_region[region]["val_minus_test"] = validation[f"dice_{region}"] - summary[f"dice_{region}"]["mean"]
    result = {"name": name, "mode": mode, "isa": isa, "seed": seed, "train_s": train_s,
              "epochs_seconds_sum": sum(e["epoch_seconds"] for e in history),
              "test_dice": summary["dice"]["mean"], "test_dice_min_case": summary["dice"]["min"],
              "test_hd95": summary["hd95"]["mean"], "test_dice_raw": summary["dice_raw"]["mean"],
              "test_hd95_raw": summary["hd95_raw"]["mean"], "regions": per_region,
              "postprocessing": summary["postprocessing"],
              "best_val_dice_per_epoch": trained["best_val_dice"], "best_epoch": trained["best_epoch"],
              "val_dice_full_volumes": validation["dice"], "val_dice_full_volumes_raw": validation["dice_raw"],
              "val_minus_test": validation["dice"] - summary["dice"]["mean"],
              "test_cases": summary["cases"], "val_cases": validation["cases"], "precision": trained["precision"]}
    return result


def summarise(runs: list[dict]) -> dict:
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(f"{run['mode']}/{run['isa']}", []).append(run)
        groups.setdefault(f"{run['mode']}/all", []).append(run)
    summary = {}
    for key, members in groups.items():
        dice = [r["test_dice"] for r in members]
        gaps = [r["val_minus_test"] for r in members]
        summary[key] = {"runs": len(members), "test_dice_mean": statistics.mean(dice), "test_dice_min": min(dice),
                        "test_dice_sd": statistics.stdev(dice) if len(dice) > 1 else 0.0,
                        "val_minus_test_mean": statistics.mean(gaps),
                        "val_minus_test_max_abs": max(abs(g) for g in gaps)}
        if members[0].get("regions"):
            summary[key]["per_region"] = per_region_summary(members)
    single = summary.get("single/all")
    for mode in ("horovod", "ps"):
        other = summary.get(f"{mode}/all")
        if single and other:
            summary[f"{mode}_minus_single"] = {
                "difference_of_means": other["test_dice_mean"] - single["test_dice_mean"],
                "seed_sd_single": single["test_dice_sd"], f"seed_sd_{mode}": other["test_dice_sd"]}
    return summary


def per_region_summary(members: list[dict]) -> dict:
    """Per region over the runs: held-out Dice mean and min (of run means, and the worst case),
    HD95 before and after the post-processing chosen on validation, and validation - test."""
    out = {}
    for region in members[0]["regions"]:
        rows = [m["regions"][region] for m in members]
        out[region] = {"test_dice_mean": statistics.mean(r["dice"] for r in rows),
                       "test_dice_min": min(r["dice"] for r in rows),
                       "test_dice_min_case": min(r["dice_min_case"] for r in rows),
                       "test_dice_raw_mean": statistics.mean(r["dice_raw"] for r in rows),
                       "hd95_raw_mean": statistics.mean(r["hd95_raw"] for r in rows),
                       "hd95_mean": statistics.mean(r["hd95"] for r in rows),
                       "val_minus_test": [r.get("val_minus_test") for r in rows],
                       "postprocessing": [m["postprocessing"][region] for m in members]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["2d", "3d"], default="2d")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--isas", default="native,avx2")
    parser.add_argument("--modes", default="single")
    parser.add_argument("--dist-isas", default=None, help="ISA paths for horovod/ps rows (default: --isas)")
    parser.add_argument("--regions", default="wt")
    parser.add_argument("--difficulty", choices=["standard", "hard"], default="standard",
                        help="hard: the hard phantom (synth --difficulty hard), one BraTS-layout set for both models")
    parser.add_argument("--epochs", type=int, default=None,
                        help="train longer than the demo's recipe (recorded in the JSON; use a new --tag)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per epoch (default the recipe's: 2D 40, 3D 30), e.g. 3D at 2D's training time")
    parser.add_argument("--tag", default=None, help="result name (default quality_<model>)")
    parser.add_argument("--reevaluate", action="store_true",
                        help="score finished runs again with today's evaluate and post-processing (no training)")
    parser.add_argument("--set", dest="set_flags", action="append", default=[],
                        help="extra --set KEY=VALUE for every run (e.g. train.precision=bf16)")
    args = parser.parse_args()
    args.tag = args.tag or args.model
    args.regions = args.regions.split(",")
    args.set_flags = [item for flag in args.set_flags for item in ("--set", flag)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = RESULTS / f"quality_{args.tag}.log"
    args.data_flags = ensure_hard_data(log) if args.difficulty == "hard" else ensure_data(args.model, log)
    def isas(mode: str) -> list[str]:
        return (args.dist_isas or args.isas).split(",") if mode != "single" else args.isas.split(",")

    runs = [run_one(args.model, mode, isa, int(seed), args, log)
            for mode in args.modes.split(",") for seed in args.seeds.split(",") for isa in isas(mode)]
    save(f"quality_{args.tag}", {"model": args.model, "difficulty": args.difficulty,
                                 "recipe": recipe_for(args.model, args.epochs, args.steps),
                                 "regions": args.regions,
                                 "extra_settings": args.set_flags, "runs": runs, "summary": summarise(runs)})


if __name__ == "__main__":
    main()
