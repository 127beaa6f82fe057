"""TensorBoard over a finished run: scalar and image tags via its HTTP API, and a real browser."""
from __future__ import annotations

import collections
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


def event_points(folder: Path) -> collections.Counter:
    """(tag, step) -> how many times it was written, over every events file in ``folder``."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    counts = collections.Counter()
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                counts[(value.tag, event.step)] += 1
    return counts


def test_one_writer_per_tag_one_point_per_epoch(trained_2d):  # noqa: F811
    # TensorBoard's HTTP API hides same-step duplicates, so count the points in the events files:
    # Keras' TensorBoard callback and TensorBoardExtras once both wrote epoch_lr/epoch_images_per_sec.
    run, _, _ = trained_2d
    for folder in ("train", "validation"):
        counts = event_points(run / "tensorboard" / folder)
        assert counts, folder
        assert {key: n for key, n in counts.items() if n > 1} == {}, folder
        for tag in {tag for tag, _ in counts if tag.startswith("epoch_")}:
            assert sorted(step for t, step in counts if t == tag) == [0, 1], (folder, tag)
    assert {("epoch_lr", 0), ("epoch_images_per_sec", 1)} <= set(event_points(run / "tensorboard" / "train"))


def _chromium(*args, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--window-size=1280,900", "--virtual-time-budget=15000", *args],
        capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed")
def test_dashboard_renders_in_headless_chromium(tensorboard_url, tmp_path):
    # The DOM after the app ran: TensorBoard's shell, and this run's tags and run names, which
    # only appear once the page has fetched and rendered the run's data. The Time Series
    # dashboard renders into the light DOM (the Polymer scalars one hides its cards in shadow roots).
    result = _chromium("--dump-dom", tensorboard_url + "/#timeseries", profile=tmp_path / "profile-dom")
    dom = result.stdout
    assert "<title>TensorBoard</title>" in dom and "<tb-webapp" in dom, (dom[:500], result.stderr[-2000:])
    for text in ("epoch_loss", "epoch_dice", "epoch_lr", "validation_overlay", "> train <", "> validation <"):
        assert text in dom, f"{text!r} not rendered; stderr: {result.stderr[-1000:]}"

    shot = tmp_path / "tensorboard.png"
    result = _chromium(f"--screenshot={shot}", tensorboard_url + "/#scalars", profile=tmp_path / "profile")
    assert shot.exists(), result.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a rendered page, not a blank frame
    artifacts = Path(__file__).resolve().parent.parent / ".artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copy(shot, artifacts / "tensorboard.png")
