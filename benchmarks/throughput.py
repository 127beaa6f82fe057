"""Training speed per precision, 2D and 3D: the in-memory ceiling (the real step on one batch held
in memory, `unet-train benchmark --mode train_in_memory`) against `unet-train train` end to end,
in fp32 and with `train.precision: auto` (bf16 where the CPU has it), plus 3D 144^3 batch-1
peak memory. One configuration per process; the configurations alternate and repeat (the
machine drifts), and ratios are taken between medians of the same run.

With --avx2 every row also runs under ONEDNN_MAX_CPU_ISA=AVX2 (an AVX2-only CPU's kernels): auto
then trains in fp32, and an explicit bf16 is refused (the refusal is recorded).

Usage: python benchmarks/throughput.py [--rounds 2] [--avx2] [--models 2d,3d] [--out throughput]
       -> benchmarks/results/<out>.json (the stored ones: --models 2d --avx2 --out throughput_2d,
          --models 3d --out throughput_3d)
Inference engines (TF fp32/bf16, OpenVINO): benchmarks/inference_engines.py.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess

from common import CLI, ROOT, RESULTS, default_data_flags, ensure_data, env, save, timed

SHAPES = {
    "2d": {"batch": 16, "steps": 20, "extra": []},
    "3d": {"batch": 2, "steps": 15, "extra": ["--set", "data.crop_size=[64,64,64]"]},
}
RUNS = ROOT / "runs" / "throughput"


def ceiling(model: str, precision: str, out, isa_env: dict) -> dict:
    shape = SHAPES[model]
    timed([*CLI, "benchmark", "--model", model, *default_data_flags(model), "--batch-size", str(shape["batch"]),
           "--steps", "10", "--warmup", "3", "--mode", "train_in_memory", "--set", f"train.precision={precision}",
           *shape["extra"], "--out", out],
          RESULTS / "throughput.log", **isa_env)
    report = json.loads(out.read_text())
    return {"images_per_sec": report["train_in_memory"]["images_per_sec"], "precision": report["precision"],
            "peak_rss_mib": report["peak_rss_mib_per_worker"][0]}


def end_to_end(model: str, precision: str, name: str, isa_env: dict) -> dict:
    """`unet-train train`, 2 epochs: the second epoch's images/s (no compilation, steady input)."""
    shape = SHAPES[model]
    shutil.rmtree(RUNS / name, ignore_errors=True)
    timed([*CLI, "train", "--model", model, *default_data_flags(model), "--epochs", "2",
           "--batch-size", str(shape["batch"]), "--run-dir", RUNS, "--run-name", name, "--set", f"train.steps_per_epoch={shape['steps']}",
           "--set", "train.validation_steps=1" if model == "2d" else "train.validation_steps=2",
           "--set", "train.image_every_epochs=0", "--set", "train.validate_full_volumes=false",
           "--set", "train.checkpoint_every_minutes=0", "--set", f"train.precision={precision}", "--quiet",
           *shape["extra"]], RESULTS / "throughput.log", **isa_env)
    history = json.loads((RUNS / name / "history.json").read_text())["epochs"]
    summary = json.loads((RUNS / name / "summary.json").read_text())
    return {"images_per_sec": history[-1]["images_per_sec"], "input_wait_share": history[-1]["input_wait_share"],
            "startup_seconds": history[-1]["startup_seconds"], "epoch_seconds": history[-1]["epoch_seconds"],
            "precision": summary["precision"]}


def memory_144(precision: str, out, isa_env: dict) -> dict:
    timed([*CLI, "benchmark", "--model", "3d", *default_data_flags("3d"), "--batch-size", "1", "--steps", "2",
           "--warmup", "1", "--mode", "train_in_memory", "--set", "data.crop_size=[144,144,144]", "--set",
           f"train.precision={precision}", "--out", out], RESULTS / "throughput.log", **isa_env)
    report = json.loads(out.read_text())
    return {"peak_rss_mib": report["peak_rss_mib_per_worker"][0], "precision": report["precision"],
            "step_p50_ms": report["train_in_memory"]["p50_ms"]}


def refusal(isa_env: dict) -> str:
    """What `train.precision: bf16` says under an ISA cap without bf16."""
    result = subprocess.run([*map(str, CLI), "benchmark", "--model", "2d", *map(str, default_data_flags("2d")),
                             "--mode", "train_in_memory", "--steps", "1", "--warmup", "0",
                             "--set", "train.precision=bf16"], cwd=ROOT, env=env(**isa_env),
                            capture_output=True, text=True)
    return (result.stderr.strip().splitlines() or ["(no output)"])[-1] if result.returncode else "NOT REFUSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--avx2", action="store_true")
    parser.add_argument("--models", default="2d,3d")
    parser.add_argument("--out", default="throughput", help="result name: results/<out>.json (default throughput)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for model in args.models.split(","):
        ensure_data(model, RESULTS / "throughput.log")
    isas = {"native": {}, **({"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"}} if args.avx2 else {})}
    rows: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for isa, isa_env in isas.items():
            # Odd rounds run the precisions in the other order, so drift does not favour one side.
            precisions = ("fp32", "auto") if round_ % 2 == 0 else ("auto", "fp32")
            for model in args.models.split(","):
                for precision in precisions:
                    key = f"{model}/{isa}/{precision}"
                    out = RESULTS / f"throughput_{model}_{isa}_{precision}_{round_}.json"
                    rows.setdefault(f"{key}/in_memory", []).append(ceiling(model, precision, out, isa_env))
                    rows.setdefault(f"{key}/train", []).append(
                        end_to_end(model, precision, f"{model}_{isa}_{precision}", isa_env))
                if model == "3d":
                    for precision in precisions:
                        rows.setdefault(f"3d_144/{isa}/{precision}", []).append(
                            memory_144(precision, RESULTS / f"throughput_144_{isa}_{precision}_{round_}.json", isa_env))
    summary = {key: {"images_per_sec_median": statistics.median(r["images_per_sec"] for r in runs)
                     if "images_per_sec" in runs[0] else None,
                     "peak_rss_mib_max": max(r.get("peak_rss_mib", 0) for r in runs), "runs": runs}
               for key, runs in rows.items()}
    ratios = {}
    for isa in isas:
        for model in args.models.split(","):
            for precision in ("fp32", "auto"):
                key = f"{model}/{isa}/{precision}"
                ratios[f"{key}: train / in-memory ceiling"] = (summary[f"{key}/train"]["images_per_sec_median"]
                                                               / summary[f"{key}/in_memory"]["images_per_sec_median"])
            ratios[f"{model}/{isa}: auto / fp32 (train end to end)"] = (
                summary[f"{model}/{isa}/auto/train"]["images_per_sec_median"]
                / summary[f"{model}/{isa}/fp32/train"]["images_per_sec_median"])
    refusals = {isa: refusal(isa_env) for isa, isa_env in isas.items() if isa != "native"}
    save(args.out, {"shapes": SHAPES, "rounds": args.rounds, "ratios": ratios, "bf16_refused": refusals,
                    "rows": summary})


if __name__ == "__main__":
    main()
