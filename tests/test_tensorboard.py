"""TensorBoard over a finished run: scalar and image tags via its HTTP API, and a real browser."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from test_training import trained_2d  # noqa: F401  (shared module fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def tensorboard_url(trained_2d):  # noqa: F811
    run, _, _ = trained_2d
    port = free_port()
    tensorboard = Path(sys.executable).with_name("tensorboard")
    proc = subprocess.Popen([str(tensorboard), "--logdir", str(run / "tensorboard"), "--host", "127.0.0.1",
                             "--port", str(port), "--reload_interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, "tensorboard exited"
            try:
                urllib.request.urlopen(url + "/data/runs", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "tensorboard did not answer within 90 s"
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _get_json(url: str, deadline_s: float = 60.0, want=lambda data: True):
    deadline = time.monotonic() + deadline_s
    while True:
        data = json.loads(urllib.request.urlopen(url, timeout=5).read())
        if want(data) or time.monotonic() > deadline:
            return data
        time.sleep(1)


def test_scalar_and_image_tags_via_http_api(tensorboard_url):
    scalars = _get_json(tensorboard_url + "/data/plugin/scalars/tags",
                        want=lambda d: "epoch_images_per_sec" in d.get("train", {}))
    assert {"epoch_loss", "epoch_dice", "epoch_lr", "epoch_images_per_sec"} <= set(scalars["train"])
    assert {"epoch_loss", "epoch_dice"} <= set(scalars["validation"])
    images = _get_json(tensorboard_url + "/data/plugin/images/tags", want=lambda d: "train" in d)
    assert "validation_overlay" in images["train"]
    points = json.loads(urllib.request.urlopen(
        tensorboard_url + "/data/plugin/scalars/scalars?run=validation&tag=epoch_dice", timeout=5).read())
    assert [p[1] for p in points] == [0, 1]  # one point per epoch


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed")
def test_dashboard_renders_in_headless_chromium(tensorboard_url, tmp_path):
    shot = tmp_path / "tensorboard.png"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900", "--virtual-time-budget=15000",
         f"--screenshot={shot}", tensorboard_url + "/#scalars"],
        capture_output=True, text=True, timeout=120)
    assert shot.exists(), result.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a rendered page, not a blank frame
    artifacts = Path(__file__).resolve().parent.parent / ".artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copy(shot, artifacts / "tensorboard.png")
