"""CPU threading and oneDNN settings, applied before TensorFlow is imported.

TensorFlow reads TF_ENABLE_ONEDNN_OPTS and OpenMP/KMP variables once, at import time, so
``apply_cpu_environment`` must run first (the CLI calls it before importing anything that
imports TensorFlow); thread-pool sizes are set right after import by ``configure_threads``.

KMP_AFFINITY and KMP_BLOCKTIME are read only by an Intel (libiomp5) or LLVM (libomp) OpenMP
runtime. Stock ``tensorflow-cpu`` links none: its oneDNN runs on TensorFlow's own Eigen thread
pool (readelf -d libtensorflow_framework.so.2 / libtensorflow_cc.so.2: no OpenMP library), and
measured here the variables changed nothing (a 2D UNet step, 3 alternated repeats per setting).
So they are set, and logged, only where the installed TensorFlow links such a runtime (Intel's
MKL builds link libiomp5); :func:`openmp_runtime` tells, from the shared libraries' dynamic
sections, without importing TensorFlow. OMP_NUM_THREADS stays: numpy's OpenBLAS reads it.
"""
from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from typing import Mapping

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


# OpenMP runtimes that read KMP_* (GNU's libgomp does not: it has GOMP_* and OMP_* only)
KMP_RUNTIMES = ("libiomp5", "libomp")
_UNSET = object()


def plan_threads(cpu: CpuSettings, local_ranks: int = 1, cores: int | None = None,
                 cluster_task: bool = False, openmp=_UNSET) -> ThreadPlan:
    """``openmp``: the OpenMP runtime TensorFlow links (:func:`openmp_runtime`, looked up when not
    given); KMP_AFFINITY/KMP_BLOCKTIME are planned only for one that reads them."""
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
        "TF_NUM_INTRAOP_THREADS": str(intra),
        "TF_NUM_INTEROP_THREADS": str(inter),
    }
    runtime = openmp_runtime() if openmp is _UNSET else openmp
    if runtime is not None and runtime.startswith(KMP_RUNTIMES):
        env["KMP_BLOCKTIME"] = str(cpu.kmp_blocktime)
        env["KMP_AFFINITY"] = cpu.kmp_affinity
    return ThreadPlan(intra_op=intra, inter_op=inter, env=env)


def openmp_runtime(package_dir: str | None = None) -> str | None:
    """The OpenMP library the installed TensorFlow's shared libraries link (e.g. 'libiomp5.so'),
    or None, read from their ELF dynamic sections (DT_NEEDED) without importing TensorFlow."""
    import glob

    if package_dir is None:
        package_dir = _tensorflow_dir()
        if package_dir is None:
            return None
    libraries = (glob.glob(os.path.join(package_dir, "libtensorflow_framework.so*"))
                 + glob.glob(os.path.join(package_dir, "libtensorflow_cc.so*"))
                 + glob.glob(os.path.join(package_dir, "python", "_pywrap_tensorflow_internal.so")))
    for library in libraries:
        for needed in needed_libraries(library):
            if needed.startswith(("libiomp", "libomp", "libgomp")):
                return needed
    return None


def _tensorflow_dir() -> str | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec("tensorflow")
    except (ImportError, ValueError):
        return None
    return os.path.dirname(spec.origin) if spec and spec.origin else None


def needed_libraries(path: str) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF file ([] for anything else). Reads only
    the program headers, the dynamic section and its string table (libtensorflow_cc is 0.5 GB)."""
    import struct

    try:
        with open(path, "rb") as handle:
            header = handle.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
                return []
            phoff, = struct.unpack_from("<Q", header, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
            handle.seek(phoff)
            table = handle.read(phentsize * phnum)
            loads, dynamic = [], None
            for i in range(phnum):
                kind, _, offset, vaddr, _, filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
                if kind == 1:  # PT_LOAD: maps addresses to file offsets
                    loads.append((vaddr, offset, filesz))
                elif kind == 2:  # PT_DYNAMIC
                    dynamic = (offset, filesz)
            if dynamic is None:
                return []
            handle.seek(dynamic[0])
            raw = handle.read(dynamic[1])
            entries = [struct.unpack_from("<qQ", raw, i) for i in range(0, len(raw) - 15, 16)]
            values = {tag: value for tag, value in entries if tag in (5, 10)}  # DT_STRTAB, DT_STRSZ
            if 5 not in values or 10 not in values:
                return []
            start = next((offset + values[5] - vaddr for vaddr, offset, size in loads
                          if vaddr <= values[5] < vaddr + size), None)
            if start is None:
                return []
            handle.seek(start)
            strings = handle.read(values[10])
    except (OSError, struct.error):
        return []
    names = []
    for tag, value in entries:
        if tag == 0:  # DT_NULL
            break
        if tag == 1 and value < len(strings):  # DT_NEEDED
            names.append(strings[value:strings.index(b"\0", value)].decode("ascii", "replace"))
    return names


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


# x86 feature flags that mean bfloat16 arithmetic in hardware (dot products / AMX tiles),
# not just conversion: without them TensorFlow and OpenVINO emulate bf16 (seen: ~18x slower).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

# oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA, or its older name DNNL_MAX_CPU_ISA), from oneDNN's
# "CPU dispatcher control" guide. The AVX-512 line is ordered AVX512_CORE < AVX512_CORE_VNNI <
# AVX512_CORE_BF16 < AVX10_1_512 (= AVX512_CORE_FP16) < AVX10_1_512_AMX (= AVX512_CORE_AMX) < ...;
# a cap below AVX512_CORE_BF16 hides the bf16 instructions from oneDNN even when the CPU has them.
# AVX2_VNNI_2 has bf16 *conversions* only (and needs AVX-NE-CONVERT), so it counts as no bf16.
ONEDNN_ISAS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                                      "AVX512_CORE_VNNI"})
ONEDNN_ISAS_WITH_BF16 = frozenset({"AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX",
                                   "AVX512_CORE_AMX", "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16",
                                   "AVX10_2_512", "AVX10_2_512_AMX_2", "DEFAULT", "ALL"})
ONEDNN_ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")  # oneDNN reads them in this order


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags (the first ``flags`` line of /proc/cpuinfo); empty when unreadable."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as handle:
                cpuinfo = handle.read()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@dataclass(frozen=True)
class OneDnnIsaCap:
    """What the environment tells oneDNN about the highest ISA it may use."""

    variable: str | None  # the variable that set the cap (None: no cap)
    value: str | None

    @property
    def allows_bf16(self) -> bool | None:
        """True/False for a known ISA name; None for a value oneDNN would not recognise."""
        if self.value is None or self.value in ONEDNN_ISAS_WITH_BF16:
            return True
        if self.value in ONEDNN_ISAS_WITHOUT_BF16:
            return False
        return None

    def describe(self) -> str:
        return "oneDNN max ISA unrestricted" if self.variable is None else f"{self.variable}={self.value}"


def onednn_isa_cap(env: Mapping[str, str] | None = None) -> OneDnnIsaCap:
    env = os.environ if env is None else env
    for variable in ONEDNN_ISA_VARIABLES:
        value = env.get(variable, "").strip()
        if value:
            return OneDnnIsaCap(variable, value.upper())
    return OneDnnIsaCap(None, None)


@dataclass(frozen=True)
class Bf16Support:
    """Whether bf16 runs natively (fast) on this CPU under the current oneDNN setup, and why."""

    native: bool
    reason: str


def native_bf16_support(flags: frozenset[str], onednn: bool, env: Mapping[str, str] | None = None) -> Bf16Support:
    """bf16 is fast only when the CPU has bf16 arithmetic, oneDNN is on, and no ISA cap hides it."""
    present = [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
    cap = onednn_isa_cap(env)
    if not present:
        return Bf16Support(False, f"no {'/'.join(NATIVE_BF16_FLAGS)} in the CPU flags")
    have = "+".join(present) + " present"
    if not onednn:
        return Bf16Support(False, f"{have}, but oneDNN is off (cpu.onednn: false)")
    allowed = cap.allows_bf16
    if allowed is None:
        return Bf16Support(False, f"{have}, but {cap.describe()} is not a oneDNN ISA name "
                                  f"(expected e.g. AVX2, AVX512_CORE, AVX512_CORE_BF16, AVX512_CORE_AMX)")
    if not allowed:
        return Bf16Support(False, f"{have}, but {cap.describe()} caps oneDNN below AVX512_CORE_BF16")
    return Bf16Support(True, f"{have}, {cap.describe()}")



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
    flags = cpu_flags()
    cap = onednn_isa_cap().value
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
            "fma_units_assumed": FMA_UNITS, "onednn_max_cpu_isa": cap,
            "gflop_per_sec": cores * lanes * 2 * FMA_UNITS * ghz}
