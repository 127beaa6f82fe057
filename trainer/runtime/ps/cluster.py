"""The PS cluster's shape, from settings: roles, addresses, TF_CONFIG."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from trainer.config.settings import ClusterSettings

PROXY_VARIABLES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy", "GRPC_PROXY",
                   "all_proxy", "ALL_PROXY")


@dataclass(frozen=True)
class ClusterLayout:
    ps: tuple[str, ...]
    workers: tuple[str, ...]
    chief: str
    control_port: int

    @classmethod
    def from_settings(cls, cluster: ClusterSettings) -> "ClusterLayout":
        return cls(tuple(cluster.ps_hosts), tuple(cluster.worker_hosts), cluster.chief_host, cluster.control_port)

    def spec(self) -> dict[str, list[str]]:
        return {"ps": list(self.ps), "worker": list(self.workers), "chief": [self.chief]}

    def address(self, job: str, index: int) -> str:
        tasks = self.spec()[job]
        if not 0 <= index < len(tasks):
            from trainer.errors import ConfigError

            raise ConfigError(f"cluster: no {job} task with index {index} (there are {len(tasks)})")
        return tasks[index]

    @property
    def control_address(self) -> tuple[str, int]:
        return self.chief.rsplit(":", 1)[0], self.control_port

    def server_tasks(self) -> list[tuple[str, int]]:
        """Every task the chief must wait for: all PS, then all workers."""
        return [("ps", i) for i in range(len(self.ps))] + [("worker", i) for i in range(len(self.workers))]

    def local_processes(self, job: str, index: int) -> int:
        """Tasks sharing this task's host (threads are divided between them)."""
        host = self.address(job, index).rsplit(":", 1)[0]
        compute = list(self.workers) + [self.chief]
        return max(1, sum(1 for address in compute if address.rsplit(":", 1)[0] == host))


def export_tf_config(layout: ClusterLayout, job: str, index: int) -> str:
    """Set TF_CONFIG for this process (the TensorFlow convention) and drop proxies: gRPC
    must talk to the cluster directly, never through an HTTP proxy."""
    for name in PROXY_VARIABLES:
        os.environ.pop(name, None)
    config = json.dumps({"cluster": layout.spec(), "task": {"type": job, "index": index}})
    os.environ["TF_CONFIG"] = config
    return config
