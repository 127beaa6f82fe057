"""``unet-train export``: a run's model as a SavedModel or an OpenVINO IR, checked against Keras."""
from __future__ import annotations

import argparse
from pathlib import Path

from trainer.commands.settings import start_inference


def cmd_export(args: argparse.Namespace) -> int:
    settings = start_inference(args)
    from trainer.inference.export import export  # after the CPU settings

    report = export(settings, args.format, args.out, overwrite=args.overwrite)
    if args.format == "savedmodel":
        print(f"SavedModel: {report['saved_model']} (max |export - keras| = {report['max_abs_diff']:.2e}); "
              f"report: {Path(report['saved_model']) / 'export.json'}")
        return 0
    checks = report["checks"]
    bf16 = checks["bf16"]
    bf16_text = (f"bf16: max |dp| {bf16['max_abs_diff']:.2e}, mask Dice {bf16['mask_dice']:.4f}"
                 if "skipped" not in bf16 else f"bf16 skipped: {bf16['skipped']}")
    print(f"OpenVINO IR: {report['openvino_ir']} (f32: max |dp| {checks['f32']['max_abs_diff']:.2e}; {bf16_text}); "
          f"report: {Path(report['openvino_ir']).parent / 'export.json'}")
    return 0
