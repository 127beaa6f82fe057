"""A parameter-server role on a host that carries a public address is refused before its
unauthenticated gRPC server opens: really started, in a network namespace this test makes, whose
loopback also carries 1.2.3.4 (no packet leaves the namespace)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import uuid

import pytest

from support.data import REPO_ROOT


@pytest.fixture
def namespace_with_public_address():
    if shutil.which("ip") is None:
        pytest.fail("iproute2's ip is required (scripts/setup.sh installs it)")
    name = f"unet-probe-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        for command in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", "1.2.3.4/32", "dev", "lo"]):
            subprocess.run(["ip", "netns", "exec", name, *command], check=True, timeout=10)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


@pytest.mark.parametrize("role", [["ps", "--index", "0"], ["worker", "--index", "0"], ["chief", "--quiet"]])
def test_a_role_on_a_host_with_a_public_address_is_refused(namespace_with_public_address, tmp_path, role):
    command = ["ip", "netns", "exec", namespace_with_public_address, sys.executable, "-m", "trainer.cli", *role,
               "--set", f"cluster.token_file={tmp_path / 'token'}"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "public address(es) 1.2.3.4 on lo" in result.stderr
    assert "cluster.allow_public_network" in result.stderr
