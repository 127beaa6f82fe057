"""Issue 2 figures: synth time for 20 cases, prepare time and peak RSS for 100 cases
(full 240x240x155 volumes). Peak RSS is sampled over the whole process tree (the
prepare pool's workers included) and also read from getrusage (largest single process).

Usage: python benchmarks/data_prep.py  -> benchmarks/results/data_prep.json
"""
from __future__ import annotations

import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from common import CLI, ROOT, env, save


def run_sampled(cmd: list, cwd: Path = ROOT) -> tuple[float, float]:
    """(wall seconds, peak summed RSS of the process tree in MiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [root] + root.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {cmd}")
    return time.perf_counter() - start, peak / 2 ** 20


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="unet-bench-", dir=ROOT / "data" if (ROOT / "data").exists() else None))
    try:
        synth20_s, _ = run_sampled(CLI + ["synth", "--format", "brats", "--out", work / "b20", "--cases", "20", "--quiet"])
        synth100_s, _ = run_sampled(CLI + ["synth", "--format", "brats", "--out", work / "b100", "--cases", "100",
                                           "--quiet"])
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        # run in `work`: prepare records its folder as the last one prepared in its working folder,
        # and this one is deleted below (the repository's settings.yaml is passed explicitly)
        prepare_s, tree_peak = run_sampled(CLI + ["prepare", "--format", "brats", "--src", work / "b100",
                                                  "--model", "2d", "--out", work / "prepared",
                                                  "--settings", ROOT / "settings.yaml", "--quiet"], cwd=work)
        single_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        size = sum(f.stat().st_size for f in (work / "prepared").glob("slices-*.h5"))
        raw = sum(f.stat().st_size for f in (work / "b100").rglob("*.nii.gz"))
        save("data_prep", {
            "synth_20_cases_s": synth20_s, "synth_100_cases_s": synth100_s,
            "prepare_100_cases_s": prepare_s, "prepare_peak_rss_tree_mib": tree_peak,
            "prepare_peak_rss_largest_process_mib": single_peak, "rusage_before_kib": before,
            "slices_mib": size / 2 ** 20, "raw_nifti_mib": raw / 2 ** 20,
            "full_dataset_in_memory_mib": 100 * 240 * 240 * 155 * 5 * 4 / 2 ** 20,
        })
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
