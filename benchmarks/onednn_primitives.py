"""Where a training step's time goes, per oneDNN primitive kind, in fp32 and bf16: why bf16 is
not 2x everywhere.

Each (model, precision) runs the in-memory step (`unet-train benchmark --mode
train_in_memory`) in its own process under ONEDNN_VERBOSE=1, which prints every oneDNN
primitive execution with its implementation and milliseconds, with one inter-op thread (so
ops run one at a time and their times add up to the step's). The log is cut into steps
(a step starts at the first layer's forward convolution), the first steps are dropped
(primitive creation, first touch), and the rest are averaged per
(primitive, direction, implementation), and per convolution problem (direction and shape; layers
of the same shape share a row) for the largest ones. "outside oneDNN" is the step's wall time
minus the oneDNN sum: TensorFlow's own kernels (activations, casts, the loss, the optimizer, and
the 2D instance norm; 3D batch norm runs in oneDNN) and the framework. Verbose logging itself
costs a little in both precisions.

Usage: python benchmarks/onednn_primitives.py [--models 2d,3d] [--rounds 2]
       -> benchmarks/results/onednn_primitives.json
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import tempfile
from pathlib import Path

from common import CLI, RESULTS, ensure_data, save, timed

SHAPES = {"2d": {"batch": 16, "extra": []},
          "3d": {"batch": 2, "extra": ["--set", "data.crop_size=[64,64,64]"]}}
WARMUP, STEPS, DROPPED = 2, 4, 2
TOP_PROBLEMS = 16  # convolution problems listed one by one, largest first


def problem_key(direction: str, problem: str) -> str:
    """'backward_weights mb2_ic32oc16_id64...' -> 'backward_weights ic32oc16 64x64x64 k3 s1': channels in and
    out, input size, kernel and stride (of the first spatial axis; the UNets' kernels are cubic or square)."""
    channels = re.search(r"ic\d+oc\d+", problem)
    sizes = re.findall(r"i([dhw])(\d+)", problem)
    kernel, stride = re.search(r"k[dh](\d+)", problem), re.search(r"s[dh](\d+)", problem)
    edges = "x".join(size for _, size in sizes)
    return (f"{direction} {channels.group(0) if channels else '?'} {edges or '?'}"
            f" k{kernel.group(1) if kernel else '?'} s{stride.group(1) if stride else '?'}")


def parse_steps(lines: list[str]) -> list[list[tuple[str, str, str, str, float]]]:
    """oneDNN verbose ``exec`` lines -> steps of (primitive, direction, implementation, problem, ms)."""
    executions = []
    for line in lines:
        fields = line.strip().split(",")
        if len(fields) < 10 or fields[0] != "onednn_verbose" or fields[1] != "exec":
            continue
        primitive, implementation, direction, problem = fields[3], fields[4], fields[5], fields[-2]
        executions.append((primitive, direction, implementation, problem, float(fields[-1])))
    first = next((e for e in executions if e[0] == "convolution" and e[1] == "forward_training"), None)
    if first is None:
        raise SystemExit("no oneDNN convolution in the verbose log: is oneDNN on (TF_ENABLE_ONEDNN_OPTS=1)?")
    steps: list[list] = []
    for primitive, direction, implementation, problem, ms in executions:
        if (primitive, direction, problem) == (first[0], first[1], first[3]):
            steps.append([])
        if steps:  # what ran before the first step (reorders of the fed batch) is not a step's
            steps[-1].append((primitive, direction, implementation, problem, ms))
    return steps


def breakdown(model: str, precision: str, data_flags: list) -> dict:
    shape = SHAPES[model]
    with tempfile.TemporaryDirectory(prefix="onednn-") as scratch:
        out, log = Path(scratch) / "report.json", Path(scratch) / "verbose.log"
        timed([*CLI, "benchmark", "--model", model, *data_flags, "--batch-size", str(shape["batch"]),
               "--steps", str(STEPS), "--warmup", str(WARMUP), "--mode", "train_in_memory",
               "--set", f"train.precision={precision}", "--set", "cpu.inter_op_threads=1", *shape["extra"], "--quiet",
               "--out", out], log, ONEDNN_VERBOSE="1")
        report = json.loads(out.read_text())
        steps = parse_steps(log.read_text().splitlines())
    kept = steps[DROPPED:]
    per_kind: dict[str, float] = collections.defaultdict(float)
    per_problem: dict[str, float] = collections.defaultdict(float)
    implementations: dict[str, set] = collections.defaultdict(set)
    for step in kept:
        for primitive, direction, implementation, problem, ms in step:
            key = f"{primitive}/{direction}" if primitive == "convolution" else primitive
            per_kind[key] += ms / len(kept)
            implementations[key].add(implementation)
            if primitive == "convolution":
                per_problem[problem_key(direction, problem)] += ms / len(kept)
    wall_ms = report["train_in_memory"]["p50_ms"]
    onednn_ms = sum(per_kind.values())
    return {"precision": report["precision"], "step_p50_ms": wall_ms, "steps_parsed": len(steps),
            "steps_averaged": len(kept), "onednn_ms_per_step": onednn_ms,
            "outside_onednn_ms_per_step": wall_ms - onednn_ms,
            "ms_per_step": dict(sorted(per_kind.items(), key=lambda kv: -kv[1])),
            "convolution_ms_per_step": dict(sorted(per_problem.items(), key=lambda kv: -kv[1])),
            "implementations": {k: sorted(v) for k, v in implementations.items()}}


def ratios(fp32: dict, bf16: dict) -> dict:
    """fp32 time / bf16 time per kind (> 1: bf16 is faster there), from medians over rounds."""
    kinds = set(fp32["ms_per_step"]) & set(bf16["ms_per_step"])
    out = {kind: fp32["ms_per_step"][kind] / bf16["ms_per_step"][kind] for kind in sorted(kinds)
           if bf16["ms_per_step"][kind] > 0}
    out["onednn_total"] = fp32["onednn_ms_per_step"] / bf16["onednn_ms_per_step"]
    out["outside_onednn"] = fp32["outside_onednn_ms_per_step"] / max(bf16["outside_onednn_ms_per_step"], 1e-9)
    out["step_wall"] = fp32["step_p50_ms"] / bf16["step_p50_ms"]
    return out


def largest_convolutions(fp32: dict, bf16: dict) -> dict:
    """The TOP_PROBLEMS convolutions that take fp32 longest, with both times and their ratio."""
    both = [k for k in fp32["convolution_ms_per_step"] if bf16["convolution_ms_per_step"].get(k, 0.0) > 0]
    largest = sorted(both, key=lambda k: -fp32["convolution_ms_per_step"][k])[:TOP_PROBLEMS]
    return {k: {"fp32_ms": fp32["convolution_ms_per_step"][k], "bf16_ms": bf16["convolution_ms_per_step"][k],
                "fp32_over_bf16": fp32["convolution_ms_per_step"][k] / bf16["convolution_ms_per_step"][k]}
            for k in largest}


def median_run(runs: list[dict]) -> dict:
    """Per-key medians over rounds (implementations from the first round)."""
    kinds = set().union(*(r["ms_per_step"] for r in runs))
    problems = set().union(*(r["convolution_ms_per_step"] for r in runs))
    return {**runs[0], "rounds": len(runs),
            "convolution_ms_per_step": dict(sorted(
                ((k, statistics.median(r["convolution_ms_per_step"].get(k, 0.0) for r in runs)) for k in problems),
                key=lambda kv: -kv[1])),
            "step_p50_ms": statistics.median(r["step_p50_ms"] for r in runs),
            "onednn_ms_per_step": statistics.median(r["onednn_ms_per_step"] for r in runs),
            "outside_onednn_ms_per_step": statistics.median(r["outside_onednn_ms_per_step"] for r in runs),
            "ms_per_step": {k: statistics.median(r["ms_per_step"].get(k, 0.0) for r in runs) for k in kinds}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="2d,3d")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict = {"method": __doc__.split("\n\n")[1].replace("\n", " "), "models": {}}
    for model in args.models.split(","):
        data_flags = ensure_data(model)
        runs: dict[str, list] = {"fp32": [], "bf16": []}
        for round_index in range(args.rounds):
            order = ("fp32", "bf16") if round_index % 2 == 0 else ("bf16", "fp32")  # alternate: the machine drifts
            for precision in order:
                runs[precision].append(breakdown(model, precision, data_flags))
                print(model, precision, round_index + 1, f"{runs[precision][-1]['step_p50_ms']:.0f} ms", flush=True)
        medians = {p: median_run(r) for p, r in runs.items()}
        results["models"][model] = {**medians, "fp32_over_bf16": ratios(medians["fp32"], medians["bf16"]),
                                    "largest_convolutions": largest_convolutions(medians["fp32"], medians["bf16"]),
                                    "runs": runs}
    save("onednn_primitives", results)


if __name__ == "__main__":
    main()
