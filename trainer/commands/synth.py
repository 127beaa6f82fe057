"""``unet-train synth``: a synthetic dataset in the real BraTS / Decathlon layout."""
from __future__ import annotations

import argparse

from trainer.commands.settings import load_cli_settings
from trainer.data.synth.phantom import REAL_SHAPE
from trainer.data.synth.writers import SynthRequest, write_brats, write_decathlon


def cmd_synth(args: argparse.Namespace) -> int:
    load_cli_settings(args)  # validate settings even though synth needs none of them
    request = SynthRequest(out=args.out, cases=args.cases, seed=args.seed, shape=args.size or REAL_SHAPE,
                           test_cases=args.test_cases, appledouble=not args.no_appledouble,
                           workers=args.workers, overwrite=args.overwrite, difficulty=args.difficulty)
    writer = write_brats if args.format == "brats" else write_decathlon
    out = writer(request, progress=not args.quiet)
    print(f"wrote {args.cases} {args.format} case(s) to {out}")
    return 0
