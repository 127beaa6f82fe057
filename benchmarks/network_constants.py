"""The network model's constants for ``unet-train plan``: a Horovod allreduce of the UNets'
gradients timed on loopback at 2 and 4 ranks (benchmarks/allreduce_time.py under horovodrun),
fitted to t = 2 (N - 1) alpha + 2 (N - 1) / N x G x beta (ring allreduce; docs/planning.md).

    python benchmarks/network_constants.py [--out benchmarks/results/network_constants.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("UNET_BENCH_RESULTS") or ROOT / "benchmarks" / "results").resolve()
RANKS = (2, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "network_constants.json")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for ranks in RANKS:
            out = Path(scratch) / f"allreduce_{ranks}.json"
            env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
            subprocess.run([str(Path(sys.executable).parent / "horovodrun"), "-np", str(ranks), "-H",
                            f"localhost:{ranks}", "--gloo", sys.executable, str(ROOT / "benchmarks" / "allreduce_time.py"),
                            str(out)], check=True, env=env, timeout=900, capture_output=True)
            report = json.loads(out.read_text())
            for model in ("2d", "3d"):
                runs.append({"ranks": ranks, "model": model, "gradient_bytes": report[model]["gradient_mib"] * 2 ** 20,
                             "seconds": report[model]["allreduce_ms_median"] / 1000})
    matrix = np.array([[2 * (r["ranks"] - 1), 2 * (r["ranks"] - 1) / r["ranks"] * r["gradient_bytes"]] for r in runs])
    (alpha, beta), *_ = np.linalg.lstsq(matrix, np.array([r["seconds"] for r in runs]), rcond=None)
    fitted = matrix @ np.array([alpha, beta])
    for row, value in zip(runs, fitted):
        row["fitted_seconds"] = float(value)
    from trainer.fsutil import write_json

    write_json(args.out, {"runs": runs, "alpha_s": float(alpha), "beta_s_per_byte": float(beta),
                          "model": "t = 2 (N-1) alpha + 2 (N-1)/N x G x beta (loopback, Gloo)"})
    print(json.dumps({"alpha_s": alpha, "beta_s_per_byte": beta}))


if __name__ == "__main__":
    main()
