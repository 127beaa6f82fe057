"""``unet-train benchmark``: the training runtime's own figures (train, in-memory, inference, pipeline)."""
from __future__ import annotations

import argparse
import json

from trainer.commands.args import BENCHMARK_MODES
from trainer.commands.settings import load_run_settings


def cmd_benchmark(args: argparse.Namespace) -> int:
    settings = load_run_settings(args)
    from trainer.runtime.start import start_runtime  # loads TensorFlow: start_runtime applies the CPU settings

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
