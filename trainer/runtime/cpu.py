"""CPU threading and oneDNN settings, applied before TensorFlow is imported.

TensorFlow reads TF_ENABLE_ONEDNN_OPTS and OpenMP/KMP variables once, at import time, so
``apply_cpu_environment`` must run first (the CLI calls it before importing anything that
imports TensorFlow); thread-pool sizes are set right after import by ``configure_threads``.
"""
from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass

from trainer.config.settings import CpuSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadPlan:
    intra_op: int
    inter_op: int
    env: dict[str, str]

    def describe(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in sorted(self.env.items()))
        return f"intra_op={self.intra_op} inter_op={self.inter_op} {env}"


def physical_cores() -> int:
    """Physical cores (not hyper-threads) from ``lscpu -p``; falls back to os.cpu_count()."""
    try:
        out = subprocess.run(["lscpu", "-p=CORE,SOCKET"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
        cores = {line for line in out.splitlines() if line and not line.startswith("#")}
        if cores:
            return len(cores)
    except (OSError, subprocess.SubprocessError):
        pass
    return os.cpu_count() or 1


def local_ranks_from_environment() -> int:
    """Processes sharing this host, as told by horovodrun (Gloo) or mpirun (Open MPI)."""
    for key in ("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if os.environ.get(key, "").isdigit():
            return max(1, int(os.environ[key]))
    return 1


def allowed_cpus() -> tuple[int, bool]:
    """CPUs this process may run on, and whether that is fewer than the machine has (bound by
    mpirun --bind-to, numactl, taskset or a container's cpuset)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1, False
    return allowed, allowed < (os.cpu_count() or allowed)


def default_intra_threads(local_ranks: int, cores: int | None = None) -> int:
    """Physical cores / ranks on this host; a process already bound to a CPU subset uses that
    subset (the binder has done the dividing), never more cores than it may run on."""
    cores = cores or physical_cores()
    allowed, bound = allowed_cpus()
    if bound:
        return max(1, min(allowed, cores))
    return max(1, min(cores, allowed) // max(1, local_ranks))


# A parameter-server cluster task runs remote functions whose ops block on each other across
# tasks; with a single inter-op thread one blocked op holds the only thread and the step never
# ends (seen: 1 PS + 2 workers at cpu.inter_op_threads=1 hung on the first step).
MIN_INTER_OP_CLUSTER = 2


def plan_threads(cpu: CpuSettings, local_ranks: int = 1, cores: int | None = None,
                 cluster_task: bool = False) -> ThreadPlan:
    intra = cpu.intra_op_threads or default_intra_threads(local_ranks, cores)
    inter = cpu.inter_op_threads
    if cluster_task and inter < MIN_INTER_OP_CLUSTER:
        log.warning("cpu.inter_op_threads=%d raised to %d for a parameter-server cluster task "
                    "(one inter-op thread can deadlock TensorFlow's distributed runtime)", inter,
                    MIN_INTER_OP_CLUSTER)
        inter = MIN_INTER_OP_CLUSTER
    omp = cpu.omp_num_threads or intra
    env = {
        "TF_ENABLE_ONEDNN_OPTS": "1" if cpu.onednn else "0",
        "OMP_NUM_THREADS": str(omp),
        "KMP_BLOCKTIME": str(cpu.kmp_blocktime),
        "KMP_AFFINITY": cpu.kmp_affinity,
        "TF_NUM_INTRAOP_THREADS": str(intra),
        "TF_NUM_INTEROP_THREADS": str(inter),
    }
    return ThreadPlan(intra_op=intra, inter_op=inter, env=env)


def apply_cpu_environment(cpu: CpuSettings, local_ranks: int | None = None,
                          cluster_task: bool = False) -> ThreadPlan:
    """Export the plan's variables into this process (call before importing TensorFlow)."""
    plan = plan_threads(cpu, local_ranks or local_ranks_from_environment(), cluster_task=cluster_task)
    os.environ.update(plan.env)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    return plan


def configure_threads(plan: ThreadPlan) -> None:
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(plan.intra_op)
        tf.config.threading.set_inter_op_parallelism_threads(plan.inter_op)
    except RuntimeError:  # already initialised (e.g. a second run in one process): keep the first
        log.debug("TensorFlow thread pools already initialised; keeping them")


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _clock_ghz() -> tuple[float, str]:
    """The nominal clock: lscpu's max MHz where the kernel reports it, else /proc/cpuinfo's MHz."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=True).stdout
        for line in out.splitlines():
            if line.startswith("CPU max MHz:"):
                return float(line.split(":", 1)[1]) / 1000.0, "lscpu max MHz"
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("cpu MHz"):
                    return float(line.split(":", 1)[1]) / 1000.0, "/proc/cpuinfo cpu MHz"
    except (OSError, ValueError):
        pass
    return 0.0, "unknown"


FMA_UNITS = 2  # two FMA pipes per core: Xeon (Skylake-SP and later) and EPYC server cores


def nominal_peak() -> dict:
    """fp32 FMA peak of the cores this process may use: cores x SIMD lanes x 2 (FMA) x FMA units
    x clock. The vector width is what oneDNN may use: AVX-512 unless ONEDNN_MAX_CPU_ISA caps it.
    A nominal ceiling for comparison (turbo, AVX-512 down-clocking and bf16/AMX units aside)."""
    flags = _cpu_flags()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    capped_below_avx512 = cap in {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2"}
    if "avx512f" in flags and not capped_below_avx512:
        lanes, isa = 16, "avx512"
    elif "avx2" in flags and "fma" in flags:
        lanes, isa = 8, "avx2+fma"
    else:
        lanes, isa = 4, "sse"
    cores = min(physical_cores(), allowed_cpus()[0])
    ghz, source = _clock_ghz()
    return {"cores": cores, "clock_ghz": ghz, "clock_source": source, "isa": isa, "fp32_lanes": lanes,
            "fma_units_assumed": FMA_UNITS, "onednn_max_cpu_isa": cap or None,
            "gflop_per_sec": cores * lanes * 2 * FMA_UNITS * ghz}
