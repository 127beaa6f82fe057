"""Batch norm on volumes: Keras's layer (5D, Eigen's kernels) against VolumeBatchNormalization
(a 4D view, oneDNN's kernels), forward and backward in training mode, fp32 and mixed bf16.

The five shapes are the 3D UNet's activations at batch 2 and 64³ crops (16-256 channels), one
layer each. Every (layer, precision) runs in its own process (a second model in one process
runs slower), the configurations alternate and repeat, and each reports the median of 10 timed
steps after 3 warm-up steps. One inter-op thread: the layers run one after the other.

Usage: python benchmarks/batch_norm_kernels.py [--rounds 2] -> benchmarks/results/batch_norm_kernels.json
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

from common import ROOT, env, save

SHAPES = [(2, 64, 64, 64, 16), (2, 32, 32, 32, 32), (2, 16, 16, 16, 64), (2, 8, 8, 8, 128), (2, 4, 4, 4, 256)]
LAYERS = ("keras_5d", "volume_4d")  # Keras's layer on the 5D tensor; VolumeBatchNormalization


def measure(layer: str, precision: str) -> float:
    """Median milliseconds of one forward and backward pass over all SHAPES, in a new process."""
    result = subprocess.run([sys.executable, __file__, "--child", layer, precision], cwd=ROOT, env=env(),
                            capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def child(layer: str, precision: str) -> None:
    import time

    import tensorflow as tf

    from trainer.models.batch_norm import VolumeBatchNormalization

    tf.config.threading.set_inter_op_parallelism_threads(1)
    if precision == "bf16":
        tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    make = VolumeBatchNormalization if layer == "volume_4d" else tf.keras.layers.BatchNormalization
    norms = [make(momentum=0.9) for _ in SHAPES]
    compute = tf.keras.mixed_precision.global_policy().compute_dtype
    inputs = [tf.cast(tf.random.normal(shape, seed=i) * 3 + 1, compute) for i, shape in enumerate(SHAPES)]

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            loss = tf.add_n([tf.reduce_sum(tf.cast(norm(x, training=True), tf.float32))
                             for norm, x in zip(norms, inputs)])
        return tape.gradient(loss, inputs + [v for norm in norms for v in norm.trainable_variables])

    for _ in range(3):
        step()
    seconds = []
    for _ in range(10):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    print(statistics.median(seconds) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    runs: dict[str, list[float]] = {}
    for round_index in range(args.rounds):
        order = LAYERS if round_index % 2 == 0 else LAYERS[::-1]  # the machine drifts
        for precision in ("fp32", "bf16"):
            for layer in order:
                runs.setdefault(f"{layer}/{precision}", []).append(measure(layer, precision))
                print(layer, precision, round_index + 1, f"{runs[f'{layer}/{precision}'][-1]:.1f} ms", flush=True)
    medians = {key: statistics.median(values) for key, values in runs.items()}
    ratios = {f"keras_5d / volume_4d, {p}": medians[f"keras_5d/{p}"] / medians[f"volume_4d/{p}"] for p in ("fp32", "bf16")}
    save("batch_norm_kernels", {"shapes": SHAPES, "rounds": args.rounds, "ms_median": medians, "ratios": ratios,
                                "runs_ms": runs})


if __name__ == "__main__":
    main()
