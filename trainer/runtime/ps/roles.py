"""``unet-train ps|worker --index i``: a gRPC server task that lives exactly as long as the job."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from trainer.config.settings import Settings
from trainer.errors import UserError
from trainer.network import check_private_network
from trainer.runtime.cpu import apply_cpu_environment, configure_threads
from trainer.runtime.ps.cluster import ClusterLayout, export_tf_config
from trainer.runtime.ps.control import ControlClient
from trainer.runtime.ps.token import load_or_create_token

log = logging.getLogger(__name__)
# Set by launcher/remote/supervise.sh: the file that says "this role ended on purpose, do not restart it".
FINISHED_FILE_ENV = "UNET_ROLE_FINISHED_FILE"


def declare_finished() -> None:
    """Tell a supervisor that this role ended for a reason a restart cannot fix (the chief said
    stop or went away, or the role's own input is wrong). Without the file, a non-zero exit means
    the process died (killed, crashed) and the supervisor starts it again on the same port."""
    path = os.environ.get(FINISHED_FILE_ENV)
    if path:
        Path(path).touch()


def serve(settings: Settings, job: str, index: int) -> int:
    """Start this task's server, register with the chief, return the exit code it asks for."""
    layout = ClusterLayout.from_settings(settings.cluster)
    address = layout.address(job, index)
    # Before the server opens its port: it listens on every interface and authenticates no one.
    check_private_network(layout.ps + layout.workers + (layout.chief,), settings.cluster.allow_public_network)
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
