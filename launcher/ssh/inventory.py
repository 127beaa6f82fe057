"""Render a plan into an Ansible YAML inventory (groups ps, workers, chief; per-host vars).

Every string that comes from users, settings or paths (argv, workdir, run dir, key, user,
host, interpreter) is tagged ``!unsafe``: Ansible templates ``{{ }}`` in inventory values on
the controller, so an untagged ``--set train.run_dir=/x/{{ lookup('pipe', ...) }}`` would run
there. No password ever appears: connections are SSH keys in BatchMode.
"""
from __future__ import annotations

import getpass
import shlex
from pathlib import Path

import yaml

from launcher.ssh.plan import LaunchPlan
from trainer.config.settings import ClusterSettings
from trainer.fsutil import write_text


class Unsafe(str):
    """A string Ansible must treat literally (YAML ``!unsafe``)."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(Unsafe, lambda dumper, value: dumper.represent_scalar("!unsafe", str(value)))


def ssh_options(cluster: ClusterSettings) -> list[str]:
    """Keys only, and bounded waits: ServerAlive* drops a vanished host in ~15 s, not hours.

    Host keys: with ``cluster.known_hosts_file`` only the keys listed there are accepted
    (StrictHostKeyChecking=yes); without it, ssh's own file, and a new host is trusted on first
    use (accept-new), then pinned."""
    strict = "yes" if cluster.known_hosts_file else "accept-new"
    options = ["-o", f"StrictHostKeyChecking={strict}", "-o", "BatchMode=yes",
               "-o", f"ConnectTimeout={cluster.connect_timeout_s}",
               "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
    if cluster.known_hosts_file:
        options += ["-o", f"UserKnownHostsFile={cluster.known_hosts_file}"]
    return options


def ssh_user(cluster: ClusterSettings) -> str:
    return cluster.ssh_user or getpass.getuser()


def interpreter_excludes(python: str) -> list[str]:
    """A relative ``cluster.python`` such as ``venv/bin/python`` lives in the workdir: keep its
    top folder out of the mirror so --delete never removes the hosts' environment."""
    parts = Path(python).parts
    if Path(python).is_absolute() or len(parts) < 2 or parts[0] in ("..", "."):
        return []
    return [f"/{parts[0]}/"]


def render(plan: LaunchPlan, cluster: ClusterSettings, source_root: Path, stage_dir: Path,
           follow_delay_s: float = 1.0) -> dict:
    user = ssh_user(cluster)
    rsync_ssh = ["ssh", "-p", str(cluster.ssh_port), *ssh_options(cluster)]
    if cluster.ssh_key:
        rsync_ssh += ["-i", str(cluster.ssh_key)]
    # Anchored (leading /): an unanchored "data/" would also drop the trainer/data package.
    # Excluded paths are also safe from --delete: the hosts' own venv (a folder or a symlink, so no
    # trailing slash: a worktree's .venv symlink was synced), data, runs, marker, and every run/data
    # path in settings that lies inside the workdir (plan.keep, launcher/protect.py).
    excludes = ["/.git", "/.venv", "/data/", "/runs/", "/.launch/", "/.pytest_cache/", "/.artifacts/",
                "/benchmarks/results/", "/inventory/*.yml", "/.unet-train-workdir", "__pycache__/", "*.egg-info/"]
    excludes += [e for e in interpreter_excludes(cluster.python) + list(plan.keep) if e not in excludes]
    # -s (--protect-args): paths travel to the remote rsync unsplit; playbooks add "--" before
    # source and target. --timeout: a stalled transfer fails instead of hanging.
    rsync_argv = ["rsync", "-a", "-s", "--timeout=120", *[f"--exclude={e}" for e in excludes],
                  "-e", shlex.join(rsync_ssh)]
    common = {
        "unet_run": Unsafe(plan.run), "unet_workdir": Unsafe(plan.workdir), "unet_python": Unsafe(plan.python),
        "unet_state": Unsafe(plan.state_dir), "unet_source": Unsafe(source_root),
        "unet_stage": Unsafe(stage_dir),
        "unet_rsync_argv": [Unsafe(a) for a in rsync_argv],
        # defaults for a manual ansible-playbook run; the launcher passes its own and re-issues follow.yml
        "unet_follow_delay": follow_delay_s, "unet_follow_retries": int(24 * 3600 / follow_delay_s),
        "unet_phase": "main",
    }
    groups: dict[str, dict] = {"ps": {"hosts": {}}, "workers": {"hosts": {}}, "chief": {"hosts": {}}}
    all_hosts = list(dict.fromkeys(plan.hosts + plan.ps_hosts))
    for host in all_hosts:
        host_vars = {
            "ansible_host": Unsafe(host), "ansible_port": cluster.ssh_port, "ansible_user": Unsafe(user),
            "ansible_ssh_common_args": Unsafe(shlex.join(ssh_options(cluster))),
            "ansible_python_interpreter": Unsafe(plan.python),
            "unet_rsync_target": Unsafe(f"{user}@{host}"),
            "unet_roles": [{"name": Unsafe(r.name), "phase": Unsafe(r.phase), "follow": r.follow,
                            "argv": [Unsafe(a) for a in r.argv]} for r in plan.roles_on(host)],
        }
        if cluster.ssh_key:
            host_vars["ansible_ssh_private_key_file"] = Unsafe(cluster.ssh_key)
        choice = plan.cpu.get(host)
        if choice:
            host_vars["unet_cpu_threads"] = choice.threads or "auto"
            host_vars["unet_numactl"] = [Unsafe(a) for a in choice.numactl]
        groups_of = {r.group for r in plan.roles_on(host)} or {"workers"}
        for index, group in enumerate(sorted(groups_of)):
            groups[group]["hosts"][host] = host_vars if index == 0 else {}
    return {"all": {"vars": common, "children": groups}}


def to_yaml(inventory: dict) -> str:
    header = ("# Rendered by `unet-train distributed` from --hosts and settings.yaml; do not edit.\n"
              "# SSH keys only (BatchMode=yes): no passwords are stored or prompted for.\n")
    return header + yaml.dump(inventory, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)


def write_inventory(path: Path, inventory: dict) -> Path:
    write_text(path, to_yaml(inventory))
    return path
