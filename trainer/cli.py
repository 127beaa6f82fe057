"""``unet-train``: the one console command. Parses argv and settings, then dispatches.

This is the only module that reads argv or settings.yaml (the grammar is in
``trainer.cli_args``). Every command is a thin wrapper over a library function that takes typed
settings. Heavy imports (TensorFlow, Horovod) happen inside the command that needs them, after
CPU settings are applied.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from trainer.cli_args import BENCHMARK_MODES, DEFAULT_SETTINGS, build_parser
from trainer.errors import InfrastructureError, UserError

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


def _launcher(args: argparse.Namespace, settings):
    from launcher.base import LaunchRequest, open_launcher
    from launcher.hosts import hosts_and_slots

    # --hosts/--mode win over cluster.hosts/cluster.mode in settings.yaml
    hosts = args.hosts if args.hosts is not None else ",".join(settings.cluster.hosts)
    hosts, slots = hosts_and_slots(hosts, getattr(args, "slots_per_host", None)) if hosts else ("", 1)
    request = LaunchRequest(hosts=hosts, mode=args.mode or settings.cluster.mode,
                            ps_hosts=getattr(args, "ps_hosts", None), dry_run=getattr(args, "dry_run", False),
                            slots_per_host=slots, controller=getattr(args, "controller", "gloo"),
                            elastic=getattr(args, "elastic", False), min_hosts=getattr(args, "min_hosts", None),
                            max_hosts=getattr(args, "max_hosts", None), scheduler_given=args.scheduler is not None)
    return open_launcher(settings, request, stopping=getattr(args, "stop", False))


def _cmd_distributed(args: argparse.Namespace) -> int:
    launcher = _launcher(args, _cluster_settings(args))
    return launcher.stop() if args.stop else launcher.dry_run() if args.dry_run else launcher.launch()


def _cmd_doctor(args: argparse.Namespace) -> int:
    return _launcher(args, _cluster_settings(args)).doctor()


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


RUN_FLAGS = {"model": "train.model", "run_name": "train.run_name", "run_dir": "train.run_dir",
             "dist": "train.dist", "epochs": "train.epochs", "batch_size": "train.batch_size",
             "learning_rate": "train.learning_rate", "elastic": "train.elastic"}


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, attr) for attr, key in RUN_FLAGS.items() if hasattr(args, attr)}


def load_cli_settings(args: argparse.Namespace, flags: dict[str, Any] | None = None):
    """settings.yaml < a plan (train --plan) < --set overrides < flags."""
    from trainer.config.loader import load_settings

    path = args.settings
    if path is None and DEFAULT_SETTINGS.is_file():
        path = DEFAULT_SETTINGS
    return load_settings(path, _plan_overrides(args) + args.overrides, flags)


def _plan_overrides(args: argparse.Namespace) -> list[str]:
    if getattr(args, "plan", None) is None:
        return []
    from trainer.planning.run import load_plan

    return [f"{key}={json.dumps(value)}" for key, value in load_plan(args.plan).items()]


def load_run_settings(args: argparse.Namespace, extra: dict[str, Any] | None = None):
    """Settings for a command that works on a run: the run's own model and input keys from
    runs/R/settings.yaml, where it exists (see trainer.config.run_settings)."""
    from trainer.config.run_settings import Explicit, settings_for_run

    flags = {**_flag_overrides(args), **(extra or {})}
    return settings_for_run(load_cli_settings(args, flags),
                            Explicit.from_cli(_plan_overrides(args) + args.overrides, flags))


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
                           workers=args.workers, overwrite=args.overwrite, difficulty=args.difficulty)
    writer = write_brats if args.format == "brats" else write_decathlon
    out = writer(request, progress=not args.quiet)
    print(f"wrote {args.cases} {args.format} case(s) to {out}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from trainer.data.prepare import PrepareChoice, prepare

    settings = load_cli_settings(args)
    model = args.model or None
    default_src = settings.data.decathlon_dir if (args.format or "") == "decathlon" or model == "3d" \
        else settings.data.brats_dir
    choice = PrepareChoice(src=args.src or default_src, out=args.out, layout=args.format, model=model,
                           workers=args.workers, overwrite=args.overwrite)
    print(prepare(settings, choice, progress=not args.quiet))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from trainer.planning.run import PlanRequest, run_plan

    settings = load_cli_settings(args, {"train.run_name": args.run_name})
    request = PlanRequest(src=args.src, out=args.out or settings.run_path / "plan.json", model=args.model,
                          nodes=args.nodes, network_gbps=args.network_gbps, calibrate=not args.no_calibrate,
                          max_cases=args.max_cases)
    print(run_plan(settings, request, progress=not args.quiet)[1])
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    settings = load_run_settings(args)
    from trainer.runtime.start import start_runtime

    runtime = start_runtime(settings)
    from trainer.training.run import describe_result, train_run, validate_run

    succeeded = False
    try:
        result = train_run(settings, runtime, progress=not args.quiet)
        succeeded = True
    finally:
        runtime.shutdown(succeeded)
    if runtime.is_chief:
        print(describe_result(result))
        _print_if(validate_run(settings, result, progress=not args.quiet))
    return 0


def _print_if(line: str | None) -> None:
    if line:
        print(line)


def _cmd_server_role(args: argparse.Namespace) -> int:
    from trainer.runtime.ps.roles import run_server_role

    run_server_role(load_cli_settings(args), args.role, args.index)  # never returns: ends the process


def _cmd_chief(args: argparse.Namespace) -> int:
    from trainer.runtime.ps.roles import run_chief

    run_chief(load_run_settings(args, {"train.dist": "ps"}), progress=not args.quiet)  # ends the process


def _start_inference(args: argparse.Namespace):
    settings = load_run_settings(args)
    from trainer.hardware.cpu import apply_cpu_environment, configure_threads

    configure_threads(apply_cpu_environment(settings.cpu))
    return settings


def _window_options(args: argparse.Namespace) -> dict[str, Any]:
    if not 0.0 <= args.overlap < 0.95:
        raise UserError(f"--overlap: expected 0 <= overlap < 0.95, got {args.overlap}")
    return {"overlap": args.overlap, "blending": args.blending, "engine": args.engine,
            "precision": args.precision, "ir": args.ir}


def _cmd_evaluate(args: argparse.Namespace) -> int:
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
    if args.out is None:
        raise UserError("-o/--out: required (the output folder)")
    if bool(args.input_folder) == bool(args.inputs):
        raise UserError("expected either -i FOLDER or case paths, not both" if args.inputs
                        else "expected cases: -i FOLDER, or case folders / NIfTI files as arguments")
    if args.disable_tta:
        args.overrides += ["model.mirror_axes_2d=[]", "model.mirror_axes_3d=[]"]
    settings = _start_inference(args)
    from trainer.inference.inputs import case_from_path, cases_in_folder
    from trainer.inference.predict import PredictOptions, predict_cases

    cases = cases_in_folder(args.input_folder) if args.input_folder else [case_from_path(p) for p in args.inputs]
    options = PredictOptions(out=args.out, nnunet_names=args.input_folder is not None,
                             png=args.png or not args.input_folder, save_probabilities=args.save_probabilities,
                             resume=args.resume, progress=not args.quiet)
    report = predict_cases(settings, cases, options, **_window_options(args))
    for path in report.written:
        print(path)
    print(report.closing_line())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    settings = _start_inference(args)
    from trainer.inference.export import export

    report = export(settings, args.format, args.out, overwrite=args.overwrite)
    if args.format == "savedmodel":
        print(f"SavedModel: {report['saved_model']} (max |export - keras| = {report['max_abs_diff']:.2e}); "
              f"report: {Path(report['saved_model']) / 'export.json'}")
        return 0
    checks = report["checks"]
    bf16 = checks["bf16"]
    bf16_text = (f"bf16: max |dp| {bf16['max_abs_diff']:.2e}, mask Dice {bf16['mask_dice']:.4f}"
                 if "skipped" not in bf16 else f"bf16 skipped: {bf16['skipped']}")
    print(f"OpenVINO IR: {report['openvino_ir']} (f32: max |dp| {checks['f32']['max_abs_diff']:.2e}; {bf16_text}); "
          f"report: {Path(report['openvino_ir']).parent / 'export.json'}")
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    settings = load_run_settings(args)
    from trainer.runtime.start import start_runtime

    runtime = start_runtime(settings, log_to_run=False)  # a benchmark writes no run
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


HANDLERS = {"config": _cmd_config, "synth": _cmd_synth, "prepare": _cmd_prepare, "plan": _cmd_plan,
            "train": _cmd_train,
            "ps": _cmd_server_role, "worker": _cmd_server_role, "chief": _cmd_chief,
            "distributed": _cmd_distributed, "doctor": _cmd_doctor, "manifests": _cmd_manifests,
            "slurm-task": _cmd_slurm_task, "evaluate": _cmd_evaluate, "predict": _cmd_predict,
            "export": _cmd_export, "benchmark": _cmd_benchmark}


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
        return int(HANDLERS[args.command](args) or 0)
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
