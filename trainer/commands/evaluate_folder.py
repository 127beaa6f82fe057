"""``unet-train evaluate-folder PRED GT``: evaluate's metrics for any folder of label maps
(nnU-Net's ``nnUNetv2_evaluate_folder``), per-case CSV and summary JSON."""
from __future__ import annotations

import argparse
import json

from trainer.commands.settings import load_cli_settings


def cmd_evaluate_folder(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args)
    from trainer.hardware.cpu import apply_cpu_environment, configure_threads
    from trainer.inference.score_folder import plan_evaluation, run_evaluation

    threads = apply_cpu_environment(settings.cpu)
    regions = None if args.regions is None else tuple(r.strip().lower() for r in args.regions.split(","))
    plan = plan_evaluation(args.predictions, args.references, args.out, args.labels, regions, args.allow_missing,
                           settings.data.max_voxels)  # every input checked before TensorFlow loads
    configure_threads(threads)
    summary = run_evaluation(plan, progress=not args.quiet)
    print(json.dumps({k: summary[k] for k in ("cases", "dice", "hd95")}, indent=1))
    print(f"evaluated {plan.describe()}; per-case metrics: {plan.out / 'per_case.csv'}; "
          f"summary: {plan.out / 'summary.json'}")
    return 0
