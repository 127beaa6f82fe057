"""Case-level validation: the figure that picks the best checkpoint ranks it like evaluation does.

Per epoch, every validation case is predicted (its slices in 2D, fixed crops in 3D) and
its true/false positive/negative voxels are pooled per case and region (nnU-Net's
"pseudo Dice"), so ``val_dice`` is the mean over cases of case-level Dice, as ``unet-train
evaluate`` reports on full volumes. The mean of per-slice Dice (where every empty slice
predicted empty scores 1) is still logged, as ``val_slice_dice``: it rises with the share of
tumour-free slices and ranked checkpoints differently from the final evaluation.
"""
from __future__ import annotations

import numpy as np

from trainer.data.streams import Streams
from trainer.models.metrics import count_ratios
from trainer.runtime.contract import Runtime, Stepper



def case_level_logs(counts: np.ndarray, regions: tuple[str, ...]) -> dict[str, float]:
    """Validation figures from per-case, per-region counts (cases, R, 4).

    ``val_dice`` etc.: the mean over cases (and regions) of each case's pooled ratio; with
    several regions also ``val_dice_<region>``.
    """
    ratios = count_ratios(counts)  # each (cases, R)
    logs = {f"val_{name}": float(values.mean()) for name, values in ratios.items()}
    if len(regions) > 1:
        logs.update({f"val_dice_{region}": float(ratios["dice"][:, r].mean()) for r, region in enumerate(regions)})
    return logs


class CaseValidator:
    """Runs one validation pass with the runtime's stepper and pools it across workers."""

    def __init__(self, streams: Streams, stepper: Stepper, runtime: Runtime):
        self.streams, self.stepper, self.runtime = streams, stepper, runtime
        self.cases = len(streams.validation.case_ids)
        self.regions = streams.regions.names

    def run(self) -> dict[str, float]:
        counts = np.zeros((self.cases, len(self.regions), 4), np.float64)
        sums = np.zeros(3, np.float64)  # loss sum, slice-Dice sum, samples
        for images, masks, cases in self.streams.validation_batches():
            loss, sample_counts = self.stepper.evaluate(images, masks)
            cases = cases.numpy()
            real = cases >= 0
            np.add.at(counts, cases[real], sample_counts[real])
            sums += (loss[real].sum(), count_ratios(sample_counts[real])["dice"].mean(axis=-1).sum(), real.sum())
        pooled = self.runtime.sum_over_workers(np.concatenate([counts.ravel(), sums]))
        counts, (loss_sum, slice_dice_sum, samples) = pooled[:counts.size].reshape(counts.shape), pooled[counts.size:]
        logs = {"val_loss": float(loss_sum / samples)}
        logs.update(case_level_logs(counts, self.regions))
        logs["val_slice_dice"] = float(slice_dice_sum / samples)
        return logs
