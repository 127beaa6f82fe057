"""``unet-train manifests --target kubeflow``: Kubernetes YAML for the Kubeflow operators.

- Horovod: an ``MPIJob`` (kubeflow.org/v2beta1, mpi-operator): a launcher pod runs ``mpirun``
  over the worker pods (the operator provides the hostfile and SSH keys; workers run sshd),
  one rank per slot, each ``unet-train train --dist horovod``. The operator mounts only the key
  pair and relies on its base image's ssh settings (StrictHostKeyChecking no, UserKnownHostsFile
  /dev/null, sshd StrictModes no): the image gets them from docker/ssh/ (see SSH_PORT). The
  launcher is created once every worker is Ready (``launcherCreationPolicy:
  WaitForWorkersReady``), and a worker is Ready when its sshd accepts TCP connections; mpirun
  passes PATH, LD_LIBRARY_PATH and the thread variables to the ranks (``-x``); /dev/shm is a
  memory emptyDir (NCCL with several GPUs per pod needs more than the runtime's 64 MiB).
  By default everything runs as the image's non-root user (uid 1000, ``mpiuser``) the way
  mpi-operator's own examples do: sshd with its own config, keys in /home/mpiuser/.ssh
  (``sshAuthMountPath``); ``user=None`` renders the root variant (/root/.ssh).
- PS: a ``TFJob`` (kubeflow.org/v1, training-operator) with Chief, PS and Worker replicas, each
  the ordinary role command. The operator names every replica's headless service
  ``<job>-<type>-<i>.<namespace>.svc``, so the cluster layout is known up front and goes into
  the settings; a replica's index comes from its pod label through the downward API. Such a
  name resolves only once its pod is ready: the roles wait for it (cluster.startup_timeout_s,
  trainer/runtime/ps/peers.py). Workers restart on failure (``OnFailure``, at most
  ``cluster.max_restarts`` times in all, ``runPolicy.backoffLimit``) and register again with
  the chief. The control channel's token is a fresh random value per rendering, in a Secret
  mounted read-only (defaultMode 0400) where ``cluster.token_file`` points.
  training-operator v1 also serves an MPIJob (kubeflow.org/v1) whose CRD conflicts with
  mpi-operator's v2beta1: run it next to mpi-operator with ``--enable-scheme=tfjob`` (and the
  other schemes it should serve, but not mpijob).

Beside the job: the merged settings as a ConfigMap (mounted read-only) and a ReadWriteMany
PersistentVolumeClaim mounted as the working folder, so the relative ``data/`` and ``runs/``
paths of settings.yaml land on it. CPU requests equal the threads each rank/role is given.
Nothing here talks to a cluster: the output is plain YAML for ``kubectl apply -f``.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from launcher.roles import CHIEF, ONE_RANK_ASKED, PS, WORKER, layout_values, role_args
from trainer.config.settings import Settings, settings_to_yaml
from trainer.config.values import with_values
from trainer.errors import UserError
from trainer.fsutil import write_text

MPIJOB_API, TFJOB_API = "kubeflow.org/v2beta1", "kubeflow.org/v1"
SETTINGS_DIR, WORKSPACE = "/etc/unet-train", "/workspace"
SETTINGS_FILE = f"{SETTINGS_DIR}/settings.yaml"
TOKEN_DIR = "/etc/unet-train-token"        # the TFJob's control token (a Secret), read-only
TOKEN_FILE = f"{TOKEN_DIR}/token"
SECRET_MODE = 0o400
# The image's ssh configuration (docker/ssh/, installed by the Dockerfile): the one place that says
# which port sshd listens on and mpirun's ssh connects to; the readiness probe checks that port.
SSH_DIR = Path(__file__).resolve().parent.parent / "docker" / "ssh"
SSH_PORT = 2222
USER_ID, USER_HOME = 1000, "/home/mpiuser"  # the Dockerfile's non-root user
THREAD_VARIABLES = ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"  # set on every TFJob pod by the operator
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
MAX_JOB_NAME = 40  # the operators append "-worker-<i>" (and more) to it for pod and service names


class _Dumper(yaml.SafeDumper):
    """Plain YAML for kubectl: no &anchors for repeated objects, settings.yaml as a | block."""

    def ignore_aliases(self, data) -> bool:
        return True


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def job_name(run: str) -> str:
    """runs/<run> -> a DNS-1123 name (lower case, '-' for '_' and '.')."""
    name = "unet-train-" + re.sub(r"[^a-z0-9-]+", "-", run.lower()).strip("-")
    if len(name) > MAX_JOB_NAME or not _DNS_LABEL.fullmatch(name):
        raise UserError(f"train.run_name {run!r}: gives the Kubernetes name {name!r}, which must be at most "
                        f"{MAX_JOB_NAME} characters of a-z, 0-9 and '-'; pick a shorter run name")
    return name


def _labels(name: str) -> dict:
    return {"app.kubernetes.io/name": "unet-train", "app.kubernetes.io/instance": name}


def _volumes(name: str) -> list[dict]:
    return [{"name": "settings", "configMap": {"name": f"{name}-settings"}},
            {"name": "workspace", "persistentVolumeClaim": {"claimName": f"{name}-workspace"}}]


def _mounts() -> list[dict]:
    return [{"name": "settings", "mountPath": SETTINGS_DIR, "readOnly": True},
            {"name": "workspace", "mountPath": WORKSPACE}]


def _pod_security(user: int | None) -> dict:
    """Pod-level: the workspace volume (and a Secret) group-owned by the user's group."""
    return {} if user is None else {"securityContext": {"runAsUser": user, "runAsGroup": user, "fsGroup": user}}


def _container_security(user: int | None) -> dict:
    return {} if user is None else {"securityContext": {"runAsUser": user, "runAsGroup": user,
                                                        "allowPrivilegeEscalation": False}}


def _resources(cpu: int, memory: str, gpus: int = 0) -> dict:
    amounts = {"cpu": str(cpu), "memory": memory}
    limits = dict(amounts)
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    return {"requests": amounts, "limits": limits}


def _config_map(name: str, namespace: str, settings: Settings) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{name}-settings", "namespace": namespace, "labels": _labels(name)},
            "data": {"settings.yaml": settings_to_yaml(settings)}}


def _claim(name: str, settings: Settings) -> dict:
    kubeflow = settings.cluster.kubeflow
    spec = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": kubeflow.pvc_size}}}
    if kubeflow.storage_class:
        spec["storageClassName"] = kubeflow.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": f"{name}-workspace", "namespace": kubeflow.namespace, "labels": _labels(name)},
            "spec": spec}


def mpijob(settings: Settings, user: int | None = USER_ID) -> list[dict]:
    """``user``: the uid every pod runs as (the image's ``mpiuser``, as in mpi-operator's examples);
    None = root, with the operator's default key path /root/.ssh."""
    kubeflow = settings.cluster.kubeflow
    name = job_name(settings.train.run_name)
    slots = max(1, kubeflow.gpus_per_worker)  # one rank per GPU, or one CPU rank per worker
    ranks = kubeflow.workers * slots
    threads = kubeflow.threads
    settings = with_values(settings, {"train.dist": "horovod", "cpu.intra_op_threads": threads,
                                      "cpu.omp_num_threads": threads})
    thread_env = {"OMP_NUM_THREADS": threads, "TF_NUM_INTRAOP_THREADS": threads,
                  "TF_NUM_INTEROP_THREADS": settings.cpu.inter_op_threads}
    exported = [arg for variable in ("PATH", "LD_LIBRARY_PATH", *THREAD_VARIABLES) for arg in ("-x", variable)]
    launcher = {"name": "launcher", "image": kubeflow.image, "workingDir": WORKSPACE,
                "command": ["mpirun"],
                # --bind-to none: each rank's TensorFlow pools use the threads it is given; -x: the
                # launcher's PATH (the venv), libraries and thread counts reach every rank
                "args": ["-np", str(ranks), *([] if user is not None else ["--allow-run-as-root"]),
                         "--bind-to", "none", "--map-by", "slot", *exported, "--wdir", WORKSPACE,
                         "unet-train", "train", "--dist", "horovod", "--settings", SETTINGS_FILE,
                         *(ONE_RANK_ASKED if ranks == 1 else ())],
                "env": [{"name": key, "value": str(value)} for key, value in thread_env.items()],
                "resources": _resources(1, "1Gi"), "volumeMounts": _mounts(), **_container_security(user)}
    sshd = ["-De"] if user is None else ["-De", "-f", f"{USER_HOME}/.sshd_config"]
    worker = {"name": "worker", "image": kubeflow.image, "workingDir": WORKSPACE,
              "command": ["/usr/sbin/sshd"], "args": sshd,  # mpirun reaches the workers over SSH
              "ports": [{"name": "ssh", "containerPort": SSH_PORT}],
              # Ready = sshd accepts connections: the launcher (WaitForWorkersReady) starts only then
              "readinessProbe": {"tcpSocket": {"port": SSH_PORT}, "initialDelaySeconds": 1, "periodSeconds": 2,
                                 "failureThreshold": 30},
              "resources": _resources(threads * slots, kubeflow.memory, kubeflow.gpus_per_worker),
              "volumeMounts": _mounts() + [{"name": "dshm", "mountPath": "/dev/shm"}], **_container_security(user)}
    shm = {"name": "dshm", "emptyDir": {"medium": "Memory"}}  # NCCL's shared-memory transport
    spec = {"slotsPerWorker": slots, "mpiImplementation": "OpenMPI", "launcherCreationPolicy": "WaitForWorkersReady",
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": 0}}
    if user is not None:
        spec["sshAuthMountPath"] = f"{USER_HOME}/.ssh"
    spec["mpiReplicaSpecs"] = {
        "Launcher": {"replicas": 1, "restartPolicy": "Never",
                     "template": {"spec": {**_pod_security(user), "containers": [launcher],
                                           "volumes": _volumes(name)}}},
        "Worker": {"replicas": kubeflow.workers, "restartPolicy": "Never",
                   "template": {"spec": {**_pod_security(user), "containers": [worker],
                                         "volumes": _volumes(name) + [shm]}}}}
    job = {"apiVersion": MPIJOB_API, "kind": "MPIJob",
           "metadata": {"name": name, "namespace": kubeflow.namespace, "labels": _labels(name)}, "spec": spec}
    return [_config_map(name, kubeflow.namespace, settings), _claim(name, settings), job]


def _token_secret(name: str, namespace: str) -> dict:
    """The control channel's shared secret: a fresh random token each time manifests are rendered."""
    from trainer.runtime.ps.token import new_token

    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": f"{name}-token", "namespace": namespace, "labels": _labels(name)},
            "stringData": {"token": new_token()}}


def tfjob(settings: Settings, user: int | None = USER_ID) -> list[dict]:
    kubeflow = settings.cluster.kubeflow
    name = job_name(settings.train.run_name)
    port, threads = kubeflow.port, kubeflow.threads

    def address(kind: str, index: int) -> str:  # the operator's headless service for that replica
        return f"{name}-{kind}-{index}.{kubeflow.namespace}.svc:{port}"

    layout = layout_values([address(PS, i) for i in range(kubeflow.ps)],
                           [address(WORKER, i) for i in range(kubeflow.workers)], address(CHIEF, 0))
    settings = with_values(settings, {"train.dist": "ps", "cpu.intra_op_threads": threads,
                                      "cpu.omp_num_threads": threads, **layout, "cluster.token_file": TOKEN_FILE})
    token = {"name": "token", "secret": {"secretName": f"{name}-token", "defaultMode": SECRET_MODE}}

    def replica(count: int, args: list[str], ports: list[dict], restart: str = "Never") -> dict:
        container = {"name": "tensorflow",  # the operator's default container name
                     "image": kubeflow.image, "workingDir": WORKSPACE, "command": ["unet-train"],
                     "args": args + ["--settings", SETTINGS_FILE],
                     "ports": ports, "resources": _resources(threads, kubeflow.memory),
                     "volumeMounts": _mounts() + [{"name": "token", "mountPath": TOKEN_DIR, "readOnly": True}],
                     **_container_security(user)}
        if "$(REPLICA_INDEX)" in args:  # Kubernetes expands $(VAR) in args from the env: no shell involved
            container["env"] = [{"name": "REPLICA_INDEX", "valueFrom": {
                "fieldRef": {"fieldPath": f"metadata.labels['{REPLICA_INDEX_LABEL}']"}}}]
        return {"replicas": count, "restartPolicy": restart,
                "template": {"metadata": {"labels": _labels(name)},  # what the NetworkPolicy admits
                             "spec": {**_pod_security(user), "containers": [container],
                                      "volumes": _volumes(name) + [token]}}}

    grpc = [{"name": "tfjob-port", "containerPort": port}]
    control = [{"name": "control", "containerPort": settings.cluster.control_port}]
    job = {"apiVersion": TFJOB_API, "kind": "TFJob",
           "metadata": {"name": name, "namespace": kubeflow.namespace, "labels": _labels(name)},
           # a worker that died is started again (it registers with the chief again and the chief
           # re-runs its closures meanwhile), as the SSH launcher's supervisor does, at most
           # cluster.max_restarts times; a lost PS or chief ends the job (rerun: it resumes)
           "spec": {"runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": settings.cluster.max_restarts},
                    "tfReplicaSpecs": {
                        "Chief": replica(1, role_args(CHIEF, 0), grpc + control),
                        "PS": replica(kubeflow.ps, role_args(PS, "$(REPLICA_INDEX)"), grpc),
                        "Worker": replica(kubeflow.workers, role_args(WORKER, "$(REPLICA_INDEX)"), grpc,
                                          restart="OnFailure")}}}
    return [_config_map(name, kubeflow.namespace, settings), _claim(name, settings),
            _token_secret(name, kubeflow.namespace),
            _job_only_network_policy(name, kubeflow.namespace, [port, settings.cluster.control_port]), job]


def _job_only_network_policy(name: str, namespace: str, ports: list[int]) -> dict:
    """TensorFlow's gRPC servers authenticate no one: only the job's own pods may reach its ports
    (without it, every pod in the namespace could run ops on a parameter server). Needs a network
    plugin that enforces NetworkPolicy (Calico, Cilium, ...); on one that does not, it is inert."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"{name}-job-only", "namespace": namespace, "labels": _labels(name)},
            "spec": {"podSelector": {"matchLabels": _labels(name)}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": _labels(name)}}],
                                  "ports": [{"protocol": "TCP", "port": p} for p in ports]}]}}


def render(settings: Settings, mode: str, user: int | None = USER_ID) -> list[dict]:
    if mode == "horovod":
        return mpijob(settings, user)
    if mode == "ps":
        return tfjob(settings, user)
    raise UserError(f"--mode: expected 'ps' or 'horovod', got {mode!r}")


def write_manifests(settings: Settings, mode: str, out: Path, user: int | None = USER_ID) -> Path:
    documents = render(settings, mode, user)
    operator = ("mpi-operator (v2beta1)" if mode == "horovod" else
                "training-operator v1; next to mpi-operator start it with --enable-scheme=tfjob: both "
                "define an MPIJob CRD")
    header = (f"# Rendered by `unet-train manifests --target kubeflow --mode {mode}` (run {settings.train.run_name}).\n"
              f"# kubectl apply -f {out.name}   (needs the {operator}, and a ReadWriteMany StorageClass)\n")
    if mode == "ps":
        header += "# Holds the run's control token (a Secret): this file is written with mode 0600.\n"
    text = header + yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)
    if mode == "ps":
        _write_private(out, text)
    else:
        write_text(out, text)
    return out


def _write_private(path: Path, text: str) -> None:
    """Atomically, mode 0600 from the first byte (mkstemp): the file holds a Secret's value."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
