"""``unet-train evaluate``: per-case metrics of a run on a split, predictions in source geometry."""
from __future__ import annotations

import argparse
import json

from trainer.commands.settings import start_inference, window_options


def cmd_evaluate(args: argparse.Namespace) -> int:
    settings = start_inference(args)
    from trainer.inference.evaluate import default_evaluation_folder, evaluate  # loads TensorFlow: after the CPU settings

    summary = evaluate(settings, args.split, args.limit, args.out, not args.no_predictions,
                       progress=not args.quiet, **window_options(args))
    out = args.out or default_evaluation_folder(settings, args.split)
    print(json.dumps({k: summary[k] for k in ("cases", "dice", "hd95")}, indent=1))
    print(f"per-case metrics: {out / 'per_case.csv'}; summary: {out / 'summary.json'}"
          + ("" if args.no_predictions else f"; predictions: {out / 'predictions'}"))
    return 0
