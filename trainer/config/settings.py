"""Typed settings: the one schema behind settings.yaml.

Parsed once at the CLI edge (see ``trainer.config.load``) and passed down as these
immutable objects; nothing below the CLI reads YAML, argv or the environment for
configuration. Unknown keys, wrong types and out-of-range values are rejected by
pydantic with the offending key's dotted path.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Modality = Literal["flair", "t1", "t1ce", "t2"]
MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
# A host name the launcher may pass to ssh/Ansible: no spaces, quotes or shell characters.
HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?")


def check_host_names(hosts: tuple[str, ...]) -> tuple[str, ...]:
    """The one host rule (``--hosts`` and ``cluster.hosts``): safe names, none listed twice."""
    for host in hosts:
        if not HOST_NAME.fullmatch(host):
            raise ValueError(f"invalid host {host!r}: only letters, digits, '.' and '-' are allowed "
                             f"(no spaces, quotes or shell characters)")
    duplicates = sorted(host for host, seen in Counter(hosts).items() if seen > 1)
    if duplicates:
        raise ValueError(f"host {duplicates[0]!r} is listed twice")
    return hosts


# An absolute path the launcher may hand to ssh, rsync and horovodrun: horovodrun pastes
# `-i KEY` unquoted into a /bin/sh command line, so no spaces, quotes or shell characters.
ABSOLUTE_PATH = r"(/[A-Za-z0-9_.-]+)+"


def _check_host_port(address: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9.-]+:[0-9]{1,5}", address):
        raise ValueError(f"expected 'host:port' (letters, digits, '.', '-'), got {address!r}")
    port = int(address.rsplit(":", 1)[1])
    if not 1 <= port <= 65535:
        raise ValueError(f"port out of range 1..65535 in {address!r}")
    return address


class _Section(BaseModel):
    """Strict, frozen base: typos in settings must fail loudly, not be ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class SplitSettings(_Section):
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    seed: int = Field(42, ge=0)

    @model_validator(mode="after")
    def _leave_training_cases(self) -> "SplitSettings":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be < 1 (no cases left to train on)")
        return self


# Keys of the layout-named data settings, and what replaced each (a prepared dataset folder
# describes itself: trainer.data.prepared).
RENAMED_DATA_KEYS = {
    "brats_dir": "data.source (the raw dataset folder of either layout; prepare --src)",
    "decathlon_dir": "data.source (the raw dataset folder of either layout; prepare --src)",
    "slices_h5": "data.dataset (the prepared dataset folder holding the slices; prepare --out, train --data)",
    "decathlon_split": "data.dataset (the prepared dataset folder, whose prepared.json holds the split)",
    "cache_dir": "data.cache_volumes (true: the 3D cache inside the prepared dataset folder)",
}


MAX_CROP_EDGE = 512
MAX_CROP_VOXELS = 256 ** 3  # a whole BraTS volume (240 x 240 x 155) fits


class DataSettings(_Section):
    # The prepared dataset folder (prepare --out, train --data); null = the last one prepared from
    # the current folder (data/prepared/last.json).
    dataset: Optional[Path] = None
    # The raw dataset folder (either layout): prepare's --src, and where the whole volumes are read
    # when they moved since prepare; null = the source the prepared dataset recorded.
    source: Optional[Path] = None
    cache_volumes: bool = Field(True, description="3D: prepare also writes a normalised .npy cache")
    brats_dir: Any = Field(None, exclude=True)
    slices_h5: Any = Field(None, exclude=True)
    decathlon_dir: Any = Field(None, exclude=True)
    cache_dir: Any = Field(None, exclude=True)
    decathlon_split: Any = Field(None, exclude=True)
    channels: tuple[Modality, ...] = Field(MODALITIES, min_length=1, max_length=4)
    image_size: int = Field(128, ge=16, le=1024, multiple_of=16)
    crop_size: tuple[int, int, int] = (64, 64, 64)
    tumour_crop_fraction: float = Field(0.5, ge=0.0, le=1.0)
    tumour_slice_fraction: float = Field(0.33, ge=0.0, le=1.0,
                                         description="2D: share of each shuffled batch drawn from tumour slices")
    val_crops_per_case: int = Field(4, ge=1, le=64, description="3D: fixed validation crops per case")
    split: SplitSettings = SplitSettings()
    augment: bool = True
    shuffle: bool = True
    shuffle_buffer: int = Field(2048, ge=1)
    parallel_calls: int = Field(0, ge=0, description="0 = tf.data AUTOTUNE")
    prefetch: int = Field(0, ge=0, description="0 = tf.data AUTOTUNE")
    # Checked on the NIfTI header before anything is allocated: an 83-byte file can claim
    # 16384 x 16384 x 16 voxels. 2**28 is 7.5x a 240 x 240 x 155 x 4 BraTS/Decathlon case.
    # At most 2**30: a plan or a run's settings once set 1e12. Voxels wider than 4 bytes count as
    # more than one (a float64 volume twice: seen, 2.1 MB of gzip -> 6.9 GB at its peak).
    max_voxels: int = Field(2 ** 28, ge=1, le=2 ** 30, description="largest NIfTI volume read (voxels, all "
                                                                    "channels; 8-byte voxels count twice)")

    @field_validator("brats_dir", "slices_h5", "decathlon_dir", "cache_dir", "decathlon_split")
    @classmethod
    def _renamed_data_key(cls, value: Any, info) -> None:
        if value is not None:
            raise ValueError(f"replaced by {RENAMED_DATA_KEYS[info.field_name]}")
        return None

    @field_validator("crop_size")
    @classmethod
    def _crop_divisible_by_16(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(edge < 16 or edge % 16 for edge in value):
            raise ValueError(f"every crop edge must be a multiple of 16 and >= 16, got {list(value)}")
        # seen: [1024,1024,64] in a run's settings killed 3D predict for memory in 8 s
        if max(value) > MAX_CROP_EDGE or math.prod(value) > MAX_CROP_VOXELS:
            raise ValueError(f"a crop is at most {MAX_CROP_EDGE} per edge and {MAX_CROP_VOXELS:,} voxels "
                             f"(256 x 256 x 256), got {list(value)}")
        return value

    @field_validator("channels")
    @classmethod
    def _unique_channels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"channels must not repeat, got {list(value)}")
        return value


class ModelSettings(_Section):
    regions: tuple[Literal["wt", "tc", "et"], ...] = Field(("wt",), min_length=1, max_length=3)
    base_filters_2d: int = Field(32, ge=1, le=256)
    base_filters_3d: int = Field(16, ge=1, le=128)
    upsampling: Literal["transposed", "upsample"] = "transposed"
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    # "instance" normalises each sample on its own (nnU-Net's choice): its numbers do not depend on
    # the batch, so N workers x b compute exactly what one process computes at N*b; in 2D it also made
    # training far less sensitive to the CPU's rounding (quality benchmark). In 3D, on 64^3 crops that
    # are often healthy tissue only, it over-segmented (validation precision ~0.6 after 180 steps),
    # so 3D keeps batch norm. "batch" keeps moving statistics (see batch_norm_momentum).
    norm_2d: Literal["none", "batch", "instance"] = "instance"
    norm_3d: Literal["batch", "instance"] = "batch"
    # Keras' default 0.99 keeps ~74% of the initial statistics after 30 steps: inference-mode
    # validation of a short run at batch 1-2 (the 3D model) is then garbage. 0.9 tracks in ~20 steps.
    batch_norm_momentum: float = Field(0.9, gt=0.0, lt=1.0)
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    # Post-processing also chooses each region's threshold on the validation split (0.3-0.9, kept only
    # where its Dice rises). The 2D model over-segments at 0.5 on the hard phantom: in 8 runs of 8,
    # validation chose 0.8 for TC and the held-out TC rose too (docs/results.md). 3D does not:
    # in 2 runs of 2 validation chose 0.3 for TC and the held-out TC fell, so 3D keeps its threshold.
    tune_thresholds_2d: bool = True
    tune_thresholds_3d: bool = False
    # Test-time mirroring (nnU-Net's default): predictions are averaged over every combination of
    # flips along these volume axes (0 = x, 1 = y, 2 = z), 2**k passes. Training flips every axis,
    # so each pass is an input the model has learnt. On the 2D regions benchmark it removed a 3-voxel
    # false enhancing tumour (ET probability 0.61 -> 0.27) that scored a low-grade case 0. 3D keeps it
    # off by default: x/y mirroring made the sliding window 4x slower (about 4 minutes a case on 2
    # cores), and the 3D region targets are met without it.
    # 2.5D: the 2D model also sees k slices above and below, every modality (input channels x (2k + 1));
    # 0 = one slice. Neighbours outside the brain or the volume are zeros, in training and inference.
    context_slices_2d: int = Field(0, ge=0, le=4)
    # Slices between context planes: k planes at stride s reach k x s slices each side, same cost.
    context_stride_2d: int = Field(1, ge=1, le=8)
    mirror_axes_2d: tuple[Literal[0, 1], ...] = Field((0, 1), max_length=2)
    mirror_axes_3d: tuple[Literal[0, 1, 2], ...] = Field((), max_length=3)

    # The old boolean key stays in the schema only to point old files at norm_2d (never dumped).
    batch_norm_2d: Any = Field(None, exclude=True)

    @field_validator("batch_norm_2d")
    @classmethod
    def _renamed_to_norm_2d(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("replaced by model.norm_2d: none | batch | instance "
                             "(batch_norm_2d: true -> norm_2d: batch; false -> norm_2d: none)")
        return None

    @field_validator("mirror_axes_2d", "mirror_axes_3d")
    @classmethod
    def _distinct_mirror_axes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"mirror axes must not repeat, got {list(value)}")
        return tuple(sorted(value))

    def mirror_axes(self, model: str) -> tuple[int, ...]:
        """The test-time mirror axes of the 2D or the 3D model."""
        return getattr(self, f"mirror_axes_{model}")

    def tune_thresholds(self, model: str) -> bool:
        """Whether validation chooses the region thresholds of the 2D or the 3D model."""
        return getattr(self, f"tune_thresholds_{model}")

    @field_validator("regions")
    @classmethod
    def _distinct_regions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"regions must not repeat, got {list(value)}")
        return value


class LossSettings(_Section):
    name: Literal["dice", "log_dice", "bce_dice"] = "bce_dice"
    bce_weight: float = Field(1.0, ge=0.0)
    smooth_numerator: float = Field(1.0, ge=0.0)
    smooth_denominator: float = Field(1.0, gt=0.0)


class ScheduleSettings(_Section):
    name: Literal["constant", "step", "cosine", "poly", "plateau"] = "cosine"
    step_epochs: int = Field(10, ge=1)
    gamma: float = Field(0.5, gt=0.0, le=1.0)
    min_lr: float = Field(1e-6, ge=0.0)
    plateau_patience: int = Field(3, ge=1)


class TrainSettings(_Section):
    model: Literal["2d", "3d"] = "2d"
    dist: Literal["single", "horovod", "ps"] = "single"
    run_dir: Path = Path("runs")
    run_name: str = Field("default", pattern=r"^[A-Za-z0-9._-]+$")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1, description="per worker/rank")
    steps_per_epoch: int = Field(0, ge=0, description="0 = one pass over the training set (global batches)")
    validation_steps: int = Field(0, ge=0, description="0 = every validation case; N = N global batches over all cases")
    optimizer: Literal["adam", "sgd"] = "adam"
    learning_rate: float = Field(1e-3, gt=0.0, le=10.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    scale_lr: bool = Field(True, description="multiply LR by the number of workers (Horovod/PS)")
    warmup_epochs: float = Field(0.0, ge=0.0)
    loss: LossSettings = LossSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    early_stopping_patience: int = Field(0, ge=0, description="0 = off")
    keep_checkpoints: int = Field(3, ge=1)
    checkpoint_every_steps: int = Field(0, ge=0, description="mid-epoch checkpoint every N steps (0 = off)")
    checkpoint_every_minutes: float = Field(10.0, ge=0.0, description="mid-epoch checkpoint every M minutes (0 = off)")
    max_steps: int = Field(0, ge=0, description="stop once the global step reaches this (0 = no limit)")
    validate_full_volumes: bool = Field(True, description="after training: post-processing decided on the whole "
                                                          "validation volumes, their Dice in runs/R/validation.json")
    elastic: bool = Field(False, description="Horovod Elastic: survive lost/added ranks (horovodrun --min-np ...)")
    allow_single_rank: bool = Field(False, description="true = dist horovod may run as one rank (no launcher, or "
                                                       "horovodrun -np 1); false = refused as a forgotten launcher")
    elastic_commit_steps: int = Field(10, ge=1, description="elastic: commit the in-memory state every N steps")
    image_every_epochs: int = Field(1, ge=0, description="0 = no TensorBoard image panels")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on CPUs with native bf16, fp16 on GPUs, else fp32")
    # The old boolean key could not say "auto"; it stays in the schema only to point old files
    # at the new key (excluded from dumps, so `config show` and run settings never carry it).
    mixed_precision: Any = Field(None, exclude=True)
    seed: int = Field(1234, ge=0)
    # The plan file these settings came from (train --plan), recorded in runs/R/run.json.
    plan: Optional[Path] = None

    @field_validator("mixed_precision")
    @classmethod
    def _renamed_to_precision(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("replaced by train.precision: auto | fp32 | bf16 | fp16 "
                             "(mixed_precision: false -> precision: fp32; true -> precision: auto)")
        return None

    @field_validator("run_name")
    @classmethod
    def _not_only_dots(cls, value: str) -> str:
        if set(value) == {"."}:
            raise ValueError(f"run_name {value!r} would name the runs folder itself or its parent")
        return value


class CpuSettings(_Section):
    intra_op_threads: int = Field(0, ge=0, description="0 = physical cores / local ranks")
    inter_op_threads: int = Field(2, ge=1)
    omp_num_threads: int = Field(0, ge=0, description="0 = same as intra_op_threads")
    kmp_blocktime: int = Field(1, ge=0)
    kmp_affinity: str = Field("granularity=fine,compact,1,0", pattern=r"^[A-Za-z0-9_=,.]*$")
    onednn: bool = True
    numa_node: int = Field(-1, ge=-1, description="-1 = no numactl binding")
    knl_mcdram: bool = False
    memory_limit_gb: float = Field(0.0, ge=0.0, description="memory a training process may use; 0 = detect "
                                                            "(cgroup limit or MemAvailable)")


# Values that land in a #SBATCH line or a Kubernetes manifest: no spaces, quotes, newlines or
# shell characters, so nothing a user writes can add a directive or a command.
SLURM_NAME = r"^[A-Za-z0-9_.-]*$"
# Slurm time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or UNLIMITED/INFINITE.
SLURM_TIME = r"^(|[0-9]+|[0-9]+:[0-9]{2}|[0-9]+:[0-9]{2}:[0-9]{2}|[0-9]+-[0-9]+(:[0-9]{2}(:[0-9]{2})?)?|UNLIMITED|INFINITE)$"
# One extra sbatch option, e.g. --mem=8G, --exclusive, --qos=long, --gres=gpu:2, --mail-user=a@b.org
SBATCH_OPTION = re.compile(r"--[a-z][a-z0-9-]*(=[A-Za-z0-9_.,:@%+/=*-]+)?")
# Options the launcher sets itself (or that would change what it reads back): never from settings.
SBATCH_RESERVED = ("job-name", "output", "error", "chdir", "parsable", "wrap", "nodes", "ntasks",
                   "ntasks-per-node", "cpus-per-task", "partition", "time", "account", "constraint",
                   "array", "open-mode", "input", "export", "export-file", "hold", "test-only")


# Options extra_sbatch may add: an allow-list, by full name (sbatch would expand a prefix to a
# name not checked here). Resources, placement, accounting and mail only. Not allowed, e.g.:
# --wait (blocks the launcher's `sbatch --parsable`), --uid/--gid, --get-user-env, --container,
# --clusters (the job would leave the cluster the launcher follows), --burst-buffer/--bbf (files
# staged by the scheduler), --kill-on-invalid-dep. --signal/--requeue come from signal_s/requeue.
SBATCH_ALLOWED = ("mem", "mem-per-cpu", "mem-per-gpu", "qos", "exclusive", "gres", "gres-flags", "gpus",
                  "gpus-per-node", "gpus-per-task", "gpus-per-socket", "cpus-per-gpu", "gpu-bind", "mail-user",
                  "mail-type", "comment", "reservation", "nodelist", "exclude", "licenses", "tmp", "hint",
                  "threads-per-core", "cores-per-socket", "sockets-per-node", "mincpus", "contiguous",
                  "switches", "begin", "deadline", "nice", "oversubscribe", "wckey", "time-min", "dependency",
                  "prefer", "cpu-freq", "mem-bind")
# Set by the batch script from cluster.slurm.signal_s/requeue: refused there, naming those keys.
SBATCH_FROM_SETTINGS = ("signal", "requeue", "no-requeue")


def reserved_sbatch_option(name: str) -> str | None:
    """The reserved option ``--name`` stands for, if any. sbatch parses long options with
    getopt_long, which takes any unambiguous prefix (``--outp=`` is ``--output=``), so a name that
    begins a reserved option is that option (or an error), never something else."""
    for reserved in SBATCH_RESERVED:
        if reserved.startswith(name):
            return reserved
    return None


class SlurmSettings(_Section):
    """``unet-train distributed --scheduler slurm``: one batch job, one task per rank/role."""

    nodes: int = Field(1, ge=1, le=100000)
    ntasks_per_node: int = Field(4, ge=1, le=1024, description="PS mode default: chief + 1 PS + 2 workers")
    cpus_per_task: int = Field(1, ge=1, le=4096, description="threads per rank/role (intra-op, OMP)")
    partition: str = Field("", pattern=SLURM_NAME, description="'' = the cluster's default partition")
    time: str = Field("", pattern=SLURM_TIME, description="'' = the partition's default limit")
    account: str = Field("", pattern=SLURM_NAME)
    constraint: str = Field("", pattern=r"^[A-Za-z0-9_.,&|:*()\[\]!-]*$",
                            description="node features, e.g. KNL modes 'quad,flat' or 'quad&cache'")
    extra_sbatch: tuple[str, ...] = Field((), description="more #SBATCH options, each '--key=value' or '--flag'")
    ps_tasks: int = Field(1, ge=1, description="PS mode: tasks that are parameter servers (one task is the chief)")
    port_base: int = Field(8888, ge=1024, le=65000, description="PS mode: first gRPC port per node")
    srun_mpi: str = Field("pmix", pattern=r"^[a-z0-9_]+$", description="srun --mpi plugin for Horovod ranks")
    poll_s: float = Field(1.0, gt=0.0, le=60.0, description="how often the launcher reads the job's output")
    signal_s: int = Field(120, ge=0, le=65535, description="#SBATCH --signal=B:USR1@signal_s: seconds before the "
                          "time limit the tasks checkpoint at the next step and exit 75 (0 = no warning signal)")
    requeue: bool = Field(True, description="#SBATCH --requeue, and the job requeues itself when its step exits "
                          "75 (checkpointed after SIGUSR1); false = it ends there, resume by running it again")

    @field_validator("extra_sbatch")
    @classmethod
    def _safe_sbatch_options(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for option in value:
            if not SBATCH_OPTION.fullmatch(option):
                raise ValueError(f"invalid sbatch option {option!r}: expected '--key=value' or '--flag' "
                                 f"(letters, digits and _.,:@%+/=*- only; no spaces, quotes or newlines)")
            name = option[2:].split("=", 1)[0]
            reserved = reserved_sbatch_option(name)
            if reserved:
                raise ValueError(f"sbatch option {option!r}: --{name} is (sbatch reads it as) --{reserved}, which "
                                 f"the launcher sets (use cluster.slurm.{reserved.replace('-', '_')} or its flag "
                                 f"where there is one)")
            if name not in SBATCH_ALLOWED and not any(word.startswith(name) for word in SBATCH_FROM_SETTINGS):
                raise ValueError(f"sbatch option {option!r}: --{name} is not one extra_sbatch passes on (full names "
                                 f"only): {', '.join('--' + n for n in SBATCH_ALLOWED)}")
        return value


class KubeflowSettings(_Section):
    """``unet-train manifests --target kubeflow``: what the rendered MPIJob/TFJob carry."""

    image: str = Field("unet-train:latest", pattern=r"^[A-Za-z0-9][A-Za-z0-9_./:@-]*$")
    namespace: str = Field("default", pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
    workers: int = Field(2, ge=1, description="MPIJob workers (one rank each) / TFJob workers")
    ps: int = Field(1, ge=1, description="TFJob parameter servers")
    threads: int = Field(4, ge=1, le=1024, description="CPU request per rank/role = intra-op threads")
    memory: str = Field("8Gi", pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)?$")
    gpus_per_worker: int = Field(0, ge=0, le=16, description="nvidia.com/gpu per worker (0 = CPU)")
    pvc_size: str = Field("100Gi", pattern=r"^[0-9]+(Mi|Gi|Ti)$")
    storage_class: str = Field("", pattern=r"^([a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?)?$",
                               description="'' = the cluster's default StorageClass")
    port: int = Field(2222, ge=1, le=65535, description="TFJob: gRPC port of every task")


class ClusterSettings(_Section):
    hosts: tuple[str, ...] = Field((), description="launcher hosts when --hosts is not given")
    mode: Literal["ps", "horovod"] = Field("ps", description="launcher mode when --mode is not given")
    ps_hosts: tuple[str, ...] = ("127.0.0.1:2222",)
    worker_hosts: tuple[str, ...] = ("127.0.0.1:2223", "127.0.0.1:2224")
    chief_host: str = "127.0.0.1:2225"
    control_port: int = Field(2226, ge=1, le=65535, description="chief's lifecycle channel (stop/heartbeat)")
    asynchronous: bool = Field(False, alias="async")
    startup_timeout_s: float = Field(60.0, gt=0.0)
    step_timeout_s: float = Field(300.0, gt=0.0)
    max_restarts: int = Field(3, ge=0, le=1000, description="SSH launcher, PS mode: times a worker process that "
                                                            "died is started again on its host and port (0 = off)")
    elastic_cooldown_s: tuple[int, int] = Field((10, 300), description="elastic Horovod: a host whose ranks failed "
                                                "is left out for about min x 2^failures s, at most max, then may rejoin")
    network_interface: str = Field("", pattern=r"^([A-Za-z][A-Za-z0-9_.:-]{0,14}(,[A-Za-z][A-Za-z0-9_.:-]{0,14})*)?$",
                                   description="Horovod: NIC(s) the ranks talk over, e.g. eth0 or ib0,eth0 "
                                               "(horovodrun --network-interface); '' = Horovod finds common ones")
    # never starting with '-': ssh/rsync would read the user as an option
    ssh_user: str = Field("", pattern=r"^(?:[A-Za-z0-9._][A-Za-z0-9._-]*)?$")
    ssh_key: Optional[Path] = None
    ssh_port: int = Field(22, ge=1, le=65535)
    known_hosts_file: str = Field("", pattern=rf"^({ABSOLUTE_PATH})?$",
                                  description="'' = ssh's default file with StrictHostKeyChecking=accept-new; "
                                              "a file = StrictHostKeyChecking=yes against it")
    connect_timeout_s: int = Field(10, ge=1, le=300)
    workdir: str = Field("", pattern=r"^((/[A-Za-z0-9_.-]+)+/?)?$",
                         description="absolute path on every host; '' = the same path as this checkout")
    python: str = Field(".venv/bin/python", pattern=r"^[A-Za-z0-9_./-]+$",
                        description="interpreter on the hosts; relative paths are inside workdir")
    tensorboard: bool = True
    # TensorFlow's gRPC servers listen on every interface, unauthenticated: refuse public addresses.
    allow_public_network: bool = Field(False, description="true = allow cluster addresses that are not "
                                                          "private, loopback or link-local")
    token_file: str = Field(".unet-train-cluster.token", pattern=r"^[A-Za-z0-9_./-]+$",
                            description="shared secret of the chief's control channel (0600; created if absent)")
    scheduler: Literal["ssh", "slurm"] = Field("ssh", description="launcher: SSH hosts via Ansible, or a Slurm job")
    slurm: SlurmSettings = SlurmSettings()
    kubeflow: KubeflowSettings = KubeflowSettings()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("ssh_key")
    @classmethod
    def _safe_key_path(cls, value: Optional[Path]) -> Optional[Path]:
        if value is not None and not re.fullmatch(ABSOLUTE_PATH, str(value)):
            raise ValueError("expected an absolute path of letters, digits, '_', '.' and '-' (no spaces, "
                             "quotes or shell characters: horovodrun passes it through /bin/sh)")
        return value

    @field_validator("elastic_cooldown_s")
    @classmethod
    def _cooldown_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= value[0] <= value[1] <= 3600:  # horovodrun's own bounds
            raise ValueError(f"expected [min, max] seconds with 1 <= min <= max <= 3600, got {list(value)}")
        return value

    @field_validator("ps_hosts", "worker_hosts")
    @classmethod
    def _host_ports(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for address in value:
            _check_host_port(address)
        return value

    @field_validator("chief_host")
    @classmethod
    def _chief_host_port(cls, value: str) -> str:
        return _check_host_port(value)

    @field_validator("hosts")
    @classmethod
    def _host_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_host_names(value)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # a host name or address: it is printed in copy-paste commands and passed to tensorboard --host
    tensorboard_host: str = Field("127.0.0.1", pattern=r"^([A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?|[0-9A-Fa-f:.]+)$")
    tensorboard_port: int = Field(6006, ge=1, le=65535)
    log_file: str = Field("training.log", description="a file name inside runs/<run_name>/")

    @field_validator("log_file")
    @classmethod
    def _file_name_only(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", value) or set(value) == {"."}:
            raise ValueError("expected a file name (letters, digits, '_', '.', '-'; no '/'): "
                             "the log is written inside runs/<run_name>/")
        return value


class Settings(_Section):
    data: DataSettings = DataSettings()
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    cpu: CpuSettings = CpuSettings()
    cluster: ClusterSettings = ClusterSettings()
    logging: LoggingSettings = LoggingSettings()

    @property
    def run_path(self) -> Path:
        return self.train.run_dir / self.train.run_name


def settings_to_yaml(settings: Settings) -> str:
    """The merged configuration as YAML (``unet-train config show``, runs/<run>/settings.yaml)."""
    import yaml

    data = settings.model_dump(mode="json", by_alias=True)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
