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
# Public = ipaddress's is_global, plus the IANA special-purpose blocks below. Python 3.11 calls
# all of them private (it takes 2001::/23 wholesale), yet none is a private network a cluster could
# be isolated on: they are routed on the internet (Teredo, AMT, AS112, ORCHIDv2, DRONE DET; seen: a
# PS role with 2001:3::5 on an interface started its gRPC server), routed by some networks and
# stacks (0/8, 240/4, the benchmarking blocks) or discard-only. The documentation ranges (TEST-NET-1/2/3,
# 2001:db8::/32) are not listed: IANA marks them not globally reachable, so nothing on the
# internet reaches a server there, and sandboxes carry them on real interfaces (seen: 192.0.2.2 on
# eth0 of the machines this project's CI runs on). RFC 6598's 100.64/10 (carrier-grade NAT,
# Tailscale) is neither global nor listed: private.
NOT_PRIVATE_BLOCKS = tuple(ipaddress.ip_network(n) for n in (
    "2001::/32",        # Teredo
    "2001:2::/48",      # benchmarking
    "2001:3::/32",      # AMT
    "2001:4:112::/48",  # AS112-v6
    "2001:20::/28",     # ORCHIDv2
    "2001:30::/28",     # DRONE DET
    "100::/64",         # discard-only
    "0.0.0.0/8",        # "this network"
    "240.0.0.0/4",      # reserved, and the limited broadcast
    "198.18.0.0/15",    # benchmarking
))
ALL_INTERFACES = ("", "0.0.0.0", "::", "*")


def resolve(host: str) -> list[str]:
    """Every address ``host`` resolves to here (IPv4 and IPv6); [] if it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    return sorted({info[4][0] for info in infos})


def is_private(address: str) -> bool:
    """Private (RFC 1918, ULA, shared 100.64/10), loopback or link-local: not reachable from the internet.
    That is: an address, not unspecified, neither global nor in one of NOT_PRIVATE_BLOCKS."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # fe80::1%eth0: drop the zone
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_global or ip.is_multicast:
        return False
    return not any(ip in net for net in NOT_PRIVATE_BLOCKS if net.version == ip.version)


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


def public_interface_addresses() -> list[tuple[str, str]]:
    """(interface, address) for every address of this host's own interfaces that is not private."""
    import psutil

    found = []
    for name, addresses in sorted(psutil.net_if_addrs().items()):
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6) and not is_private(address.address):
                found.append((name, address.address.split("%", 1)[0]))
    return found


def check_host_interfaces(role: str, allow_public: bool,
                          addresses: Callable[[], list[tuple[str, str]]] = public_interface_addresses) -> None:
    """Refuse to start a parameter-server role on a host that carries a public address: its gRPC
    server listens on every interface, whatever address the cluster names, so it would be reachable
    there without authentication (seen: a TensorFlow client wrote a file through such an address)."""
    if allow_public:
        return
    public = addresses()
    if public:
        shown = ", ".join(f"{address} on {name}" for name, address in public)
        raise UserError(f"{role}: this host has public address(es) {shown}; a parameter-server role's gRPC "
                        f"server listens on every interface without authentication, so it would be reachable "
                        f"there. Run on hosts without public addresses, or set cluster.allow_public_network: "
                        f"true if a firewall isolates them")
