"""Issue 3 figures: 2D training throughput at batch 32 (128x128x4, 32 base filters) and the
FLOP/s it implies; the input pipeline alone vs training; 3D 144^3 batch-1 training peak RSS.

Usage: python benchmarks/throughput.py  -> benchmarks/results/throughput_2d.json, throughput_3d_144.json
"""
from __future__ import annotations

from common import CLI, RESULTS, timed

RESULTS.mkdir(parents=True, exist_ok=True)
timed(CLI + ["benchmark", "--model", "2d", "--batch-size", "32", "--steps", "10", "--warmup", "3",
             "--out", RESULTS / "throughput_2d.json"], RESULTS / "throughput.log")
timed(CLI + ["benchmark", "--model", "3d", "--batch-size", "1", "--steps", "2", "--warmup", "1", "--mode", "train",
             "--set", "data.crop_size=[144,144,144]", "--out", RESULTS / "throughput_3d_144.json"],
      RESULTS / "throughput.log")
print((RESULTS / "throughput_2d.json").read_text())
print((RESULTS / "throughput_3d_144.json").read_text())
