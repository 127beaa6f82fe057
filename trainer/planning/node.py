"""The node a plan is for: cores, sockets, NUMA nodes, memory, ISA and native bf16, GPUs.

Read without TensorFlow (lscpu, /sys, /proc, nvidia-smi), so ``plan`` describes a node in a
second; the same readers as the runtime's (trainer.hardware.cpu).
"""
from __future__ import annotations

import glob
import shutil
import subprocess
from dataclasses import asdict, dataclass, field

from trainer.hardware.cpu import allowed_cpus, cpu_flags, native_bf16_support, physical_cores
from trainer.planning.memory import available_memory

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class NodeFingerprint:
    physical_cores: int
    allowed_cpus: int
    sockets: int
    numa_nodes: int
    memory_total_gb: float
    memory_available_gb: float
    memory_source: str
    isa: tuple[str, ...]
    native_bf16: bool
    bf16_reason: str
    gpus: list[dict] = field(default_factory=list)  # name, memory_gb

    def as_dict(self) -> dict:
        return asdict(self)

    def rows(self) -> list[tuple[str, str]]:
        gpus = ", ".join(f"{g['name']} ({g['memory_gb']:.0f} GB)" for g in self.gpus) or "none"
        return [("cores", f"{self.physical_cores} physical ({self.allowed_cpus} CPUs allowed), {self.sockets} "
                          f"socket(s), {self.numa_nodes} NUMA node(s)"),
                ("memory", f"{self.memory_total_gb:.1f} GB, {self.memory_available_gb:.1f} GB available "
                           f"({self.memory_source})"),
                ("ISA", " ".join(self.isa) or "baseline x86-64"),
                ("bf16", f"{'native' if self.native_bf16 else 'not native'}: {self.bf16_reason}"),
                ("GPUs", gpus)]


def probe_node(onednn: bool = True, memory_limit_gb: float = 0.0) -> NodeFingerprint:
    flags = cpu_flags()
    bf16 = native_bf16_support(flags, onednn)
    available = available_memory(memory_limit_gb)
    return NodeFingerprint(
        physical_cores=physical_cores(), allowed_cpus=allowed_cpus()[0], sockets=_count_sockets(),
        numa_nodes=max(1, len(glob.glob("/sys/devices/system/node/node[0-9]*"))),
        memory_total_gb=_mem_total_gb(), memory_available_gb=available.mib / 1024, memory_source=available.source,
        isa=tuple(f for f in ISA_FLAGS if f in flags), native_bf16=bf16.native, bf16_reason=bf16.reason,
        gpus=_gpus())


def _count_sockets() -> int:
    ids = set()
    for path in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/topology/physical_package_id"):
        try:
            with open(path) as handle:
                ids.add(handle.read().strip())
        except OSError:
            continue
    return max(1, len(ids))


def _mem_total_gb() -> float:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2 ** 20
    except (OSError, ValueError):
        pass
    return 0.0


def _gpus() -> list[dict]:
    """NVIDIA GPUs as nvidia-smi lists them (none when it is not installed)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.splitlines():
        name, _, mib = line.rpartition(",")
        try:
            gpus.append({"name": name.strip(), "memory_gb": float(mib) / 1024})
        except ValueError:
            continue
    return gpus
