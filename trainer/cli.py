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

from trainer.errors import UserError

DEFAULT_SETTINGS = Path("settings.yaml")


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

    dist = _command(sub, "distributed", "launch PS/worker/chief or horovodrun on SSH hosts via Ansible",
                    _cmd_distributed)
    _add_cluster_flags(dist)
    dist.add_argument("--mode", choices=["ps", "horovod"], default=None, help="default: cluster.mode (ps)")
    dist.add_argument("--ps-hosts", default=None, help="parameter-server hosts (default: the first host)")
    dist.add_argument("--slots-per-host", type=_positive_int, default=1, help="horovod: ranks per host")
    dist.add_argument("--controller", choices=["gloo", "mpi"], default="gloo", help="horovodrun controller")
    dist.add_argument("--run-name", default=None)
    dist.add_argument("--model", choices=["2d", "3d"], default=None)
    dist.add_argument("--epochs", type=_positive_int, default=None)
    dist.add_argument("--dry-run", action="store_true", help="print the inventory and every command, then stop")
    dist.add_argument("--stop", action="store_true", help="stop every process a previous launch of --run-name started")
    doctor = _command(sub, "doctor", "preflight: SSH, versions, MPI, cores/sockets/NUMA and NICs on every host",
                      _cmd_doctor)
    _add_cluster_flags(doctor)
    doctor.add_argument("--mode", choices=["ps", "horovod"], default=None,
                        help="check for this launch mode (default: cluster.mode)")

    evaluate = _command(sub, "evaluate", "per-case metrics on a held-out split; predictions as NIfTI", _cmd_evaluate)
    _add_run_flags(evaluate)
    evaluate.add_argument("--split", choices=["test", "val", "train"], default="test")
    evaluate.add_argument("--limit", type=_positive_int, default=None, help="first N cases only")
    evaluate.add_argument("--out", type=Path, default=None, help="default runs/<run>/evaluation")
    evaluate.add_argument("--no-predictions", action="store_true", help="metrics only, no NIfTI files")
    _add_window_flags(evaluate)

    predict = _command(sub, "predict", "predict WT masks (NIfTI + PNG overlay) for case folders or 4D NIfTI files",
                       _cmd_predict)
    _add_run_flags(predict)
    predict.add_argument("inputs", nargs="+", type=Path)
    predict.add_argument("--out", type=Path, required=True, help="output folder")
    _add_window_flags(predict)

    export = _command(sub, "export", "export the best checkpoint as a SavedModel or OpenVINO IR (+ parity check)",
                      _cmd_export)
    _add_run_flags(export)
    export.add_argument("--format", choices=["savedmodel", "openvino"], default="savedmodel")
    export.add_argument("--out", type=Path, default=None,
                        help="default runs/<run>/export/saved_model (openvino: runs/<run>/export/openvino)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing export")

    bench = _command(sub, "benchmark", "throughput, latency percentiles, peak RSS, input pipeline", _cmd_benchmark)
    _add_run_flags(bench)
    bench.add_argument("--mode", action="append", choices=["train", "infer", "pipeline"], default=None,
                       help="repeatable (default: all three)")
    bench.add_argument("--batch-size", type=_positive_int, default=32)
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


CLUSTER_FLAGS = {"user": "cluster.ssh_user", "key": "cluster.ssh_key", "port": "cluster.ssh_port",
                 "workdir": "cluster.workdir", "run_name": "train.run_name", "model": "train.model",
                 "epochs": "train.epochs"}


def _launcher(args: argparse.Namespace, hosts_required: bool = True):
    from launcher.distributed import Launcher, LaunchRequest

    flags = {key: (str(getattr(args, attr)) if attr == "key" and getattr(args, attr) else getattr(args, attr))
             for attr, key in CLUSTER_FLAGS.items() if hasattr(args, attr)}
    settings = load_cli_settings(args, flags)
    # --hosts/--mode win over cluster.hosts/cluster.mode in settings.yaml
    hosts = args.hosts if args.hosts is not None else ",".join(settings.cluster.hosts)
    if hosts_required and not hosts:
        raise UserError("--hosts: required (e.g. --hosts node1,node2), or set cluster.hosts in settings.yaml")
    request = LaunchRequest(hosts=hosts, mode=args.mode or settings.cluster.mode,
                            ps_hosts=getattr(args, "ps_hosts", None),
                            dry_run=getattr(args, "dry_run", False),
                            slots_per_host=getattr(args, "slots_per_host", 1),
                            controller=getattr(args, "controller", "gloo"))
    return Launcher(settings, request)


def _cmd_distributed(args: argparse.Namespace) -> int:
    if args.stop:
        launcher = _launcher(args, hosts_required=False)
        result = launcher.stop()
        return 0 if result.succeeded else 1
    launcher = _launcher(args)
    return launcher.dry_run() if args.dry_run else launcher.launch()


def _cmd_doctor(args: argparse.Namespace) -> int:
    _launcher(args).doctor(standalone=True)
    print("doctor: every host passed")
    return 0


def _add_window_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overlap", type=float, default=0.5, help="3D sliding-window overlap (0..0.9)")
    parser.add_argument("--blending", choices=["gaussian", "mean"], default="gaussian")
    parser.add_argument("--engine", choices=["auto", "tf", "openvino"], default="auto",
                        help="inference engine (auto: OpenVINO when installed and no GPU, else TensorFlow)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="inference precision (auto: bf16 where the CPU has native bf16, else fp32)")
    parser.add_argument("--ir", type=Path, default=None,
                        help="run this exported OpenVINO IR (.xml) instead of converting the checkpoint")


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=["2d", "3d"], default=None)
    parser.add_argument("--run-name", default=None, help="runs/<run-name>/ (resumes when it holds a checkpoint)")
    parser.add_argument("--run-dir", type=Path, default=None)


RUN_FLAGS = {"model": "train.model", "run_name": "train.run_name", "run_dir": "train.run_dir",
             "dist": "train.dist", "epochs": "train.epochs", "batch_size": "train.batch_size",
             "learning_rate": "train.learning_rate"}


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
                                 workers=args.workers, overwrite=args.overwrite)
        counts = prepare_brats(request, progress=not args.quiet)
        print(f"wrote {request.out} (slices: " + ", ".join(f"{k} {v}" for k, v in counts.items())
              + f"); split: {split_path_for(request.out)}")
    else:
        from trainer.data.decathlon import prepare_decathlon

        src = args.src or settings.data.decathlon_dir
        cache = args.out or settings.data.cache_dir
        split_file = settings.data.decathlon_split
        split = prepare_decathlon(src, cache, settings.data.split, split_file, progress=not args.quiet,
                                  overwrite=args.overwrite)
        print(f"checked {sum(len(v) for v in split.values())} case(s) in {src}; cache: {cache}; "
              f"split: {split_file}")
    return 0


def _start_runtime(settings):
    """Apply CPU settings, import TensorFlow, and start the runtime named by train.dist."""
    from trainer.runtime.cpu import apply_cpu_environment, configure_threads

    plan = apply_cpu_environment(settings.cpu)
    configure_threads(plan)
    if settings.train.dist == "horovod":
        from trainer.runtime.horovod import HorovodRuntime

        runtime = HorovodRuntime.start()
    elif settings.train.dist == "ps":
        raise UserError("train.dist=ps: the parameter-server chief is 'unet-train chief' (with "
                        "'unet-train ps --index i' and 'unet-train worker --index i' running; see README)")
    else:
        from trainer.runtime.base import SingleRuntime

        runtime = SingleRuntime()
    _log_to_run_file(settings, runtime)
    logging.getLogger(__name__).info("rank %d/%d, threads: %s", runtime.rank, runtime.size, plan.describe())
    return runtime


def _log_to_run_file(settings, runtime) -> None:
    root = logging.getLogger()
    if not runtime.is_chief:
        root.setLevel(logging.WARNING)
        return
    settings.run_path.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(settings.run_path / settings.logging.log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(settings.logging.level)


def _cmd_train(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args, _flag_overrides(args))
    runtime = _start_runtime(settings)
    from trainer.training.run import train

    try:
        result = train(settings, runtime)
    finally:
        runtime.shutdown()
    if runtime.is_chief:
        print(f"trained {result.epochs_run} epoch(s) (now at epoch {result.final_epoch}, step {result.step}); "
              f"best val Dice {result.best_val_dice:.4f}; run: {result.run_path}")
    return 0


def _exit_now(code: int) -> None:
    """Leave without waiting for TensorFlow's gRPC threads, which never join on their own."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def _cmd_server_role(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args)
    from trainer.runtime.ps.roles import serve

    code = 1
    try:
        code = serve(settings, args.role, args.index)
    except UserError as exc:
        print(f"unet-train {args.role}: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        code = 130
    finally:
        _exit_now(code)  # gRPC server threads never join: leave explicitly, whatever happened
    return code


def _cmd_chief(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args, {**_flag_overrides(args), "train.dist": "ps"})
    from trainer.runtime.cpu import apply_cpu_environment, configure_threads
    from trainer.runtime.ps.cluster import ClusterLayout

    layout = ClusterLayout.from_settings(settings.cluster)
    configure_threads(apply_cpu_environment(settings.cpu, layout.local_processes("chief", 0), cluster_task=True))
    _log_to_run_file(settings, _ChiefIdentity())
    from trainer.runtime.ps.chief import run_chief

    code = 1
    try:
        result = run_chief(settings)
        print(f"trained {result.epochs_run} epoch(s) (now at epoch {result.final_epoch}, step {result.step}); "
              f"best val Dice {result.best_val_dice:.4f}; run: {result.run_path}")
        code = 0
    except UserError as exc:
        print(f"unet-train chief: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("unet-train chief: interrupted", file=sys.stderr)
        code = 130
    except BaseException:  # still say what happened: os._exit below skips the normal traceback
        import traceback

        traceback.print_exc()
    finally:
        _exit_now(code)
    return code


class _ChiefIdentity:
    is_chief = True


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

    settings = _start_inference(args)
    from trainer.benchmark import BenchmarkRequest, run_benchmark

    request = BenchmarkRequest(modes=tuple(args.mode or ("train", "infer", "pipeline")),
                               batch_size=args.batch_size, steps=args.steps, warmup=args.warmup)
    print(json.dumps(run_benchmark(settings, request, args.out), indent=1))
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
    except UserError as exc:
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
