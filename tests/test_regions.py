"""BraTS regions (WT, TC, ET): label conventions, nesting, post-processing decided on validation,
and a real region model through train, evaluate, predict and export."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from support.data import run_cli
from trainer.errors import TrainingError
from trainer.inference import postprocess
from trainer.data.regions import BRATS, DECATHLON, RegionSet

pytestmark = pytest.mark.slow  # trains models or starts processes: not in scripts/test.sh --fast

TINY = ["--set", "model.base_filters_2d=4", "--set", "train.batch_size=4", "--set", "train.steps_per_epoch=3",
        "--set", "model.regions=[wt,tc,et]", "--quiet"]


# ---------------------------------------------------------------- labels and nesting

def test_brats_labels_round_trip_through_the_canonical_convention():
    brats = np.array([0, 1, 2, 4, 4, 2, 0], np.uint8)
    canonical = BRATS.canonical(brats)
    assert canonical.tolist() == [0, 2, 1, 3, 3, 1, 0]  # necrotic core -> 2, oedema -> 1, enhancing -> 3
    assert BRATS.source(canonical).tolist() == brats.tolist()
    assert DECATHLON.source(DECATHLON.canonical(np.array([0, 1, 2, 3]))).tolist() == [0, 1, 2, 3]


def test_region_masks_are_the_brats_definitions():
    masks = RegionSet(("wt", "tc", "et")).masks(BRATS.canonical(np.array([0, 1, 2, 4], np.uint8)))
    # BraTS: WT = {1, 2, 4}, TC = {1, 4}, ET = {4}
    assert masks.tolist() == [[0, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1]]


def test_label_maps_are_nested_even_when_predictions_are_not():
    regions = RegionSet(("wt", "tc", "et"))
    predicted = np.array([[1, 1, 1], [0, 1, 1], [1, 0, 1], [0, 0, 1], [1, 0, 0]], bool)  # ET outside TC/WT
    labels = regions.label_map(predicted)
    assert labels.tolist() == [3, 0, 1, 0, 1]
    back = regions.masks(labels)
    assert np.all(back[:, 2] <= back[:, 1]) and np.all(back[:, 1] <= back[:, 0])
    assert regions.file_labels(predicted, BRATS).tolist() == [4, 0, 2, 0, 2]
    assert RegionSet(("wt",)).file_labels(predicted[:, :1], BRATS).tolist() == [1, 0, 1, 0, 1]  # binary


# ---------------------------------------------------------------- post-processing

def _blob(shape, corner, size):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(c, c + size) for c in corner)] = True
    return mask


def test_post_processing_is_chosen_only_where_validation_dice_rises():
    shape, spacing = (32, 32, 32), (1.0, 1.0, 1.0)
    truth = _blob(shape, (8, 8, 8), 10)
    with_false_blob = truth | _blob(shape, (25, 25, 25), 4)           # a distant false positive
    two_true_parts = truth | _blob(shape, (24, 2, 2), 6)              # the truth itself has two parts
    cases_helped = [postprocess.score_case(truth[..., None], with_false_blob[..., None], spacing, ["wt"])]
    cases_hurt = [postprocess.score_case(two_true_parts[..., None], two_true_parts[..., None], spacing, ["wt"])]
    helped, = postprocess.decide(cases_helped, ["wt"])
    hurt, = postprocess.decide(cases_hurt, ["wt"])
    assert helped.action in ("largest", "min_mm3:100") and helped.val_dice_after == pytest.approx(1.0)
    assert helped.val_dice_before < 1.0
    assert hurt.action == "none" and hurt.val_dice_after == hurt.val_dice_before == pytest.approx(1.0)
    cleaned = postprocess.apply_decisions(with_false_blob[..., None], ["wt"], {"wt": helped_rule(helped)}, spacing, 0.5)
    assert np.array_equal(cleaned[..., 0], truth)


def helped_rule(decision):
    return postprocess.Rule(decision.threshold, decision.action)


def test_a_region_threshold_is_raised_only_where_validation_dice_rises():
    """A model that hedges (probability 0.65) over tissue a slice cannot tell apart: a higher threshold
    removes the false part only if validation shows it false; a true part at 0.65 keeps 0.5."""
    shape, spacing = (24, 24, 24), (1.0, 1.0, 1.0)
    truth = _blob(shape, (4, 4, 4), 8)
    hedged = _blob(shape, (4, 4, 12), 8)  # touches the truth: no component action can remove it
    probabilities = np.where(truth, 0.95, 0.0) + np.where(hedged, 0.65, 0.0)
    thresholds = postprocess.candidate_thresholds(0.5, True)
    assert 0.5 in thresholds and len(thresholds) > 1
    assert postprocess.candidate_thresholds(0.45, False) == (0.45,)
    false_hedge = postprocess.score_case(truth[..., None], probabilities[..., None], spacing, ["tc"], thresholds)
    decided, = postprocess.decide([false_hedge], ["tc"], 0.5)
    assert 0.65 <= decided.threshold < 0.95 and decided.val_dice_after == pytest.approx(1.0)
    assert decided.val_dice_before == pytest.approx(2 / 3)
    masks = postprocess.apply_decisions(probabilities[..., None], ["tc"], {"tc": helped_rule(decided)}, spacing, 0.5)
    assert np.array_equal(masks[..., 0], truth)
    true_hedge = postprocess.score_case((truth | hedged)[..., None], probabilities[..., None], spacing, ["tc"],
                                        thresholds)
    kept, = postprocess.decide([true_hedge], ["tc"], 0.5)
    assert (kept.threshold, kept.action) == (0.5, "none")  # ties keep the default
    # a region without a stored rule: the default threshold, no action
    assert np.array_equal(postprocess.apply_decisions(probabilities[..., None], ["tc"], {}, spacing, 0.5)[..., 0],
                          truth | hedged)


def test_a_small_false_enhancing_tumour_is_dropped_only_when_validation_has_such_a_case():
    """BraTS's ET rule: a case without ET scores 0 for any predicted ET, 1 for none."""
    shape, spacing = (40, 40, 40), (1.0, 1.0, 1.0)
    empty = np.zeros(shape, bool)
    false_et = _blob(shape, (4, 4, 4), 7) | _blob(shape, (20, 20, 20), 6)   # 343 + 216 voxels, two parts
    true_et = _blob(shape, (10, 10, 10), 9)                 # a small real ET, 729 mm^3 in one part
    low_grade = postprocess.score_case(empty[..., None], false_et[..., None], spacing, ["et"])
    high_grade = postprocess.score_case(true_et[..., None], true_et[..., None], spacing, ["et"])
    rule = postprocess.Rule
    assert low_grade["et"][rule(0.5, "min_mm3:100")] == 0.0 and low_grade["et"][rule(0.5, "drop_below_mm3:500")] == 0.0
    smaller_false_et = _blob(shape, (4, 4, 4), 7) | _blob(shape, (20, 20, 20), 5)   # 468 mm^3 in all
    low_grade = postprocess.score_case(empty[..., None], smaller_false_et[..., None], spacing, ["et"])
    assert low_grade["et"][rule(0.5, "min_mm3:100")] == 0.0 and low_grade["et"][rule(0.5, "drop_below_mm3:500")] == 1.0
    chosen, = postprocess.decide([low_grade, high_grade], ["et"])
    assert chosen.action == "drop_below_mm3:500"  # min_mm3:1000 would also remove the real 729 mm^3 ET
    assert (chosen.val_dice_before, chosen.val_dice_after) == (0.5, 1.0)
    assert postprocess.decide([high_grade], ["et"])[0].action == "none"  # no such case: no action
    assert np.array_equal(postprocess.apply_action(true_et, "drop_below_mm3:500", spacing), true_et)
    assert not postprocess.apply_action(true_et, "drop_below_mm3:1000", spacing).any()


MIRRORED = postprocess.procedure(0.5, (1, 0))


def test_a_stored_decision_with_an_unknown_action_is_refused_by_name(tmp_path):
    postprocess.save(tmp_path, "ckpt-1", [postprocess.RegionDecision("et", "drop_below_mm3:abc", 0.5, 0.5, 1.0, 3)],
                     MIRRORED)
    with pytest.raises(TrainingError, match=r"postprocessing\.json: unknown post-processing action.*drop_below_mm3:abc"):
        postprocess.load(tmp_path, "ckpt-1", MIRRORED)


def test_a_stored_threshold_outside_the_candidates_is_refused_by_name(tmp_path):
    postprocess.save(tmp_path, "ckpt-1", [postprocess.RegionDecision("tc", "none", 0.05, 0.5, 1.0, 3)], MIRRORED)
    with pytest.raises(TrainingError, match=r"postprocessing\.json: threshold\(s\) 0\.05 outside the candidates"):
        postprocess.load(tmp_path, "ckpt-1", MIRRORED)


def test_the_decision_is_stored_for_its_checkpoint_and_inference_procedure(tmp_path):
    tuned = postprocess.procedure(0.5, (1, 0), tune_thresholds=True)
    decisions = [postprocess.RegionDecision("wt", "largest", 0.7, 0.8, 0.9, 3)]
    postprocess.save(tmp_path, "ckpt-1", decisions, tuned)
    assert MIRRORED == {"threshold": 0.5, "mirror_axes": [0, 1], "thresholds": [0.5]}
    assert postprocess.load(tmp_path, "ckpt-1", tuned) == {"wt": postprocess.Rule(0.7, "largest")}
    assert postprocess.load(tmp_path, "ckpt-2", tuned) is None  # another checkpoint: decide again
    # masks made another way (no mirroring, another threshold, no tuning) were not what validation judged
    assert postprocess.load(tmp_path, "ckpt-1", postprocess.procedure(0.5, (), True)) is None
    assert postprocess.load(tmp_path, "ckpt-1", postprocess.procedure(0.4, (0, 1), True)) is None
    assert postprocess.load(tmp_path, "ckpt-1", MIRRORED) is None
    legacy = json.loads((tmp_path / postprocess.FILE_NAME).read_text())
    del legacy["inference"]  # written before mirroring existed
    (tmp_path / postprocess.FILE_NAME).write_text(json.dumps(legacy))
    assert postprocess.load(tmp_path, "ckpt-1", tuned) is None


# ---------------------------------------------------------------- a real region model, end to end

@pytest.fixture(scope="module")
def trained_regions(prepared_brats, brats_dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("regions")
    flags = ["--model", "2d", "--run-dir", work / "runs", "--run-name", "r", *TINY,
             "--set", f"data.dataset={prepared_brats}", "--set", f"data.source={brats_dataset}"]
    result = run_cli("train", "--epochs", "2", *flags, cwd=work, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "runs" / "r", flags, work


def test_region_training_logs_each_region(trained_regions):
    run, _, _ = trained_regions
    history = json.loads((run / "history.json").read_text())["epochs"]
    assert {"val_dice_wt", "val_dice_tc", "val_dice_et", "val_dice"} <= set(history[-1])


def test_evaluate_reports_every_region_and_writes_brats_labels(trained_regions, brats_dataset):
    run, flags, work = trained_regions
    result = run_cli("evaluate", *flags, "--engine", "tf", cwd=work, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    header = (run / "evaluation" / "per_case.csv").read_text().splitlines()[0].split(",")
    for region in ("wt", "tc", "et"):
        assert {f"dice_{region}", f"hd95_{region}", f"dice_raw_{region}", f"hd95_raw_{region}"} <= set(header)
    summary = json.loads((run / "evaluation" / "summary.json").read_text())
    assert summary["regions"] == ["wt", "tc", "et"] and set(summary["postprocessing"]) == {"wt", "tc", "et"}
    stored = json.loads((run / "postprocessing.json").read_text())
    assert stored["checkpoint"] == summary["checkpoint"] and stored["split"] == "val"
    for prediction in (run / "evaluation" / "predictions").glob("*_pred.nii.gz"):
        case_id = prediction.name[: -len("_pred.nii.gz")]
        written = sitk.ReadImage(str(prediction))  # an independent reader
        source = sitk.ReadImage(str(next(brats_dataset.rglob(f"{case_id}_seg.nii.gz"))))
        assert written.GetSize() == source.GetSize() and written.GetOrigin() == source.GetOrigin()
        assert written.GetDirection() == source.GetDirection() and written.GetSpacing() == source.GetSpacing()
        assert set(np.unique(sitk.GetArrayFromImage(written)).tolist()) <= {0, 1, 2, 4}  # BraTS, no label 3


def test_predict_writes_each_inputs_own_label_convention(trained_regions, brats_dataset, decathlon_dataset,
                                                          tmp_path):
    run, flags, work = trained_regions
    case = next(p.parent for p in brats_dataset.rglob("*_seg.nii.gz"))
    volume = decathlon_dataset / "imagesTr" / "BRATS_001.nii.gz"
    out = tmp_path / "predicted"
    result = run_cli("predict", *flags, "--engine", "tf", case, volume, "--out", out, cwd=work, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    brats = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case.name}_labels.nii.gz")))
    decathlon = sitk.ReadImage(str(out / "BRATS_001_labels.nii.gz"))
    assert set(np.unique(brats).tolist()) <= {0, 1, 2, 4}
    assert set(np.unique(sitk.GetArrayFromImage(decathlon)).tolist()) <= {0, 1, 2, 3}
    assert decathlon.GetSize() == sitk.ReadImage(str(volume)).GetSize()[:3]
    assert (out / f"{case.name}_overlay.png").stat().st_size > 0


def test_export_has_one_output_per_region(trained_regions):
    import tensorflow as tf

    run, flags, work = trained_regions
    result = run_cli("export", *flags, cwd=work, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    served = tf.saved_model.load(str(run / "export" / "saved_model")).signatures["serving_default"]
    outputs = served(tf.constant(np.zeros((1, 128, 128, 4), np.float32)))
    assert sorted(outputs) == ["et", "tc", "wt"] and all(v.shape == (1, 128, 128, 1) for v in outputs.values())
