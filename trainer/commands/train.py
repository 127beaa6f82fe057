"""``unet-train train``: a training run end to end: train, then the best checkpoint on the whole
validation volumes.

The second half decides the run's post-processing and writes ``runs/R/validation.json``, so
that ``predict`` right after ``train`` already applies it. When the raw volumes cannot be
reached, the run says so at its start, and at its end prints the command that decides it later:
nothing is skipped silently.
"""
from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.commands.settings import load_run_settings, pin_dataset, plan_flag
from trainer.data.prepared import raw_source
from trainer.errors import ConfigError, DataError, UserError
from trainer.fsutil import write_json
from trainer.hardware.cpu import local_ranks_from_environment
from trainer.hardware.precision import resolve_precision
from trainer.inference.postprocess import decide_command
from trainer.planning.memory import check_fits
from trainer.runtime.launch_env import check_launch

if TYPE_CHECKING:
    from trainer.config.settings import Settings
    from trainer.runtime.contract import Runtime

log = logging.getLogger(__name__)


def cmd_train(args: argparse.Namespace) -> int:
    settings = load_run_settings(args, plan_flag(args))
    check_launch(settings.train)  # before anything is written into runs/: a failed start leaves none
    settings = pin_dataset(settings)
    check_memory(settings)
    from trainer.runtime.start import start_runtime  # loads TensorFlow: after the settings, in start_runtime's order

    new_run = not settings.run_path.exists()
    runtime = start_runtime(settings)
    succeeded = False
    try:
        result = train_run(settings, runtime, progress=not args.quiet)
        succeeded = True
    except (ConfigError, DataError):  # settings or data the run cannot use; a diverged run keeps its log
        if new_run and runtime.is_chief:
            forget_failed_start(settings.run_path)
        raise
    finally:
        runtime.shutdown(succeeded)
    if runtime.is_chief:
        print(describe_result(result))
        line = validate_run(settings, result, progress=not args.quiet)
        if line:
            print(line)
    return 0


def forget_failed_start(run_path: Path) -> None:
    """A new run that a user error stopped before its first checkpoint (a validation budget that
    cannot cover the cases, data that do not fit the model...) leaves no folder behind: the error is
    on the console, and a half-made run would be resumed from nothing."""
    if any(run_path.glob("checkpoints/*/*.index")):
        return
    for handler in list(logging.getLogger().handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_path.absolute():
            logging.getLogger().removeHandler(handler)
            handler.close()
    shutil.rmtree(run_path, ignore_errors=True)


def unreachable_validation_source(settings: Settings) -> str | None:
    """One line when the end-of-training validation will not find the raw volumes, else None."""
    if not settings.train.validate_full_volumes:
        return None
    key, folder = raw_source(settings)
    if folder.is_dir():
        return None
    return (f"{key} = {folder}: raw volumes not found, so the end-of-training validation cannot decide the "
            f"post-processing; fix: prepare with --src DIR (recorded for later), or --set {key}=DIR, or "
            f"--set train.validate_full_volumes=false")


def describe_result(result) -> str:
    return (f"trained {result.epochs_run} epoch(s) (now at epoch {result.final_epoch}, step {result.step}); "
            f"best val Dice {result.best_val_dice:.4f} (case-level); run: {result.run_path}")


def train_run(settings: Settings, runtime: Runtime, progress: bool):
    """Train on ``runtime``; returns the TrainResult. Validation follows in :func:`validate_run`
    (on the chief alone, once the other processes may go)."""
    from trainer.training.loop import train  # loads TensorFlow (start_runtime has applied the CPU settings)

    if runtime.is_chief:
        problem = unreachable_validation_source(settings)
        if problem:
            log.warning("%s", problem)
    return train(settings, runtime, progress=progress)


def check_memory(settings: Settings) -> None:
    """Refuse, before the model or the data are built, a step that would not fit this node's memory
    with every local rank (trainer.planning.memory)."""
    precision = resolve_precision(settings.train.precision, settings.cpu.onednn).name
    estimate = check_fits(settings, precision, ranks=local_ranks_from_environment())
    log.info("memory: predicted peak %.2f GB per process", estimate.total_mib / 1024)


def validate_run(settings: Settings, result, progress: bool) -> str | None:
    """Chief, after training: the best checkpoint on the whole validation volumes. Returns the line
    to print (the figure, or why post-processing is undecided and the command that decides it)."""
    if not settings.train.validate_full_volumes:
        return None
    from trainer.inference.evaluate import validation_report  # loads TensorFlow

    path = settings.run_path / "validation.json"
    if result.epochs_run == 0 and path.exists():
        return None
    try:
        # OpenVINO in float32 where it is installed (the faster engine, parity checked by export;
        # figures stay those of the fp32 model on any CPU), else TensorFlow float32
        report = validation_report(settings, progress, engine="auto", precision="fp32")
    except UserError as exc:  # e.g. the raw volumes are not on this host: training itself succeeded
        message = (f"post-processing undecided: no full-volume validation ({exc}); once the raw volumes are "
                   f"reachable, decide it with: {decide_command(settings)}")
        log.warning("%s", message)
        return message
    if report is None:
        return None
    write_json(path, report)
    actions = ", ".join(f"{region}: {action}" for region, action in report["postprocessing"].items())
    message = (f"validation on {report['cases']} whole case(s), best checkpoint, {report['engine']}: "
               f"Dice {report['dice']:.4f} after post-processing ({actions}), {report['dice_raw']:.4f} before; {path}")
    log.info("%s", message)
    return message
