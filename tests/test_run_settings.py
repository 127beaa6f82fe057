"""A run describes itself (trainer.commands.run_settings), without training anything: what comes from
runs/R/settings.yaml, what an override may change, and the dataset folder the run keeps."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.commands.run_settings import Explicit, settings_for_run
from trainer.config.loader import load_settings
from trainer.config.settings import settings_to_yaml
from trainer.errors import ConfigError

DATASET = Path("/srv/data/prepared/brats")  # absolute, as train records it


@pytest.fixture
def run_3d(tmp_path):
    """A 3D region run's folder, as train leaves it."""
    trained = load_settings(None, ["train.model=3d", "model.regions=[wt,tc,et]", "data.crop_size=[32,32,32]",
                                   f"train.run_dir={tmp_path / 'runs'}", "train.run_name=r",
                                   "model.mirror_axes_3d=[0]", f"data.dataset={DATASET}"])
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "settings.yaml").write_text(settings_to_yaml(trained))
    return tmp_path


def current(tmp_path, *overrides, flags=None):
    items = [f"train.run_dir={tmp_path / 'runs'}", "train.run_name=r", *overrides]
    return load_settings(None, items, flags), Explicit.from_cli(list(overrides), flags or {})


def test_the_model_comes_from_the_run(run_3d):
    settings = settings_for_run(*current(run_3d))
    assert settings.train.model == "3d" and settings.model.regions == ("wt", "tc", "et")
    assert settings.data.crop_size == (32, 32, 32) and settings.model.mirror_axes_3d == (0,)


@pytest.mark.parametrize("override, key, theirs", [
    ({"flags": {"train.model": "2d"}}, "train.model", "3d"),
    ({"overrides": ["model.regions=[wt]"]}, "model.regions", '["wt", "tc", "et"]'),
    ({"overrides": ["data.channels=[flair]"]}, "data.channels", '["flair", "t1", "t1ce", "t2"]'),
    ({"overrides": ["model.base_filters_3d=8"]}, "model.base_filters_3d", "16"),
    ({"overrides": ["model={base_filters_3d: 16}"]}, "model.regions", '["wt", "tc", "et"]'),  # a whole section
])
def test_an_override_that_contradicts_the_run_is_refused_naming_both(run_3d, override, key, theirs):
    with pytest.raises(ConfigError) as caught:
        settings_for_run(*current(run_3d, *override.get("overrides", []), flags=override.get("flags")))
    message = str(caught.value)
    assert key in message and theirs in message and "runs/r/settings.yaml" in message


def test_what_is_free_at_inference_may_change(run_3d):
    settings = settings_for_run(*current(run_3d, "model.mirror_axes_3d=[]", "train.model=3d",
                                         "model.regions=[wt,tc,et]", "cpu.intra_op_threads=1"))
    assert settings.model.mirror_axes_3d == () and settings.cpu.intra_op_threads == 1


def test_a_fresh_run_is_the_current_settings(tmp_path):
    settings = settings_for_run(*current(tmp_path, "train.model=3d"))
    assert settings.train.model == "3d" and settings.model.regions == ("wt",)


def test_the_run_keeps_its_dataset_unless_another_is_named(run_3d, tmp_path):
    """A run records the prepared dataset it trained on (absolute): evaluate and predict read that,
    not the last one prepared here; --data (or --set data.source) names another."""
    recorded = settings_for_run(*current(run_3d))
    assert recorded.data.dataset == DATASET
    moved = settings_for_run(*current(run_3d, flags={"data.dataset": str(tmp_path / "copy")}))
    assert moved.data.dataset == tmp_path / "copy"
    source = settings_for_run(*current(run_3d, f"data.source={tmp_path / 'raw'}"))
    assert source.data.source == tmp_path / "raw" and source.data.dataset == DATASET

