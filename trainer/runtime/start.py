"""Start the runtime a command trains on, and the run's log file, from typed settings.

CPU settings go first: they must be in the environment before TensorFlow is imported.
"""
from __future__ import annotations

import logging

from trainer.config.settings import Settings
from trainer.errors import UserError
from trainer.runtime.contract import Runtime

log = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def start_runtime(settings: Settings, log_to_run: bool = True) -> Runtime:
    """Apply CPU settings, import TensorFlow, and start the runtime named by train.dist.

    A launcher whose world disagrees with train.dist is refused first, before the run's log."""
    from trainer.hardware.cpu import apply_cpu_environment, configure_threads
    from trainer.runtime.launch_env import check_launch

    check_launch(settings.train)
    plan = apply_cpu_environment(settings.cpu)
    configure_threads(plan)
    if settings.train.dist == "horovod":
        from trainer.runtime.horovod import HorovodRuntime

        runtime = HorovodRuntime.start(settings.train.elastic, settings.train.elastic_commit_steps)
    elif settings.train.dist == "ps":
        raise UserError("train.dist=ps: the parameter-server chief is 'unet-train chief' (with "
                        "'unet-train ps --index i' and 'unet-train worker --index i' running; see README)")
    else:
        from trainer.runtime.single import SingleRuntime

        runtime = SingleRuntime()
    if log_to_run:
        log_to_run_file(settings, runtime.is_chief)
    elif not runtime.is_chief:
        logging.getLogger().setLevel(logging.WARNING)
    log.info("rank %d/%d, threads: %s", runtime.rank, runtime.size, plan.describe())
    return runtime


def log_to_run_file(settings: Settings, is_chief: bool) -> None:
    """The chief logs into runs/R/<logging.log_file>; other ranks log warnings only."""
    root = logging.getLogger()
    if not is_chief:
        root.setLevel(logging.WARNING)
        return
    settings.run_path.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(settings.run_path / settings.logging.log_file)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(settings.logging.level)
