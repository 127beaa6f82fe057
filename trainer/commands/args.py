"""The ``unet-train`` command line: every command, every flag, each with what it does and its default.

Only the grammar lives here; ``trainer.commands.dispatch`` runs the command. Flags that stand
for a setting name it (``--epochs`` is ``train.epochs``), and their default is that setting's.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from trainer import __version__

DEFAULT_SETTINGS = Path("settings.yaml")
BENCHMARK_MODES = ("train", "train_in_memory", "infer", "pipeline")
SYNTH_SIZE_ENV = "UNET_TRAIN_SYNTH_SIZE"  # synth --size default (X,Y,Z): tiny cases for tests and docs

WORKFLOW = """\
workflow (each command: unet-train COMMAND --help):
  unet-train synth --format brats --out data/raw/BraTS --cases 20    # or bring your own BraTS / Decathlon data
  unet-train prepare --src data/raw/BraTS --out data/prepared/brats  # a dataset folder; train finds the last one
  unet-train train --model 2d --run-name r1                          # writes runs/r1/, resumes when re-run
  unet-train synth --format brats --out data/new --cases 2 --seed 9  # cases the model has never seen
  unet-train predict --run-name r1 -i data/new -o masks              # the run knows its model, data and post-processing

every command reads ./settings.yaml (or --settings FILE) and takes --set section.key=value overrides."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unet-train", description="Train and run 2D/3D UNets for brain-tumour segmentation (BraTS, Decathlon "
                                       "Task01) in one process, under Horovod or with parameter servers.",
        epilog=WORKFLOW, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"unet-train {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = _command(sub, "config", "show the merged configuration (settings.yaml + --set)")
    config.add_argument("action", choices=["show"], help="show: print the merged settings as YAML")

    _add_synth(sub)
    _add_prepare(sub)
    _add_plan(sub)
    _add_train(sub)
    _add_parameter_server_roles(sub)
    _add_distributed(sub)
    _add_manifests(sub)
    _add_inference(sub)
    _add_benchmark(sub)
    return parser


def _add_synth(sub) -> None:
    synth = _command(sub, "synth", "write a synthetic dataset in the real BraTS/Decathlon layout")
    synth.add_argument("--format", required=True, choices=_Registered("trainer.data.synth.writers", "WRITERS"),
                       help="brats: BraTS 2019 case folders; decathlon: Task01_BrainTumour (4D NIfTI + dataset.json)")
    synth.add_argument("--out", required=True, type=Path, help="dataset folder to create")
    synth.add_argument("--cases", type=_positive_int, default=20, help="labelled cases (default 20)")
    synth.add_argument("--test-cases", type=_non_negative_int, default=None,
                       help="decathlon: unlabelled imagesTs cases (default cases/3)")
    synth.add_argument("--seed", type=_non_negative_int, default=0, help="random seed of the phantoms (default 0)")
    synth.add_argument("--size", type=parse_shape3, default=None,
                       help=f"X,Y,Z volume size (default ${SYNTH_SIZE_ENV} where set, else the real 240,240,155; "
                            "smaller for tests)")
    synth.add_argument("--workers", type=_non_negative_int, default=0, help="processes (default 0 = CPU count)")
    synth.add_argument("--no-appledouble", action="store_true",
                       help="decathlon: omit the macOS ._* files the official tarball carries")
    synth.add_argument("--difficulty", choices=["standard", "hard"], default="standard",
                       help="hard: faint (20-45%% contrast), heterogeneous, infiltrative lesions, 1 case in 7 without "
                            "an enhancing rim; elsewhere the rim covers a cap of the core, and below it the core "
                            "looks like oedema in any one slice (default standard)")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def _add_prepare(sub) -> None:
    prepare = _command(sub, "prepare", "check a raw dataset (BraTS or Decathlon layout) and write a prepared "
                                       "dataset folder: its manifest (source, fingerprint, split), 2D slices "
                                       "(HDF5) and/or the 3D cache, side by side")
    prepare.add_argument("--format", choices=_Registered("trainer.data.layouts", "LAYOUT_NAMES"), default=None,
                         help="layout of --src (default: detected from what the folder holds; docs/datasets.md)")
    prepare.add_argument("--model", choices=MODEL_KINDS, default=None,
                         help="prepare for this model (default: 2d for a BraTS folder, 3d for a Decathlon folder)")
    prepare.add_argument("--src", type=Path, default=None,
                         help="raw dataset folder (default data.source); recorded, absolute, in the prepared "
                              "dataset, so train, evaluate and predict find it without being told again")
    prepare.add_argument("--out", type=Path, default=None,
                         help="the prepared dataset folder (default data/prepared/<name of --src>); a folder "
                              "prepared before for the other model keeps that model's data and its split")
    prepare.add_argument("--workers", type=_non_negative_int, default=0, help="processes (default 0 = CPU count)")
    prepare.add_argument("--overwrite", action="store_true",
                         help="replace this model's prepared data in --out (or the whole folder, when its "
                              "source or split differ)")


def _add_plan(sub) -> None:
    plan = _command(sub, "plan", "configure a run from the dataset and this node: fingerprints, a plan with a "
                                 "reason per choice, predicted memory, calibrated speed, multi-node projection")
    plan.add_argument("--src", type=Path, default=None,
                      help="raw dataset folder, either layout (default: the source of --data, the prepared "
                           "dataset the plan is for)")
    plan.add_argument("--data", type=Path, default=None,
                      help="data.dataset: the prepared dataset folder the plan trains on (default: the last one "
                           "prepared here, when there is one)")
    plan.add_argument("--out", type=Path, default=None, help="plan JSON (default runs/<run>/plan.json)")
    plan.add_argument("--run-name", default=None, help="train.run_name the plan is for (default 'default')")
    plan.add_argument("--model", choices=MODEL_KINDS, default=None,
                      help="plan this model (default: 3d when model.regions asks for tc/et, else 2d)")
    plan.add_argument("--nodes", type=_positive_int, default=1, help="project the speed up to N nodes (default 1)")
    plan.add_argument("--network-gbps", type=_positive_float, default=10.0,
                      help="network between nodes, Gb/s (default 10)")
    plan.add_argument("--max-cases", type=_positive_int, default=20,
                      help="cases read for intensities and labels (headers: every case; default 20)")
    plan.add_argument("--no-calibrate", action="store_true", help="skip the few timed steps (no speed figures)")


def _add_train(sub) -> None:
    train = _command(sub, "train", "train a UNet (single process or a Horovod rank); resumes runs/R when it "
                                   "holds a checkpoint, then validates on the whole validation volumes")
    _add_run_flags(train, "the run to write or resume")
    train.add_argument("--plan", type=Path, default=None,
                       help="apply the settings of a plan JSON (unet-train plan); --set and flags still win")
    train.add_argument("--dist", choices=["single", "horovod", "ps"], default=None,
                       help="train.dist (default single); horovod: one process per rank under horovodrun/mpirun")
    _add_recipe_flags(train, "per process/rank")
    train.add_argument("--elastic", action="store_const", const=True, default=None,
                       help="train.elastic: Horovod Elastic (under horovodrun --min-np/--max-np "
                            "--host-discovery-script; default off)")


def _add_recipe_flags(parser: argparse.ArgumentParser, batch_of: str) -> None:
    parser.add_argument("--epochs", type=_positive_int, default=None, help="train.epochs (default 10)")
    parser.add_argument("--batch-size", type=_positive_int, default=None, help=f"train.batch_size, {batch_of} "
                                                                               f"(default 16)")
    parser.add_argument("--learning-rate", type=float, default=None, help="train.learning_rate (default 0.001)")


def _add_parameter_server_roles(sub) -> None:
    for role in ("ps", "worker"):
        server = _command(sub, role, f"parameter-server mode: serve as {role} --index i of cluster."
                                     f"{role}_hosts until the chief says stop")
        server.add_argument("--index", type=_non_negative_int, required=True,
                            help=f"position in cluster.{role}_hosts (from 0)")
        server.set_defaults(role=role)
    chief = _command(sub, "chief", "parameter-server mode: the coordinator that trains (synchronous SGD over "
                                   "the ps and worker tasks)")
    _add_run_flags(chief, "the run to write or resume")
    _add_recipe_flags(chief, "per worker")


def _add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hosts", default=None,
                        help="comma-separated hosts, node1,node2, or with slots as horovodrun writes them, "
                             "node1:4,node2:4 (default cluster.hosts)")
    parser.add_argument("--user", default=None, help="cluster.ssh_user (default: the current user)")
    parser.add_argument("--key", type=Path, default=None, help="cluster.ssh_key: SSH private key file "
                                                                "(default: ssh's own)")
    parser.add_argument("--port", type=_positive_int, default=None, help="cluster.ssh_port (default 22)")
    parser.add_argument("--workdir", default=None, help="cluster.workdir: absolute path on every host "
                                                        "(default: the same path as this checkout)")
    parser.add_argument("--mode", choices=["ps", "horovod"], default=None, help="cluster.mode (default ps)")


def _add_slurm_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheduler", choices=["ssh", "slurm"], default=None,
                        help="cluster.scheduler: ssh = hosts over SSH via Ansible; slurm = one batch job "
                             "(default ssh)")
    slurm = parser.add_argument_group("Slurm (--scheduler slurm; defaults: cluster.slurm.*)")
    slurm.add_argument("--nodes", type=_positive_int, default=None, help="nodes (default 1)")
    slurm.add_argument("--ntasks-per-node", type=_positive_int, default=None,
                       help="ranks / PS-mode roles per node (default 4)")
    slurm.add_argument("--cpus-per-task", type=_positive_int, default=None, help="threads per rank/role (default 1)")
    slurm.add_argument("--partition", default=None, help="partition (default: the cluster's default)")
    slurm.add_argument("--time", default=None, help="time limit, e.g. 2:00:00 or 1-00:00 (default: the "
                                                    "partition's)")
    slurm.add_argument("--account", default=None, help="account to charge (default: yours)")
    slurm.add_argument("--constraint", default=None, help="node features, e.g. KNL modes quad,flat (default none)")


def _add_distributed(sub) -> None:
    dist = _command(sub, "distributed", "launch PS/worker/chief or Horovod ranks: on SSH hosts (Ansible) or as "
                                        "a Slurm job; streams every log, serves TensorBoard")
    _add_cluster_flags(dist)
    _add_slurm_flags(dist)
    dist.add_argument("--ps-hosts", default=None, help="parameter-server hosts (default: the first host)")
    dist.add_argument("--slots-per-host", type=_positive_int, default=None,
                      help="horovod: ranks per host (default 1, or the N of --hosts h:N)")
    dist.add_argument("--controller", choices=["gloo", "mpi"], default="gloo",
                      help="horovodrun controller (default gloo)")
    dist.add_argument("--elastic", action="store_true",
                      help="horovod: Horovod Elastic on Gloo; hosts that answer SSH join, lost hosts drop out")
    dist.add_argument("--min-hosts", type=_positive_int, default=None,
                      help="--elastic: hosts the job needs (default 1)")
    dist.add_argument("--max-hosts", type=_positive_int, default=None,
                      help="--elastic: hosts the job may use (default: every host)")
    dist.add_argument("--run-name", default=None, help="train.run_name (default 'default')")
    dist.add_argument("--model", choices=MODEL_KINDS, default=None, help="train.model (default 2d)")
    dist.add_argument("--epochs", type=_positive_int, default=None, help="train.epochs (default 10)")
    dist.add_argument("--dry-run", action="store_true", help="print the inventory and every command, then stop")
    dist.add_argument("--stop", action="store_true", help="stop every process a previous launch of --run-name "
                                                          "started (Slurm: scancel its job)")
    doctor = _command(sub, "doctor", "preflight: SSH, versions, MPI, cores/sockets/NUMA and NICs on every host; "
                                     "with --scheduler slurm: sinfo, the partition and its limits")
    _add_cluster_flags(doctor)
    _add_slurm_flags(doctor)
    task = _command(sub, "slurm-task", "inside a Slurm job step (srun): map this task to its Horovod rank or "
                                       "PS/worker/chief role and run it (started by distributed --scheduler slurm)")
    task.add_argument("--mode", choices=["ps", "horovod"], required=True, help="the job's launch mode")


def _add_manifests(sub) -> None:
    manifests = _command(sub, "manifests", "write Kubernetes YAML: an MPIJob (Horovod) or a TFJob (PS mode) for "
                                           "the Kubeflow operators, with the settings as a ConfigMap and a PVC")
    manifests.add_argument("--target", choices=["kubeflow"], required=True, help="kubeflow: mpi-operator / "
                                                                                  "training-operator")
    manifests.add_argument("--mode", choices=["ps", "horovod"], default=None, help="cluster.mode (default ps)")
    manifests.add_argument("--out", type=Path, default=None,
                           help="YAML file (default runs/<run>/kubeflow-<mode>.yaml)")
    manifests.add_argument("--run-name", default=None, help="train.run_name (default 'default')")
    manifests.add_argument("--model", choices=MODEL_KINDS, default=None, help="train.model (default 2d)")
    manifests.add_argument("--epochs", type=_positive_int, default=None, help="train.epochs (default 10)")
    manifests.add_argument("--image", default=None, help="container image (default cluster.kubeflow.image)")
    manifests.add_argument("--namespace", default=None, help="Kubernetes namespace (default "
                                                             "cluster.kubeflow.namespace)")
    manifests.add_argument("--workers", type=_positive_int, default=None,
                           help="Horovod ranks / TFJob workers (default cluster.kubeflow.workers, 2)")
    manifests.add_argument("--ps", type=_positive_int, default=None,
                           help="TFJob parameter servers (default cluster.kubeflow.ps, 1)")
    manifests.add_argument("--threads", type=_positive_int, default=None,
                           help="CPU request = threads per rank/role (default cluster.kubeflow.threads, 4)")
    manifests.add_argument("--gpus-per-worker", type=_non_negative_int, default=None,
                           help="nvidia.com/gpu per MPIJob worker, one rank per GPU (default 0)")


def _add_inference(sub) -> None:
    evaluate = _command(sub, "evaluate", "per-case Dice, HD95, sensitivity, specificity, precision on a held-out "
                                         "split of the run's data (CSV + JSON); predictions as NIfTI")
    _add_run_flags(evaluate, "the trained run to evaluate")
    evaluate.add_argument("--split", choices=["test", "val", "train"], default="test",
                          help="cases to score (default test; val also decides the post-processing)")
    evaluate.add_argument("--limit", type=_positive_int, default=None, help="first N cases only (default all)")
    evaluate.add_argument("--out", type=Path, default=None, help="output folder (default runs/<run>/evaluation)")
    evaluate.add_argument("--no-predictions", action="store_true", help="metrics only, no NIfTI files")
    _add_window_flags(evaluate, precision="fp32")

    folder = _command(sub, "evaluate-folder", "evaluate's per-case Dice, HD95, sensitivity, specificity, precision "
                                              "per region for any folder of label maps against references, as "
                                              "nnUNetv2_evaluate_folder (CSV + JSON)")
    folder.add_argument("predictions", metavar="PRED", type=Path,
                        help="folder of predicted label maps: CASE.nii.gz, CASE_pred|_mask|_labels.nii.gz")
    folder.add_argument("references", metavar="GT", type=Path,
                        help="folder of references: CASE.nii.gz (labelsTr; a dataset folder means its labelsTr) "
                             "or BraTS CASE_seg.nii.gz, flat or in case folders")
    folder.add_argument("-o", "--out", type=Path, default=None,
                        help="output folder, never inside PRED or GT (default evaluation-<PRED> beside PRED)")
    folder.add_argument("--labels", choices=["auto", "brats", "decathlon"], default="auto",
                        help="label convention of both folders: brats 0/1/2/4, decathlon 0/1/2/3 (default auto: "
                             "brats when a reference holds a 4)")
    folder.add_argument("--regions", default=None, metavar="wt,tc,et",
                        help="regions to score, comma-separated (default wt,tc,et; wt only when every prediction "
                             "is a binary mask)")
    folder.add_argument("--allow-missing", "--chill", dest="allow_missing", action="store_true",
                        help="score the cases both folders hold instead of refusing a case on one side only "
                             "(the summary counts the others)")

    predict = _command(sub, "predict", "segment cases with a trained run: a mask (whole-tumour run) or a label "
                                       "map (region run) per case, post-processed as the run decided")
    _add_run_flags(predict, "the trained run to predict with")
    predict.add_argument("inputs", nargs="*", type=Path,
                         help="cases, one each: a BraTS case folder, a 4D NIfTI or a CASE_0000.nii.gz file "
                              "(writes CASE_mask|labels.nii.gz and CASE_overlay.png into --out)")
    predict.add_argument("-i", "--input-folder", type=Path, default=None,
                         help="as nnUNetv2_predict -i: every case in this folder (CASE_0000..0003.nii.gz channel "
                              "files in the order flair, t1, t1ce, t2; 4D NIfTI files; BraTS case folders)")
    predict.add_argument("-o", "--out", type=Path, default=None,
                         help="output folder (required); with -i, one CASE.nii.gz per case")
    predict.add_argument("--png", action="store_true",
                         help="also an overlay PNG per case (always written for positional inputs)")
    predict.add_argument("--save-probabilities", action="store_true",
                         help="also CASE.npz: float16 probabilities (regions, x, y, z) in the source geometry")
    predict.add_argument("--continue", dest="resume", action="store_true",
                         help="skip cases whose outputs exist and read back whole")
    predict.add_argument("--disable-tta", action="store_true",
                         help="no test-time mirroring (model.mirror_axes_* = []): faster, usually a little worse")
    _add_window_flags(predict, precision="auto")

    export = _command(sub, "export", "export the run's best checkpoint as a SavedModel or OpenVINO IR, parity "
                                     "checked against the Keras model")
    _add_run_flags(export, "the trained run to export")
    export.add_argument("--format", choices=["savedmodel", "openvino"], default="savedmodel",
                        help="default savedmodel")
    export.add_argument("--out", type=Path, default=None,
                        help="folder (default runs/<run>/export/saved_model, openvino: runs/<run>/export/openvino)")
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")


def _add_benchmark(sub) -> None:
    bench = _command(sub, "benchmark", "time the real training step (single or under horovodrun), inference "
                                       "and the input pipeline; prints JSON")
    _add_run_flags(bench, "a trained run to take the model settings from (optional)")
    bench.add_argument("--dist", choices=["single", "horovod"], default=None,
                       help="train.dist (default single); horovod: under horovodrun/mpirun, one process per rank")
    bench.add_argument("--mode", action="append", choices=list(BENCHMARK_MODES), default=None,
                       help="what to time, repeatable (default: all)")
    bench.add_argument("--batch-size", type=_positive_int, default=16, help="per worker/rank (default 16)")
    bench.add_argument("--steps", type=_positive_int, default=20, help="timed steps (default 20)")
    bench.add_argument("--warmup", type=_non_negative_int, default=5, help="untimed steps first (default 5)")
    bench.add_argument("--out", type=Path, default=None, help="also write the JSON to this file")


def _add_window_flags(parser: argparse.ArgumentParser, precision: str) -> None:
    """Inference options, free at inference time. evaluate defaults to fp32 (its figures describe
    the model, not a quantisation of it); predict to auto (bf16 where native: OpenVINO bf16 masks
    match fp32's to a Dice >= 0.99, checked by ``export --format openvino``)."""
    parser.add_argument("--overlap", type=float, default=0.5,
                        help="3D sliding-window overlap, 0 <= overlap < 0.95 (default 0.5)")
    parser.add_argument("--blending", choices=["gaussian", "mean"], default="gaussian",
                        help="3D: how overlapping windows are averaged (default gaussian)")
    parser.add_argument("--engine", choices=["auto", "tf", "openvino"], default="auto",
                        help="inference engine (default auto: OpenVINO when installed and no GPU, else TensorFlow)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=precision,
                        help=f"inference precision (auto: bf16 where the CPU has native bf16, else fp32; "
                             f"default {precision})")
    parser.add_argument("--ir", type=Path, default=None,
                        help="run this exported OpenVINO IR (.xml) instead of converting the checkpoint")


def _add_run_flags(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--run-name", default=None, help=f"{what}: runs/<run-name>/ (train.run_name, "
                                                         f"default 'default')")
    parser.add_argument("--data", type=Path, default=None,
                        help="data.dataset: the prepared dataset folder (default: an existing run's own, else the "
                             "last one prepared here)")
    parser.add_argument("--run-dir", type=Path, default=None, help="folder of the runs (train.run_dir, "
                                                                   "default runs)")
    parser.add_argument("--model", choices=MODEL_KINDS, default=None,
                        help="train.model (default 2d); an existing run keeps its own, and a different value "
                             "is refused")


class _Registered:
    """The names a registry holds (dataset layouts, synthetic writers), read only when argparse checks
    a value or prints the help: the grammar stays free of the readers' imports, and a new layout
    needs no edit here."""

    def __init__(self, module: str, attribute: str):
        self.module, self.attribute = module, attribute

    def _names(self) -> list[str]:
        import importlib

        return sorted(getattr(importlib.import_module(self.module), self.attribute))

    def __iter__(self):
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()


MODEL_KINDS = _Registered("trainer.config.kinds", "KINDS")  # train.model: 2d, 3d


def _command(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("--settings", type=Path, default=None,
                        help=f"settings file (default ./{DEFAULT_SETTINGS} when present, else built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set train.epochs=3 (repeatable; wins over the file)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def parse_shape3(text: str) -> tuple[int, int, int]:
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 8:
        raise argparse.ArgumentTypeError(f"expected X,Y,Z with each >= 8, e.g. 64,64,48; got {text!r}")
    return shape  # type: ignore[return-value]
