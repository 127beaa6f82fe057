"""Wait for the cluster's host names to resolve before a role checks or uses them.

On Kubernetes (a TFJob), every replica is reached through a headless service named after it,
and such a service publishes a pod's address only once that pod is ready: while a peer is still
being scheduled or pulling its image, its name does not resolve *yet*. A role that resolved
every peer once at start and refused the first missing name made the whole job fail with the
start order. Here a name that does not resolve is retried until ``cluster.startup_timeout_s``,
with one log line every 10 s naming the peers still missing; only then is it an error (and the
network check of :func:`trainer.runtime.network.check_private_network` runs on the resolved names).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

from trainer.errors import UserError
from trainer.runtime.network import Resolver, host_of, resolve

log = logging.getLogger(__name__)
LOG_EVERY_S = 10.0
RETRY_S = 0.5


def wait_until_resolvable(addresses: Iterable[str], timeout_s: float, who: str,
                          describe: Callable[[str], str] = lambda host: host, resolver: Resolver = resolve,
                          clock: Callable[[], float] = time.monotonic,
                          sleep: Callable[[float], None] = time.sleep) -> float:
    """Block until every host of ``addresses`` (``host:port`` or bare hosts) resolves here; return
    the seconds waited. ``describe`` names a host's role(s) in the messages. Raises UserError
    after ``timeout_s`` naming the hosts that never resolved."""
    missing = list(dict.fromkeys(host_of(address) for address in addresses))
    started = clock()
    next_log = started + LOG_EVERY_S
    while True:
        missing = [host for host in missing if not resolver(host)]
        now = clock()
        if not missing:
            if now - started >= 1.0:
                log.info("%s: every peer resolves now (after %.0f s)", who, now - started)
            return now - started
        names = ", ".join(describe(host) for host in missing)
        if now - started >= timeout_s:
            raise UserError(f"{who}: {names} did not resolve within {timeout_s:g} s (cluster.startup_timeout_s); "
                            f"is that replica running? (a Kubernetes headless service publishes a pod's name "
                            f"only once the pod is ready)")
        if now >= next_log:
            log.warning("%s: waiting for %s to resolve (%.0f s of %g s, cluster.startup_timeout_s)", who, names,
                        now - started, timeout_s)
            next_log = now + LOG_EVERY_S
        sleep(min(RETRY_S, max(0.0, started + timeout_s - now)))


def roles_by_host(spec: dict[str, list[str]]) -> Callable[[str], str]:
    """host -> 'host (worker 1, ps 0)' from a cluster spec {job: [host:port, ...]}."""
    names: dict[str, list[str]] = {}
    for job, addresses in spec.items():
        for index, address in enumerate(addresses):
            names.setdefault(host_of(address), []).append(f"{job} {index}")
    return lambda host: f"{host} ({', '.join(names[host])})" if host in names else host


__all__ = ["wait_until_resolvable", "roles_by_host", "LOG_EVERY_S"]
