"""Issue 6 figure: seconds from `unet-train distributed` to the first training step on 2 SSH
hosts (sshd on 127.0.0.2 and 127.0.0.3), for Horovod and PS modes.

Needs the 2D synthetic default, data/prepared/brats-default (run_all.py makes it).
Usage: python benchmarks/launch_overhead.py -> results/launch_overhead.json
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from common import CLI, DATASETS, ROOT, RESULTS, save, timed

sys.path.insert(0, str(ROOT / "tests"))
from support.sshd_hosts import free_port_on, start_sshd_hosts  # noqa: E402


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="unet-launch-"))
    hosts = start_sshd_hosts(work / "sshd")
    result = {"hosts": list(hosts.hosts)}
    try:
        for mode in ("horovod", "ps"):
            ports = [free_port_on(["127.0.0.1", *hosts.hosts]) for _ in range(6)]
            run = f"launch_{mode}"
            cmd = CLI + ["distributed", "--hosts", ",".join(hosts.hosts), "--mode", mode, "--run-name", run,
                         "--port", hosts.port, "--key", hosts.key, "--workdir", work / "remote",
                         "--epochs", "1", "--set", f"cluster.known_hosts_file={hosts.known_hosts}",
                         "--set", f"cluster.python={sys.executable}", "--set", "cluster.tensorboard=false",
                         "--set", f"cluster.ps_hosts=[127.0.0.1:{ports[0]}]",
                         "--set", f"cluster.worker_hosts=[127.0.0.1:{ports[1]},127.0.0.1:{ports[5]}]",
                         "--set", f"cluster.chief_host=127.0.0.1:{ports[2]}", "--set", f"cluster.control_port={ports[3]}",
                         "--set", f"train.run_dir={work / 'runs'}", "--set", f"data.dataset={DATASETS['2d'][2]}",
                         "--set", "train.steps_per_epoch=2", "--set", "train.validation_steps=1",
                         "--set", "train.image_every_epochs=0", "--set", "train.batch_size=4"]
            wall = timed(cmd, RESULTS / "launch_overhead.log")
            launch = json.loads((work / "runs" / run / "launcher" / "launch.json").read_text())
            result[mode] = {"command_to_first_training_step_s": launch["first_training_s"],
                            "command_to_first_output_s": launch["first_output_s"], "total_s": wall}
            time.sleep(1)
    finally:
        hosts.stop()
    save("launch_overhead", result)


if __name__ == "__main__":
    main()
