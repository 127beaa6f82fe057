"""Time limits and preemption: checkpoint at the next step boundary, then exit 75.

Schedulers warn a job before they end it: Slurm sends ``--signal=B:USR1@<s>`` before the time
limit (the batch script forwards it to every task), SIGTERM at the limit or on preemption, and
SIGKILL ``KillWait`` seconds later (30 s by default). Without a handler SIGUSR1 kills Python at
once, and everything since the last periodic checkpoint is lost.

Here a signal only *notes* the request. The training loop asks :func:`agreed` at every step
boundary, and every worker takes the same decision there: Horovod ranks sum their flags (one
allreduce, so a rank the signal reached late still stops at the same step), a parameter-server
run follows its chief (the only process that runs the loop), a single process itself. The chief
then writes a full step checkpoint (weights, optimizer slots, epoch and step in epoch: the
mid-epoch resume of :class:`trainer.training.callbacks.StepCheckpoint`), every worker waits
until it is complete, and each one leaves with :data:`PREEMPTED_EXIT`.

Exit code 75 (``EX_TEMPFAIL`` of sysexits.h) means "checkpointed, requeue me": the Slurm batch
script requeues the job when its step ends with it after SIGUSR1, and the requeued job resumes
at the saved step, mid-epoch, losing no step.

Which signals are taken:

* SIGUSR1 always while a run trains (``kill -USR1 <pid>`` checkpoints any run and exits 75).
* SIGTERM only where :func:`install` was asked for it (``term=True``: the Slurm task runner
  does, trainer/commands/slurm_role.py). Elsewhere SIGTERM keeps its default meaning (the SSH launcher's
  stop). Once enabled, a SIGTERM before or after the training steps ends the process as before,
  except after a checkpoint decision: then it is ignored until the process has gone, so that a
  rank still leaving is not killed by ``srun --kill-on-bad-exit`` ending the step when another
  rank has exited 75 first (srun would then report 143, not 75, and the job would not requeue).

The handler only sets a few variables: no logging, no I/O inside a signal handler.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from trainer.errors import InfrastructureError

log = logging.getLogger(__name__)
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "checkpointed, requeue me"
RECORD_NAME = "preemptions.json"


class Preempted(InfrastructureError):
    """The run checkpointed at a step boundary after a signal and ends with exit 75."""

    exit_code = PREEMPTED_EXIT


class _State:
    def __init__(self):
        self.signum: int | None = None   # the first signal noted
        self.at: float = 0.0             # its wall-clock time (time.time())
        self.count = 0
        self.term = False                # SIGTERM taken (not only SIGUSR1)
        self.installed: set[int] = set()
        self.armed = 0                   # > 0 while the training loop runs steps
        self.deciding = False            # a checkpoint decision was taken: absorb SIGTERM until exit
        self.raised: Preempted | None = None


_state = _State()


def _handle(signum, frame) -> None:
    if signum == signal.SIGTERM and not (_state.armed or _state.deciding):
        # Outside the training steps SIGTERM means what it always meant: end now.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if _state.signum is None:
        _state.signum, _state.at = signum, time.time()
    _state.count += 1


def install(term: bool = False) -> None:
    """Take SIGUSR1 (and SIGTERM when ``term``) from now on; idempotent, never narrows what a
    previous call enabled. Only from the main thread (a Python rule for signal handlers)."""
    wanted = {signal.SIGUSR1} | ({signal.SIGTERM} if term else set())
    _state.term = _state.term or term
    if threading.current_thread() is not threading.main_thread():
        log.debug("preemption: not on the main thread; signal handlers left as they are")
        return
    for signum in sorted(wanted - _state.installed):
        signal.signal(signum, _handle)
        _state.installed.add(signum)


def requested() -> tuple[str, float] | None:
    """(signal name, wall time it arrived) of the first signal noted, or None."""
    if _state.signum is None:
        return None
    return signal.Signals(_state.signum).name, _state.at


@contextmanager
def watching():
    """The training loop's steps: install the handlers, and let SIGTERM (where enabled) be noted
    rather than end the process."""
    install()
    _state.armed += 1
    try:
        yield
    finally:
        _state.armed -= 1


def agreed(runtime) -> bool:
    """Every worker's answer to "does anyone stop here?" at this step boundary. Horovod: the sum
    of all ranks' flags (an allreduce, so all stop at the same step); PS: the chief alone;
    single: itself. Sets the TERM-absorbing state on every worker that stops."""
    import numpy as np

    mine = 1.0 if _state.signum is not None else 0.0
    stop = float(runtime.sum_over_workers(np.array([mine]))[0]) > 0.0
    if stop:
        _state.deciding = True
        if signal.SIGTERM in _state.installed and threading.current_thread() is threading.main_thread():
            # Ignored, not handled: Python puts the default action back on every signal it handles
            # when the interpreter finalizes, and a rank still finalizing when another has exited
            # 75 gets srun's SIGTERM (--kill-on-bad-exit). An ignored signal stays ignored.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return stop


def defer_to_chief(role: str) -> None:
    """A parameter server or worker: it holds variables or runs closures the chief's checkpoint
    needs, so the signals the chief acts on must not end it; the chief's STOP (with exit code
    75) does. SIGUSR1 is always taken, SIGTERM where :func:`install` enabled it."""
    install(term=_state.term)
    _state.deciding = True  # never "armed": a role has no steps of its own; it just waits
    log.debug("%s: SIGUSR1%s left to the chief", role, "/SIGTERM" if _state.term else "")


def record(run_path: Path, entry: dict) -> Path:
    """Append one preemption (what the chief saved, and when) to runs/R/preemptions.json."""
    from trainer.errors import UserError
    from trainer.fsutil import read_regular_json, write_json

    path = Path(run_path) / RECORD_NAME
    try:  # on the way out after a signal: a FIFO or /dev/zero here must not hang it (started afresh)
        entries = read_regular_json(path, str(path), 1 << 20)
        if not isinstance(entries, list):
            entries = []
    except (OSError, ValueError, UserError):
        entries = []
    entries.append(entry)
    write_json(path, entries)
    return path


def stop_here(settings, runtime, session, epoch: int, steps_done: int, steps_per_epoch: int) -> None:
    """After the agreed step boundary: the chief writes the step checkpoint, every worker waits
    for it (a second sum over workers: no rank leaves, and so no ``srun --kill-on-bad-exit``
    ends the step, before the checkpoint is complete), then all raise :class:`Preempted`."""
    import numpy as np

    noted = requested()
    name = noted[0] if noted else "a peer's signal"
    step = session.step
    if runtime.is_chief:
        started = time.time()
        path = session.store.save_step(step)
        saved = time.time()
        since = saved - noted[1] if noted else None
        entry = {"signal": name, "signal_time": noted[1] if noted else None, "saved_time": saved,
                 "signal_to_checkpoint_s": since, "save_s": saved - started, "checkpoint": path,
                 "global_step": step, "epoch": epoch + 1, "step_in_epoch": steps_done,
                 "steps_per_epoch": steps_per_epoch, "workers": runtime.size, "dist": runtime.name,
                 "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                 "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0)}
        record(settings.run_path, entry)
        log.warning("%s: checkpoint %s at epoch %d, step %d/%d (global step %d), %s after the signal; "
                    "exit %d (requeue to resume here)", name, path, epoch + 1, steps_done, steps_per_epoch, step,
                    f"{since:.2f} s" if since is not None else "on a peer's signal", PREEMPTED_EXIT)
    runtime.sum_over_workers(np.zeros(1))  # barrier: the checkpoint is complete on every worker's return
    error = Preempted(f"{name}: checkpointed at epoch {epoch + 1}, step {steps_done}/{steps_per_epoch} "
                      f"(global step {step}) in {settings.run_path / 'checkpoints' / 'steps'}; exit {PREEMPTED_EXIT} "
                      f"= requeue the job (or rerun the command) to resume from there")
    # Kept (with its traceback, so the training frames stay alive) until the process leaves:
    # unwinding them would run the input pipeline's and TensorFlow's destructors, which were seen
    # to block a Horovod rank for longer than Slurm's KillWait once srun had ended the step.
    _state.raised = error
    raise error


def _reset_for_tests() -> None:
    for signum in _state.installed:
        signal.signal(signum, signal.SIG_DFL)
    _state.__init__()


__all__ = ["PREEMPTED_EXIT", "Preempted", "install", "requested", "watching", "agreed", "defer_to_chief",
           "record", "stop_here"]
