"""``unet-train distributed``, ``doctor`` and ``slurm-task``: a run on machines a launcher drives.

Which launcher a command gets is decided here, above the launchers: Slurm when
cluster.scheduler is slurm (or, for ``--stop``, when the run has a Slurm job record and no
``--scheduler`` was named), else SSH hosts driven by Ansible.
"""
from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from launcher.base import Launcher, LaunchRequest
from launcher.hosts import hosts_and_slots
from launcher.slurm.launch import SlurmLauncher, has_job_record
from launcher.slurm.task import task_command
from launcher.ssh.launch import SshLauncher
from trainer.commands.settings import load_cli_settings, pin_dataset
from trainer.errors import UserError

if TYPE_CHECKING:
    from trainer.config.settings import Settings

SLURM_FLAGS = {"scheduler": "cluster.scheduler", "nodes": "cluster.slurm.nodes",
               "ntasks_per_node": "cluster.slurm.ntasks_per_node", "cpus_per_task": "cluster.slurm.cpus_per_task",
               "partition": "cluster.slurm.partition", "time": "cluster.slurm.time",
               "account": "cluster.slurm.account", "constraint": "cluster.slurm.constraint"}
CLUSTER_FLAGS = {"user": "cluster.ssh_user", "key": "cluster.ssh_key", "port": "cluster.ssh_port",
                 "workdir": "cluster.workdir", "run_name": "train.run_name", "model": "train.model",
                 "epochs": "train.epochs"}


def cmd_distributed(args: argparse.Namespace) -> int:
    settings = _cluster_settings(args)
    launcher = _launcher(args, settings if args.stop else _dataset_as_seen_here(settings))
    return launcher.stop() if args.stop else launcher.dry_run() if args.dry_run else launcher.launch()


def _dataset_as_seen_here(settings: Settings) -> Settings:
    """data.dataset made absolute as this folder sees it (the folder named, else the last one
    prepared here): the roles run in the hosts' workdir, where a relative path or "the last one
    prepared here" means another folder (seen: after `prepare` here, the chief of an SSH launch
    found no dataset). Unchanged when none is found here: the data may be on the hosts only."""
    try:
        return pin_dataset(settings, check_model_data=False)
    except UserError:
        return settings


def cmd_doctor(args: argparse.Namespace) -> int:
    return _launcher(args, _cluster_settings(args)).doctor()


def cmd_slurm_task(args: argparse.Namespace) -> int:
    if args.settings is None:
        raise UserError("--settings: required (the run's merged settings, written by distributed --scheduler slurm)")
    settings = load_cli_settings(args)
    command = task_command(settings, args.mode, str(args.settings.resolve()), os.environ)
    print(command.announcement(), flush=True)
    argv = command.exec_argv()
    os.execvp(argv[0], argv)  # the role replaces this process: srun and Slurm see it directly
    return 1  # not reached


def open_launcher(settings: Settings, request: LaunchRequest, stopping: bool = False,
                  hosts_from_settings: bool = False) -> Launcher:
    """The Slurm launcher when cluster.scheduler is slurm (or, for --stop, when the run has a Slurm
    job record and no --scheduler was named), else the SSH one. Hosts that came from
    cluster.hosts (not --hosts) are the SSH launcher's default and mean nothing to Slurm."""
    slurm = settings.cluster.scheduler == "slurm" or (stopping and not request.scheduler_given
                                                       and has_job_record(settings))
    if slurm:
        if request.hosts and not hosts_from_settings:
            raise UserError("--hosts: not used with --scheduler slurm (Slurm picks the nodes; see --nodes, "
                            "--partition)")
        if request.elastic:
            raise UserError("--elastic: SSH hosts only (--scheduler ssh); a Slurm job has a fixed set of nodes")
        return SlurmLauncher(settings, request.mode)
    if not request.hosts and not stopping:
        raise UserError("--hosts: required (e.g. --hosts node1,node2), or set cluster.hosts in settings.yaml")
    return SshLauncher(settings, request)


def _cluster_settings(args: argparse.Namespace):
    # --key is made absolute here: horovodrun uses it on the first host, from another folder
    flags = {key: (os.path.abspath(os.path.expanduser(getattr(args, attr))) if attr == "key" and getattr(args, attr)
                   else getattr(args, attr))
             for attr, key in {**CLUSTER_FLAGS, **SLURM_FLAGS}.items() if hasattr(args, attr)}
    return load_cli_settings(args, flags)


def _launcher(args: argparse.Namespace, settings) -> Launcher:
    # --hosts/--mode win over cluster.hosts/cluster.mode in settings.yaml
    hosts = args.hosts if args.hosts is not None else ",".join(settings.cluster.hosts)
    hosts, slots = hosts_and_slots(hosts, getattr(args, "slots_per_host", None)) if hosts else ("", 1)
    request = LaunchRequest(hosts=hosts, mode=args.mode or settings.cluster.mode,
                            ps_hosts=getattr(args, "ps_hosts", None), dry_run=getattr(args, "dry_run", False),
                            slots_per_host=slots, controller=getattr(args, "controller", "gloo"),
                            elastic=getattr(args, "elastic", False), min_hosts=getattr(args, "min_hosts", None),
                            max_hosts=getattr(args, "max_hosts", None), scheduler_given=args.scheduler is not None)
    return open_launcher(settings, request, stopping=getattr(args, "stop", False),
                         hosts_from_settings=args.hosts is None)
