"""``unet-train synth``: a synthetic dataset in a real layout (BraTS, Decathlon, nnU-Net raw)."""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from trainer.commands.args import SYNTH_SIZE_ENV, parse_shape3
from trainer.commands.settings import load_cli_settings
from trainer.data.synth.phantom import REAL_SHAPE
from trainer.data.synth.writers import WRITERS, SynthRequest
from trainer.errors import UserError


def default_size(environ: Mapping[str, str] = os.environ) -> tuple[int, int, int]:
    """``--size``'s default: $UNET_TRAIN_SYNTH_SIZE (X,Y,Z) where set and not empty, else the real
    240 x 240 x 155. A malformed value is refused naming the variable."""
    text = environ.get(SYNTH_SIZE_ENV, "").strip()
    if not text:
        return REAL_SHAPE
    try:
        return parse_shape3(text)
    except argparse.ArgumentTypeError as error:
        raise UserError(f"{SYNTH_SIZE_ENV}: {error}") from None


def cmd_synth(args: argparse.Namespace) -> int:
    load_cli_settings(args)  # validate settings even though synth needs none of them
    request = SynthRequest(out=args.out, cases=args.cases, seed=args.seed, shape=args.size or default_size(),
                           test_cases=args.test_cases, appledouble=not args.no_appledouble,
                           workers=args.workers, overwrite=args.overwrite, difficulty=args.difficulty)
    out = WRITERS[args.format](request, progress=not args.quiet)
    print(f"wrote {args.cases} {args.format} case(s) to {out}")
    return 0
