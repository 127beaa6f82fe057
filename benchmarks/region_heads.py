"""The cost of the region heads: the real training step and inference of the whole-tumour model
against the WT/TC/ET model (three sigmoid outputs), 2D and 3D, one configuration per process,
alternated and repeated.

Usage: python benchmarks/region_heads.py [--rounds 2] -> benchmarks/results/region_heads.json
"""
from __future__ import annotations

import argparse
import json
import statistics

from common import CLI, RESULTS, ensure_data, save, timed

MODELS = {"2d": ["--batch-size", "16"], "3d": ["--batch-size", "2", "--set", "data.crop_size=[64,64,64]"]}
REGIONS = {"wt": "[wt]", "wt_tc_et": "[wt,tc,et]"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    data_flags = {model: ensure_data(model, RESULTS / "region_heads.log") for model in MODELS}
    rows: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for model, flags in MODELS.items():
            for name, regions in REGIONS.items():
                out = RESULTS / f"region_heads_{model}_{name}_{round_}.json"
                timed([*CLI, "benchmark", "--model", model, *data_flags[model], *flags, "--steps", "8", "--warmup", "2",
                       "--mode", "train_in_memory", "--mode", "infer", "--set", f"model.regions={regions}",
                       "--out", out], RESULTS / "region_heads.log")
                report = json.loads(out.read_text())
                rows.setdefault(f"{model}/{name}", []).append(
                    {"train_images_per_sec": report["train_in_memory"]["images_per_sec"],
                     "infer_images_per_sec": report["infer"]["images_per_sec_per_worker"][0],
                     "params": report["params"]})
    summary = {key: {"train_images_per_sec": statistics.median(r["train_images_per_sec"] for r in runs),
                     "infer_images_per_sec": statistics.median(r["infer_images_per_sec"] for r in runs),
                     "params": runs[0]["params"]} for key, runs in rows.items()}
    ratios = {f"{model}: regions / wt, {kind}": summary[f"{model}/wt_tc_et"][kind] / summary[f"{model}/wt"][kind]
              for model in MODELS for kind in ("train_images_per_sec", "infer_images_per_sec")}
    save("region_heads", {"rounds": args.rounds, "rows": summary, "ratios": ratios, "runs": rows})


if __name__ == "__main__":
    main()
