"""``unet-train predict``: label maps for new cases (``-i FOLDER`` or case paths) with a run's model."""
from __future__ import annotations

import argparse

from trainer.commands.settings import start_inference, window_options
from trainer.errors import UserError


def cmd_predict(args: argparse.Namespace) -> int:
    if args.out is None:
        raise UserError("-o/--out: required (the output folder)")
    if bool(args.input_folder) == bool(args.inputs):
        raise UserError("expected either -i FOLDER or case paths, not both" if args.inputs
                        else "expected cases: -i FOLDER, or case folders / NIfTI files as arguments")
    if args.disable_tta:
        args.overrides += ["model.mirror_axes_2d=[]", "model.mirror_axes_3d=[]"]
    settings = start_inference(args)
    from trainer.inference.inputs import case_from_path, cases_in_folder  # after the CPU settings
    from trainer.inference.predict import PredictOptions, predict_cases

    cases = cases_in_folder(args.input_folder) if args.input_folder else [case_from_path(p) for p in args.inputs]
    options = PredictOptions(out=args.out, nnunet_names=args.input_folder is not None,
                             png=args.png or not args.input_folder, save_probabilities=args.save_probabilities,
                             resume=args.resume, progress=not args.quiet, input_folder=args.input_folder)
    report = predict_cases(settings, cases, options, **window_options(args))
    for path in report.written:
        print(path)
    print(report.closing_line())
    return 0
