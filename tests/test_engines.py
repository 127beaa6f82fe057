"""Inference engines: selection rule, shape errors, TF vs OpenVINO agreement (2D, 3D sliding window, K channels).

No timing here: speed lives in benchmarks/inference_engines.py.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from support.data import run_cli
from trainer.errors import ConfigError, DataError
from trainer.inference import engines
from trainer.inference.engines import OpenVinoUnavailable, check_batch, select_engine

pytestmark = pytest.mark.slow  # trains models or starts processes: not in scripts/test.sh --fast


# ---------------------------------------------------------------- selection (no TensorFlow)

def test_auto_picks_openvino_when_installed_on_a_cpu_host():
    assert select_engine("auto", have_openvino=True, gpu=False) == ("openvino", "auto: OpenVINO installed, CPU only")


def test_auto_falls_back_to_tf_without_openvino_or_with_a_gpu():
    assert select_engine("auto", have_openvino=False, gpu=False) == ("tf", "auto: OpenVINO not installed")
    name, reason = select_engine("auto", have_openvino=True, gpu=True)
    assert name == "tf" and "GPU" in reason


def test_explicit_engines_are_honoured():
    assert select_engine("tf", have_openvino=True, gpu=False)[0] == "tf"
    assert select_engine("openvino", have_openvino=True, gpu=True)[0] == "openvino"


def test_an_ir_needs_openvino():
    assert select_engine("auto", have_openvino=True, gpu=True, ir="m.xml") == ("openvino", "--ir given")
    with pytest.raises(ConfigError, match=r"^--ir m.xml: an OpenVINO IR runs on --engine openvino"):
        select_engine("tf", have_openvino=True, gpu=False, ir="m.xml")


def test_unknown_engine_is_a_config_error():
    with pytest.raises(ConfigError, match="--engine: expected one of auto, tf, openvino"):
        select_engine("onnx", have_openvino=True, gpu=False)


@pytest.fixture
def openvino_not_installed(monkeypatch):
    """Make ``import openvino`` fail in this process, as on a machine without it."""
    monkeypatch.setitem(sys.modules, "openvino", None)


def test_openvino_missing_is_detected_by_the_import(openvino_not_installed):
    assert engines.openvino_available() is False
    assert select_engine("auto", engines.openvino_available(), gpu=False)[0] == "tf"


def test_openvino_requested_but_missing_is_a_one_line_error(openvino_not_installed):
    with pytest.raises(OpenVinoUnavailable) as caught:
        select_engine("openvino", have_openvino=False, gpu=False)
    message = str(caught.value)
    assert "OpenVINO is not installed" in message and engines.OPENVINO_REQUIREMENT in message
    assert "--engine tf" in message and "\n" not in message


def test_check_batch_names_both_shapes():
    assert check_batch(np.zeros((2, 8, 8, 4), np.float64), (None, 8, 4), "m").dtype == np.float32
    with pytest.raises(DataError, match=r"^m.xml: input batch of shape \[2, 8, 8, 3\] does not match the "
                                        r"model's input \[N, 8, 8, 4\]"):
        check_batch(np.zeros((2, 8, 8, 3)), (8, 8, 4), "m.xml")
    with pytest.raises(DataError, match=r"\[N, \?, \?, 4\]"):
        check_batch(np.zeros((8, 8, 4)), (None, None, 4), "m.xml")


# ---------------------------------------------------------------- TF vs OpenVINO (TensorFlow, OpenVINO)

openvino = engines.import_openvino()  # pinned in requirements.txt; imported the project's way (telemetry off)


def _tiny_multichannel(dims: int, classes: int):
    """Not a UNet: a 2-layer conv net with ``classes`` sigmoid outputs, to prove nothing assumes K == 1."""
    import tensorflow as tf

    conv = tf.keras.layers.Conv2D if dims == 2 else tf.keras.layers.Conv3D
    tf.keras.utils.set_random_seed(7)
    inputs = tf.keras.Input((None,) * dims + (4,))
    x = conv(6, 3, padding="same", activation="relu")(inputs)
    outputs = conv(classes, 1, activation="sigmoid", dtype="float32")(x)
    return tf.keras.Model(inputs, outputs)


def _both_engines(model):
    tf_engine = engines.TfEngine(model, "fp32", "test model")
    ov_engine = engines.OpenVinoEngine.compile(engines.convert_keras(model), "f32", 2, "test model")
    return tf_engine, ov_engine


@pytest.mark.parametrize("dims", [2, 3])
def test_engines_return_every_output_channel_and_agree(dims):
    tf_engine, ov_engine = _both_engines(_tiny_multichannel(dims, classes=3))
    batch = np.random.default_rng(0).normal(size=(2,) + (16,) * dims + (4,)).astype(np.float32)
    expected, actual = tf_engine.predict(batch), ov_engine.predict(batch)
    assert expected.shape == actual.shape == (2,) + (16,) * dims + (3,)
    assert actual.dtype == np.float32
    assert np.abs(actual - expected).max() <= 1e-5
    assert ov_engine.precision == "fp32"


def test_openvino_engine_rejects_a_wrong_channel_count():
    from trainer.config.settings import ModelSettings
    from trainer.models import UNet2D

    _, ov_engine = _both_engines(UNet2D(ModelSettings(base_filters_2d=2), 4, 32))
    assert ov_engine.input_shape == (32, 32, 4)
    with pytest.raises(DataError, match=r"input batch of shape \[1, 32, 32, 3\]"):
        ov_engine.predict(np.zeros((1, 32, 32, 3), np.float32))


def test_3d_sliding_window_runs_on_the_engine_and_openvino_matches_tf():
    """The project's 3D UNet (batch norm, inference mode) through the predictor's sliding window,
    on a volume that needs several overlapping windows per axis."""
    from trainer.config.settings import ModelSettings
    from trainer.inference.predictor import Predictor
    from trainer.models import UNet3D

    import tensorflow as tf

    tf.keras.utils.set_random_seed(3)
    model = UNet3D(ModelSettings(base_filters_3d=2), 4, (32, 32, 32))
    volume = np.random.default_rng(1).normal(size=(48, 40, 36, 4)).astype(np.float32)
    results, windows = {}, {}
    for engine in _both_engines(model):
        calls = []
        predict = engine.predict
        engine.predict = lambda batch, predict=predict, calls=calls: calls.append(len(batch)) or predict(batch)
        results[engine.name] = Predictor(engine, "3d", [0, 1, 2, 3], 128, (32, 32, 32)).predict(volume)
        windows[engine.name] = sum(calls)
    assert windows["tf"] == windows["openvino"] == 2 * 2 * 2  # 48, 40, 36 -> two windows per axis
    assert results["tf"].shape == results["openvino"].shape == (48, 40, 36)
    assert np.abs(results["openvino"] - results["tf"]).max() <= 1e-3


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_predictor_keeps_every_output_channel(kind):
    from trainer.inference.predictor import Predictor

    dims = 2 if kind == "2d" else 3
    _, ov_engine = _both_engines(_tiny_multichannel(dims, classes=2))
    image = np.random.default_rng(2).normal(size=(40, 36, 20, 4)).astype(np.float32)
    predictor = Predictor(ov_engine, kind, [0, 1, 2, 3], 32, (16, 16, 16))
    channels = predictor.predict_channels(image)
    assert channels.shape == (40, 36, 20, 2)
    assert np.array_equal(predictor.predict(image), channels[..., 0])
    assert not np.allclose(channels[..., 0], channels[..., 1])  # two real outputs, not one copied


class _RampEngine:
    """A stand-in engine whose output depends on where a voxel sits (a ramp along every spatial axis
    times the first channel): not flip-equivariant, so each mirror gives a different answer."""

    def __init__(self, spatial_dims: int):
        self.input_shape = (None,) * spatial_dims + (4,)
        self.calls = 0

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        ramp = sum(np.linspace(0.0, 1.0, n).reshape([-1 if a == i else 1 for a in range(batch.ndim - 2)])
                   for i, n in enumerate(batch.shape[1:-1]))
        return (1.0 / (1.0 + np.exp(-batch[..., :1] * ramp[None, ..., None]))).astype(np.float32)


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_test_time_mirroring_averages_the_flipped_predictions_flipped_back(kind):
    from trainer.inference.predictor import Predictor

    dims = 2 if kind == "2d" else 3
    image = np.random.default_rng(5).normal(size=(20, 18, 12, 4)).astype(np.float32)

    def predictor(engine, axes):
        return Predictor(engine, kind, [0, 1, 2, 3], 16, (16, 16, 16), mirror_axes=axes)

    plain_engine = _RampEngine(dims)
    plain = predictor(plain_engine, ()).predict_channels(image)
    by_hand = np.mean([np.flip(predictor(_RampEngine(dims), ()).predict_channels(np.flip(image, axes).copy()), axes)
                       for axes in [(), (0,), (1,), (0, 1)]], axis=0)
    mirrored_engine = _RampEngine(dims)
    mirrored = predictor(mirrored_engine, (0, 1)).predict_channels(image)
    assert mirrored.shape == plain.shape == (20, 18, 12, 1)
    assert np.allclose(mirrored, by_hand, atol=1e-6)
    assert not np.allclose(mirrored, plain, atol=1e-3)  # the mirrors really changed the answer
    assert mirrored_engine.calls == 4 * plain_engine.calls
    # the 2D model sees slices one at a time: a flip of their order is not a new pass
    through_plane = predictor(_RampEngine(dims), (0, 1, 2))
    assert len(through_plane.mirrors()) == (4 if kind == "2d" else 8)


def test_mirror_axes_are_checked_in_settings():
    from pydantic import ValidationError

    from trainer.config.settings import ModelSettings

    defaults = ModelSettings()
    assert (defaults.mirror_axes("2d"), defaults.mirror_axes("3d")) == ((0, 1), ())
    assert ModelSettings(mirror_axes_3d=[2, 0]).mirror_axes("3d") == (0, 2)
    for key, bad in (("mirror_axes_2d", [0, 0]), ("mirror_axes_2d", [2]), ("mirror_axes_3d", [3]),
                     ("mirror_axes_3d", [0, 1, 2, 0])):
        with pytest.raises(ValidationError, match=key):
            ModelSettings(**{key: bad})


def test_read_ir_errors_name_the_file(tmp_path):
    from trainer.config.settings import ModelSettings
    from trainer.models import UNet2D

    with pytest.raises(DataError, match=r"nope.xml: OpenVINO IR not found"):
        engines.read_ir(tmp_path / "nope.xml", (32, 32, 4))
    with pytest.raises(DataError, match=r"model.onnx: expected an OpenVINO IR .xml file"):
        engines.read_ir(tmp_path / "model.onnx", (32, 32, 4))
    xml = tmp_path / "ir" / "model.xml"
    xml.parent.mkdir()
    openvino.save_model(engines.convert_keras(UNet2D(ModelSettings(base_filters_2d=2), 4, 32)), str(xml))
    assert engines.read_ir(xml, (32, 32, 4)) is not None
    with pytest.raises(DataError, match=r"model input \[N, 32, 32, 4\] does not match the settings' \[N, 64, 64, 4\]"):
        engines.read_ir(xml, (64, 64, 4))
    xml.with_suffix(".bin").unlink()
    with pytest.raises(DataError, match=r"model.bin: OpenVINO IR not found"):
        engines.read_ir(xml, (32, 32, 4))


def test_openvino_telemetry_is_blocked():
    """The converter falls back to its no-op telemetry stub: nothing is sent off the machine."""
    from openvino.tools.ovc import telemetry_utils

    assert telemetry_utils.tm.__name__ == "openvino.tools.ovc.telemetry_stub"


# ---------------------------------------------------------------- through the CLI, on a trained run

@pytest.fixture(scope="module")
def learned_2d(prepared_brats, brats_dataset, tmp_path_factory):
    """A tiny 2D run trained until it segments (val Dice ~0.9). An untrained model outputs ~0.5
    everywhere, where any rounding flips mask pixels, so mask parity would measure nothing."""
    work = tmp_path_factory.mktemp("learned2d")
    flags = ["--model", "2d", "--run-dir", work / "runs", "--run-name", "l", "--set", "model.base_filters_2d=4",
             "--set", "model.dropout=0", "--set", f"data.dataset={prepared_brats}",
             "--set", f"data.source={brats_dataset}", "--quiet"]
    result = run_cli("train", "--epochs", "3", "--set", "train.batch_size=8", "--set", "train.steps_per_epoch=40",
                     "--set", "train.validation_steps=2", "--set", "train.learning_rate=0.003", *flags,
                     cwd=work, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "runs" / "l", flags, work


def _val_slices(h5_path, count: int) -> np.ndarray:
    import h5py

    with h5py.File(h5_path, "r") as h5:
        return h5["val"]["images"][:count].astype(np.float32)


def test_openvino_export_parity_is_reported_bounded_and_independently_true(learned_2d, brats_slices):
    from trainer.hardware.cpu import cpu_flags, native_bf16_support

    run, flags, work = learned_2d
    result = run_cli("export", "--format", "openvino", *flags, cwd=work, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = run / "export" / "openvino"
    assert "OpenVINO IR: " in result.stdout and str(folder / "export.json") in result.stdout
    report = json.loads((folder / "export.json").read_text())
    assert report["parity_inputs"].startswith("8 val slice(s) with the most tumour")
    f32 = report["checks"]["f32"]
    assert f32["max_abs_diff"] <= 1e-3 and f32["mask_dice"] >= 0.99
    assert f32["mask_voxels"] > 0  # the masks compared are not both empty
    bf16 = report["checks"]["bf16"]
    if native_bf16_support(cpu_flags(), onednn=True).native:
        assert bf16["mask_dice"] >= 0.99 and 0 < bf16["max_abs_diff"] < 0.1
    else:
        assert bf16["skipped"].startswith("no native bf16 here")
    # Independently: OpenVINO's own reader on the files, against the checkpointed Keras model.
    import tensorflow as tf

    from trainer.config.settings import ModelSettings
    from trainer.models import UNet2D

    model = UNet2D(ModelSettings(base_filters_2d=4, dropout=0), 4)
    tf.train.Checkpoint(model=model).restore(report["checkpoint"]).expect_partial()
    compiled = openvino.Core().compile_model(str(folder / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    slices = _val_slices(brats_slices, 4)
    exported = compiled(slices)[compiled.output(0)]
    assert np.abs(exported - model(slices, training=False).numpy()).max() <= 1e-3


@pytest.mark.parametrize("fmt", ["savedmodel", "openvino"])
def test_export_refuses_an_existing_output_unless_overwrite(learned_2d, fmt):
    run, flags, work = learned_2d
    out = work / f"exports-{fmt}" / "model"
    first = run_cli("export", "--format", fmt, "--out", out, *flags, cwd=work, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    marker = out / "marker"
    marker.write_text("first export")
    again = run_cli("export", "--format", fmt, "--out", out, *flags, cwd=work, timeout=300)
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert f"{out}: output already exists (pass --overwrite to replace it)" in again.stderr
    assert marker.exists()  # untouched
    replaced = run_cli("export", "--format", fmt, "--out", out, "--overwrite", *flags, cwd=work, timeout=300)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert not marker.exists() and any(out.iterdir())
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []  # no partial folders


def _predict(flags, work, case, out, *extra):
    import SimpleITK as sitk

    result = run_cli("predict", *flags, *extra, case, "--out", out, cwd=work, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case.name}_mask.nii.gz")))


def test_predict_masks_agree_across_engines(learned_2d, brats_dataset, tmp_path):
    run, flags, work = learned_2d
    case = next(p.parent for p in brats_dataset.rglob("*_flair.nii.gz"))
    logged, reference = _predict(flags, work, case, tmp_path / "tf", "--engine", "tf", "--precision", "fp32")
    assert "inference engine: tf (fp32)" in logged.stderr
    assert reference.sum() > 0  # the model finds tumour, so equality below is not about empty masks
    logged, openvino_f32 = _predict(flags, work, case, tmp_path / "ov", "--engine", "openvino", "--precision", "fp32")
    assert "inference engine: openvino (fp32)" in logged.stderr
    assert np.array_equal(openvino_f32, reference)
    logged, fastest = _predict(flags, work, case, tmp_path / "auto")  # defaults: --engine auto --precision auto
    assert "inference engine: openvino" in logged.stderr
    dice = 2 * np.logical_and(fastest, reference).sum() / (fastest.sum() + reference.sum())
    assert dice >= 0.99  # whatever precision auto chose here (bf16 on a CPU with native bf16)
    export = run_cli("export", "--format", "openvino", "--out", tmp_path / "ir", *flags, cwd=work, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    logged, from_ir = _predict(flags, work, case, tmp_path / "from-ir", "--ir", tmp_path / "ir" / "model.xml",
                               "--precision", "fp32")
    assert f"on {tmp_path / 'ir' / 'model.xml'} (--ir given)" in logged.stderr
    assert np.array_equal(from_ir, reference)


def test_evaluate_metrics_agree_across_engines(learned_2d, tmp_path):
    run, flags, work = learned_2d
    summaries, rows = {}, {}
    for engine in ("tf", "openvino"):
        out = tmp_path / engine
        result = run_cli("evaluate", *flags, "--engine", engine, "--precision", "fp32", "--out", out,
                         "--no-predictions", cwd=work, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        summaries[engine] = json.loads((out / "summary.json").read_text())
        rows[engine] = (out / "per_case.csv").read_text().splitlines()
    assert summaries["tf"]["engine"].startswith("tf (fp32) on ")
    assert summaries["openvino"]["engine"].startswith("openvino (fp32) on ")
    assert summaries["tf"]["dice"]["mean"] > 0.3  # a model that segments, so agreement means something
    assert abs(summaries["openvino"]["dice"]["mean"] - summaries["tf"]["dice"]["mean"]) <= 1e-3
    assert [r.split(",")[0] for r in rows["openvino"]] == [r.split(",")[0] for r in rows["tf"]]


def test_engine_auto_falls_back_to_tf_when_openvino_cannot_be_imported(learned_2d, tmp_path, monkeypatch):
    """A package that fails to import shadows the installed OpenVINO for the CLI processes."""
    run, flags, work = learned_2d
    fake = tmp_path / "no-openvino" / "openvino"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'openvino' (simulated)\")\n")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    auto = run_cli("evaluate", *flags, "--precision", "fp32", "--out", tmp_path / "auto", "--no-predictions",
                   cwd=work, timeout=300)
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "inference engine: tf (fp32)" in auto.stderr and "(auto: OpenVINO not installed)" in auto.stderr
    forced = run_cli("evaluate", *flags, "--engine", "openvino", "--out", tmp_path / "ov", cwd=work, timeout=300)
    assert forced.returncode != 0 and "Traceback" not in forced.stderr
    assert "error: OpenVINO is not installed" in forced.stderr and "--engine tf" in forced.stderr
    assert not (tmp_path / "ov").exists()
    export = run_cli("export", "--format", "openvino", "--out", tmp_path / "ir", *flags, cwd=work, timeout=300)
    assert export.returncode != 0 and "error: OpenVINO is not installed" in export.stderr
    assert not (tmp_path / "ir").exists()


def test_in_process_auto_selection_without_openvino(learned_2d, monkeypatch):
    from trainer.config.loader import load_settings
    from trainer.inference.engines import EngineRequest, open_engine

    run, _, _ = learned_2d
    settings = load_settings(None, [f"train.run_dir={run.parent}", "train.run_name=l", "model.base_filters_2d=4",
                                    "model.dropout=0"])
    monkeypatch.setitem(sys.modules, "openvino", None)
    engine, checkpoint = open_engine(settings, EngineRequest("auto", "fp32"))
    assert engine.name == "tf" and checkpoint.startswith(str(run / "checkpoints"))


# ---------------------------------------------------------------- export parity inputs (no model)

def test_parity_slices_are_the_validation_slices_with_the_most_tumour(prepared_brats, brats_slices):
    import h5py

    from trainer.config.loader import load_settings
    from trainer.inference.export import held_out_slices

    settings = load_settings(None, [f"data.dataset={prepared_brats}", "data.channels=[t2,flair]"])
    images, description = held_out_slices(settings, 3)
    with h5py.File(brats_slices, "r") as h5:
        labels = h5["val"]["labels"][:]  # computed from the label maps, not the stored per-slice counts
        tumour = (labels > 0).reshape(labels.shape[0], -1).sum(axis=1, dtype=np.int64)
        top = np.sort(np.argsort(tumour)[::-1][:3])
        expected = h5["val"]["images"][top][..., [3, 0]]  # t2, flair in the file's flair,t1,t1ce,t2 order
    assert tumour[top].min() > 0 and tumour[top].min() >= np.sort(tumour)[-3]
    assert np.array_equal(images, expected)
    assert description == f"3 val slice(s) with the most tumour from {brats_slices}"


def test_parity_crop_is_centred_on_the_tumour_of_a_held_out_case(decathlon_dataset, tmp_path):
    from trainer.config.settings import DataSettings, Settings, TrainSettings
    from trainer.data.decathlon import load_case, read_index
    from support.data import write_prepared
    from trainer.inference.export import held_out_crop

    folder = write_prepared(decathlon_dataset, tmp_path / "data", {"train": ["BRATS_001"], "val": ["BRATS_002"]})
    settings = Settings(data=DataSettings(dataset=folder, crop_size=(32, 32, 16), channels=("flair", "t2")),
                        train=TrainSettings(model="3d"))
    crop, description = held_out_crop(settings)
    assert crop.shape == (1, 32, 32, 16, 2) and description.endswith("of BRATS_002")
    index = read_index(decathlon_dataset)
    image, mask, _ = load_case(next(c for c in index.training if c.case_id == "BRATS_002"), index.label_set)
    centre = np.argwhere(mask).mean(axis=0).astype(int)
    start = np.clip(centre - [16, 16, 8], 0, np.asarray(image.shape[:3]) - [32, 32, 16])
    assert np.array_equal(crop[0], image[start[0]:start[0] + 32, start[1]:start[1] + 32, start[2]:start[2] + 16][..., [0, 3]])
    assert mask[start[0]:start[0] + 32, start[1]:start[1] + 32, start[2]:start[2] + 16].any()


@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_openvino_runs_instance_norm_as_one_fused_operation(dims):
    """Keras's GroupNormalization became ~25 unfused ops per layer and ran 4-5x slower than TF."""
    import collections

    from trainer.config.settings import ModelSettings
    from trainer.models import build_model

    model = build_model(dims, ModelSettings(base_filters_2d=4, base_filters_3d=4, norm_2d="instance",
                                            norm_3d="instance"), 4, 32, (16, 16, 16))
    norms = sum(type(layer).__name__ == "InstanceNormalization" for layer in model.layers)
    ops = collections.Counter(op.get_type_name() for op in engines.convert_keras(model).get_ops())
    assert norms > 0 and ops["MVN"] == norms, ops
    assert ops["ReduceSum"] == ops["ReduceMean"] == 0, ops
