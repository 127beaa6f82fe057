"""``unet-train evaluate-folder PRED GT``: any folder of label maps scored with evaluate's metrics.

Figures are checked against Dice computed by hand and against evaluate's own per-case function
and summary on the same predictions (a stub model: nothing is trained); BraTS and Decathlon
labels give the same figures; every bad input is one line and exit 2, with nothing written.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from support.data import run_cli
from trainer.data.nifti import read_volume, write_volume
from trainer.data.regions import BRATS, DECATHLON, REGION_LABELS, REGION_NAMES, RegionSet
from trainer.inference.score_folder import find_predictions, find_references

METRIC_COLUMNS = [f"{name}_{region}" for region in REGION_NAMES
                  for name in ("dice", "hd95", "sensitivity", "specificity", "precision")]


def perturb(canonical: np.ndarray, k: int) -> np.ndarray:
    """A different, label-valid prediction per case: shifted, ET dropped, perfect, or eroded."""
    if k % 4 == 0:
        return np.roll(canonical, 2, axis=0)
    if k % 4 == 1:
        out = np.roll(canonical, -1, axis=1)
        out[out == 3] = 2  # no enhancing tumour predicted: ET Dice 0, its HD95 undefined
        return out
    if k % 4 == 2:
        return canonical.copy()
    out = canonical.copy()
    out[:, :, ::3] = 0
    return out


def hand_dice(truth: np.ndarray, prediction: np.ndarray) -> float:
    total = int(truth.sum()) + int(prediction.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(truth, prediction).sum()) / total


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


def same(a: str | float, b: str | float) -> bool:
    a, b = float(a), float(b)
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12)


@pytest.fixture(scope="module")
def folders(brats_dataset, tmp_path_factory) -> dict[str, Path]:
    """The BraTS references as they are (HGG/LGG case folders) with BraTS-labelled predictions under
    evaluate's and predict's names, and the same cases flat in Decathlon labels (labelsTr style)."""
    root = tmp_path_factory.mktemp("evaluate-folder")
    brats_pred, dec_gt, dec_pred = root / "brats-pred", root / "dec-gt", root / "dec-pred"
    names = ("{}_pred", "{}_mask", "{}_labels", "{}")
    segs = sorted(brats_dataset.rglob("*_seg.nii.gz"))
    assert len(segs) >= 4
    for k, seg in enumerate(segs):
        case = seg.name[:-len("_seg.nii.gz")]
        volume = read_volume(seg)
        canonical = BRATS.canonical(volume.array)
        prediction = perturb(canonical, k)
        write_volume(brats_pred / f"{names[k % 4].format(case)}.nii.gz", BRATS.source(prediction), volume.geometry)
        write_volume(dec_gt / f"{case}.nii.gz", DECATHLON.source(canonical), volume.geometry)
        write_volume(dec_pred / f"{case}.nii.gz", DECATHLON.source(prediction), volume.geometry)
    return {"root": root, "brats_gt": brats_dataset, "brats_pred": brats_pred, "dec_gt": dec_gt, "dec_pred": dec_pred}


def test_figures_equal_hand_dice_and_evaluate_per_case_function(folders):
    from trainer.inference.evaluate import case_row  # what evaluate scores each case with
    from trainer.inference.score_folder import score_folder

    out = folders["root"] / "out-brats"
    summary = score_folder(folders["brats_pred"], folders["brats_gt"], out=out)
    assert summary["labels"] == "brats" and "label 4" in summary["labels_how"]
    assert summary["regions"] == list(REGION_NAMES) and summary["cases"] == len(find_references(folders["brats_gt"]))
    rows = read_rows(out / "per_case.csv")
    regions = RegionSet(REGION_NAMES)
    for case, row in rows.items():
        reference = read_volume(next(folders["brats_gt"].rglob(f"{case}_seg.nii.gz")))
        prediction = read_volume(folders["brats_pred"] / row["prediction"])
        truth_labels, predicted_labels = BRATS.canonical(reference.array), BRATS.canonical(prediction.array)
        for region in REGION_NAMES:
            labels = sorted(REGION_LABELS[region])
            expected = hand_dice(np.isin(truth_labels, labels), np.isin(predicted_labels, labels))
            assert float(row[f"dice_{region}"]) == pytest.approx(expected, abs=1e-6), (case, region)
        evaluated = case_row(regions, regions.masks(truth_labels), regions.masks(predicted_labels),
                             regions.masks(predicted_labels), reference.geometry.spacing)
        for column in ("dice", "hd95", "sensitivity", "specificity", "precision", *METRIC_COLUMNS):
            assert same(row[column], evaluated[column]), (case, column, row[column], evaluated[column])
    assert {float(row["dice_et"]) for row in rows.values()} >= {0.0, 1.0}  # ET dropped, and a perfect case
    assert any(row["hd95_et"] == "nan" for row in rows.values())
    assert summary["hd95_et"]["undefined_cases"] >= 1
    assert summary["dice"]["mean"] == pytest.approx(np.mean([float(row["dice"]) for row in rows.values()]))
    assert json.loads((out / "summary.json").read_text())["dice_tc"] == summary["dice_tc"]


def test_brats_and_decathlon_labels_give_the_same_figures(folders):
    from trainer.inference.score_folder import score_folder

    brats = score_folder(folders["brats_pred"], folders["brats_gt"], out=folders["root"] / "same-brats")
    decathlon = score_folder(folders["dec_pred"], folders["dec_gt"], out=folders["root"] / "same-dec")
    assert (brats["labels"], decathlon["labels"]) == ("brats", "decathlon")
    assert decathlon["labels_how"].startswith("auto")
    a = read_rows(folders["root"] / "same-brats" / "per_case.csv")
    b = read_rows(folders["root"] / "same-dec" / "per_case.csv")
    assert sorted(a) == sorted(b)
    for case in a:
        for column in METRIC_COLUMNS:
            assert same(a[case][column], b[case][column]), (case, column)
    from trainer.errors import DataError

    with pytest.raises(DataError, match=r"label value\(s\) \[3\] outside the brats labels .*--labels brats"):
        score_folder(folders["dec_pred"], folders["dec_gt"], out=folders["root"] / "same-wrong", labels="brats")
    assert not (folders["root"] / "same-wrong").exists()


def test_binary_masks_score_the_whole_tumour_only(folders):
    from trainer.inference.score_folder import score_folder

    binary = folders["root"] / "binary"
    for path in sorted(folders["dec_pred"].iterdir()):
        volume = read_volume(path)
        write_volume(binary / path.name.replace(".nii.gz", "_mask.nii.gz"), (volume.array > 0).astype(np.uint8),
                     volume.geometry)
    out = folders["root"] / "out-binary"
    summary = score_folder(binary, folders["dec_gt"], out=out)
    assert summary["regions"] == ["wt"] and "binary" in summary["regions_how"]
    rows = read_rows(out / "per_case.csv")
    assert "dice_wt" not in next(iter(rows.values()))  # one region: evaluate's columns, dice, hd95 ...
    for case, row in rows.items():
        truth = read_volume(folders["dec_gt"] / f"{case}.nii.gz").array > 0
        predicted = read_volume(binary / f"{case}_mask.nii.gz").array > 0
        assert float(row["dice"]) == pytest.approx(hand_dice(truth, predicted), abs=1e-6)
    tc = score_folder(binary, folders["dec_gt"], out=folders["root"] / "out-binary-tc", regions=("tc",))
    assert tc["regions"] == ["tc"] and tc["regions_how"] == "--regions"


def test_evaluate_folder_matches_evaluate_on_the_same_predictions(decathlon_dataset, tmp_path, monkeypatch):
    """evaluate with a stub region model (nothing trained) writes CASE_pred.nii.gz and its figures;
    evaluate-folder on that folder against the dataset's labels gives the same figures."""
    from types import SimpleNamespace

    from support.data import write_prepared
    from trainer.config.settings import DataSettings, ModelSettings, Settings, TrainSettings
    from trainer.inference import evaluate as evaluation
    from trainer.inference.score_folder import score_folder

    references = find_references(decathlon_dataset / "labelsTr")
    ids = sorted(references)
    regions = RegionSet(REGION_NAMES)
    # nested masks, as a label map can hold them; case 1 predicts nothing (every HD95 undefined)
    outputs = [np.zeros((*read_volume(references[case]).array.shape, 3), np.float32) if k == 1 else
               regions.masks(perturb(read_volume(references[case]).array, k)).astype(np.float32)
               for k, case in enumerate(ids)]
    stub = SimpleNamespace(predict_channels=lambda image: outputs.pop(0), mirrored_axes=lambda: (),
                           engine=SimpleNamespace(name="stub", precision="fp32", source="stub"))
    monkeypatch.setattr(evaluation, "Predictor", SimpleNamespace(from_run=lambda settings, **o: (stub, "stub")))
    settings = Settings(data=DataSettings(dataset=write_prepared(decathlon_dataset, tmp_path / "data", {"test": ids})),
                        model=ModelSettings(regions=REGION_NAMES),
                        train=TrainSettings(model="3d", run_dir=tmp_path, run_name="stub"))
    evaluated = evaluation.evaluate(settings, "test", progress=False)
    predictions = tmp_path / "stub" / "evaluation" / "predictions"
    assert sorted(p.name for p in predictions.iterdir()) == [f"{case}_pred.nii.gz" for case in ids]

    scored = score_folder(predictions, decathlon_dataset, out=tmp_path / "folder")
    assert scored["cases"] == evaluated["cases"] == len(ids)
    assert scored["references"] == str(decathlon_dataset / "labelsTr")  # a dataset folder: its labelsTr
    for column in ("dice", "hd95", "sensitivity", "specificity", "precision", *METRIC_COLUMNS):
        assert scored[column] == evaluated[column], column
    a = read_rows(tmp_path / "stub" / "evaluation" / "per_case.csv")
    b = read_rows(tmp_path / "folder" / "per_case.csv")
    for case in ids:
        for column in METRIC_COLUMNS:
            assert same(a[case][column], b[case][column]), (case, column)
    assert scored["hd95"]["undefined_cases"] == 1


def test_file_names_match_evaluate_predict_and_brats(tmp_path):
    gt = tmp_path / "gt"
    for relative in ("A.nii.gz", "B_seg.nii.gz", "HGG/C/C_seg.nii.gz", "HGG/C/C_flair.nii.gz", "D_mask.nii.gz",
                     "._E.nii.gz", "notes.txt"):
        (gt / relative).parent.mkdir(parents=True, exist_ok=True)
        (gt / relative).write_bytes(b"")
    assert {k: str(v.relative_to(gt)) for k, v in find_references(gt).items()} == {
        "A": "A.nii.gz", "B": "B_seg.nii.gz", "C": "HGG/C/C_seg.nii.gz", "D_mask": "D_mask.nii.gz"}
    pred = tmp_path / "pred"
    pred.mkdir()
    for name in ("A_pred.nii.gz", "B_labels.nii.gz", "C_mask.nii", "D_mask.nii.gz", "X_pred.nii.gz",
                 "A_overlay.png", "B.npz"):
        (pred / name).write_bytes(b"")
    found = find_predictions(pred, set(find_references(gt)))
    assert {k: v.name for k, v in found.items()} == {"A": "A_pred.nii.gz", "B": "B_labels.nii.gz", "C": "C_mask.nii",
                                                     "D_mask": "D_mask.nii.gz", "X": "X_pred.nii.gz"}
    (pred / "A.nii.gz").write_bytes(b"")
    from trainer.errors import DataError
    with pytest.raises(DataError, match="two predictions for case A"):
        find_predictions(pred, {"A"})


# ---------------------------------------------------------------- bad input: one line, exit 2

def _flat_pair(folders, tmp_path) -> tuple[Path, Path]:
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    shutil.copytree(folders["dec_gt"], gt)
    shutil.copytree(folders["dec_pred"], pred)
    return pred, gt


def _missing(pred, gt, tmp_path):
    first = sorted(pred.iterdir())[0]
    first.unlink()
    return [pred, gt], [first.name[:-len(".nii.gz")], "without a prediction", "--allow-missing"]


def _extra(pred, gt, tmp_path):
    shutil.copy(sorted(pred.iterdir())[0], pred / "NOT_A_CASE_pred.nii.gz")
    return [pred, gt], ["NOT_A_CASE", "without a reference", "--allow-missing"]


def _shape(pred, gt, tmp_path):
    path = sorted(pred.iterdir())[1]
    volume = read_volume(path)
    write_volume(path, volume.array[:-4], volume.geometry)
    x, y, z = volume.array.shape
    return [pred, gt], [path.name[:-len(".nii.gz")], f"{x - 4} x {y} x {z}", f"{x} x {y} x {z}"]


def _fifo(pred, gt, tmp_path):
    path = sorted(pred.iterdir())[0]
    path.unlink()
    os.mkfifo(path)
    return [pred, gt], [path.name, "FIFO"]


def _out_inside_gt(pred, gt, tmp_path):
    return [pred, gt, "-o", gt / "evaluation"], ["lies inside the input folder", str(gt)]


def _default_out_inside_gt(pred, gt, tmp_path):
    inner = gt.parent / "gt" / "preds"
    shutil.move(str(pred), str(inner))
    return [inner, gt], ["-o (default)", "lies inside the input folder"]


def _wrong_labels(pred, gt, tmp_path):
    path = sorted(pred.iterdir())[0]
    volume = read_volume(path)
    labels = volume.array.copy()
    labels[0, 0, 0] = 4
    write_volume(path, labels, volume.geometry)
    return [pred, gt], [path.name, "[4]", "decathlon labels", "--labels"]


def _bad_regions(pred, gt, tmp_path):
    return [pred, gt, "--regions", "wt,xx"], ["--regions wt,xx", "wt, tc, et"]


@pytest.mark.parametrize("breakage", [_missing, _extra, _shape, _fifo, _out_inside_gt, _default_out_inside_gt,
                                      _wrong_labels, _bad_regions], ids=lambda f: f.__name__.strip("_"))
def test_bad_input_is_one_line_and_exit_2(folders, tmp_path, breakage):
    pred, gt = _flat_pair(folders, tmp_path)
    args, expected = breakage(pred, gt, tmp_path)
    before = sorted(p for p in tmp_path.rglob("*"))
    result = run_cli("evaluate-folder", *args, "--quiet", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if " INFO " not in line and " WARNING " not in line]
    assert len(errors) == 1 and errors[0].startswith("unet-train evaluate-folder: error: "), result.stderr
    for text in expected:
        assert text in errors[0], (text, errors[0])
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written


def test_allow_missing_scores_the_intersection_and_says_where(folders, tmp_path):
    pred, gt = _flat_pair(folders, tmp_path)
    sorted(pred.iterdir())[0].unlink()
    cases = len(list(gt.iterdir()))
    result = run_cli("evaluate-folder", pred, gt, "--allow-missing", "--quiet", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "evaluation-pred"  # the default: beside PRED
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == cases - 1
    assert summary["unmatched"] == {"predictions_without_reference": 0, "references_without_prediction": 1}
    last = result.stdout.strip().splitlines()[-1]
    assert str(out / "per_case.csv") in last and str(out / "summary.json") in last and "1 unmatched" in last
    assert len(read_rows(out / "per_case.csv")) == cases - 1
