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

import cv2
import numpy as np
import pytest

from test_training import trained_2d  # noqa: F401  (shared module fixture)

pytestmark = pytest.mark.slow  # trains models or starts processes: not in scripts/test.sh --fast

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
    assert {"epoch_loss", "epoch_slice_dice", "epoch_lr", "epoch_images_per_sec"} <= set(scalars["train"])
    assert {"epoch_loss", "epoch_dice", "epoch_slice_dice"} <= set(scalars["validation"])  # case-level dice
    images = _get_json(tensorboard_url + "/data/plugin/images/tags", want=lambda d: "train" in d)
    assert "validation_overlay" in images["train"]
    points = json.loads(urllib.request.urlopen(
        tensorboard_url + "/data/plugin/scalars/scalars?run=validation&tag=epoch_dice", timeout=5).read())
    assert [p[1] for p in points] == [0, 1]  # one point per epoch


def overlay_share(picture: np.ndarray) -> float:
    """Share of pixels in the whole-tumour overlay colour (green blended 1:1 over grey MRI)."""
    red, green, blue = (picture[..., c].astype(int) for c in range(3))
    return float(np.mean((green - red > 80) & (green - blue > 80)))


def test_image_panels_show_the_tumour(tensorboard_url):
    """Each panel is [MRI | truth | prediction]: its truth third must hold tumour, in the overlay colour."""
    tags = _get_json(tensorboard_url + "/data/plugin/images/tags", want=lambda d: "train" in d)
    samples = tags["train"]["validation_overlay"]["samples"]
    assert samples >= 1  # one per validation case, up to 4 (the tiny dataset has one)
    base = tensorboard_url + "/data/plugin/images/images?run=train&tag=validation_overlay"
    for sample in range(samples):
        entries = _get_json(f"{base}&sample={sample}", want=lambda d: len(d) >= 2)
        assert entries, f"no panel {sample}"
        data = urllib.request.urlopen(tensorboard_url + "/data/plugin/images/individualImage?"
                                      + entries[-1]["query"], timeout=5).read()
        picture = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        height, width = picture.shape[:2]
        assert height >= 240, f"panel {sample} is {height} px high: too small to read"
        truth = picture[:, width // 3: 2 * width // 3]
        assert overlay_share(truth) > 0.01, f"panel {sample}: no tumour in the ground-truth third"
        assert overlay_share(picture[:, : width // 3]) == 0.0  # the plain MRI third has no overlay


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

    # What a user sees on the Images dashboard: the rendered page holds tumour-overlay pixels.
    shot = tmp_path / "images.png"
    result = _chromium(f"--screenshot={shot}", "--window-size=1280,1400", tensorboard_url + "/#images",
                       profile=tmp_path / "profile-images")
    assert shot.exists(), result.stderr[-2000:]
    page = cv2.cvtColor(cv2.imread(str(shot), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    shutil.copy(shot, artifacts / "tensorboard-images.png")
    overlay_pixels = overlay_share(page) * page.shape[0] * page.shape[1]
    assert overlay_pixels > 300, f"the Images dashboard shows {overlay_pixels:.0f} tumour-overlay pixels"
