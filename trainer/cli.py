"""``unet-train``: the one console command (``python -m trainer.cli`` runs it too).

It parses argv (the grammar: ``trainer.commands.args``) and dispatches to the command's module
in ``trainer.commands``, which turns errors into one-line messages and exit codes
(``trainer.commands.dispatch``). Everything else is a library.
"""
from __future__ import annotations

import sys
from typing import Sequence

from trainer.commands.args import build_parser
from trainer.commands.dispatch import dispatch


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
