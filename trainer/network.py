"""Which network a cluster may use: private, loopback or link-local addresses only.

TensorFlow 2.15's gRPC servers (parameter-server mode) listen on *every* interface, whatever
address the cluster names (``0.0.0.0`` is hard-coded in ``grpc_server_lib.cc``; seen:
``127.0.0.1:PORT`` in the cluster -> ``*:PORT`` in ``ss -ltn``), and they authenticate no one:
anyone who reaches a port can run ops on that task (write files, overwrite variables).
TensorFlow's own security guidance says its distributed runtime is for isolated networks only.
So the launcher and the roles refuse cluster addresses that are publicly routable, unless
``cluster.allow_public_network`` says the user has isolated the network some other way.
"""
from __future__ import annotations

import ipaddress
import socket
from typing import Callable, Iterable

from trainer.errors import UserError

Resolver = Callable[[str], list[str]]
# RFC 6598 shared address space (carrier-grade NAT, also Tailscale): not routable on the internet,
# but Python's is_private says False for it.
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")
ALL_INTERFACES = ("", "0.0.0.0", "::", "*")


def resolve(host: str) -> list[str]:
    """Every address ``host`` resolves to here (IPv4 and IPv6); [] if it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    return sorted({info[4][0] for info in infos})


def is_private(address: str) -> bool:
    """Private (RFC 1918, ULA, shared 100.64/10), loopback or link-local: not reachable from the internet."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # fe80::1%eth0: drop the zone
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return False
    return ip.is_loopback or ip.is_link_local or ip.is_private or ip in SHARED_ADDRESS_SPACE


def is_loopback(host: str, resolver: Resolver = resolve) -> bool:
    """True when ``host`` (a bind address or name) means this machine only."""
    if host in ALL_INTERFACES:
        return False
    addresses = resolver(host)
    return bool(addresses) and all(ipaddress.ip_address(a.split("%", 1)[0]).is_loopback for a in addresses)


def host_of(address: str) -> str:
    """'node1:2222' -> 'node1'; a bare host stays as it is."""
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def check_private_network(hosts: Iterable[str], allow_public: bool, resolver: Resolver = resolve) -> None:
    """Refuse (UserError, naming the host) any cluster host that is public or cannot be resolved.

    ``allow_public`` (``cluster.allow_public_network: true``) skips the check: the user vouches
    that the network is isolated some other way (a firewall, a VPN)."""
    if allow_public:
        return
    how = ("; the cluster's gRPC servers listen on every interface without authentication, so run it on a "
           "private, isolated network (or set cluster.allow_public_network: true if a firewall or VPN isolates it)")
    for host in dict.fromkeys(host_of(h) for h in hosts):
        addresses = resolver(host)
        if not addresses:
            raise UserError(f"cluster host {host}: does not resolve here, so it cannot be checked to be on a "
                            f"private network; use its address or a resolvable name{how}")
        public = [a for a in addresses if not is_private(a)]
        if public:
            raise UserError(f"cluster host {host}: {', '.join(public)} is a public address{how}")
