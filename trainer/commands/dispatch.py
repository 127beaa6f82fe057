"""Run one command by name; errors become one line and an exit code.

The console entry (``trainer.cli``) and the Slurm task's runner (``trainer.commands.slurm_role``)
both come here. A command's module is imported when that command runs, so each command loads
only what it needs, and TensorFlow only after the command has applied its CPU settings.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Callable

from trainer.errors import InfrastructureError, UserError

# command -> (module in trainer.commands, function taking the parsed arguments)
HANDLERS = {"config": ("config", "cmd_config"), "synth": ("synth", "cmd_synth"),
            "prepare": ("prepare", "cmd_prepare"), "plan": ("plan", "cmd_plan"), "train": ("train", "cmd_train"),
            "ps": ("roles", "cmd_server_role"), "worker": ("roles", "cmd_server_role"),
            "chief": ("roles", "cmd_chief"),
            "distributed": ("distributed", "cmd_distributed"), "doctor": ("distributed", "cmd_doctor"),
            "slurm-task": ("distributed", "cmd_slurm_task"), "manifests": ("manifests", "cmd_manifests"),
            "evaluate": ("evaluate", "cmd_evaluate"), "evaluate-folder": ("evaluate_folder", "cmd_evaluate_folder"),
            "predict": ("predict", "cmd_predict"),
            "export": ("export", "cmd_export"), "benchmark": ("benchmark", "cmd_benchmark")}


def handler(command: str) -> Callable[[argparse.Namespace], int]:
    module, function = HANDLERS[command]
    return getattr(importlib.import_module(f"trainer.commands.{module}"), function)


def dispatch(args: argparse.Namespace) -> int:
    """Run ``args.command``; its exit code, or a one-line error and the error's exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(handler(args.command)(args) or 0)
    except (UserError, InfrastructureError) as exc:
        print(f"unet-train {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # permission denied, disk full, unwritable --out: the user's to fix
        logging.getLogger(__name__).debug("OSError", exc_info=True)
        print(f"unet-train {args.command}: error: {_os_error_text(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"unet-train {args.command}: interrupted", file=sys.stderr)
        return 130


def _os_error_text(exc: OSError) -> str:
    """``<file>: <reason>`` on one line (the reason alone when the OS named no file)."""
    def name(value) -> str:
        return os.fsdecode(value) if isinstance(value, (str, bytes, os.PathLike)) else str(value)

    reason = exc.strerror or str(exc)
    if exc.filename is not None:
        names = name(exc.filename) + ("" if exc.filename2 is None else f" -> {name(exc.filename2)}")
        reason = f"{names}: {reason}"
    return " ".join(reason.split())
