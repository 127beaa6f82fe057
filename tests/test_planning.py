"""unet-train plan: the activation count against Keras, the memory check before allocation, the
fingerprint's warnings, the projection, and train --plan under --set."""
from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import SimpleITK as sitk

from support.data import brats_case_folders, run_cli
from trainer.config.settings import ModelSettings, Settings
from trainer.data.datasets import RawDataset
from trainer.errors import UserError
from trainer.commands import calibration
from trainer.planning import speed
from trainer.planning.fingerprint import fingerprint
from trainer.planning.memory import Available, ModelShape, check_fits, predict_peak, unet_tensors



@pytest.mark.parametrize("kind, model, spatial", [
    ("2d", ModelSettings(), (128, 128)),
    ("2d", ModelSettings(norm_2d="none", upsampling="upsample", regions=("wt", "tc", "et")), (64, 64)),
    ("3d", ModelSettings(), (64, 64, 64)),
    ("3d", ModelSettings(norm_3d="instance", dropout=0.0, base_filters_3d=8), (32, 48, 64)),
])
def test_the_activation_count_is_kerass(kind, model, spatial):
    """The memory model counts the UNet from its definition; Keras must agree, or it has drifted."""
    import tensorflow as tf  # noqa: F401

    from trainer.models import UNet2D, UNet3D

    keras = UNet2D(model, 4, spatial[0]) if kind == "2d" else UNet3D(model, 4, spatial)
    elements = sum(int(np.prod(layer.output.shape[1:])) for layer in keras.layers)
    assert unet_tensors(ModelShape(kind, spatial, 4, len(model.regions), 1, model, "fp32")) == \
        (elements, keras.count_params())


def test_memory_grows_with_batch_crop_and_precision():
    def peak(spatial, batch, precision):
        return predict_peak(ModelShape("3d", spatial, 4, 1, batch, ModelSettings(), precision)).total_mib
    assert peak((64,) * 3, 1, "fp32") < peak((64,) * 3, 2, "fp32") < peak((128,) * 3, 2, "fp32")
    assert peak((128,) * 3, 2, "bf16") < peak((128,) * 3, 2, "fp32")


def test_a_step_over_the_limit_is_refused_naming_the_figures_and_what_fits():
    settings = Settings.model_validate({"train": {"model": "3d"}, "data": {"crop_size": [144, 144, 144]}})
    small = Available(3 * 1024, "cpu.memory_limit_gb = 3")
    with pytest.raises(UserError) as caught:
        check_fits(settings, "fp32", available=small)
    message = str(caught.value)
    assert message.startswith("memory: 3D 144x144x144 batch 16 fp32 needs about ")
    assert "more than the 2.7 GB available (cpu.memory_limit_gb = 3: 3.0 GB less a 10% margin)" in message
    assert "the largest that fits: 3D " in message and "--set train.batch_size=" in message
    assert "\n" not in message
    check_fits(settings.model_copy(update={"train": settings.train.model_copy(update={"batch_size": 1}),
                                           "data": settings.data.model_copy(update={"crop_size": (32, 32, 32)})}),
               "fp32", available=small)  # what it names does fit


def test_train_refuses_a_configuration_over_the_limit_before_building_anything(prepared_brats, brats_dataset,
                                                                              tmp_path):
    started = time.monotonic()
    result = run_cli("train", "--run-name", "big", "--set", f"data.dataset={prepared_brats}", "--set",
                     "cpu.memory_limit_gb=1.5", "--set", "train.batch_size=64", "--quiet", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "memory: 2D 128^2 batch 64" in line and "cpu.memory_limit_gb = 1.5" in line and "largest that fits" in line
    assert time.monotonic() - started < 60
    assert not (tmp_path / "runs").exists()  # nothing allocated, nothing written: not even the log
    env_limited = run_cli("train", "--run-name", "big2", "--set", f"data.dataset={prepared_brats}", "--set",
                          "train.batch_size=64", "--quiet", cwd=tmp_path, timeout=120,
                          env={"UNET_TRAIN_MEMORY_LIMIT_GB": "1.5"})
    assert env_limited.returncode == 2 and "UNET_TRAIN_MEMORY_LIMIT_GB = 1.5" in env_limited.stderr


def _respace(path, spacing):
    image = sitk.ReadImage(str(path))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def test_the_fingerprint_warns_on_mixed_spacing_and_an_empty_case(brats_copy):
    cases = brats_case_folders(brats_copy)
    stretched, empty = cases[1], cases[2]
    for path in stretched.glob("*.nii.gz"):
        _respace(path, (1.0, 1.0, 1.5))
    seg = next(empty.glob("*_seg.nii.gz"))
    image = sitk.ReadImage(str(seg))
    blank = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(image)))
    blank.CopyInformation(image)
    sitk.WriteImage(blank, str(seg))
    found = fingerprint(RawDataset.open(brats_copy), progress=False)
    assert any(w.startswith(f"{stretched.name}: spacing 1 x 1 x 1.5 mm differs") for w in found.warnings), found.warnings
    assert f"{empty.name}: empty case (no tumour label at all)" in found.warnings
    assert found.cases == len(cases) and found.spacing["z"] == [1.0, 1.0, 1.5]
    assert len(found.warnings) == 2, found.warnings  # nothing else in the set is flagged


def test_a_hot_spot_is_an_intensity_outlier(brats_copy):
    case = brats_case_folders(brats_copy)[3]
    flair = next(case.glob("*_flair.nii.gz"))
    image = sitk.ReadImage(str(flair))
    array = sitk.GetArrayFromImage(image)
    brain = np.argwhere(array > 0)
    hot = brain[:: max(1, len(brain) // 200)]  # 2% of its voxels, at the top of its type
    top = np.iinfo(array.dtype).max if np.issubdtype(array.dtype, np.integer) else array.max() * 100
    array[tuple(hot.T)] = top
    spiked = sitk.GetImageFromArray(array)
    spiked.CopyInformation(image)
    sitk.WriteImage(spiked, str(flair))
    found = fingerprint(RawDataset.open(brats_copy), progress=False)
    assert [w for w in found.warnings if "outlier" in w] == [w for w in found.warnings
                                                            if w.startswith(f"{case.name}: flair intensity outlier")]
    assert any(w.startswith(f"{case.name}: flair intensity outlier") for w in found.warnings), found.warnings


def test_anisotropic_spacing_is_named(brats_copy):
    case = brats_case_folders(brats_copy)[0]
    for path in case.glob("*.nii.gz"):
        _respace(path, (1.0, 1.0, 5.0))
    found = fingerprint(RawDataset.open(brats_copy), progress=False)
    assert any(w.startswith(f"{case.name}: anisotropic spacing 1 x 1 x 5 mm") for w in found.warnings)


def test_the_projection_loses_efficiency_with_nodes_and_ps_loses_more():
    one = speed.project(0.5, 16, 5_650_625, 1, 1, 10.0, "horovod")
    assert one.efficiency == 1.0 and one.images_per_sec == pytest.approx(32.0)
    ring = [speed.project(0.5, 16, 5_650_625, n, 1, 10.0, "horovod").efficiency for n in (2, 4, 8, 16)]
    ps = [speed.project(0.5, 16, 5_650_625, n, 1, 10.0, "ps").efficiency for n in (2, 4, 8, 16)]
    assert ring == sorted(ring, reverse=True) and ps == sorted(ps, reverse=True)
    assert all(p < r for p, r in zip(ps, ring))
    faster = speed.project(0.5, 16, 5_650_625, 8, 1, 100.0, "horovod").efficiency
    assert faster > ring[2]


def _fingerprints():
    from trainer.planning.fingerprint import DatasetFingerprint
    from trainer.planning.node import NodeFingerprint

    data = DatasetFingerprint(source="x", layout="brats", cases=20, sampled_cases=20, shapes={"240x240x155": 20},
                              spacing={a: [1.0, 1.0, 1.0] for a in "xyz"},
                              brain_extent={"x": [130, 140, 150], "y": [160, 170, 180], "z": [120, 130, 140]},
                              intensity={}, labels=[0, 1, 2, 4], foreground_share={"wt": 0.05})
    node = NodeFingerprint(physical_cores=8, allowed_cpus=8, sockets=1, numa_nodes=1, memory_total_gb=64.0,
                           memory_available_gb=60.0, memory_source="test", isa=("avx2",), native_bf16=False,
                           bf16_reason="test")
    return data, node


@pytest.mark.parametrize("context", [0, 2])
def test_a_2d_plan_checks_the_memory_of_its_input_planes_and_adds_no_context_itself(context):
    from trainer.planning.planner import make_plan

    data, node = _fingerprints()
    model = ModelSettings(regions=("wt", "tc", "et"), context_slices_2d=context)
    settings = Settings().model_copy(update={"model": model})
    plan = make_plan(settings, data, node, model="2d")
    assert "model.context_slices_2d" not in plan.settings()  # measured: no context setting won on every region
    shape = ModelShape.from_settings(settings, "fp32", plan.settings()["train.batch_size"])
    assert shape.channels == 4 * (2 * context + 1)
    assert plan.memory_mib == pytest.approx(predict_peak(shape).total_mib)  # the step it proposes, planes and all
    assert make_plan(settings, data, node).settings()["train.model"] == "3d"  # the core wanted: 3D


def test_plan_then_train_with_the_plan_and_set_on_top(brats_dataset, prepared_brats, tmp_path):
    planned = run_cli("plan", "--src", brats_dataset, "--out", tmp_path / "plan.json", "--no-calibrate",
                      "--set", "model.base_filters_2d=4", "--quiet", cwd=tmp_path, timeout=120)
    assert planned.returncode == 0, planned.stderr[-2000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["settings"]["train.model"] == "2d" and "reason" in plan["choices"][0]
    # only the keys train reads for the 2D model: no 3D crop, validation crops or overlap, no flags
    assert not {"data.crop_size", "data.val_crops_per_case", "model.base_filters_3d"} & set(plan["settings"])
    assert not [c for c in plan["choices"] if c["key"].startswith("-") or "overlap" in c["key"]]
    assert plan["settings"]["train.run_name"] == "default" and plan["settings"]["model.regions"] == ["wt"]
    assert "predicted peak memory" in planned.stdout and "train.batch_size" in planned.stdout
    chosen = plan["settings"]["train.batch_size"]
    plan["settings"]["train.steps_per_epoch"] = 2  # keep the test short: a plan file is the user's to edit
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    trained = run_cli("train", "--plan", tmp_path / "plan.json", "--run-name", "p", "--epochs", "1",
                      "--set", f"data.dataset={prepared_brats}", "--set", "model.base_filters_2d=4",
                      "--set", "train.validation_steps=1", "--set", "cpu.inter_op_threads=1", "--quiet",
                      cwd=tmp_path, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    from trainer.config.loader import load_settings

    used = load_settings(tmp_path / "runs" / "p" / "settings.yaml")
    assert used.train.batch_size == chosen and used.train.steps_per_epoch == 2  # from the plan
    assert used.cpu.inter_op_threads == 1  # --set wins over the plan's 2
    shutil.rmtree(tmp_path / "runs")
    bad = run_cli("train", "--plan", tmp_path / "nothing.json", cwd=tmp_path)
    assert bad.returncode == 2 and "--plan" in bad.stderr and "not found" in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind, flags", [
    ("2d", ["--set", "model.base_filters_2d=4"]),
    ("3d", ["--set", "model.base_filters_3d=2", "--set", "data.crop_size=[32,32,32]", "--set", "train.precision=fp32"]),
])
def test_the_calibration_times_the_real_pipeline_on_a_prepared_sample(kind, flags, brats_dataset, tmp_path):
    """plan's speed comes from the benchmark's train mode on a few cases prepared in scratch: the
    sustained rate (input stalls included), at least CALIBRATION_SECONDS of steps, no scratch left."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    planned = run_cli("plan", "--src", brats_dataset, "--out", tmp_path / "plan.json", "--model", kind, *flags,
                      "--quiet", cwd=tmp_path, timeout=600, env={"TMPDIR": str(scratch)})
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert "calibrated: " in planned.stdout
    measured = json.loads((tmp_path / "plan.json").read_text())["speed"]
    assert measured["timed_steps"] >= 3 and 0.0 <= measured["input_wait_share"] < 1.0
    assert measured["images_per_sec"] > 0 and measured["step_s"] * measured["timed_steps"] >= calibration.CALIBRATION_SECONDS \
        or measured["timed_steps"] == 200
    assert measured["timed_at"] == ([32, 32, 32] if kind == "3d" else [measured["timed_at"][0]] * 2)
    assert list(scratch.iterdir()) == []  # the prepared sample is gone



def test_a_failed_calibration_is_one_line_naming_the_data(tmp_path):
    with pytest.raises(UserError) as caught:
        calibration.calibrate("train: {model: 9}", tmp_path, 1)  # settings the calibration process refuses
    message = str(caught.value)
    assert message.startswith(f"plan: the speed calibration on {tmp_path} failed (") and "--no-calibrate" in message
    assert "\n" not in message


@pytest.mark.slow
def test_a_plan_for_regions_trains_what_it_was_made_for(brats_dataset, tmp_path):
    """plan --set model.regions=[wt,tc,et] picks 3D because TC/ET are asked; train --plan trains
    exactly that (3D, the three regions) into the plan's run, and the run records the plan."""
    prepared = run_cli("prepare", "--src", brats_dataset, "--model", "3d", "--quiet", cwd=tmp_path, timeout=120)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    planned = run_cli("plan", "--run-name", "plan3d", "--set", "model.regions=[wt,tc,et]", "--no-calibrate",
                      "--quiet", cwd=tmp_path, timeout=120)
    assert planned.returncode == 0, planned.stderr[-2000:]
    path = tmp_path / "runs" / "plan3d" / "plan.json"
    plan = json.loads(path.read_text())
    chosen = plan["settings"]
    assert chosen["train.model"] == "3d" and chosen["model.regions"] == ["wt", "tc", "et"]
    assert chosen["train.run_name"] == "plan3d" and chosen["data.dataset"].endswith("data/prepared/" + brats_dataset.name)
    assert "data.image_size" not in chosen and "model.base_filters_2d" not in chosen
    assert not [key for key in chosen if key.startswith("-")]
    crop = next(c for c in plan["choices"] if c["key"] == "data.crop_size")
    edge = crop["value"][0]
    assert f"up to {edge}" in crop["reason"] or "up to" in crop["reason"]
    assert "3D model, regions wt/tc/et, run plan3d" in planned.stdout
    chosen.update({"data.crop_size": [32, 32, 32], "model.base_filters_3d": 2, "train.batch_size": 1,
                   "train.steps_per_epoch": 2, "train.precision": "fp32"})  # a plan file is the user's to edit
    path.write_text(json.dumps(plan))
    trained = run_cli("train", "--plan", path, "--epochs", "1", "--set", "train.validation_steps=1",
                      "--set", "train.validate_full_volumes=false", "--quiet", cwd=tmp_path, timeout=400)
    assert trained.returncode == 0, trained.stderr[-3000:]
    from trainer.config.loader import load_settings

    used = load_settings(tmp_path / "runs" / "plan3d" / "settings.yaml")
    assert used.train.model == "3d" and used.model.regions == ("wt", "tc", "et")
    assert json.loads((tmp_path / "runs" / "plan3d" / "run.json").read_text())["plan"] == str(path)
    assert not (tmp_path / "runs" / "default").exists()


@pytest.mark.parametrize("key, value, says", [
    ("cluster.allow_public_network", True, "not a setting a plan may set"),
    ("data.max_voxels", 10 ** 12, "not a setting a plan may set"),
    ("cluster.token_file", "/tmp/x", "not a setting a plan may set"),
    ("data.crop_size", [64, 64, 64], "not read by the 2D model"),
])
def test_a_plan_file_sets_only_what_a_plan_owns(key, value, says, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"format": 2, "settings": {"train.model": "2d", "train.batch_size": 4, key: value}}))
    result = run_cli("train", "--plan", path, "--run-name", "p", "--quiet", cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and key in result.stderr and says in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "runs" / "p").exists()
