"""A command's settings: settings.yaml < a plan (``train --plan``) < ``--set`` overrides < flags.

This is the only place that reads settings.yaml for a command (``trainer.config.loader`` parses
it). A command that works on a run also takes the run's own model and input keys (see
``trainer.commands.run_settings``). Library imports happen inside the functions: dispatching a
command loads only what that command needs.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from trainer.commands.args import DEFAULT_SETTINGS
from trainer.errors import UserError

RUN_FLAGS = {"data": "data.dataset", "model": "train.model", "run_name": "train.run_name", "run_dir": "train.run_dir",
             "dist": "train.dist", "epochs": "train.epochs", "batch_size": "train.batch_size",
             "learning_rate": "train.learning_rate", "elastic": "train.elastic"}


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, attr) for attr, key in RUN_FLAGS.items() if hasattr(args, attr)}


def load_cli_settings(args: argparse.Namespace, flags: dict[str, Any] | None = None):
    """settings.yaml < a plan (train --plan) < --set overrides < flags."""
    from trainer.config.loader import load_settings

    path = args.settings
    if path is None and DEFAULT_SETTINGS.is_file():
        path = DEFAULT_SETTINGS
    return load_settings(path, plan_overrides(args) + args.overrides, flags)


def plan_overrides(args: argparse.Namespace) -> list[str]:
    if getattr(args, "plan", None) is None:
        return []
    from trainer.planning.planner import load_plan

    return [f"{key}={json.dumps(value)}" for key, value in load_plan(args.plan).items()]


def plan_flag(args: argparse.Namespace) -> dict[str, Any]:
    """train --plan P records P (absolute) as train.plan, for runs/R/run.json."""
    plan = getattr(args, "plan", None)
    return {} if plan is None else {"train.plan": str(Path(plan).absolute())}


def load_run_settings(args: argparse.Namespace, extra: dict[str, Any] | None = None):
    """Settings for a command that works on a run: the run's own model and input keys from
    runs/R/settings.yaml, where it exists (see trainer.commands.run_settings)."""
    from trainer.commands.run_settings import Explicit, settings_for_run

    flags = {**flag_overrides(args), **(extra or {})}
    return settings_for_run(load_cli_settings(args, flags),
                            Explicit.from_cli(plan_overrides(args) + args.overrides, flags))


def start_inference(args: argparse.Namespace):
    """The run's settings, with this process's CPU settings applied (before TensorFlow loads)."""
    settings = load_run_settings(args)
    from trainer.hardware.cpu import apply_cpu_environment, configure_threads

    configure_threads(apply_cpu_environment(settings.cpu))
    return settings


def window_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sliding-window flags of evaluate and predict, checked."""
    if not 0.0 <= args.overlap < 0.95:
        raise UserError(f"--overlap: expected 0 <= overlap < 0.95, got {args.overlap}")
    return {"overlap": args.overlap, "blending": args.blending, "engine": args.engine,
            "precision": args.precision, "ir": args.ir}


def _check_plan_source(plan: Path, prepared) -> None:
    """A plan made from a raw --src names no prepared dataset: the one train found must come from
    the same raw folder (by the folder itself), or the plan's sizes were chosen for other data."""
    from trainer.fsutil import is_within
    from trainer.planning.planner import plan_source

    source = plan_source(plan)
    if source is None or not source.is_dir() or not prepared.source.is_dir():
        return
    if not (is_within(source, prepared.source) and is_within(prepared.source, source)):
        raise UserError(f"--plan {plan}: made for the data in {source}, but the prepared dataset {prepared.root} "
                        f"comes from {prepared.source}; pass --data with a dataset prepared from {source} "
                        f"(unet-train prepare --src {source})")


def pin_dataset(settings, check_model_data: bool = True):
    """``settings`` with data.dataset resolved to the prepared dataset folder, absolute (the one named,
    else the last one prepared here), checked to hold what the settings' model trains on; the log
    says which folder and how it was found. Called before anything is written into runs/."""
    import logging

    from trainer.config.kinds import kind_of
    from trainer.config.values import with_values
    from trainer.data.prepared import PreparedDataset, find_dataset

    folder, how = find_dataset(settings.data.dataset)
    prepared = PreparedDataset.open(folder)
    if settings.train.plan is not None:
        _check_plan_source(settings.train.plan, prepared)
    if check_model_data and kind_of(settings.train.model).slices:
        prepared.slices_file(settings.data.image_size)  # refuses, naming the prepare command, when absent
    logging.getLogger(__name__).info("dataset: %s", prepared.describe(how))
    return with_values(settings, {"data.dataset": str(folder)})
