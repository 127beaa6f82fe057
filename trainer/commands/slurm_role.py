"""``python -m trainer.commands.slurm_role``: the process srun starts for each task of a Slurm run.

    python -m trainer.commands.slurm_role --mode horovod|ps --settings FILE   (what the batch script's srun runs)
    python -m trainer.commands.slurm_role --run TASK ROLE -- ARGS...          (after numactl, or from slurm-task)

Its first instruction takes SIGUSR1 and SIGTERM (trainer/runtime/preemption.py), before any
slow import: Slurm may signal a task at any time, and Python's default for SIGUSR1 is to die.
It then works out the task's role (launcher/slurm/task.py), announces it and runs the role's
``unet-train`` command in this same process (through ``trainer.commands.dispatch``, as the
console command does), so Slurm's signals reach the Python that acts on them. Where a NUMA
binding is asked for, it execs ``numactl ... python -m trainer.commands.slurm_role --run ...``
with the two signals blocked across the exec: one that arrives meanwhile waits, pending, for the
new process's handler instead of killing it. It execs a fresh Python the same way when working
out the role imported TensorFlow (PS mode), whose CPU settings must be in the environment before
TensorFlow is imported.

Its last line is ``unet-train slurm-task: task N (ROLE) exited RC``, for the launcher's labels;
the parameter-server roles leave through ``os._exit`` (their gRPC threads never join), so the
line is printed from their exit hook too.
"""
from __future__ import annotations

import os
import signal
import sys

from trainer.runtime import preemption

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def run_role(task: str, role: str, args: list[str]) -> int:
    """Run ``unet-train ARGS`` in this process; print the exit line; return the exit code."""
    from launcher.slurm.task import exit_line
    from trainer.commands.args import build_parser
    from trainer.commands.dispatch import dispatch
    from trainer.runtime.ps import roles

    reported = False

    def report(code: int) -> None:
        nonlocal reported
        if not reported:
            reported = True
            print(exit_line(task, role, code), flush=True)

    roles.BEFORE_EXIT.append(report)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # a signal held across numactl's exec arrives now
    sys.argv = ["unet-train", *args]
    code = 1
    try:
        code = int(dispatch(build_parser().parse_args(args)) or 0)
    except SystemExit as exc:  # argparse errors and explicit exits
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # still report: the launcher names the role that failed
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        report(code)
    if code == preemption.PREEMPTED_EXIT:
        # Checkpointed: leave now. The other ranks leave at the same moment, and srun ends the step
        # (--kill-on-bad-exit) once the first has gone; unwinding and finalizing the interpreter
        # (the input pipeline's and TensorFlow's destructors, MPI's finalize) was seen to outlast
        # Slurm's KillWait on a loaded node: SIGKILL, exit 137, and a job that is not requeued.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def start_task(mode: str, settings_file: str) -> int:
    """Work out this task's role from the Slurm environment, announce it, run it."""
    from pathlib import Path

    from launcher.slurm.task import task_command
    from trainer.config.loader import load_settings
    from trainer.errors import UserError

    try:
        path = Path(settings_file).resolve()
        command = task_command(load_settings(path), mode, str(path), os.environ)
    except UserError as exc:
        print(f"unet-train slurm-task: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    print(command.announcement(), flush=True)
    argv = command.exec_argv()
    # A fresh interpreter where numactl comes first, or where working out the role imported
    # TensorFlow (PS mode's SlurmClusterResolver): the role's CPU settings must be in the
    # environment before TensorFlow is imported. Signals are held meanwhile (pending, not lost).
    if command.prefix or "tensorflow" in sys.modules:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        sys.stdout.flush()
        os.execvp(argv[0], argv)
    return run_role(str(command.task), command.role, list(command.cli_args))


def main(argv: list[str]) -> int:
    preemption.install(term=True)  # first: nothing below may die of SIGUSR1 (see the module docstring)
    if argv[:1] == ["--run"] and len(argv) >= 4 and argv[3] == "--":
        return run_role(argv[1], argv[2], argv[4:])
    if len(argv) == 4 and argv[0] == "--mode" and argv[2] == "--settings":
        return start_task(argv[1], argv[3])
    print("usage: python -m trainer.commands.slurm_role --mode horovod|ps --settings FILE | --run TASK ROLE -- "
          "ARGS...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
