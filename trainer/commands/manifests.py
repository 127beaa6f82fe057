"""``unet-train manifests --target kubeflow``: Kubernetes YAML for the Kubeflow operators."""
from __future__ import annotations

import argparse

from launcher.kubeflow import write_manifests
from trainer.commands.settings import load_cli_settings

KUBEFLOW_FLAGS = {"run_name": "train.run_name", "model": "train.model", "epochs": "train.epochs",
                  "image": "cluster.kubeflow.image", "namespace": "cluster.kubeflow.namespace",
                  "workers": "cluster.kubeflow.workers", "ps": "cluster.kubeflow.ps",
                  "threads": "cluster.kubeflow.threads", "gpus_per_worker": "cluster.kubeflow.gpus_per_worker"}


def cmd_manifests(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args, {key: getattr(args, attr) for attr, key in KUBEFLOW_FLAGS.items()})
    mode = args.mode or settings.cluster.mode
    out = args.out or settings.run_path / f"kubeflow-{mode}.yaml"
    write_manifests(settings, mode, out)
    kind = "MPIJob (mpi-operator)" if mode == "horovod" else "TFJob (training-operator)"
    print(f"wrote {out}: ConfigMap (settings), PersistentVolumeClaim (data/, runs/), {kind}; "
          f"apply with: kubectl apply -f {out}")
    return 0
