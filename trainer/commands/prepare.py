"""``unet-train prepare``: a raw dataset (either layout) into a prepared dataset folder."""
from __future__ import annotations

import argparse

from trainer.commands.settings import load_cli_settings
from trainer.data.prepare import PrepareChoice, prepare


def cmd_prepare(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args)
    choice = PrepareChoice(src=args.src, out=args.out, layout=args.format, model=args.model or None,
                           workers=args.workers, overwrite=args.overwrite)
    print(prepare(settings, choice, progress=not args.quiet))
    return 0
