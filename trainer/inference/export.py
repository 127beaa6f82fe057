"""Export a trained model (SavedModel or OpenVINO IR) and prove the export computes the same function.

The parity check runs the export on held-out inputs (validation slices or a tumour-centred crop
when the prepared data is there, random normal input otherwise) and compares it with the Keras
model in float32. An export that breaks a bound is discarded, never left half-trusted.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from trainer.config.kinds import kind_of
from trainer.config.settings import MODALITIES, Settings
from trainer.data.prepared import prepared_dataset, raw_dataset, split_cases_of
from trainer.errors import DataError, TrainingError, UserError
from trainer.fsutil import atomic_dir, check_regular, refuse_existing, write_json
from trainer.inference.engines import (OpenVinoEngine, build_run_model, convert_keras, expected_input_shape,
                                       import_openvino, read_ir)
from trainer.hardware.cpu import cpu_flags, local_ranks_from_environment, native_bf16_support, plan_threads

log = logging.getLogger(__name__)

FORMATS = ("savedmodel", "openvino")
PARITY_TOLERANCE = 1e-5  # SavedModel: the same TensorFlow kernels, so only float noise
OPENVINO_F32_TOLERANCE = 1e-3  # OpenVINO f32: other kernels, fused differently
OPENVINO_BF16_MIN_DICE = 0.99  # OpenVINO bf16: probabilities move (~1e-2), masks must not
PARITY_SAMPLES = 8
EXPORT_MARKER = ".unet-train-export"  # what --overwrite recognises as an export it may replace


def export(settings: Settings, fmt: str = "savedmodel", out: Path | None = None, overwrite: bool = False,
           seed: int = 0) -> dict:
    if fmt == "openvino":
        return export_openvino(settings, out, overwrite, seed)
    return export_savedmodel(settings, out, overwrite, seed)


def export_savedmodel(settings: Settings, out: Path | None = None, overwrite: bool = False, seed: int = 0) -> dict:
    """A SavedModel whose serving signature has one output per region (``wt``, ``tc``, ``et``:
    probabilities (N, ..., 1)), each checked against the Keras model's channel."""
    import tensorflow as tf

    out = Path(out or settings.run_path / "export" / "saved_model")
    claim_export_folder(out, settings.run_path, overwrite)  # before the model is built
    model, checkpoint = build_run_model(settings)
    regions = tuple(settings.model.regions)
    per_region = tf.keras.Model(model.input, {region: tf.keras.layers.Lambda(
        lambda t, index=index: t[..., index:index + 1], name=region)(model.output)
        for index, region in enumerate(regions)}, name=f"{model.name}_regions")
    sample = np.random.default_rng(seed).normal(size=(2, *model.input_shape[1:])).astype(np.float32)
    expected = model(sample, training=False).numpy()
    with atomic_dir(out, overwrite) as tmp:
        per_region.save(str(tmp), save_format="tf", include_optimizer=False)
        served = tf.saved_model.load(str(tmp)).signatures["serving_default"](tf.constant(sample))
        if sorted(served) != sorted(regions):
            raise TrainingError(f"{out}: exported outputs {sorted(served)} are not the regions {list(regions)}")
        max_diff = max(float(np.max(np.abs(served[region].numpy()[..., 0] - expected[..., index])))
                       for index, region in enumerate(regions))
        if not max_diff <= PARITY_TOLERANCE:
            raise TrainingError(f"{out}: exported model differs from Keras model by {max_diff:.3g} "
                                f"(> {PARITY_TOLERANCE}); export discarded")
        report = {"saved_model": str(out), "checkpoint": checkpoint, "outputs": list(regions),
                  "max_abs_diff": max_diff, "tolerance": PARITY_TOLERANCE, "sample_shape": list(sample.shape)}
        _finish_export_folder(tmp, report)
    return report


def export_openvino(settings: Settings, out: Path | None = None, overwrite: bool = False, seed: int = 0) -> dict:
    """``out``/model.xml + model.bin (float32 weights; the precision is chosen when compiled) and
    ``out``/export.json with the parity of f32 and, where the CPU has native bf16, bf16 inference."""
    ov = import_openvino()  # fail before building anything when OpenVINO is missing
    out = Path(out or settings.run_path / "export" / "openvino")
    claim_export_folder(out, settings.run_path, overwrite)
    model, checkpoint = build_run_model(settings)
    sample, inputs = parity_inputs(settings, PARITY_SAMPLES, seed)
    expected = model(sample, training=False).numpy()
    threads = plan_threads(settings.cpu, local_ranks_from_environment()).intra_op
    threshold = settings.model.threshold
    with atomic_dir(out, overwrite) as tmp:
        ov.save_model(convert_keras(model), str(tmp / "model.xml"), compress_to_fp16=False)
        ir = read_ir(tmp / "model.xml", expected_input_shape(settings))
        f32 = OpenVinoEngine.compile(ir, "f32", threads, str(out / "model.xml"))
        checks = {"f32": parity(expected, f32.predict(sample), threshold)}
        if not checks["f32"]["max_abs_diff"] <= OPENVINO_F32_TOLERANCE:
            raise TrainingError(f"{out}: OpenVINO f32 inference differs from the Keras model by max |dp| "
                                f"{checks['f32']['max_abs_diff']:.3g} (> {OPENVINO_F32_TOLERANCE}); export discarded")
        bf16 = native_bf16_support(cpu_flags(), settings.cpu.onednn)
        if bf16.native:
            engine = OpenVinoEngine.compile(ir, "bf16", threads, str(out / "model.xml"))
            checks["bf16"] = parity(expected, engine.predict(sample), threshold)
            if not checks["bf16"]["mask_dice"] >= OPENVINO_BF16_MIN_DICE:
                raise TrainingError(f"{out}: OpenVINO bf16 inference changes the masks (Dice "
                                    f"{checks['bf16']['mask_dice']:.4f} < {OPENVINO_BF16_MIN_DICE} against the "
                                    f"Keras model, max |dp| {checks['bf16']['max_abs_diff']:.3g}); export discarded")
        else:
            checks["bf16"] = {"skipped": f"no native bf16 here: {bf16.reason}"}
        report = {"openvino_ir": str(out / "model.xml"), "checkpoint": checkpoint, "openvino": ov.__version__,
                  "parity_inputs": inputs, "sample_shape": list(sample.shape), "threshold": threshold,
                  "bounds": {"f32_max_abs_diff": OPENVINO_F32_TOLERANCE, "bf16_min_mask_dice": OPENVINO_BF16_MIN_DICE},
                  "checks": checks}
        _finish_export_folder(tmp, report)
    log.info("exported %s; parity: %s", out / "model.xml", checks)
    return report


def claim_export_folder(out: Path, run_path: Path, overwrite: bool) -> None:
    """Refuse, before anything is built, an --out that export must not replace: the run folder or
    a folder that holds it, and, even with --overwrite, any folder that is not an earlier export
    (recognised by its marker file). Replacing someone's folder would delete its contents."""
    target, run = Path(out).resolve(), Path(run_path).resolve()
    if target == run or target in run.parents:
        raise UserError(f"--out {out}: is the run folder {run_path} or holds it; an export goes to a folder of "
                        f"its own (default {run_path / 'export'})")
    if not os.path.lexists(out):
        return
    refuse_existing(out, overwrite)
    if not (Path(out).is_dir() and not Path(out).is_symlink() and (Path(out) / EXPORT_MARKER).is_file()):
        raise UserError(f"--out {out}: exists and is not an earlier export (no {EXPORT_MARKER} in it); "
                        f"--overwrite replaces only what export wrote, so it is left as it is: choose another --out")


def _finish_export_folder(tmp: Path, report: dict) -> None:
    """export.json and the marker that lets a later --overwrite recognise this folder."""
    write_json(tmp / "export.json", report)
    (tmp / EXPORT_MARKER).write_text("written by unet-train export; --overwrite may replace this folder\n")


def parity(expected: np.ndarray, actual: np.ndarray, threshold: float) -> dict:
    """max |dp| over every output channel, and the Dice of the thresholded masks (1.0 when both are empty)."""
    truth, mask = expected > threshold, actual > threshold
    total = int(truth.sum() + mask.sum())
    dice = 1.0 if total == 0 else 2.0 * float(np.logical_and(truth, mask).sum()) / total
    return {"max_abs_diff": float(np.max(np.abs(actual - expected))), "mask_dice": dice,
            "mask_voxels": int(truth.sum()), "voxels": int(truth.size)}


def parity_inputs(settings: Settings, count: int, seed: int) -> tuple[np.ndarray, str]:
    """Held-out inputs with tumour in them when the prepared data is there, else random normal input."""
    try:
        if kind_of(settings.train.model).slices:
            return held_out_slices(settings, count)
        return held_out_crop(settings)
    except (DataError, OSError, KeyError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:200]
        log.warning("export parity on random input (no held-out data: %s)", reason)
        shape = expected_input_shape(settings)
        return (np.random.default_rng(seed).normal(size=(count if len(shape) == 3 else 1, *shape))
                .astype(np.float32), f"random normal (no held-out data: {reason})")


def held_out_slices(settings: Settings, count: int) -> tuple[np.ndarray, str]:
    """The validation slices with the most tumour (test or train slices when there is no validation
    set), with their context slices, read as training reads them."""
    import h5py

    from trainer.data.pipeline import SliceSource
    from trainer.data.regions import RegionSet

    path = prepared_dataset(settings).slices_file(settings.data.image_size)
    check_regular(path, f"{path}: prepared slices")
    with h5py.File(path, "r") as h5:
        split = next((s for s in ("val", "test", "train") if s in h5 and h5[s]["images"].shape[0]), None)
        if split is None:
            raise DataError(f"{path}: no slices")
    source = SliceSource(path, split, settings.data.channels, RegionSet(settings.model.regions),
                         settings.model.context_slices_2d, settings.model.context_stride_2d)
    chosen = np.sort(np.argsort(-source.region_voxels[:, 0], kind="stable")[:count])
    return source.read(chosen)[0], f"{len(chosen)} {split} slice(s) with the most tumour from {path}"


def held_out_crop(settings: Settings) -> tuple[np.ndarray, str]:
    """One crop of the model's input size, centred on the tumour of the first held-out case."""
    data = settings.data
    prepared = prepared_dataset(settings)
    dataset = raw_dataset(settings, prepared)
    case = next((cases[0] for name in ("val", "test", "train")
                 if (cases := split_cases_of(settings, name, dataset, prepared))), None)
    if case is None:
        raise DataError(f"{prepared.manifest_path}: no held-out case found in {dataset.describe()}")
    image, mask, _ = case.load()
    crop = np.asarray(data.crop_size)
    centre = np.argwhere(mask).mean(axis=0).astype(int) if mask is not None and mask.any() \
        else np.asarray(image.shape[:3]) // 2
    padded = np.zeros((*np.maximum(image.shape[:3], crop), image.shape[-1]), dtype=np.float32)
    padded[: image.shape[0], : image.shape[1], : image.shape[2]] = image
    start = np.clip(centre - crop // 2, 0, np.asarray(padded.shape[:3]) - crop)
    window = padded[tuple(slice(s, s + c) for s, c in zip(start, crop))][..., [MODALITIES.index(c) for c in data.channels]]
    return window[None], f"1 crop {list(crop)} centred on the tumour of {case.case_id}"
