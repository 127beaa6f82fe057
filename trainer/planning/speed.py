"""Speed: what N nodes would make of a step calibrated on one.

The calibration itself (a few steps of ``unet-train benchmark``'s train mode on this node) is
the plan command's, in ``trainer.commands.calibration``; this module is the pure model it feeds.

The multi-node projection (docs/planning.md) adds communication to the calibrated compute:

* Horovod ring allreduce of the float32 gradients G over N ranks:
  t = 2 (N - 1) alpha + 2 (N - 1) / N x G x (beta + 8 / B)
* parameter servers (P of them, W workers): every worker pushes G and pulls the weights, through
  the servers' links: t = 2 alpha + 2 W G / P x (beta + 8 / B)

alpha (per message) and beta (per byte: copying and reducing) come from a Horovod allreduce timed
on loopback at 2 and 4 ranks (benchmarks/allreduce_time.py); B is the network's bits per second.
Communication is not overlapped with compute here, so the projection errs on the slow side.
"""
from __future__ import annotations

from dataclasses import dataclass

# Fitted by benchmarks/network_constants.py (a Horovod/Gloo allreduce of the UNets' gradients on
# loopback at 2 and 4 ranks, 2-core Xeon: 4 ranks oversubscribe it, so alpha errs high); docs/planning.md.
ALPHA_S = 0.00641          # seconds per ring message
BETA_S_PER_BYTE = 1.05e-09  # seconds per byte copied and reduced


@dataclass(frozen=True)
class Projection:
    nodes: int
    step_s: float
    images_per_sec: float
    efficiency: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def project(compute_step_s: float, global_batch_per_node: int, params: int, nodes: int, ranks_per_node: int,
            network_gbps: float, mode: str, ps: int = 1) -> Projection:
    """Step time and scaling efficiency of synchronous SGD on ``nodes`` nodes."""
    gradient_bytes = 4.0 * params
    per_byte = BETA_S_PER_BYTE + 8.0 / (network_gbps * 1e9)
    ranks = nodes * ranks_per_node
    if ranks == 1:
        communication = 0.0
    elif mode == "horovod":
        communication = 2 * (ranks - 1) * ALPHA_S + 2 * (ranks - 1) / ranks * gradient_bytes * per_byte
    else:
        communication = 2 * ALPHA_S + 2 * ranks * gradient_bytes / ps * per_byte
    step = compute_step_s + communication
    images = nodes * global_batch_per_node / step
    return Projection(nodes, step, images, compute_step_s / step)
