"""What runs where: roles per host, their argv, ports, and per-host CPU settings.

A plan is pure data computed from settings, the host list and (when known) each host's
facts from preflight; rendering it into an inventory and running it is someone else's job.
Every argv element is passed to the remote host as a separate argument (never through a
shell), so nothing in a host name or a setting can be executed.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from launcher.roles import CHIEF, ONE_RANK_ASKED, PS, WORKER, layout_overrides, role_args, role_name
from launcher.ssh.protect import mirror_excludes
from trainer.config.settings import Settings
from trainer.errors import UserError

PS_MODE, HOROVOD_MODE = "ps", "horovod"
TOKEN_FILE = "cluster.token"  # in the run's state folder on every host (PS mode)
DISCOVERY_SCRIPT = "discover-hosts.sh"  # ditto (elastic Horovod): launcher/discovery.py renders it


@dataclass(frozen=True)
class HostFacts:
    """What preflight learnt about a host."""

    physical_cores: int
    numa_nodes: int = 1
    numactl: bool = False
    versions: Mapping[str, str | None] = field(default_factory=dict)
    mpi: str = ""
    interfaces: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()  # every IPv4/IPv6 address of the host's interfaces


@dataclass(frozen=True)
class CpuChoice:
    threads: int | None  # None: the trainer derives it (physical cores / local ranks)
    numactl: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Role:
    name: str                 # ps0, worker1, chief, horovod, tensorboard
    host: str
    group: str                # inventory group: ps, workers, chief
    argv: tuple[str, ...]
    phase: str                # start order: servers -> main -> tensorboard
    follow: bool = True       # the launcher waits for it and streams its output


@dataclass(frozen=True)
class Elastic:
    """Horovod Elastic: the job runs on as long as min_hosts answer, and grows up to max_hosts."""

    min_hosts: int
    max_hosts: int
    cooldown_s: tuple[int, int]  # horovodrun --blacklist-cooldown-range: when a failed host may rejoin


@dataclass(frozen=True)
class LaunchPlan:
    run: str
    mode: str
    hosts: tuple[str, ...]
    ps_hosts: tuple[str, ...]
    workdir: str
    python: str
    roles: tuple[Role, ...]
    cpu: Mapping[str, CpuChoice]
    tensorboard: tuple[str, int] | None  # (host, port) on the chief
    keep: tuple[str, ...] = ()  # rsync excludes for the settings' run/data paths inside the workdir
    elastic: Elastic | None = None

    @property
    def state_dir(self) -> str:
        """Per-run folder on every host: role logs, PIDs, exit codes, merged settings."""
        return f"{self.workdir}/.launch/{self.run}"

    def roles_on(self, host: str) -> list[Role]:
        return [role for role in self.roles if role.host == host]

    def describe(self) -> str:
        lines = [f"run {self.run}: mode {self.mode}, hosts {', '.join(self.hosts)}, workdir {self.workdir}"]
        for host in self.hosts + tuple(h for h in self.ps_hosts if h not in self.hosts):
            choice = self.cpu.get(host)
            if choice:
                lines.append(f"  {host}: threads {choice.threads or 'auto'}"
                             f"{' numactl ' + ' '.join(choice.numactl) if choice.numactl else ''} ({choice.reason})")
            for role in self.roles_on(host):
                lines.append(f"    [{role.phase}] {role.name}: {shlex.join(role.argv)}")
        return "\n".join(lines)


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _nth_port(addresses: tuple[str, ...], index: int) -> int:
    """Port of task ``index``: from settings when listed, else the last listed port + offset.

    Distinct ports per task also let several tasks share a host: TensorFlow's gRPC server
    binds its port on every interface.
    """
    if index < len(addresses):
        return _port(addresses[index])
    return _port(addresses[-1]) + index - len(addresses) + 1


def _check_ports(roles_ports: list[tuple[str, str, int]]) -> None:
    seen: dict[tuple[str, int], str] = {}
    for name, host, port in roles_ports:
        if (host, port) in seen:
            raise UserError(f"cluster ports: {name} and {seen[(host, port)]} would both use {host}:{port}; "
                            f"set distinct ports in cluster.ps_hosts/worker_hosts/chief_host/control_port")
        seen[(host, port)] = name


def cpu_choice(settings: Settings, facts: HostFacts | None, processes: int, derive: bool) -> CpuChoice:
    """Threads and numactl prefix for one process: cpu.intra_op_threads when set, else the cores
    ``facts`` report divided by the processes sharing them (None: the trainer derives it)."""
    cpu = settings.cpu
    numactl: tuple[str, ...] = ()
    if cpu.knl_mcdram:
        numactl = ("numactl", "-p", "1")
    elif cpu.numa_node >= 0:
        numactl = ("numactl", f"--cpunodebind={cpu.numa_node}", f"--membind={cpu.numa_node}")
    if numactl and facts is not None and not facts.numactl:
        raise UserError("cpu.numa_node/knl_mcdram: numactl is not installed on a host (see doctor)")
    if cpu.intra_op_threads:
        return CpuChoice(cpu.intra_op_threads, numactl, "cpu.intra_op_threads")
    if not derive:
        return CpuChoice(None, numactl, "trainer: physical cores / local ranks")
    if facts is None:
        return CpuChoice(None, numactl, "from host facts at launch")
    cores = facts.physical_cores
    if cpu.numa_node >= 0 and facts.numa_nodes > 1:
        cores = max(1, cores // facts.numa_nodes)
    threads = max(1, cores // max(1, processes))
    return CpuChoice(threads, numactl, f"{cores} physical cores / {processes} process(es)")


def build_plan(settings: Settings, hosts: tuple[str, ...], mode: str, ps_hosts: tuple[str, ...] = (),
               facts: Mapping[str, HostFacts] | None = None,
               source_root: Path | None = None, slots_per_host: int = 1, controller: str = "gloo",
               elastic: Elastic | None = None) -> LaunchPlan:
    cluster = settings.cluster
    workdir = (cluster.workdir or str(source_root or Path.cwd())).rstrip("/")
    python = cluster.python if cluster.python.startswith("/") else f"{workdir}/{cluster.python}"
    run = settings.train.run_name
    state_dir = f"{workdir}/.launch/{run}"  # == LaunchPlan.state_dir
    settings_file = f"{state_dir}/settings.yaml"
    facts = facts or {}

    def trainer_argv(choice: CpuChoice, *command: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
        argv = ["env", f"PYTHONPATH={workdir}", *choice.numactl, python, "-m", "trainer.cli", *command,
                "--settings", settings_file, *extra]
        if choice.threads:
            argv += ["--set", f"cpu.intra_op_threads={choice.threads}", "--set", f"cpu.omp_num_threads={choice.threads}"]
        return tuple(argv)

    roles: list[Role] = []
    cpu: dict[str, CpuChoice] = {}
    if elastic is not None:
        _check_elastic(elastic, hosts, mode, controller)
    if mode == PS_MODE:
        ps_hosts = ps_hosts or hosts[:1]
        ps_ports = [_nth_port(cluster.ps_hosts, i) for i in range(len(ps_hosts))]
        worker_ports = [_nth_port(cluster.worker_hosts, i) for i in range(len(hosts))]
        _check_ports([(role_name(PS, i), h, p) for i, (h, p) in enumerate(zip(ps_hosts, ps_ports))]
                     + [(role_name(WORKER, i), h, p) for i, (h, p) in enumerate(zip(hosts, worker_ports))]
                     + [(CHIEF, hosts[0], _port(cluster.chief_host)), ("control", hosts[0], cluster.control_port)])
        layout = layout_overrides([f"{h}:{p}" for h, p in zip(ps_hosts, ps_ports)],
                                  [f"{h}:{p}" for h, p in zip(hosts, worker_ports)],
                                  f"{hosts[0]}:{_port(cluster.chief_host)}")
        layout += ("--set", f"cluster.control_port={cluster.control_port}",
                   # the run's own control-channel secret, written by the launcher and synced 0600
                   "--set", f"cluster.token_file={state_dir}/{TOKEN_FILE}")
        for host in dict.fromkeys(hosts + ps_hosts):
            # Every process that computes shares the host's cores: a PS (applies the averaged
            # update) and a worker (computes gradients). The chief on hosts[0] is left out: it
            # only coordinates (reads the next global batch, schedules closures, then waits), so
            # counting it would halve worker0's threads for a process that is mostly idle.
            processes = int(host in ps_hosts) + int(host in hosts)
            cpu[host] = cpu_choice(settings, facts.get(host), max(1, processes), derive=True)
        for index, host in enumerate(ps_hosts):
            name = role_name(PS, index)
            roles.append(Role(name, host, "ps", trainer_argv(
                cpu[host], *role_args(PS, index), extra=layout + _log_file(name)), "servers"))
        for index, host in enumerate(hosts):
            name = role_name(WORKER, index)
            worker = trainer_argv(cpu[host], *role_args(WORKER, index), extra=layout + _log_file(name))
            if cluster.max_restarts:
                # A worker that dies is started again with the same argv (host, port): it registers with
                # the chief again and TensorFlow's coordinator uses it again. PS tasks hold the
                # variables, so a restarted PS would serve none: they are never supervised.
                worker = ("sh", f"{workdir}/launcher/ssh/remote/supervise.sh", str(cluster.max_restarts),
                          f"{state_dir}/{name}", f"worker {index}") + worker
            roles.append(Role(name, host, "workers", worker, "servers"))
        roles.append(Role(CHIEF, hosts[0], "chief", trainer_argv(
            cpu[hosts[0]], *role_args(CHIEF, 0), extra=layout + _log_file(CHIEF)), "main"))
    elif mode == HOROVOD_MODE:
        for host in hosts:
            cpu[host] = cpu_choice(settings, facts.get(host), slots_per_host, derive=False)
        horovodrun = str(Path(python).parent / "horovodrun")
        if elastic is None:
            argv = [horovodrun, "-np", str(len(hosts) * slots_per_host),
                    "-H", ",".join(f"{h}:{slots_per_host}" for h in hosts)]
        else:
            # Start as soon as min_hosts answer (with every host that answers then), shrink to no fewer,
            # grow to no more than max_hosts. Which hosts answer is the discovery script's job.
            low, high = elastic.min_hosts * slots_per_host, elastic.max_hosts * slots_per_host
            argv = [horovodrun, "-np", str(low), "--min-np", str(low), "--max-np", str(high),
                    "--slots-per-host", str(slots_per_host), "--host-discovery-script", f"{state_dir}/{DISCOVERY_SCRIPT}",
                    "--blacklist-cooldown-range", *(str(s) for s in elastic.cooldown_s)]
        if cluster.network_interface:
            argv += ["--network-interface", cluster.network_interface]
        elif elastic is not None and len(hosts) < 2:
            # horovodrun resolves the common NICs of two hosts before an elastic job starts: with one
            # host it waits (600 s) and fails. A named interface skips that check.
            raise UserError("--elastic with one host: set cluster.network_interface (e.g. eth0); Horovod Elastic "
                            "otherwise waits for a second host to resolve the network interfaces")
        argv += ["-p", str(cluster.ssh_port), f"--{controller}"]
        if cluster.ssh_key:
            argv += ["-i", str(cluster.ssh_key)]
        extra = _log_file("rank0") + (("--set", "train.elastic=true") if elastic else ())
        if elastic is None and len(hosts) * slots_per_host == 1:
            extra += ONE_RANK_ASKED
        rank = trainer_argv(cpu[hosts[0]], "train", "--dist", "horovod", extra=extra)
        # Every rank, on every host, runs through rank.sh: it records a PID file there, so
        # stop.yml can stop ranks that horovodrun's own shutdown does not reach.
        rank = ("sh", f"{workdir}/launcher/ssh/remote/rank.sh", state_dir) + rank
        roles.append(Role("horovod", hosts[0], "chief", tuple(argv) + rank, "main"))
    else:
        raise UserError(f"--mode: expected 'ps' or 'horovod', got {mode!r}")

    tensorboard = None
    if cluster.tensorboard:
        run_dir = settings.train.run_dir
        logdir = str(run_dir / run / "tensorboard") if run_dir.is_absolute() else f"{workdir}/{run_dir}/{run}/tensorboard"
        port = settings.logging.tensorboard_port
        roles.append(Role("tensorboard", hosts[0], "chief", (
            "env", f"PYTHONPATH={workdir}", python, "-m", "tensorboard.main", "--logdir", logdir,
            "--host", settings.logging.tensorboard_host, "--port", str(port)), "tensorboard", follow=False))
        tensorboard = (hosts[0], port)
    keep = tuple(mirror_excludes(settings, workdir, source_root or Path.cwd()))
    return LaunchPlan(run, mode, hosts, tuple(ps_hosts), workdir, python, tuple(roles), cpu, tensorboard, keep,
                      elastic)


def _check_elastic(elastic: Elastic, hosts: tuple[str, ...], mode: str, controller: str) -> None:
    if mode != HOROVOD_MODE:
        raise UserError("--elastic: Horovod mode only (--mode horovod); in PS mode the job already survives a "
                        "lost worker, and cluster.max_restarts restarts it")
    if controller != "gloo":
        raise UserError("--elastic: Horovod Elastic runs on Gloo only; drop --controller mpi")
    if not 1 <= elastic.min_hosts <= elastic.max_hosts <= len(hosts):
        raise UserError(f"--min-hosts/--max-hosts: expected 1 <= min-hosts <= max-hosts <= {len(hosts)} (the hosts "
                        f"in --hosts), got {elastic.min_hosts} and {elastic.max_hosts}")


_RANK_TAG = re.compile(r"\[(?:\d+,)?(\d+)\]<(?:stdout|stderr)>:")  # Gloo [r]; OpenMPI --tag-output [job,r]


def horovod_rank_hosts(hosts: tuple[str, ...], slots_per_host: int) -> tuple[str, ...]:
    """The host of each Horovod rank, by rank. build_plan passes ``-H h1:s,h2:s,...`` and
    horovodrun fills the hosts in that order: ranks 0..s-1 on h1, s..2s-1 on h2, and so on."""
    return tuple(host for host in hosts for _ in range(slots_per_host))


def label_rank_line(line: str, rank_hosts: tuple[str, ...] | None) -> str | None:
    """``[r]<stdout>:text`` from horovodrun -> ``[<host of rank r> rank r] text``; None when the
    line carries no rank tag (horovodrun's own output) or names a rank outside the plan.
    ``rank_hosts`` None (elastic: ranks move between hosts): ``[rank r] text``."""
    match = _RANK_TAG.match(line)
    if not match:
        return None
    rank = int(match.group(1))
    if rank_hosts is None:
        return f"[rank {rank}] {line[match.end():]}"
    if rank >= len(rank_hosts):
        return None
    return f"[{rank_hosts[rank]} rank {rank}] {line[match.end():]}"


def _log_file(role: str) -> tuple[str, ...]:
    # Each role keeps its own log file beside the run; the launcher's merged stream is training.log.
    return ("--set", f"logging.log_file=training-{role}.log")
