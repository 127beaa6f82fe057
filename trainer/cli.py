"""``unet-train``: the one console command. Parses argv and settings, then dispatches.

This is the only module that reads argv or settings.yaml. Every sub-command is a thin
wrapper over a library function that takes typed settings. Heavy imports (TensorFlow,
Horovod) happen inside the command that needs them, after CPU settings are applied.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from trainer.errors import InfrastructureError, UserError

DEFAULT_SETTINGS = Path("settings.yaml")
BENCHMARK_MODES = ("train", "train_in_memory", "infer", "pipeline")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unet-train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = _command(sub, "config", "show the merged configuration", _cmd_config)
    config.add_argument("action", choices=["show"])

    synth = _command(sub, "synth", "write a synthetic dataset in the real BraTS/Decathlon layout", _cmd_synth)
    synth.add_argument("--format", required=True, choices=["brats", "decathlon"])
    synth.add_argument("--out", required=True, type=Path, help="dataset folder to create")
    synth.add_argument("--cases", type=_positive_int, default=20, help="labelled cases (default 20)")
    synth.add_argument("--test-cases", type=_non_negative_int, default=None,
                       help="decathlon: unlabelled imagesTs cases (default cases/3)")
    synth.add_argument("--seed", type=_non_negative_int, default=0)
    synth.add_argument("--size", type=_shape3, default=None,
                       help="X,Y,Z volume size (default the real 240,240,155; smaller for tests)")
    synth.add_argument("--workers", type=_non_negative_int, default=0, help="processes (0 = CPU count)")
    synth.add_argument("--no-appledouble", action="store_true",
                       help="decathlon: omit the macOS ._* files the official tarball carries")
    synth.add_argument("--overwrite", action="store_true")

    prepare = _command(sub, "prepare", "convert raw data: BraTS -> 2D slices HDF5, Decathlon -> checked cache + split",
                       _cmd_prepare)
    prepare.add_argument("--format", required=True, choices=["brats", "decathlon"])
    prepare.add_argument("--src", type=Path, default=None, help="raw dataset folder (default from settings)")
    prepare.add_argument("--out", type=Path, default=None,
                         help="brats: slices .h5 file; decathlon: cache folder (default from settings)")
    prepare.add_argument("--workers", type=_non_negative_int, default=0)
    prepare.add_argument("--overwrite", action="store_true")

    train = _command(sub, "train", "train a UNet (single process, Horovod or parameter-server chief)", _cmd_train)
    _add_run_flags(train)
    train.add_argument("--dist", choices=["single", "horovod", "ps"], default=None)
    train.add_argument("--epochs", type=_positive_int, default=None)
    train.add_argument("--batch-size", type=_positive_int, default=None, help="per worker/rank")
    train.add_argument("--learning-rate", type=float, default=None)
    train.add_argument("--elastic", action="store_const", const=True, default=None,
                       help="horovod: Horovod Elastic (under horovodrun --min-np/--max-np --host-discovery-script)")

    for role in ("ps", "worker"):
        server = _command(sub, role, f"parameter-server mode: run {role} task --index i of settings' cluster",
                          _cmd_server_role)
        server.add_argument("--index", type=_non_negative_int, required=True)
        server.set_defaults(role=role)
    chief = _command(sub, "chief", "parameter-server mode: the coordinator that trains (synchronous SGD)",
                     _cmd_chief)
    _add_run_flags(chief)
    chief.add_argument("--epochs", type=_positive_int, default=None)
    chief.add_argument("--batch-size", type=_positive_int, default=None, help="per worker")
    chief.add_argument("--learning-rate", type=float, default=None)

    dist = _command(sub, "distributed", "launch PS/worker/chief or Horovod ranks: on SSH hosts (Ansible) or as "
                                        "a Slurm job", _cmd_distributed)
    _add_cluster_flags(dist)
    _add_slurm_flags(dist)
    dist.add_argument("--mode", choices=["ps", "horovod"], default=None, help="default: cluster.mode (ps)")
    dist.add_argument("--ps-hosts", default=None, help="parameter-server hosts (default: the first host)")
    dist.add_argument("--slots-per-host", type=_positive_int, default=1, help="horovod: ranks per host")
    dist.add_argument("--controller", choices=["gloo", "mpi"], default="gloo", help="horovodrun controller")
    dist.add_argument("--elastic", action="store_true",
                      help="horovod: Horovod Elastic on Gloo; hosts that answer SSH join, lost hosts drop out")
    dist.add_argument("--min-hosts", type=_positive_int, default=None, help="--elastic: hosts the job needs (default 1)")
    dist.add_argument("--max-hosts", type=_positive_int, default=None,
                      help="--elastic: hosts the job may use (default: every host)")
    dist.add_argument("--run-name", default=None)
    dist.add_argument("--model", choices=["2d", "3d"], default=None)
    dist.add_argument("--epochs", type=_positive_int, default=None)
    dist.add_argument("--dry-run", action="store_true", help="print the inventory and every command, then stop")
    dist.add_argument("--stop", action="store_true", help="stop every process a previous launch of --run-name started "
                                                          "(Slurm: scancel its job)")
    doctor = _command(sub, "doctor", "preflight: SSH, versions, MPI, cores/sockets/NUMA and NICs on every host; "
                                     "with --scheduler slurm: sinfo, the partition and its limits", _cmd_doctor)
    _add_cluster_flags(doctor)
    _add_slurm_flags(doctor)
    doctor.add_argument("--mode", choices=["ps", "horovod"], default=None,
                        help="check for this launch mode (default: cluster.mode)")

    manifests = _command(sub, "manifests", "write Kubernetes YAML: an MPIJob (Horovod) or a TFJob (PS mode) for the "
                                           "Kubeflow operators, with the settings as a ConfigMap and a PVC", _cmd_manifests)
    manifests.add_argument("--target", choices=["kubeflow"], required=True)
    manifests.add_argument("--mode", choices=["ps", "horovod"], default=None, help="default: cluster.mode")
    manifests.add_argument("--out", type=Path, default=None, help="YAML file (default runs/<run>/kubeflow-<mode>.yaml)")
    manifests.add_argument("--run-name", default=None)
    manifests.add_argument("--model", choices=["2d", "3d"], default=None)
    manifests.add_argument("--epochs", type=_positive_int, default=None)
    manifests.add_argument("--image", default=None, help="container image (default: cluster.kubeflow.image)")
    manifests.add_argument("--namespace", default=None)
    manifests.add_argument("--workers", type=_positive_int, default=None, help="Horovod ranks / TFJob workers")
    manifests.add_argument("--ps", type=_positive_int, default=None, help="TFJob parameter servers")
    manifests.add_argument("--threads", type=_positive_int, default=None, help="CPU request = threads per rank/role")
    manifests.add_argument("--gpus-per-worker", type=_non_negative_int, default=None,
                           help="nvidia.com/gpu per MPIJob worker (one rank per GPU)")

    task = _command(sub, "slurm-task", "inside a Slurm job step (srun): map this task to its Horovod rank or "
                                       "PS/worker/chief role and run it (started by distributed --scheduler slurm)",
                    _cmd_slurm_task)
    task.add_argument("--mode", choices=["ps", "horovod"], required=True)

    evaluate = _command(sub, "evaluate", "per-case metrics on a held-out split; predictions as NIfTI", _cmd_evaluate)
    _add_run_flags(evaluate)
    evaluate.add_argument("--split", choices=["test", "val", "train"], default="test")
    evaluate.add_argument("--limit", type=_positive_int, default=None, help="first N cases only")
    evaluate.add_argument("--out", type=Path, default=None, help="default runs/<run>/evaluation")
    evaluate.add_argument("--no-predictions", action="store_true", help="metrics only, no NIfTI files")
    _add_window_flags(evaluate, precision="fp32")

    predict = _command(sub, "predict", "predict WT masks (NIfTI + PNG overlay) for case folders or 4D NIfTI files",
                       _cmd_predict)
    _add_run_flags(predict)
    predict.add_argument("inputs", nargs="+", type=Path)
    predict.add_argument("--out", type=Path, required=True, help="output folder")
    _add_window_flags(predict, precision="auto")

    export = _command(sub, "export", "export the best checkpoint as a SavedModel or OpenVINO IR (+ parity check)",
                      _cmd_export)
    _add_run_flags(export)
    export.add_argument("--format", choices=["savedmodel", "openvino"], default="savedmodel")
    export.add_argument("--out", type=Path, default=None,
                        help="default runs/<run>/export/saved_model (openvino: runs/<run>/export/openvino)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing export")

    bench = _command(sub, "benchmark", "time the real training step (single or under horovodrun), inference "
                     "and the input pipeline", _cmd_benchmark)
    _add_run_flags(bench)
    bench.add_argument("--dist", choices=["single", "horovod"], default=None,
                       help="horovod: run under horovodrun/mpirun, one process per rank")
    bench.add_argument("--mode", action="append", choices=list(BENCHMARK_MODES), default=None,
                       help="repeatable (default: all)")
    bench.add_argument("--batch-size", type=_positive_int, default=16, help="per worker/rank")
    bench.add_argument("--steps", type=_positive_int, default=20)
    bench.add_argument("--warmup", type=_non_negative_int, default=5)
    bench.add_argument("--out", type=Path, default=None, help="JSON file")
    return parser


def _add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hosts", default=None, help="comma-separated host names (node1,node2); "
                                                      "default: cluster.hosts")
    parser.add_argument("--user", default=None, help="SSH user (default: current user)")
    parser.add_argument("--key", type=Path, default=None, help="SSH private key file")
    parser.add_argument("--port", type=_positive_int, default=None, help="SSH port (default 22)")
    parser.add_argument("--workdir", default=None, help="absolute path on every host (default: same as here)")


def _add_slurm_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheduler", choices=["ssh", "slurm"], default=None,
                        help="ssh: hosts over SSH via Ansible; slurm: one batch job (default: cluster.scheduler)")
    slurm = parser.add_argument_group("Slurm (--scheduler slurm; defaults: cluster.slurm.*)")
    slurm.add_argument("--nodes", type=_positive_int, default=None)
    slurm.add_argument("--ntasks-per-node", type=_positive_int, default=None, help="ranks / PS-mode roles per node")
    slurm.add_argument("--cpus-per-task", type=_positive_int, default=None, help="threads per rank/role")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--time", default=None, help="time limit, e.g. 2:00:00 or 1-00:00")
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--constraint", default=None, help="node features, e.g. KNL modes quad,flat")


SLURM_FLAGS = {"scheduler": "cluster.scheduler", "nodes": "cluster.slurm.nodes",
               "ntasks_per_node": "cluster.slurm.ntasks_per_node", "cpus_per_task": "cluster.slurm.cpus_per_task",
               "partition": "cluster.slurm.partition", "time": "cluster.slurm.time",
               "account": "cluster.slurm.account", "constraint": "cluster.slurm.constraint"}
CLUSTER_FLAGS = {"user": "cluster.ssh_user", "key": "cluster.ssh_key", "port": "cluster.ssh_port",
                 "workdir": "cluster.workdir", "run_name": "train.run_name", "model": "train.model",
                 "epochs": "train.epochs"}


def _cluster_settings(args: argparse.Namespace):
    # --key is made absolute here: horovodrun uses it on the first host, from another folder
    flags = {key: (os.path.abspath(os.path.expanduser(getattr(args, attr))) if attr == "key" and getattr(args, attr)
                   else getattr(args, attr))
             for attr, key in {**CLUSTER_FLAGS, **SLURM_FLAGS}.items() if hasattr(args, attr)}
    return load_cli_settings(args, flags)


def _slurm_launcher(args: argparse.Namespace, settings):
    """The Slurm path, or None for the SSH one. ``--stop`` finds a Slurm run by its job record."""
    from launcher.slurm.launch import SlurmLauncher, has_job_record

    stop = getattr(args, "stop", False)
    if settings.cluster.scheduler != "slurm" and not (stop and args.scheduler is None and has_job_record(settings)):
        return None
    if args.hosts:
        raise UserError("--hosts: not used with --scheduler slurm (Slurm picks the nodes; see --nodes, --partition)")
    if getattr(args, "elastic", False):
        raise UserError("--elastic: SSH hosts only (--scheduler ssh); a Slurm job has a fixed set of nodes")
    return SlurmLauncher(settings, args.mode or settings.cluster.mode)


def _launcher(args: argparse.Namespace, settings, hosts_required: bool = True):
    from launcher.distributed import Launcher, LaunchRequest

    # --hosts/--mode win over cluster.hosts/cluster.mode in settings.yaml
    hosts = args.hosts if args.hosts is not None else ",".join(settings.cluster.hosts)
    if hosts_required and not hosts:
        raise UserError("--hosts: required (e.g. --hosts node1,node2), or set cluster.hosts in settings.yaml")
    request = LaunchRequest(hosts=hosts, mode=args.mode or settings.cluster.mode,
                            ps_hosts=getattr(args, "ps_hosts", None),
                            dry_run=getattr(args, "dry_run", False),
                            slots_per_host=getattr(args, "slots_per_host", 1),
                            controller=getattr(args, "controller", "gloo"),
                            elastic=getattr(args, "elastic", False),
                            min_hosts=getattr(args, "min_hosts", None), max_hosts=getattr(args, "max_hosts", None))
    return Launcher(settings, request)


def _cmd_distributed(args: argparse.Namespace) -> int:
    settings = _cluster_settings(args)
    slurm = _slurm_launcher(args, settings)
    if slurm is not None:
        if args.stop:
            return slurm.stop()
        return slurm.dry_run() if args.dry_run else slurm.launch()
    if args.stop:
        launcher = _launcher(args, settings, hosts_required=False)
        result = launcher.stop()
        return 0 if result.succeeded else 1
    launcher = _launcher(args, settings)
    return launcher.dry_run() if args.dry_run else launcher.launch()


def _cmd_doctor(args: argparse.Namespace) -> int:
    settings = _cluster_settings(args)
    slurm = _slurm_launcher(args, settings)
    if slurm is not None:
        slurm.doctor()
        print("doctor: the Slurm cluster can run this job")
        return 0
    _launcher(args, settings).doctor(standalone=True)
    print("doctor: every host passed")
    return 0


KUBEFLOW_FLAGS = {"run_name": "train.run_name", "model": "train.model", "epochs": "train.epochs",
                  "image": "cluster.kubeflow.image", "namespace": "cluster.kubeflow.namespace",
                  "workers": "cluster.kubeflow.workers", "ps": "cluster.kubeflow.ps",
                  "threads": "cluster.kubeflow.threads", "gpus_per_worker": "cluster.kubeflow.gpus_per_worker"}


def _cmd_manifests(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args, {key: getattr(args, attr) for attr, key in KUBEFLOW_FLAGS.items()})
    from launcher.kubeflow import write_manifests

    mode = args.mode or settings.cluster.mode
    out = args.out or settings.run_path / f"kubeflow-{mode}.yaml"
    write_manifests(settings, mode, out)
    kind = "MPIJob (mpi-operator)" if mode == "horovod" else "TFJob (training-operator)"
    print(f"wrote {out}: ConfigMap (settings), PersistentVolumeClaim (data/, runs/), {kind}; "
          f"apply with: kubectl apply -f {out}")
    return 0


def _cmd_slurm_task(args: argparse.Namespace) -> int:
    if args.settings is None:
        raise UserError("--settings: required (the run's merged settings, written by distributed --scheduler slurm)")
    settings = load_cli_settings(args)
    from launcher.slurm.task import task_command

    command = task_command(settings, args.mode, str(args.settings.resolve()), os.environ)
    print(command.announcement(), flush=True)
    argv = command.exec_argv()
    os.execvp(argv[0], argv)  # the role replaces this process: srun and Slurm see it directly
    return 1  # not reached


def _add_window_flags(parser: argparse.ArgumentParser, precision: str) -> None:
    """Inference options. evaluate defaults to fp32 (its figures describe the model, not a
    quantisation of it); predict to auto (bf16 where native: OpenVINO bf16 masks match fp32's
    to a Dice >= 0.99, checked by ``export --format openvino``)."""
    parser.add_argument("--overlap", type=float, default=0.5, help="3D sliding-window overlap (0..0.9)")
    parser.add_argument("--blending", choices=["gaussian", "mean"], default="gaussian")
    parser.add_argument("--engine", choices=["auto", "tf", "openvino"], default="auto",
                        help="inference engine (auto: OpenVINO when installed and no GPU, else TensorFlow)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=precision,
                        help=f"inference precision (auto: bf16 where the CPU has native bf16, else fp32; "
                             f"default {precision})")
    parser.add_argument("--ir", type=Path, default=None,
                        help="run this exported OpenVINO IR (.xml) instead of converting the checkpoint")


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=["2d", "3d"], default=None)
    parser.add_argument("--run-name", default=None, help="runs/<run-name>/ (resumes when it holds a checkpoint)")
    parser.add_argument("--run-dir", type=Path, default=None)


RUN_FLAGS = {"model": "train.model", "run_name": "train.run_name", "run_dir": "train.run_dir",
             "dist": "train.dist", "epochs": "train.epochs", "batch_size": "train.batch_size",
             "learning_rate": "train.learning_rate", "elastic": "train.elastic"}


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, attr) for attr, key in RUN_FLAGS.items() if hasattr(args, attr)}


def _command(sub, name: str, help_text: str, handler: Callable, settings: bool = True) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    if settings:
        parser.add_argument("--settings", type=Path, default=None,
                            help=f"settings file (default ./{DEFAULT_SETTINGS} when present)")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override one setting, e.g. --set train.epochs=3 (repeatable)")
        parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=handler)
    return parser


def load_cli_settings(args: argparse.Namespace, flags: dict[str, Any] | None = None):
    from trainer.config.loader import load_settings

    path = args.settings
    if path is None and DEFAULT_SETTINGS.is_file():
        path = DEFAULT_SETTINGS
    return load_settings(path, args.overrides, flags)


def _cmd_config(args: argparse.Namespace) -> int:
    from trainer.config.settings import settings_to_yaml

    print(settings_to_yaml(load_cli_settings(args)), end="")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from trainer.data.synth.phantom import REAL_SHAPE
    from trainer.data.synth.writers import SynthRequest, write_brats, write_decathlon

    load_cli_settings(args)  # validate settings even though synth needs none of them
    request = SynthRequest(out=args.out, cases=args.cases, seed=args.seed, shape=args.size or REAL_SHAPE,
                           test_cases=args.test_cases, appledouble=not args.no_appledouble,
                           workers=args.workers, overwrite=args.overwrite)
    writer = write_brats if args.format == "brats" else write_decathlon
    out = writer(request, progress=not args.quiet)
    print(f"wrote {args.cases} {args.format} case(s) to {out}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from trainer.data.split import split_path_for

    settings = load_cli_settings(args)
    if args.format == "brats":
        from trainer.data.prepare2d import PrepareRequest, prepare_brats

        request = PrepareRequest(src=args.src or settings.data.brats_dir, out=args.out or settings.data.slices_h5,
                                 image_size=settings.data.image_size, split=settings.data.split,
                                 workers=args.workers, overwrite=args.overwrite,
                                 max_voxels=settings.data.max_voxels)
        counts = prepare_brats(request, progress=not args.quiet)
        print(f"wrote {request.out} (slices: " + ", ".join(f"{k} {v}" for k, v in counts.items())
              + f"); split: {split_path_for(request.out)}")
    else:
        from trainer.data.decathlon import prepare_decathlon

        src = args.src or settings.data.decathlon_dir
        cache = args.out or settings.data.cache_dir
        split_file = settings.data.decathlon_split
        split = prepare_decathlon(src, cache, settings.data.split, split_file, progress=not args.quiet,
                                  overwrite=args.overwrite, max_voxels=settings.data.max_voxels)
        print(f"checked {sum(len(v) for v in split.values())} case(s) in {src}; cache: {cache}; "
              f"split: {split_file}")
    return 0


def _start_runtime(settings, log_to_run: bool = True):
    """Apply CPU settings, import TensorFlow, and start the runtime named by train.dist."""
    from trainer.runtime.cpu import apply_cpu_environment, configure_threads

    plan = apply_cpu_environment(settings.cpu)
    configure_threads(plan)
    if settings.train.dist == "horovod":
        from trainer.runtime.horovod import HorovodRuntime

        runtime = HorovodRuntime.start(settings.train.elastic, settings.train.elastic_commit_steps)
    elif settings.train.dist == "ps":
        raise UserError("train.dist=ps: the parameter-server chief is 'unet-train chief' (with "
                        "'unet-train ps --index i' and 'unet-train worker --index i' running; see README)")
    else:
        from trainer.runtime.single import SingleRuntime

        runtime = SingleRuntime()
    if log_to_run:
        _log_to_run_file(settings, runtime.is_chief)
    elif not runtime.is_chief:
        logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger(__name__).info("rank %d/%d, threads: %s", runtime.rank, runtime.size, plan.describe())
    return runtime


def _log_to_run_file(settings, is_chief: bool) -> None:
    root = logging.getLogger()
    if not is_chief:
        root.setLevel(logging.WARNING)
        return
    settings.run_path.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(settings.run_path / settings.logging.log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(settings.logging.level)


def _trained(result) -> str:
    return (f"trained {result.epochs_run} epoch(s) (now at epoch {result.final_epoch}, step {result.step}); "
            f"best val Dice {result.best_val_dice:.4f} (case-level); run: {result.run_path}")


def _cmd_train(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args, _flag_overrides(args))
    runtime = _start_runtime(settings)
    from trainer.training.loop import train

    succeeded = False
    try:
        result = train(settings, runtime, progress=not args.quiet)
        succeeded = True
    finally:
        runtime.shutdown(succeeded)
    if runtime.is_chief:
        print(_trained(result))
        _validate_full_volumes(settings, result, progress=not args.quiet)
    return 0


def _validate_full_volumes(settings, result, progress: bool) -> None:
    """Chief, after training: decide the post-processing on the validation volumes and log the
    best checkpoint's Dice there (runs/R/validation.json), so that predict applies it at once."""
    if not settings.train.validate_full_volumes:
        return
    from trainer.fsutil import write_json
    from trainer.inference.evaluate import validation_report

    path = settings.run_path / "validation.json"
    if result.epochs_run == 0 and path.exists():
        return
    try:
        # TensorFlow: for a handful of volumes, converting the model for OpenVINO costs more than it saves
        report = validation_report(settings, progress, engine="tf", precision="fp32")
    except UserError as exc:  # e.g. the raw volumes are not on this host: training itself succeeded
        logging.getLogger(__name__).warning("no full-volume validation: %s", exc)
        return
    if report is None:
        return
    write_json(path, report)
    actions = ", ".join(f"{region}: {action}" for region, action in report["postprocessing"].items())
    message = (f"validation on {report['cases']} whole case(s), best checkpoint: Dice {report['dice']:.4f} after "
               f"post-processing ({actions}), {report['dice_raw']:.4f} before; {path}")
    logging.getLogger(__name__).info("%s", message)
    print(message)


def _exit_now(code: int) -> None:
    """Leave without waiting for TensorFlow's gRPC threads, which never join on their own."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def _report_and_exit(command: str, error: Exception) -> None:
    """Fatal errors seen on a background thread (a lost parameter server) end the process here,
    at the entry point, like errors of the main thread do."""
    print(f"unet-train {command}: error: {error}", file=sys.stderr, flush=True)
    _exit_now(getattr(error, "exit_code", 1))


def _cmd_server_role(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args)
    from trainer.runtime.ps.roles import declare_finished, serve

    code, finished = 1, False  # finished: a supervisor must not restart this role (see declare_finished)
    try:
        code = serve(settings, args.role, args.index)
        finished = True  # the chief said stop, or went away
    except (UserError, InfrastructureError) as exc:
        print(f"unet-train {args.role}: error: {exc}", file=sys.stderr)
        code, finished = exc.exit_code, isinstance(exc, UserError)
    except KeyboardInterrupt:
        code, finished = 130, True
    finally:
        if finished:
            declare_finished()
        _exit_now(code)  # gRPC server threads never join: leave explicitly, whatever happened
    return code


def _cmd_chief(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args, {**_flag_overrides(args), "train.dist": "ps"})
    from trainer.runtime.cpu import apply_cpu_environment, configure_threads
    from trainer.runtime.ps.cluster import ClusterLayout

    layout = ClusterLayout.from_settings(settings.cluster)
    configure_threads(apply_cpu_environment(settings.cpu, layout.local_processes("chief", 0), cluster_task=True))
    _log_to_run_file(settings, is_chief=True)
    from trainer.runtime.ps.runtime import PsRuntime
    from trainer.training.loop import train

    code, runtime = 1, None
    try:
        runtime = PsRuntime.start(settings, on_fatal=lambda error: _report_and_exit("chief", error))
        result = train(settings, runtime, progress=not args.quiet)
        print(_trained(result))
        runtime.shutdown(True)  # the roles can go: what follows runs on the chief alone
        _validate_full_volumes(settings, result, progress=not args.quiet)
        code = 0
    except (UserError, InfrastructureError) as exc:
        print(f"unet-train chief: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("unet-train chief: interrupted", file=sys.stderr)
        code = 130
    except BaseException:  # still say what happened: os._exit below skips the normal traceback
        import traceback

        traceback.print_exc()
    finally:
        if runtime is not None:
            runtime.shutdown(code == 0)
        _exit_now(code)
    return code


def _start_inference(args: argparse.Namespace):
    settings = load_cli_settings(args, _flag_overrides(args))
    from trainer.runtime.cpu import apply_cpu_environment, configure_threads

    configure_threads(apply_cpu_environment(settings.cpu))
    return settings


def _window_options(args: argparse.Namespace) -> dict[str, Any]:
    if not 0.0 <= args.overlap < 0.95:
        raise UserError(f"--overlap: expected 0 <= overlap < 0.95, got {args.overlap}")
    return {"overlap": args.overlap, "blending": args.blending, "engine": args.engine,
            "precision": args.precision, "ir": args.ir}


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    settings = _start_inference(args)
    from trainer.inference.evaluate import evaluate

    summary = evaluate(settings, args.split, args.limit, args.out, not args.no_predictions,
                       progress=not args.quiet, **_window_options(args))
    out = args.out or settings.run_path / "evaluation"
    print(json.dumps({k: summary[k] for k in ("cases", "dice", "hd95")}, indent=1))
    print(f"per-case metrics: {out / 'per_case.csv'}; summary: {out / 'summary.json'}"
          + ("" if args.no_predictions else f"; predictions: {out / 'predictions'}"))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    settings = _start_inference(args)
    from trainer.inference.predict import predict_files

    for path in predict_files(settings, args.inputs, args.out, **_window_options(args)):
        print(path)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    settings = _start_inference(args)
    from trainer.inference.export import export

    report = export(settings, args.format, args.out, overwrite=args.overwrite)
    if args.format == "savedmodel":
        print(f"SavedModel: {report['saved_model']} (max |export - keras| = {report['max_abs_diff']:.2e})")
        return 0
    checks = report["checks"]
    bf16 = checks["bf16"]
    bf16_text = (f"bf16: max |dp| {bf16['max_abs_diff']:.2e}, mask Dice {bf16['mask_dice']:.4f}"
                 if "skipped" not in bf16 else f"bf16 skipped: {bf16['skipped']}")
    print(f"OpenVINO IR: {report['openvino_ir']} (f32: max |dp| {checks['f32']['max_abs_diff']:.2e}; {bf16_text}); "
          f"report: {Path(report['openvino_ir']).parent / 'export.json'}")
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    import json

    settings = load_cli_settings(args, _flag_overrides(args))
    runtime = _start_runtime(settings, log_to_run=False)  # a benchmark writes no run
    from trainer.training.benchmark import BenchmarkRequest, run_benchmark

    request = BenchmarkRequest(modes=tuple(args.mode or BENCHMARK_MODES), batch_size=args.batch_size,
                               steps=args.steps, warmup=args.warmup)
    succeeded = False
    try:
        report = run_benchmark(settings, runtime, request, args.out)
        succeeded = True
    finally:
        runtime.shutdown(succeeded)
    if report is not None:
        print(json.dumps(report, indent=1))
    return 0


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _shape3(text: str) -> tuple[int, int, int]:
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 8:
        raise argparse.ArgumentTypeError(f"expected X,Y,Z with each >= 8, e.g. 64,64,48; got {text!r}")
    return shape  # type: ignore[return-value]


def _os_error_text(exc: OSError) -> str:
    """``<file>: <reason>`` on one line (the reason alone when the OS named no file)."""
    def name(value) -> str:
        return os.fsdecode(value) if isinstance(value, (str, bytes, os.PathLike)) else str(value)

    reason = exc.strerror or str(exc)
    if exc.filename is not None:
        names = name(exc.filename) + ("" if exc.filename2 is None else f" -> {name(exc.filename2)}")
        reason = f"{names}: {reason}"
    return " ".join(reason.split())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except (UserError, InfrastructureError) as exc:
        print(f"unet-train {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # permission denied, disk full, unwritable --out: the user's to fix
        logging.getLogger(__name__).debug("OSError", exc_info=True)
        print(f"unet-train {args.command}: error: {_os_error_text(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"unet-train {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
