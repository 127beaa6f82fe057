"""``unet-train ps|worker --index i`` and ``unet-train chief``: the parameter-server roles.

A ps or worker task serves (``trainer.runtime.ps.roles.serve``) until the chief says stop; the
chief trains over the cluster, stops the roles, then validates alone. TensorFlow's gRPC server
threads never join, so each role ends its process itself, with the exit code the job asks for:
:func:`run_server_role` and :func:`run_chief` never return (``trainer.runtime.ps.roles.exit_now``).
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import TYPE_CHECKING, NoReturn

from trainer.commands.settings import load_cli_settings, load_run_settings, pin_dataset
from trainer.runtime.network import check_host_interfaces
from trainer.commands.train import check_memory, describe_result, train_run, validate_run
from trainer.errors import InfrastructureError, UserError
from trainer.hardware.cpu import apply_cpu_environment, configure_threads
from trainer.runtime import preemption
from trainer.runtime.ps.cluster import ClusterLayout
from trainer.runtime.ps.roles import declare_finished, exit_now, report_and_exit, serve

if TYPE_CHECKING:
    from trainer.config.settings import Settings


def cmd_server_role(args: argparse.Namespace) -> int:
    run_server_role(load_cli_settings(args), args.role, args.index)  # never returns: ends the process


def cmd_chief(args: argparse.Namespace) -> int:
    settings = load_run_settings(args, {"train.dist": "ps"})
    # the security refusal first, then the data and the memory: all before the run's log is opened
    check_host_interfaces("chief", settings.cluster.allow_public_network)
    settings = pin_dataset(settings)
    check_memory(settings)
    run_chief(settings, progress=not args.quiet)  # ends the process


def run_server_role(settings: Settings, job: str, index: int) -> NoReturn:
    """``unet-train ps|worker``: serve, then leave the process with the code the chief asked for."""
    code, finished = 1, False  # finished: a supervisor must not restart this role (see declare_finished)
    try:
        code = serve(settings, job, index)
        finished = True  # the chief said stop, or went away
    except (UserError, InfrastructureError) as exc:
        print(f"unet-train {job}: error: {exc}", file=sys.stderr)
        code, finished = exc.exit_code, isinstance(exc, UserError)
    except KeyboardInterrupt:
        code, finished = 130, True
    finally:
        if finished:
            declare_finished()
        exit_now(code)  # gRPC server threads never join: leave explicitly, whatever happened


def run_chief(settings: Settings, progress: bool) -> NoReturn:
    """``unet-train chief``: train over the cluster, stop the roles, validate on the chief alone."""
    layout = ClusterLayout.from_settings(settings.cluster)
    configure_threads(apply_cpu_environment(settings.cpu, layout.local_processes("chief", 0), cluster_task=True))
    from trainer.runtime.ps.runtime import PsRuntime  # these load TensorFlow: after the CPU settings
    from trainer.runtime.start import log_to_run_file

    log_to_run_file(settings, is_chief=True)

    code, runtime = 1, None
    try:
        runtime = PsRuntime.start(settings, on_fatal=lambda error: report_and_exit("chief", error))
        result = train_run(settings, runtime, progress=progress)
        print(describe_result(result))
        runtime.shutdown(True)  # the roles can go: what follows runs on the chief alone
        line = validate_run(settings, result, progress=progress)
        if line:
            print(line)
        code = 0
    except (UserError, InfrastructureError) as exc:
        print(f"unet-train chief: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("unet-train chief: interrupted", file=sys.stderr)
        code = 130
    except BaseException:  # still say what happened: os._exit below skips the normal traceback
        traceback.print_exc()
    finally:
        if runtime is not None:
            if code == preemption.PREEMPTED_EXIT:  # checkpointed after a signal: every role leaves with 75 too
                runtime.control.stop_all(code)
            runtime.shutdown(code == 0)
        exit_now(code)
