"""Inference speed per engine and precision: TF fp32, TF bf16, OpenVINO (default hint, f32).

2D: the project's UNet (base 32, 128x128x4) at batch 32, images/s. 3D: sliding-window
inference (trainer.inference.predictor, the default 64^3 window and overlap 0.5) over one
240x240x155x4 volume, volumes/s. Weights are a fixed random initialisation (speed does not
depend on them). Building a second model in one process slowed it by 20-30%, so every
configuration runs in its own process; the order alternates between repeats (forward, then
backward) so that the machine's drift (+-35% here) spreads over every configuration.
``--avx2`` adds rows with ONEDNN_MAX_CPU_ISA=AVX2 (an AVX2-only CPU's oneDNN path).

    .venv/bin/python benchmarks/inference_engines.py [--repeats 3] [--dims 2d,3d] [--avx2] [--lock FILE]

Writes benchmarks/results/inference_engines.json: every run, medians, and ratios to TF fp32 at
the same ISA.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, env, save  # noqa: E402

CONFIGS = ("tf-fp32", "tf-bf16", "openvino-default", "openvino-f32")
AVX2_CONFIGS = ("tf-fp32", "openvino-f32")  # bf16 is refused under an AVX2 cap (and TF's would crash)
BATCH_2D = 32
VOLUME = (240, 240, 155, 4)


def child(config: str, dims: str, steps: int) -> dict:
    """One configuration, one process: build, warm up, time."""
    from trainer.config.settings import CpuSettings, ModelSettings
    from trainer.hardware.cpu import apply_cpu_environment, configure_threads

    plan = apply_cpu_environment(CpuSettings())
    configure_threads(plan)
    import numpy as np
    import tensorflow as tf

    from trainer.inference.engines import OpenVinoEngine, TfEngine, convert_keras, describe
    from trainer.inference.predictor import Predictor
    from trainer.models import build_model

    engine_name, precision = config.split("-")
    tf.keras.utils.set_random_seed(0)
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16" if config == "tf-bf16" else "float32")
    model = build_model(dims, ModelSettings(), 4, 128, (64, 64, 64))
    if engine_name == "tf":
        engine = TfEngine(model, precision, "random init")
    else:
        hint = None if precision == "default" else precision
        engine = OpenVinoEngine.compile(convert_keras(model), hint, plan.intra_op, "random init")
    rng = np.random.default_rng(0)
    if dims == "2d":
        batch = rng.normal(size=(BATCH_2D, 128, 128, 4)).astype(np.float32)
        for _ in range(2):
            engine.predict(batch)
        start = time.perf_counter()
        for _ in range(steps):
            engine.predict(batch)
        seconds = time.perf_counter() - start
        rate, unit = BATCH_2D * steps / seconds, "images/s"
    else:
        predictor = Predictor(engine, "3d", [0, 1, 2, 3], 128, (64, 64, 64))
        volume = rng.normal(size=VOLUME).astype(np.float32)
        engine.predict(volume[None, :64, :64, :64].repeat(8, axis=0))  # warm-up at the window batch
        start = time.perf_counter()
        for _ in range(steps):
            predictor.predict(volume)
        seconds = time.perf_counter() - start
        rate, unit = steps / seconds, "volumes/s"
    return {"config": config, "dims": dims, "engine": describe(engine), "rate": rate, "unit": unit,
            "seconds": seconds, "steps": steps}


def run_child(config: str, dims: str, steps: int, isa: str | None, lock: str | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", config, "--dims", dims, "--steps", str(steps)]
    if lock:
        cmd = ["flock", lock, *cmd]
    extra = {"ONEDNN_MAX_CPU_ISA": isa} if isa else {}
    result = subprocess.run(cmd, cwd=ROOT, env=env(**extra), capture_output=True, text=True, timeout=1200)
    if result.returncode:
        raise SystemExit(f"{config} {dims} (ISA {isa or 'default'}) failed:\n{result.stderr[-2000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    row["isa"] = isa or "default"
    print(f"  {dims} {config:17s} ISA {row['isa']:7s} {row['rate']:8.3f} {row['unit']}", flush=True)
    return row


def summarise(rows: list[dict]) -> dict:
    medians: dict[str, dict] = {}
    for row in rows:
        key = f"{row['dims']} {row['config']} isa={row['isa']}"
        medians.setdefault(key, {"rates": [], "unit": row["unit"], "engine": row["engine"]})["rates"].append(row["rate"])
    for key, entry in medians.items():
        entry["median"] = statistics.median(entry["rates"])
    for key, entry in medians.items():
        dims, _, isa = key.split(" ")
        base = medians.get(f"{dims} tf-fp32 {isa}")
        entry["vs_tf_fp32_same_isa"] = entry["median"] / base["median"] if base else None
        default_base = medians.get(f"{dims} tf-fp32 isa=default")
        entry["vs_tf_fp32_default_isa"] = entry["median"] / default_base["median"] if default_base else None
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--dims", default="2d,3d")
    parser.add_argument("--steps", type=int, default=0, help="timed batches (2D, default 10) or volumes (3D, default 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--avx2", action="store_true", help="also run TF fp32 / OpenVINO f32 under ONEDNN_MAX_CPU_ISA=AVX2")
    parser.add_argument("--lock", default=None, help="run each configuration under `flock FILE` (shared machines)")
    parser.add_argument("--out", default="inference_engines")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dims, args.steps or (10 if args.dims == "2d" else 1))))
        return
    plan = [(config, None) for config in CONFIGS] + ([(c, "AVX2") for c in AVX2_CONFIGS] if args.avx2 else [])
    rows = []
    for dims in args.dims.split(","):
        for repeat in range(args.repeats):
            order = plan if repeat % 2 == 0 else plan[::-1]
            for config, isa in order:
                rows.append(run_child(config, dims, args.steps, isa, args.lock))
    save(args.out, {"benchmark": "inference_engines", "batch_2d": BATCH_2D, "volume_3d": list(VOLUME),
                    "window_3d": [64, 64, 64], "repeats": args.repeats, "runs": rows, "summary": summarise(rows)})


if __name__ == "__main__":
    main()
