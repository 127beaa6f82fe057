"""``unet-train manifests --target kubeflow``: Kubernetes YAML for the Kubeflow operators.

- Horovod: an ``MPIJob`` (kubeflow.org/v2beta1, mpi-operator): a launcher pod runs ``mpirun``
  over the worker pods (the operator provides the hostfile and SSH keys; workers run sshd),
  one rank per slot, each ``unet-train train --dist horovod``.
- PS: a ``TFJob`` (kubeflow.org/v1, training-operator) with Chief, PS and Worker replicas, each
  the ordinary role command. The operator names every replica's headless service
  ``<job>-<type>-<i>.<namespace>.svc``, so the cluster layout is known up front and goes into
  the settings; a replica's index comes from its pod label through the downward API.

Beside the job: the merged settings as a ConfigMap (mounted read-only) and a ReadWriteMany
PersistentVolumeClaim mounted as the working folder, so the relative ``data/`` and ``runs/``
paths of settings.yaml land on it. CPU requests equal the threads each rank/role is given.
Nothing here talks to a cluster: the output is plain YAML for ``kubectl apply -f``.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from trainer.config.settings import Settings, settings_to_yaml
from trainer.errors import UserError
from trainer.fsutil import write_text

MPIJOB_API, TFJOB_API = "kubeflow.org/v2beta1", "kubeflow.org/v1"
SETTINGS_DIR, WORKSPACE = "/etc/unet-train", "/workspace"
SETTINGS_FILE = f"{SETTINGS_DIR}/settings.yaml"
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


def _with(settings: Settings, **sections) -> Settings:
    """A copy of the settings with some keys replaced, validated again like any settings."""
    data = settings.model_dump(mode="json", by_alias=True)
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        data[section][key] = value
    return Settings.model_validate(data)


def _labels(name: str) -> dict:
    return {"app.kubernetes.io/name": "unet-train", "app.kubernetes.io/instance": name}


def _volumes(name: str) -> list[dict]:
    return [{"name": "settings", "configMap": {"name": f"{name}-settings"}},
            {"name": "workspace", "persistentVolumeClaim": {"claimName": f"{name}-workspace"}}]


def _mounts() -> list[dict]:
    return [{"name": "settings", "mountPath": SETTINGS_DIR, "readOnly": True},
            {"name": "workspace", "mountPath": WORKSPACE}]


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


def mpijob(settings: Settings) -> list[dict]:
    kubeflow = settings.cluster.kubeflow
    name = job_name(settings.train.run_name)
    slots = max(1, kubeflow.gpus_per_worker)  # one rank per GPU, or one CPU rank per worker
    ranks = kubeflow.workers * slots
    threads = kubeflow.threads
    settings = _with(settings, train__dist="horovod", cpu__intra_op_threads=threads, cpu__omp_num_threads=threads)
    launcher = {"name": "launcher", "image": kubeflow.image, "workingDir": WORKSPACE,
                "command": ["mpirun"],
                # --bind-to none: each rank's TensorFlow pools use the threads it is given
                "args": ["-np", str(ranks), "--bind-to", "none", "--map-by", "slot", "--wdir", WORKSPACE,
                         "unet-train", "train", "--dist", "horovod", "--settings", SETTINGS_FILE],
                "resources": _resources(1, "1Gi"), "volumeMounts": _mounts()}
    worker = {"name": "worker", "image": kubeflow.image, "workingDir": WORKSPACE,
              "command": ["/usr/sbin/sshd"], "args": ["-De"],  # mpirun reaches the workers over SSH
              "resources": _resources(threads * slots, kubeflow.memory, kubeflow.gpus_per_worker),
              "volumeMounts": _mounts()}
    job = {"apiVersion": MPIJOB_API, "kind": "MPIJob",
           "metadata": {"name": name, "namespace": kubeflow.namespace, "labels": _labels(name)},
           "spec": {"slotsPerWorker": slots, "mpiImplementation": "OpenMPI",
                    "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": 0},
                    "mpiReplicaSpecs": {
                        "Launcher": {"replicas": 1, "restartPolicy": "Never",
                                     "template": {"spec": {"containers": [launcher], "volumes": _volumes(name)}}},
                        "Worker": {"replicas": kubeflow.workers, "restartPolicy": "Never",
                                   "template": {"spec": {"containers": [worker], "volumes": _volumes(name)}}}}}}
    return [_config_map(name, kubeflow.namespace, settings), _claim(name, settings), job]


def tfjob(settings: Settings) -> list[dict]:
    kubeflow = settings.cluster.kubeflow
    name = job_name(settings.train.run_name)
    port, threads = kubeflow.port, kubeflow.threads

    def address(kind: str, index: int) -> str:  # the operator's headless service for that replica
        return f"{name}-{kind}-{index}.{kubeflow.namespace}.svc:{port}"

    settings = _with(settings, train__dist="ps", cpu__intra_op_threads=threads, cpu__omp_num_threads=threads,
                     cluster__ps_hosts=[address("ps", i) for i in range(kubeflow.ps)],
                     cluster__worker_hosts=[address("worker", i) for i in range(kubeflow.workers)],
                     cluster__chief_host=address("chief", 0))

    def replica(count: int, args: list[str], ports: list[dict]) -> dict:
        container = {"name": "tensorflow",  # the operator's default container name
                     "image": kubeflow.image, "workingDir": WORKSPACE, "command": ["unet-train"],
                     "args": args + ["--settings", SETTINGS_FILE],
                     "ports": ports, "resources": _resources(threads, kubeflow.memory), "volumeMounts": _mounts()}
        if "$(REPLICA_INDEX)" in args:  # Kubernetes expands $(VAR) in args from the env: no shell involved
            container["env"] = [{"name": "REPLICA_INDEX", "valueFrom": {
                "fieldRef": {"fieldPath": f"metadata.labels['{REPLICA_INDEX_LABEL}']"}}}]
        return {"replicas": count, "restartPolicy": "Never",
                "template": {"metadata": {"labels": _labels(name)},  # what the NetworkPolicy admits
                             "spec": {"containers": [container], "volumes": _volumes(name)}}}

    grpc = [{"name": "tfjob-port", "containerPort": port}]
    control = [{"name": "control", "containerPort": settings.cluster.control_port}]
    job = {"apiVersion": TFJOB_API, "kind": "TFJob",
           "metadata": {"name": name, "namespace": kubeflow.namespace, "labels": _labels(name)},
           "spec": {"runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": 0},
                    "tfReplicaSpecs": {
                        "Chief": replica(1, ["chief"], grpc + control),
                        "PS": replica(kubeflow.ps, ["ps", "--index", "$(REPLICA_INDEX)"], grpc),
                        "Worker": replica(kubeflow.workers, ["worker", "--index", "$(REPLICA_INDEX)"], grpc)}}}
    return [_config_map(name, kubeflow.namespace, settings), _claim(name, settings),
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


def render(settings: Settings, mode: str) -> list[dict]:
    if mode == "horovod":
        return mpijob(settings)
    if mode == "ps":
        return tfjob(settings)
    raise UserError(f"--mode: expected 'ps' or 'horovod', got {mode!r}")


def write_manifests(settings: Settings, mode: str, out: Path) -> Path:
    documents = render(settings, mode)
    header = (f"# Rendered by `unet-train manifests --target kubeflow --mode {mode}` (run {settings.train.run_name}).\n"
              f"# kubectl apply -f {out.name}   (needs the {'mpi-operator' if mode == 'horovod' else 'training-operator'}"
              f" and a ReadWriteMany StorageClass)\n")
    write_text(out, header + yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000))
    return out
