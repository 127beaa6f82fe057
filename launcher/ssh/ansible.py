"""Run a playbook from ``playbooks/`` through ansible-runner and collect per-host outcomes."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ansible_runner
import yaml

PLAYBOOKS = Path(__file__).resolve().parent / "playbooks"  # shipped as package data
EventCallback = Callable[[str, str, dict], None]  # (event, host, result)


@dataclass
class PlaybookResult:
    status: str
    rc: int
    ok: dict[str, list[dict]] = field(default_factory=dict)         # host -> results of ok tasks
    failed: dict[str, str] = field(default_factory=dict)            # host -> what failed
    unreachable: dict[str, str] = field(default_factory=dict)       # host -> ssh error

    @property
    def succeeded(self) -> bool:
        return self.rc == 0 and not self.failed and not self.unreachable


class Ansible:
    def __init__(self, private_dir: Path, inventory: Path, connect_timeout_s: int,
                 cancelled: Callable[[], bool] = lambda: False):
        self.private_dir, self.inventory = Path(private_dir), Path(inventory)
        self.connect_timeout_s, self.cancelled = connect_timeout_s, cancelled

    def run(self, playbook: str, extravars: dict | None = None, limit: str | None = None,
            on_event: EventCallback | None = None) -> PlaybookResult:
        result = PlaybookResult(status="", rc=-1)
        self.private_dir.mkdir(parents=True, exist_ok=True)

        def handle(event: dict) -> bool:
            kind = event.get("event", "")
            data = event.get("event_data", {})
            host, res = data.get("host", ""), data.get("res", {}) or {}
            if kind == "runner_on_ok":
                result.ok.setdefault(host, []).append(res)
            elif kind == "runner_on_failed" and not data.get("ignore_errors"):
                result.failed[host] = _failure_text(data.get("task", ""), res)
            elif kind == "runner_on_unreachable":
                result.unreachable[host] = str(res.get("msg", "unreachable")).strip()
            if on_event and kind in ("runner_on_ok", "runner_retry", "runner_on_failed"):
                on_event(kind, host, res)
            return kind not in ("runner_retry",)  # do not keep every follow poll on disk

        env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "ANSIBLE_TIMEOUT": str(self.connect_timeout_s), "ANSIBLE_HOST_KEY_CHECKING": "True",
               "ANSIBLE_NOCOLOR": "1", "ANSIBLE_DEPRECATION_WARNINGS": "False",
               "ANSIBLE_PYTHON_INTERPRETER": "auto_silent"}
        runner = ansible_runner.run(
            private_data_dir=str(self.private_dir), project_dir=str(PLAYBOOKS), playbook=playbook,
            inventory=str(self.inventory), extravars=extravars or {}, limit=limit, envvars=env,
            forks=max(5, _host_count(self.inventory)),
            event_handler=handle, cancel_callback=self.cancelled, quiet=True, suppress_env_files=True,
            settings={"suppress_ansible_output": True})
        result.status, result.rc = runner.status, runner.rc if runner.rc is not None else -1
        return result


class _InventoryLoader(yaml.SafeLoader):
    pass


_InventoryLoader.add_constructor("!unsafe", lambda loader, node: loader.construct_scalar(node))


def _host_count(inventory: Path) -> int:
    """Hosts in a rendered inventory. Ansible's default of 5 forks would make the strategy-free
    follow playbook stream hosts 6.. only after the first five finish."""
    try:
        data = yaml.load(inventory.read_text(), Loader=_InventoryLoader) or {}
        groups = data["all"].get("children", {}).values()
        return len({host for group in groups for host in (group or {}).get("hosts") or {}})
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError):
        return 0


def _failure_text(task: str, res: dict) -> str:
    for key in ("stderr", "msg", "stdout"):
        text = str(res.get(key) or "").strip()
        if text:
            return f"task '{task}': {text.splitlines()[-1][:300]}"
    return f"task '{task}' failed (rc {res.get('rc')})"
