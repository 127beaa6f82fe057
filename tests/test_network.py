"""Cluster network checks (trainer/runtime/network.py) and the launcher refusing public hosts: no process,
no connection to anything (names are resolved by a fake resolver or are address literals)."""
from __future__ import annotations

import io

import pytest

from trainer.errors import UserError
from trainer.runtime.network import check_private_network, is_loopback, is_private


@pytest.mark.parametrize("address", ["10.1.2.3", "172.16.0.9", "192.168.1.1", "127.0.0.2", "169.254.10.1",
                                     "100.64.1.1", "::1", "fe80::1%eth0", "fd00::5", "::ffff:10.0.0.1"])
def test_private_loopback_and_link_local_addresses(address):
    assert is_private(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "0.0.0.0", "::",
                                     "::ffff:8.8.8.8", "not-an-ip",
                                     # Python calls these private, yet they route (second probe):
                                     "2001:0::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2", "240.0.0.1",
                                     "255.255.255.254", "0.1.2.3", "198.18.0.1", "198.19.255.1",
                                     "::ffff:240.0.0.1"])
def test_public_or_unspecified_addresses(address):
    assert not is_private(address)


def fake_dns(table):
    return lambda host: table.get(host, [])


def test_check_names_the_public_host_and_the_way_out():
    resolver = fake_dns({"node1": ["10.0.0.1"], "node2": ["10.0.0.2", "172.16.0.7", "34.1.2.3"]})
    check_private_network(["node1:2222", "node1"], False, resolver)
    with pytest.raises(UserError) as caught:
        check_private_network(["node1", "node2:2223"], False, resolver)
    message = str(caught.value)
    assert "cluster host node2: 34.1.2.3 is a public address" in message
    assert "cluster.allow_public_network: true" in message and "\n" not in message


def test_unresolvable_host_is_refused_not_assumed_private():
    with pytest.raises(UserError, match="cluster host ghost: does not resolve here"):
        check_private_network(["ghost"], False, fake_dns({}))


def test_allow_public_network_skips_the_check():
    check_private_network(["8.8.8.8", "ghost"], True, fake_dns({"8.8.8.8": ["8.8.8.8"]}))


def test_loopback_binds():
    dns = fake_dns({"127.0.0.1": ["127.0.0.1"], "localhost": ["127.0.0.1", "::1"], "10.0.0.5": ["10.0.0.5"]})
    assert is_loopback("127.0.0.1", dns) and is_loopback("localhost", dns)
    for host in ("0.0.0.0", "", "::", "10.0.0.5", "nowhere"):
        assert not is_loopback(host, dns), host


class _NoAnsible:
    calls: list = []

    def run(self, playbook, *args, **kwargs):
        raise AssertionError(f"{playbook} ran although the network check should have refused the hosts")


@pytest.mark.parametrize("mode", ["ps", "horovod"])
def test_launcher_refuses_a_public_host_before_anything_connects(tmp_path, monkeypatch, mode):
    from launcher.ssh import launch as distributed
    from trainer.config.settings import Settings, TrainSettings

    monkeypatch.setattr(distributed.Ansible, "run", _NoAnsible.run)
    settings = Settings(train=TrainSettings(run_dir=tmp_path, run_name="pub"))
    request = distributed.LaunchRequest(hosts="127.0.0.2,8.8.8.8", mode=mode)
    launcher = distributed.SshLauncher(settings, request, out=io.StringIO())
    launcher.inventory_path = tmp_path / "pub.yml"
    with pytest.raises(UserError, match="cluster host 8.8.8.8: 8.8.8.8 is a public address"):
        launcher.preflight(standalone=True)
    with pytest.raises(UserError, match="8.8.8.8 is a public address"):
        launcher.launch()
    assert not (tmp_path / "pub.yml").exists() and not (tmp_path / "pub.doctor.yml").exists()


def test_launcher_allows_public_hosts_when_told(tmp_path, monkeypatch):
    from launcher.ssh import launch as distributed
    from launcher.ssh.ansible import PlaybookResult
    from trainer.config.settings import ClusterSettings, Settings, TrainSettings

    ran = []
    monkeypatch.setattr(distributed.Ansible, "run",
                        lambda self, playbook, *a, **k: ran.append(playbook) or PlaybookResult("failed", 2))
    settings = Settings(train=TrainSettings(run_dir=tmp_path, run_name="pub"),
                        cluster=ClusterSettings(allow_public_network=True))
    out = io.StringIO()
    launcher = distributed.SshLauncher(settings, distributed.LaunchRequest(hosts="8.8.8.8"), out=out)
    launcher.inventory_path = tmp_path / "pub.yml"
    with pytest.raises(UserError, match="no preflight report"):
        launcher.preflight(standalone=True)
    assert ran == ["preflight.yml"] and "allow_public_network is true" in out.getvalue()


@pytest.mark.parametrize("bind, warned", [("127.0.0.1", False), ("0.0.0.0", True), ("10.0.0.5", True)])
def test_tensorboard_off_loopback_is_warned(tmp_path, bind, warned):
    """TensorBoard's image panels show patient MRI: binding it beyond loopback gets a warning."""
    from launcher.ssh import launch as distributed
    from trainer.config.settings import LoggingSettings, Settings, TrainSettings

    settings = Settings(train=TrainSettings(run_dir=tmp_path, run_name="tb"),
                        logging=LoggingSettings(tensorboard_host=bind))
    out = io.StringIO()
    assert distributed.SshLauncher(settings, distributed.LaunchRequest(hosts="node1"), out=out).dry_run() == 0
    text = out.getvalue()
    assert ("warning: TensorBoard on node1 binds to " + bind in text) is warned, text[:2000]
    if warned:
        assert "patient MRI" in text and "ssh -N -L" in text


def test_roles_refuse_a_host_with_a_public_interface_address():
    from trainer.runtime.network import check_host_interfaces

    check_host_interfaces("ps 0", False, lambda: [])
    check_host_interfaces("ps 0", True, lambda: [("eth1", "34.1.2.3")])  # the user vouches for a firewall
    with pytest.raises(UserError) as caught:
        check_host_interfaces("worker 1", False, lambda: [("eth1", "34.1.2.3"), ("tun0", "2001:0::7")])
    message = str(caught.value)
    assert message.startswith("worker 1: this host has public address(es) 34.1.2.3 on eth1, 2001:0::7 on tun0")
    assert "cluster.allow_public_network: true" in message
