"""The parameter-server roles' lifecycles: a ``ps|worker --index i`` task serves (a gRPC server
that lives exactly as long as the job); every role leaves its process through :func:`exit_now`.

TensorFlow's gRPC server threads never join, so each role ends its process itself, with the exit
code the job asks for. The commands that run the roles (``unet-train ps|worker|chief``) are in
``trainer.commands.roles``.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn

from trainer.config.settings import Settings
from trainer.errors import UserError
from trainer.runtime.network import check_host_interfaces, check_private_network
from trainer.hardware.cpu import apply_cpu_environment, configure_threads
from trainer.runtime.ps.cluster import ClusterLayout, export_tf_config
from trainer.runtime.ps.control import ControlClient
from trainer.runtime.ps.peers import roles_by_host, wait_until_resolvable
from trainer.runtime.ps.token import load_or_create_token
from trainer.runtime import preemption

log = logging.getLogger(__name__)
# Set by launcher/ssh/remote/supervise.sh: the file that says "this role ended on purpose, do not restart it".
FINISHED_FILE_ENV = "UNET_ROLE_FINISHED_FILE"
# Called with the exit code just before exit_now ends the process (os._exit skips atexit).
BEFORE_EXIT: list[Callable[[int], None]] = []


def declare_finished() -> None:
    """Tell a supervisor that this role ended for a reason a restart cannot fix (the chief said
    stop or went away, or the role's own input is wrong). Without the file, a non-zero exit means
    the process died (killed, crashed) and the supervisor starts it again on the same port."""
    path = os.environ.get(FINISHED_FILE_ENV)
    if path:
        Path(path).touch()


def serve(settings: Settings, job: str, index: int) -> int:
    """Start this task's server, register with the chief, return the exit code it asks for."""
    preemption.defer_to_chief(f"{job} {index}")  # the chief checkpoints from this task's variables first
    layout = ClusterLayout.from_settings(settings.cluster)
    address = layout.address(job, index)
    # Before the server opens its port: it listens on every interface and authenticates no one.
    # A peer's name may not resolve yet (a TFJob replica still starting): wait for it, then check.
    hosts = layout.ps + layout.workers + (layout.chief,)
    wait_until_resolvable(hosts, settings.cluster.startup_timeout_s, f"{job} {index}", roles_by_host(layout.spec()))
    check_private_network(hosts, settings.cluster.allow_public_network)
    check_host_interfaces(f"{job} {index}", settings.cluster.allow_public_network)
    token = load_or_create_token(Path(settings.cluster.token_file))
    export_tf_config(layout, job, index)
    plan = apply_cpu_environment(settings.cpu, layout.local_processes(job, index), cluster_task=True)
    import tensorflow as tf

    configure_threads(plan)
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    try:
        server = tf.distribute.Server(resolver.cluster_spec(), job_name=job, task_index=index, protocol="grpc",
                                      start=True)
    except (tf.errors.OpError, ValueError) as exc:
        raise UserError(f"{job} {index}: cannot start gRPC server on {address} "
                        f"(port in use or address not local?): {str(exc).splitlines()[0][:200]}") from None
    log.info("%s %d serving on %s (%s); waiting for the chief at %s:%d", job, index, address, plan.describe(),
             *layout.control_address)
    client = ControlClient.connect(layout.control_address, job, index, settings.cluster.startup_timeout_s, token)
    code = client.wait_for_stop()
    del server  # kept alive until the chief says stop
    if code is None:
        log.error("%s %d: the chief at %s went away without stopping the cluster; exiting", job, index,
                  layout.chief)
        return 1
    log.info("%s %d: chief says stop (exit %d)", job, index, code)
    return code


def exit_now(code: int) -> NoReturn:
    """Leave without waiting for TensorFlow's gRPC threads, which never join on their own.
    ``BEFORE_EXIT`` callbacks run first (the Slurm task runner reports the exit code there)."""
    for callback in BEFORE_EXIT:
        try:
            callback(code)
        except Exception:  # noqa: BLE001 - leaving anyway
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def report_and_exit(command: str, error: Exception) -> None:
    """Fatal errors seen on a background thread (a lost parameter server) end the process here,
    like errors of the main thread do."""
    print(f"unet-train {command}: error: {error}", file=sys.stderr, flush=True)
    exit_now(getattr(error, "exit_code", 1))
