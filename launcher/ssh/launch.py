"""``unet-train distributed`` and ``unet-train doctor``: launch, stream, stop over Ansible.

Steps: validate hosts -> render inventory -> (dry run: print and stop) -> preflight
(doctor) -> sync code and settings -> start PS/workers/chief or horovodrun, then
TensorBoard -> stream every role's output, prefixed, to the console and
runs/<run>/training.log -> on failure, Ctrl-C, SIGTERM or SIGHUP stop everything it
started, by PID; that stop itself cannot be interrupted.
"""
from __future__ import annotations

import json
import logging
import shlex
import signal
import sys
import time
from pathlib import Path

from launcher.base import SOURCE_ROOT, LaunchError, LaunchRequest
from launcher.console import Console
from launcher.hosts import parse_hosts
from launcher.interrupts import Interrupts, signals_ignored
from launcher.ssh.ansible import Ansible, PlaybookResult
from launcher.ssh.inventory import render, ssh_user, write_inventory, to_yaml
from launcher.ssh.discovery import render_discovery_script, write_discovery_script
from launcher.ssh.plan import (DISCOVERY_SCRIPT, HOROVOD_MODE, PS_MODE, TOKEN_FILE, Elastic, HostFacts, LaunchPlan,
                           build_plan, horovod_rank_hosts, label_rank_line)
from trainer.config.settings import Settings, settings_to_yaml
from trainer.fsutil import write_json, write_text
from trainer.runtime.network import check_private_network, is_loopback, is_private
from trainer.runtime.ps.token import new_token, write_token

log = logging.getLogger(__name__)


class SshLauncher:
    # follow.yml polls every follow_delay_s for at most follow_window_s, then the launcher issues it
    # again for the hosts still running: a run may last any time (a fixed 7-day bound used to end
    # in "lost contact" and stop a healthy run).
    follow_delay_s: float = 1.0
    follow_window_s: float = 24 * 3600.0

    def __init__(self, settings: Settings, request: LaunchRequest, out=sys.stdout):
        self.settings, self.request, self.out = settings, request, out
        self.hosts = parse_hosts(request.hosts) if request.hosts else ()  # --stop needs none
        self.ps_hosts = parse_hosts(request.ps_hosts, "--ps-hosts") if request.ps_hosts else ()
        run = settings.train.run_name
        self.run_dir = (settings.train.run_dir / run).resolve()
        self.stage = self.run_dir / "launcher" / "stage"
        self.inventory_path = self.run_dir / "launcher" / "inventory.yml"
        self._interrupts = Interrupts()
        self._cancel = self._interrupts.event
        self.console = Console(out)
        self.first_output_s: float | None = None
        self.first_training_s: float | None = None  # the chief's "... global batch ..." line: training starts
        self._started = time.monotonic()
        self._followed: list = []
        self.restarts: dict[str, int] = {}  # role -> times supervise.sh restarted it (PS workers)

    # ------------------------------------------------------------------ plan and inventory
    def plan(self, facts: dict[str, HostFacts] | None = None) -> LaunchPlan:
        return build_plan(self.settings, self.hosts, self.request.mode, self.ps_hosts, facts, SOURCE_ROOT,
                          self.request.slots_per_host, self.request.controller, self.elastic())

    def elastic(self) -> Elastic | None:
        request = self.request
        if not request.elastic:
            if request.min_hosts is not None or request.max_hosts is not None:
                raise LaunchError("--min-hosts/--max-hosts: only with --elastic")
            return None
        return Elastic(request.min_hosts or 1, request.max_hosts or len(self.hosts),
                       self.settings.cluster.elastic_cooldown_s)

    def discovery_script(self, plan: LaunchPlan) -> str:
        return render_discovery_script(plan.run, plan.hosts, self.request.slots_per_host, self.settings.cluster)

    def write_inventory(self, plan: LaunchPlan) -> Path:
        inventory = render(plan, self.settings.cluster, SOURCE_ROOT, self.stage)
        return write_inventory(self.inventory_path, inventory)

    def ansible(self, cancellable: bool = True) -> Ansible:
        return Ansible(self.run_dir / "launcher" / "ansible", self.inventory_path,
                       self.settings.cluster.connect_timeout_s,
                       self._cancel.is_set if cancellable else (lambda: False))

    # ------------------------------------------------------------------ network exposure
    def check_network(self, plan: LaunchPlan) -> None:
        """Every host the run uses must be private, loopback or link-local (see trainer/runtime/network.py)."""
        check_private_network(plan.hosts + plan.ps_hosts, self.settings.cluster.allow_public_network)
        if self.settings.cluster.allow_public_network:
            self.say("warning: cluster.allow_public_network is true: cluster addresses are not checked; the "
                     "gRPC servers (ps mode) accept anyone who can reach their ports")
        self.warn_tensorboard(plan)

    def warn_tensorboard(self, plan: LaunchPlan) -> None:
        bind = self.settings.logging.tensorboard_host
        if plan.tensorboard and not is_loopback(bind):
            self.say(f"warning: TensorBoard on {plan.tensorboard[0]} binds to {bind or 'every interface'} "
                     f"(logging.tensorboard_host), not loopback: its image panels show patient MRI to anyone who "
                     f"can reach port {plan.tensorboard[1]}; keep 127.0.0.1 and use the ssh -N -L tunnel")

    # ------------------------------------------------------------------ entry points
    def dry_run(self) -> int:
        plan = self.plan()  # no name lookups here: the network check runs at launch (and doctor)
        self.warn_tensorboard(plan)
        self.say(f"# inventory ({self.inventory_path} when run for real)")
        self.say(to_yaml(render(plan, self.settings.cluster, SOURCE_ROOT, self.stage)))
        self.say("# commands, in order")
        self.say(f"preflight: ansible facts + versions on {', '.join(dict.fromkeys(plan.hosts + plan.ps_hosts))}")
        self.say("network check (first, at launch): every host private, loopback or link-local"
                 + (" -- off: cluster.allow_public_network is true" if self.settings.cluster.allow_public_network
                    else ""))
        rsync = render(plan, self.settings.cluster, SOURCE_ROOT, self.stage)["all"]["vars"]["unet_rsync_argv"]
        for host in dict.fromkeys(plan.hosts + plan.ps_hosts):
            self.say(f"sync {host}: {shlex.join(rsync)} --delete -- {SOURCE_ROOT}/ {ssh_user(self.settings.cluster)}@{host}:"
                     f"{plan.workdir}/")
        self.say(plan.describe())
        if plan.elastic:
            self.say(f"# host discovery script ({plan.state_dir}/{DISCOVERY_SCRIPT}, run by horovodrun on "
                     f"{plan.hosts[0]}; min {plan.elastic.min_hosts}, max {plan.elastic.max_hosts} host(s))")
            self.say(self.discovery_script(plan).rstrip("\n"))
        return 0

    def doctor(self) -> int:
        self.preflight(standalone=True)
        self.say("doctor: every host passed")
        return 0

    def preflight(self, standalone: bool = False) -> dict[str, HostFacts]:
        """Preflight: every host reachable, same Python/TF/Horovod versions, MPI, topology.

        Standalone (``unet-train doctor``) it uses its own inventory file, so the one a
        running launch needs for ``--stop`` is never overwritten."""
        if standalone:
            self.inventory_path = self.inventory_path.with_name(f"{self.settings.train.run_name}.doctor.yml")
        self.check_network(self.plan())  # before anything connects anywhere
        self.write_inventory(self.plan())
        result = self.ansible().run("preflight.yml")
        if self._cancel.is_set():
            raise KeyboardInterrupt
        problems = [f"{host}: unreachable ({msg})" for host, msg in result.unreachable.items()]
        problems += [f"{host}: {msg}" for host, msg in result.failed.items()]
        facts: dict[str, HostFacts] = {}
        versions: dict[str, dict] = {}
        for host in dict.fromkeys(self.hosts + self.ps_hosts):
            report = _report(result, host)
            if report is None:
                if not any(p.startswith(host + ":") for p in problems):
                    problems.append(f"{host}: no preflight report")
                continue
            try:
                found = json.loads(report["versions"]) if report["versions"] else {}
            except ValueError:
                found = {}
            if not found:
                problems.append(f"{host}: cannot run {self.plan().python} ({report.get('versions_err') or 'no output'})")
                continue
            tf_version = found.get("tensorflow-cpu") or found.get("tensorflow")
            if not tf_version:
                problems.append(f"{host}: TensorFlow not installed for {self.plan().python}")
            if self.request.mode == HOROVOD_MODE and not found.get("horovod"):
                problems.append(f"{host}: Horovod not installed (run scripts/setup.sh there)")
            if self.request.mode == HOROVOD_MODE and not report["mpi"]:
                if self.request.controller == "mpi":
                    problems.append(f"{host}: MPI (mpirun) not found")
                else:  # gloo needs no MPI; say so, since `unet-train doctor` has no --controller
                    self.say(f"{host}: note: no mpirun (fine for --controller gloo; --controller mpi needs it)")
            versions[host] = {"python": found.get("python"), "tensorflow": tf_version,
                              "horovod": found.get("horovod"), "numpy": found.get("numpy")}
            cores = _count(report["cores_per_socket"]) * _count(report["sockets"]) or _count(report["vcpus"]) or 1
            facts[host] = HostFacts(physical_cores=cores, numa_nodes=max(1, _count(report["numa_nodes"])),
                                    numactl=str(report["numactl"]).lower() == "true", versions=found,
                                    mpi=report["mpi"], interfaces=tuple(report["interfaces"]),
                                    addresses=tuple(report.get("addresses") or ()))
            self.say(f"{host}: python {found.get('python')}, tensorflow {tf_version}, horovod {found.get('horovod')}, "
                     f"{cores} cores / {report['sockets']} socket(s) / {facts[host].numa_nodes} NUMA node(s), "
                     f"MPI {'yes' if report['mpi'] else 'no'}, NICs {', '.join(facts[host].interfaces)}")
        if versions:
            reference_host = next(iter(versions))
            for host, found in versions.items():
                for key, value in found.items():
                    if value != versions[reference_host][key]:
                        problems.append(f"{host}: {key} {value} differs from {reference_host}'s "
                                        f"{versions[reference_host][key]}")
        if problems:
            raise LaunchError("preflight failed:\n  " + "\n  ".join(problems))
        if self.request.mode != HOROVOD_MODE:
            self.say_grpc_exposure(facts)
        return facts

    def say_grpc_exposure(self, facts: dict[str, HostFacts]) -> None:
        """Plainly: what parameter-server mode opens on every host, and where that is public."""
        self.say("note: parameter-server mode: TensorFlow's gRPC servers listen on ALL interfaces of their hosts "
                 "with no authentication (TensorFlow 2.15 has no bind-address option); anyone who reaches those "
                 "ports can run ops as the training user. Use an isolated network or a firewall "
                 "(README: Security model)")
        for host, found in facts.items():
            public = [a for a in found.addresses if not is_private(a)]
            if public:
                self.say(f"warning: {host} has public address(es) {', '.join(public)}: the gRPC ports are open "
                         f"there too unless a firewall blocks them")

    def launch(self) -> int:
        """Preflight, sync, start, stream; stop everything on failure or Ctrl-C. Returns the exit code."""
        self.console.open_log(self.run_dir / "training.log")
        try:
            with self._interrupts.installed():
                return self._launch()
        finally:
            self.console.close_log()

    def _launch(self) -> int:
        plan = None
        try:
            facts = self.preflight()
            plan = self.plan(facts)
            self.say(plan.describe())
            self.write_inventory(plan)
            write_text(self.stage / "settings.yaml", settings_to_yaml(self.settings))
            if plan.mode == PS_MODE:  # a fresh secret per run, 0600; sync.yml copies it with its mode
                write_token(self.stage / TOKEN_FILE, new_token(), replace=True)
            if plan.elastic:  # executable; sync.yml copies it into the state folder on every host
                write_discovery_script(self.stage / DISCOVERY_SCRIPT, self.discovery_script(plan))
            self._check(self.ansible().run("sync.yml"), "sync")
            for phase in ("servers", "main", "tensorboard"):
                self._check(self.ansible().run("start.yml", extravars={"unet_phase": phase}), f"start {phase}")
            if plan.tensorboard:
                host, port = plan.tensorboard
                bind = self.settings.logging.tensorboard_host
                tunnel = shlex.join(["ssh", "-N", "-L", f"{port}:{bind}:{port}", "-p",
                                     str(self.settings.cluster.ssh_port), f"{ssh_user(self.settings.cluster)}@{host}"])
                self.say(f"TensorBoard on {host}: http://{bind}:{port}/  (from a laptop: {tunnel}, then open "
                         f"http://127.0.0.1:{port}/)")
            self._followed = [role for role in plan.roles if role.follow]
            codes = self.follow()
            self.say_restarts(plan)
            failed = {role: rc for role, rc in codes.items() if rc != 0}
            if plan.mode == "ps" and codes.get("chief") == 0:  # the chief re-ran lost workers' steps
                for role in [r for r in failed if r.startswith("worker")]:
                    self.say(f"warning: {role} on {self._host_of(plan, role)} exited {failed.pop(role)}; "
                             f"the chief finished without it")
            if self._cancel.is_set():
                raise KeyboardInterrupt
            if failed:
                where = ", ".join(f"{role} on {self._host_of(plan, role)} exited {rc}" for role, rc in failed.items())
                raise LaunchError(f"training failed: {where} (logs: {self.run_dir / 'training.log'})")
            write_json(self.run_dir / "launcher" / "launch.json", {
                "hosts": list(self.hosts), "mode": self.request.mode, "first_output_s": self.first_output_s,
                "first_training_s": self.first_training_s, "restarts": self.restarts,
                "total_s": time.monotonic() - self._started})
            self.say(f"done: every role exited 0; merged log {self.run_dir / 'training.log'}"
                     + (f"; TensorBoard keeps running (stop: unet-train distributed --stop --run-name {plan.run})"
                        if plan.tensorboard else ""))
            return 0
        except KeyboardInterrupt:
            self.say(f"interrupted: stopping every process the launcher started ... "
                     f"({signal.Signals(self._interrupts.signum).name})")
            if self.inventory_path.exists():  # else nothing was started yet
                self.stop_roles(plan)
            return self._interrupts.exit_code
        except BaseException:
            if plan is not None:
                self.stop_roles(plan)
            raise

    def stop(self) -> int:
        return 0 if self.stop_roles().succeeded else 1

    def stop_roles(self, plan: LaunchPlan | None = None) -> PlaybookResult:
        """Stop every role of this run on every host (uses the run's rendered inventory).

        Not cancellable: a second Ctrl-C (or SIGTERM/SIGHUP) must not abandon the cleanup
        half-way, so those signals are ignored while it runs and its cancel callback is False."""
        if not self.inventory_path.exists():
            raise LaunchError(f"{self.inventory_path}: no inventory for run '{self.settings.train.run_name}' "
                              f"(nothing was launched under this run name)")
        with signals_ignored():
            result = self.ansible(cancellable=False).run("stop.yml", on_event=self._print_stop)
        for host, msg in {**result.unreachable, **result.failed}.items():
            self.say(f"[{host}] could not stop: {msg}")
        return result

    # ------------------------------------------------------------------ streaming
    def follow(self) -> dict[str, int]:
        codes: dict[str, int] = {}
        # horovodrun (on the first host) relays every rank's output as "[r]<stdout>:...":
        # such lines are labelled with the host that rank runs on, not horovodrun's.
        # Elastic ranks move between hosts as hosts come and go: such lines say only "rank r".
        rank_hosts = (horovod_rank_hosts(self.hosts, self.request.slots_per_host)
                      if self.request.mode == HOROVOD_MODE and not self.request.elastic else None)

        window_over: set[str] = set()

        def on_event(kind: str, host: str, res: dict) -> None:
            if kind == "runner_on_failed" and _follow_window_over(res):
                window_over.add(host)
            for raw in str(res.get("stdout", "")).splitlines():
                try:
                    item = json.loads(raw)
                except ValueError:
                    continue
                if "line" in item:
                    if self.first_output_s is None:
                        self.first_output_s = time.monotonic() - self._started
                    if self.first_training_s is None and "global batch" in item["line"]:
                        self.first_training_s = time.monotonic() - self._started
                    labelled = label_rank_line(item["line"], rank_hosts) if item["role"] == "horovod" else None
                    self.say(labelled or f"[{host} {item['role']}] {item['line']}")
                elif "exited" in item:
                    if item.get("restarts"):
                        self.restarts[item["role"]] = item["restarts"]
                    if item["exited"]:
                        codes[item["role"]] = item["rc"]

        polls = {"unet_follow_delay": self.follow_delay_s,
                 "unet_follow_retries": max(1, int(self.follow_window_s / self.follow_delay_s))}
        hosts: str | None = None  # all
        while True:
            window_over.clear()
            result = self.ansible().run("follow.yml", extravars=polls, limit=hosts, on_event=on_event)
            if self._cancel.is_set():
                return codes
            for host, msg in {**result.unreachable, **result.failed}.items():
                if host not in window_over:
                    raise LaunchError(f"lost contact with {host} while training: {msg}")
            if not window_over:
                break
            hosts = ",".join(sorted(window_over))  # roles still running there: follow them again
        if result.rc != 0:
            raise LaunchError(f"following the logs failed (ansible exit {result.rc}; see "
                              f"{self.run_dir / 'launcher' / 'ansible'})")
        silent = [role.name for role in self._followed if role.name not in codes]
        if silent:
            raise LaunchError(f"no exit status from {', '.join(silent)}")
        return codes

    def say(self, text: str) -> None:
        self.console.say(text)

    def say_restarts(self, plan: LaunchPlan) -> None:
        for role, count in self.restarts.items():
            self.say(f"{role} on {self._host_of(plan, role)} was restarted {count} time(s) after it died "
                     f"(cluster.max_restarts {self.settings.cluster.max_restarts})")

    def _print_stop(self, kind: str, host: str, res: dict) -> None:
        for line in str(res.get("stdout", "")).splitlines():
            self.say(f"[{host}] {line}")

    def _check(self, result: PlaybookResult, step: str) -> None:
        if self._cancel.is_set():
            raise KeyboardInterrupt
        problems = [f"{host}: unreachable ({msg})" for host, msg in result.unreachable.items()]
        problems += [f"{host}: {msg}" for host, msg in result.failed.items()]
        if problems or result.rc != 0:
            raise LaunchError(f"{step} failed: " + ("; ".join(problems) or f"ansible exit {result.rc}"))

    @staticmethod
    def _host_of(plan: LaunchPlan, role: str) -> str:
        return next((r.host for r in plan.roles if r.name == role), "?")


def _follow_window_over(res: dict) -> bool:
    """A follow task that failed only because its polls ran out: follow.py answered (rc 0) every
    time, and its roles had not finished. Anything else (unreachable, a hung poll, follow.py
    failing) is a real failure."""
    lines = res.get("stdout_lines") or str(res.get("stdout", "")).splitlines()
    return res.get("rc") == 0 and "attempts" in res and "__FINISHED__" not in lines


def _count(value) -> int:
    """A fact as a count; 0 (unknown) for Ansible's "NA", empty or anything non-numeric."""
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def _report(result: PlaybookResult, host: str) -> dict | None:
    for res in result.ok.get(host, []):
        msg = res.get("msg")
        if isinstance(msg, dict) and msg.get("unet_report"):
            return msg
    return None
