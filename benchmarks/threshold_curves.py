"""Held-out Dice against each region's threshold, on validation and on the test split, for finished runs.

Post-processing chooses a threshold on the validation cases (model.tune_thresholds_2d/_3d); this
shows whether the validation curve predicts the held-out one, which is what decides the default
per model kind. Per run, per split, per region: the mean Dice over the cases at every candidate
threshold with every component rule, and the rule validation would choose with its held-out
Dice next to the held-out Dice at model.threshold with no rule.

    python benchmarks/threshold_curves.py --runs hard_3d_e10x80_single_native_s1,hard_3d_e10x80_single_native_s2 \
        --out threshold_curves_hard_3d

Runs are folders of runs/quality/ (from quality_targets.py); each is predicted once per case (its
own settings, engine auto, the run's mirroring), nothing in the run is written.
"""
from __future__ import annotations

import argparse
import statistics

from common import ROOT, save

RUNS = ROOT / "runs" / "quality"


def curves(run_name: str) -> dict:
    from trainer.config.loader import load_settings
    from trainer.data.prepared import iter_cases, raw_dataset
    from trainer.inference import postprocess
    from trainer.inference.predictor import Predictor
    from trainer.data.regions import RegionSet

    settings = load_settings(RUNS / run_name / "settings.yaml")
    regions = RegionSet(settings.model.regions)
    thresholds = postprocess.candidate_thresholds(settings.model.threshold, True)
    predictor, checkpoint = Predictor.from_run(settings)
    dataset = raw_dataset(settings)
    scores: dict[str, list] = {}
    for split in ("val", "test"):
        _, cases = iter_cases(settings, split, None, dataset)
        scores[split] = [postprocess.score_case(regions.masks(case.labels), predictor.predict_channels(case.image),
                                                case.geometry.spacing, regions.names, thresholds)
                         for case in cases]
        print(f"{run_name}: {split} scored ({len(scores[split])} cases)", flush=True)
    out = {"checkpoint": checkpoint, "thresholds": list(thresholds), "regions": {}}
    for region in regions.names:
        table = {split: {f"{rule.threshold:g}|{rule.action}": statistics.mean(case[region][rule] for case in cases)
                         for rule in cases[0][region]} for split, cases in scores.items()}
        chosen, = postprocess.decide(scores["val"], [region], settings.model.threshold)
        key = f"{chosen.threshold:g}|{chosen.action}"
        default = f"{settings.model.threshold:g}|none"
        out["regions"][region] = {"mean_dice": table, "val_choice": key,
                                  "test_dice_at_val_choice": table["test"][key],
                                  "test_dice_at_default": table["test"][default],
                                  "val_dice_at_val_choice": table["val"][key],
                                  "val_dice_at_default": table["val"][default]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="comma-separated run names under runs/quality/")
    parser.add_argument("--out", default="threshold_curves", help="result name (results/<out>.json)")
    args = parser.parse_args()
    save(args.out, {"runs": {name: curves(name) for name in args.runs.split(",")}})


if __name__ == "__main__":
    main()
