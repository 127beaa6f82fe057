"""Loss and metric values against numbers worked out by hand."""
import math

import numpy as np
import pytest
import tensorflow as tf

from trainer.config.settings import LossSettings
from trainer.models.losses import make_loss, soft_dice
from trainer.models.metrics import case_metrics, hard_dice, hd95, precision, sensitivity, specificity

# One 2x2 sample: truth [[1,1],[0,0]], prediction [[1,0],[1,0]] -> TP=1 FP=1 FN=1 TN=1.
TRUTH = np.array([[[[1.0], [1.0]], [[0.0], [0.0]]]], np.float32)
PRED = np.array([[[[0.9], [0.2]], [[0.8], [0.1]]]], np.float32)


def test_hard_metrics_by_hand():
    assert hard_dice(TRUTH, PRED).numpy() == pytest.approx([2 * 1 / (2 * 1 + 1 + 1)])
    assert sensitivity(TRUTH, PRED).numpy() == pytest.approx([1 / 2])
    assert specificity(TRUTH, PRED).numpy() == pytest.approx([1 / 2])  # TN/(TN+FP)
    assert precision(TRUTH, PRED).numpy() == pytest.approx([1 / 2])


def test_specificity_is_tn_over_tn_plus_fp():
    truth = np.zeros((1, 4, 1, 1), np.float32)
    pred = np.array([[[[0.9]], [[0.1]], [[0.1]], [[0.1]]]], np.float32)  # TN=3, FP=1
    assert specificity(truth, pred).numpy() == pytest.approx([3 / 4])


def test_soft_dice_by_hand():
    # 2*sum(t*p) = 2*(0.9+0.2) = 2.2; sum(t)+sum(p) = 2 + 2.0 = 4.0
    assert soft_dice(TRUTH, PRED, 0.0, 1e-9).numpy() == pytest.approx([2.2 / 4.0], rel=1e-6)
    assert soft_dice(TRUTH, PRED, 1.0, 1.0).numpy() == pytest.approx([3.2 / 5.0], rel=1e-6)


def test_losses_by_hand():
    settings = LossSettings(name="dice", smooth_numerator=1.0, smooth_denominator=1.0)
    dice = 3.2 / 5.0
    assert make_loss(settings)(TRUTH, PRED).numpy() == pytest.approx([1 - dice], rel=1e-6)
    log_loss = make_loss(settings.model_copy(update={"name": "log_dice"}))
    assert log_loss(TRUTH, PRED).numpy() == pytest.approx([-math.log(dice)], rel=1e-6)
    bce = -np.mean([math.log(0.9), math.log(0.2), math.log(1 - 0.8), math.log(1 - 0.1)])
    combined = make_loss(settings.model_copy(update={"name": "bce_dice", "bce_weight": 0.5}))
    assert combined(TRUTH, PRED).numpy() == pytest.approx([0.5 * bce + 1 - dice], rel=1e-4)


def test_loss_is_per_sample_mean():
    """Batch loss = mean of sample losses: what makes N workers x b equal one process x N*b."""
    loss = make_loss(LossSettings(name="dice"))
    both = np.concatenate([TRUTH, 1 - TRUTH]), np.concatenate([PRED, PRED])
    per_sample = loss(*both).numpy()
    assert per_sample.shape == (2,)
    assert per_sample[0] == pytest.approx(loss(TRUTH, PRED).numpy()[0])


def test_empty_truth_and_empty_prediction():
    empty = np.zeros((1, 3, 3, 1), np.float32)
    for metric in (hard_dice, sensitivity, specificity, precision):
        assert metric(empty, empty).numpy() == pytest.approx([1.0]), metric.__name__
    assert soft_dice(empty, empty).numpy() == pytest.approx([1.0])
    # Empty truth but something predicted: Dice 0, precision 0.
    some = empty.copy()
    some[0, 0, 0, 0] = 0.9
    assert hard_dice(empty, some).numpy() == pytest.approx([0.0])
    assert precision(empty, some).numpy() == pytest.approx([0.0])


def test_hd95_by_hand():
    a = np.zeros((20, 20, 20), bool)
    a[5:10, 5:10, 5:10] = True
    b = np.roll(a, 3, axis=0)
    assert hd95(a, a, (1, 1, 1)) == 0.0
    assert hd95(a, b, (1, 1, 1)) == pytest.approx(3.0)
    assert hd95(a, b, (2, 1, 1)) == pytest.approx(6.0)  # spacing along the shifted axis
    assert math.isnan(hd95(a, np.zeros_like(a), (1, 1, 1)))
    assert hd95(np.zeros_like(a), np.zeros_like(a), (1, 1, 1)) == 0.0


def _brute_surface(mask: np.ndarray) -> np.ndarray:
    """Independent face-connected surface: a voxel with a 6-neighbour outside the mask (numpy only)."""
    padded = np.pad(mask, 1)
    interior = np.ones_like(mask)
    for axis in range(mask.ndim):
        for shift in (1, -1):
            interior &= np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1]
    return mask & ~interior


def _brute_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """Independent HD95 (MONAI's convention): brute-force Euclidean distances between the two
    face-connected surfaces in mm, 95th percentile of each direction, the larger one."""
    sa, sb = (np.argwhere(_brute_surface(m)) * np.asarray(spacing, float) for m in (a, b))
    distances = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(axis=-1))
    return float(max(np.percentile(distances.min(axis=1), 95), np.percentile(distances.min(axis=0), 95)))


def _sphere(shape, centre, radius, spacing=(1, 1, 1)) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing)) <= radius ** 2


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 0.8, 2.0)])
def test_hd95_equals_an_independent_implementation_on_offset_spheres(spacing):
    shape = (40, 36, 30)
    a = _sphere(shape, (18, 17, 14), 9.0, spacing)
    b = _sphere(shape, (21, 15, 15), 6.5, spacing) | _sphere(shape, (10, 26, 8), 2.5, spacing)  # + a far blob
    assert hd95(a, b, spacing) == pytest.approx(_brute_hd95(a, b, spacing), abs=1e-6)
    assert hd95(b, a, spacing) == pytest.approx(_brute_hd95(b, a, spacing), abs=1e-6)


def test_surface_is_face_connected_not_fully_connected():
    from trainer.models.metrics import surface

    ball = _sphere((24, 24, 24), (12, 12, 12), 8.0)
    np.testing.assert_array_equal(surface(ball), _brute_surface(ball))
    # The fully connected contour (26-neighbourhood) is much larger: the old, non-standard convention.
    padded = np.pad(ball, 1)
    full_interior = np.ones_like(ball)
    for offset in np.ndindex(3, 3, 3):
        full_interior &= padded[offset[0]:offset[0] + 24, offset[1]:offset[1] + 24, offset[2]:offset[2] + 24]
    assert (ball & ~full_interior).sum() > 1.3 * surface(ball).sum()


def test_case_metrics_volume():
    a = np.zeros((10, 10, 10), np.float32)
    a[2:6, 2:6, 2:6] = 1
    values = case_metrics(a, a * 0.8, 0.5, (1.0, 1.0, 1.0))
    assert values["dice"] == pytest.approx(1.0)
    assert values["hd95"] == 0.0
    assert tf.is_tensor(values["dice"]) is False


def test_summary_counts_undefined_hd95_instead_of_dropping_it_silently():
    from trainer.inference.scores import summary_stats as _stats

    stats = _stats([2.0, float("nan"), 4.0, float("nan")])
    assert stats == {"mean": 3.0, "median": 3.0, "std": 1.0, "min": 2.0, "max": 4.0, "n": 2, "undefined_cases": 2}
    assert _stats([float("nan")]) == {"mean": None, "median": None, "std": None, "min": None, "max": None, "n": 0,
                                      "undefined_cases": 1}
    assert _stats([1.0])["undefined_cases"] == 0


def test_soft_dice_metric_uses_the_loss_smoothing():
    from trainer.models.metrics import keras_metrics

    def logged(**smooth):
        metric = next(m for m in keras_metrics(0.5, **smooth) if m.name == "soft_dice")
        metric.update_state(TRUTH, PRED)
        return float(metric.result())

    assert logged() == pytest.approx(3.2 / 5.0, rel=1e-6)  # default 1/1, as the loss's default
    assert logged(smooth_numerator=0.5, smooth_denominator=2.0) == pytest.approx(2.7 / 6.0, rel=1e-6)
    loss = make_loss(LossSettings(name="dice", smooth_numerator=0.5, smooth_denominator=2.0))
    assert logged(smooth_numerator=0.5, smooth_denominator=2.0) == pytest.approx(1 - float(loss(TRUTH, PRED)[0]))
