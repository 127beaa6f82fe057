"""Issue 16 figure: seconds from `unet-train distributed --scheduler slurm` (and from sbatch) to the
first training step, Horovod (2 tasks) and PS (chief + 1 PS + 2 workers), on a single-node Slurm
(slurmctld + slurmd + munged on 127.0.0.1, as in the tests). Same training settings as
launch_overhead.py (the SSH launcher's figure), so the two compare.

Uses the 2D synthetic default (data/prepared/brats-default) when it is prepared, else prepares 6
synthetic full-size BraTS cases into a dataset folder in a temp folder.
Usage: python benchmarks/slurm_overhead.py -> results/slurm_overhead.json
"""
from __future__ import annotations

import json
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from common import CLI, DATASETS, ROOT, RESULTS, prepared_for, save, timed

sys.path.insert(0, str(ROOT / "tests"))
from support.slurm_cluster import start_slurm_cluster  # noqa: E402


def prepared_data(work: Path) -> Path:
    """A prepared dataset folder holding 2D slices: the synthetic default's, else one made in ``work``."""
    default = DATASETS["2d"][2]
    if "2d" in prepared_for(default):
        return default
    src, out = work / "brats", work / "prepared"
    timed(CLI + ["synth", "--format", "brats", "--out", src, "--cases", "6", "--seed", "1", "--quiet"])
    # in `work`, so that the repository's data/prepared/last.json never names this temporary folder
    timed(CLI + ["prepare", "--format", "brats", "--src", src, "--model", "2d", "--out", out,
                 "--settings", ROOT / "settings.yaml", "--quiet"], cwd=work)
    return out


def free_base(count: int) -> int:
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="unet-slurm-bench-"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = prepared_data(work)
    cluster = start_slurm_cluster()
    result = {"cluster": "single-node slurm-wlm 22.05 on 127.0.0.1 (tests/slurm_cluster.py)", "data": str(data)}
    try:
        for mode, tasks in (("horovod", 2), ("ps", 4)):
            base = free_base(tasks + 1)
            run = f"slurm_{mode}"
            cmd = CLI + ["distributed", "--scheduler", "slurm", "--mode", mode, "--nodes", "1",
                         "--ntasks-per-node", str(tasks), "--run-name", run, "--epochs", "1",
                         "--set", f"cluster.python={sys.executable}", "--set", f"train.run_dir={work / 'runs'}",
                         "--set", f"data.dataset={data}", "--set", "train.steps_per_epoch=2",
                         "--set", "train.validation_steps=1", "--set", "train.image_every_epochs=0",
                         "--set", "train.batch_size=4", "--set", f"cluster.slurm.port_base={base}",
                         "--set", f"cluster.control_port={base + tasks}"]
            wall = timed(cmd, RESULTS / "slurm_overhead.log", SLURM_CONF=str(cluster.conf))
            launch = json.loads((work / "runs" / run / "launcher" / "launch.json").read_text())
            result[mode] = {"tasks": tasks, "command_to_first_training_step_s": launch["first_training_s"],
                            "submit_to_first_training_step_s": launch["submit_to_first_training_s"],
                            "command_to_first_output_s": launch["first_output_s"], "total_s": wall}
            time.sleep(1)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    ssh = RESULTS / "launch_overhead.json"
    if ssh.exists():
        result["ssh_launcher"] = json.loads(ssh.read_text())
    save("slurm_overhead", result)


if __name__ == "__main__":
    main()
