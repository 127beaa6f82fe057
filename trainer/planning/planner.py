"""The plan: every choice from the dataset's and the node's fingerprints, each with its reason.

The rules (docs/planning.md) are few and measured where they can be:

* model: 3D when the tumour core or enhancing tumour is wanted (3D held TC where 2D lost it on
  faint lesions), 2D for the whole tumour alone (as good, several times cheaper);
* precision: bf16 where the CPU has it natively (1.4-1.6x faster, same Dice), fp16 on GPUs;
* ranks: one per NUMA node, its physical cores as intra-op threads (threads inside one memory
  domain; a rank never straddles two);
* 3D crop and batch: nnU-Net's rule, batch 2 and the largest crop, up to the brain's median
  extent, that the memory model fits on the node; 2D: 128 x 128 slices, the largest batch up to
  32 that fits;
* nothing is proposed whose predicted peak exceeds the memory available less the margin.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config.kinds import KINDS
from trainer.config.settings import ModelSettings, Settings
from trainer.errors import UserError
from trainer.fsutil import read_regular_text
from trainer.planning.fingerprint import DatasetFingerprint
from trainer.planning.memory import MARGIN, ModelShape, predict_peak
from trainer.planning.node import NodeFingerprint

CROP_EDGES = (160, 144, 128, 112, 96, 80, 64, 48, 32)
BATCHES_2D = (32, 16, 8, 4, 2, 1)
PLAN_FORMAT = 2  # of the plan file: written by ``unet-train plan``, read by ``train --plan``
# The settings a plan owns: a complete, named training configuration. ``train --plan`` applies
# these and no other (cluster, security and data-size limits are never a plan's to set).
COMMON_KEYS = ("train.run_name", "data.dataset", "train.model", "model.regions", "train.precision",
               "cpu.intra_op_threads", "cpu.inter_op_threads", "train.batch_size", "train.steps_per_epoch")
MODEL_KEYS = {name: kind.plan_keys for name, kind in KINDS.items()}
PLAN_KEYS = COMMON_KEYS + tuple(key for keys in MODEL_KEYS.values() for key in keys)
PLAN_READ_LIMIT = 1 << 20


@dataclass(frozen=True)
class Choice:
    key: str      # the setting, or (for what is no setting) what it is for, e.g. "launch: ranks per node"
    value: object
    reason: str


@dataclass
class Plan:
    choices: list[Choice] = field(default_factory=list)
    memory_mib: float = 0.0
    budget_mib: float = 0.0
    ranks_per_node: int = 1

    def add(self, key: str, value: object, reason: str) -> None:
        self.choices.append(Choice(key, value, reason))

    def settings(self) -> dict[str, object]:
        """The dotted settings ``train --plan`` applies (recommendations for launch and inference
        are shown, not applied)."""
        return {c.key: c.value for c in self.choices if c.key in PLAN_KEYS}


def make_plan(settings: Settings, data: DatasetFingerprint, node: NodeFingerprint, model: str | None = None) -> Plan:
    plan = Plan()
    regions = tuple(settings.model.regions)
    plan.add("train.run_name", settings.train.run_name, "the run this plan trains (runs/<run_name>/; "
                                                        "--run-name on train wins)")
    if settings.data.dataset is not None:
        plan.add("data.dataset", str(settings.data.dataset), "the prepared dataset this plan was made for")
    plan.add("model.regions", list(regions), "asked for (model.regions)" if regions != ("wt",)
             else "the whole tumour (the default; --set model.regions=[wt,tc,et] for the BraTS regions)")
    if model is None:
        model = "3d" if {"tc", "et"} & set(regions) else "2d"
        why = ("tumour core / enhancing tumour wanted: the 3D UNet held TC where 2D, seeing one slice, lost it "
               "(held-out TC 0.75 against 0.71 on the hard phantom, 2D with its thresholds chosen on validation)"
               if model == "3d" else "whole tumour only: 2D is as good and several times cheaper per epoch")
    else:
        why = "asked for (--model)"
    plan.add("train.model", model, why)

    if settings.train.precision != "auto":
        precision, why = settings.train.precision, "asked for (train.precision)"
    elif not KINDS[model].slices and settings.model.base_filters_3d < ModelSettings().base_filters_3d:
        precision, why = "fp32", (f"a 3D model narrower than the default ({settings.model.base_filters_3d} filters) "
                                  f"diverged in bf16 (seen at 2, 4 and 8 filters); bf16 was measured at 16")
    elif node.gpus:
        precision, why = "fp16", f"GPU ({node.gpus[0]['name']}): mixed float16"
    elif node.native_bf16:
        precision, why = "bf16", f"native bf16 ({node.bf16_reason}): 1.4-1.6x faster steps, same Dice"
    else:
        precision, why = "fp32", f"no native bf16 ({node.bf16_reason})"
    plan.add("train.precision", precision, why)

    ranks = max(1, min(node.numa_nodes, node.physical_cores))
    threads = max(1, node.physical_cores // ranks)
    plan.ranks_per_node = ranks
    plan.add("launch: ranks per node", ranks, f"one rank per NUMA node ({node.numa_nodes}), so no rank's "
                                              f"threads straddle two memory domains (distributed "
                                              f"--slots-per-host / --ntasks-per-node)")
    plan.add("cpu.intra_op_threads", threads, f"{node.physical_cores} physical cores / {ranks} rank(s)")
    plan.add("cpu.inter_op_threads", 2, "two independent ops at a time (the UNet's graph is mostly a chain)")

    plan.budget_mib = node.memory_available_gb * 1024 * (1 - MARGIN) / ranks
    base = settings.model_copy(update={"model": settings.model.model_copy(update={"regions": regions})})
    shape_precision = "fp32" if precision == "fp32" else "bf16"
    if not KINDS[model].slices:
        _plan_3d(plan, base, data, shape_precision)
        plan.add("data.val_crops_per_case", 4, "fixed validation crops per case: the logged figure predicts the "
                                               "whole-volume one within 0.02")
        plan.add("inference: predict/evaluate --overlap", 0.5, "sliding-window overlap (nnU-Net's default)")
    else:
        _plan_2d(plan, base, data, shape_precision)
    return plan


def _fits(settings: Settings, kind: str, spatial: tuple[int, ...], batch: int, precision: str,
          budget_mib: float) -> float | None:
    shape = ModelShape(kind, spatial, ModelShape.input_channels(settings, kind), len(settings.model.regions), batch,
                       settings.model, precision)
    peak = predict_peak(shape).total_mib
    return peak if peak <= budget_mib else None


def _plan_3d(plan: Plan, settings: Settings, data: DatasetFingerprint, precision: str) -> None:
    extent = data.median_shape()
    ceiling = max(CROP_EDGES[-1], min(CROP_EDGES[0], 16 * math.ceil(max(extent) / 16)))
    for batch in (2, 1):
        for edge in (e for e in CROP_EDGES if e <= ceiling):
            peak = _fits(settings, "3d", (edge,) * 3, batch, precision, plan.budget_mib)
            if peak is not None:
                plan.memory_mib = peak
                plan.add("data.crop_size", [edge] * 3,
                         f"the largest crop, up to {ceiling} (the brain's largest median extent, "
                         f"{'x'.join(map(str, extent))}, rounded up to a multiple of 16), whose predicted peak "
                         f"{peak / 1024:.1f} GB fits {plan.budget_mib / 1024:.1f} GB")
                plan.add("train.batch_size", batch, "nnU-Net's 3D batch" if batch == 2 else
                         "batch 2 fits no crop of 32^3 or more: batch 1")
                plan.add("model.base_filters_3d", settings.model.base_filters_3d, _width_reason(
                    settings.model.base_filters_3d, ModelSettings().base_filters_3d))
                plan.add("train.steps_per_epoch", 0, "one crop per training case per epoch (tumour-centred "
                                                    f"{settings.data.tumour_crop_fraction:.0%} of them)")
                return
    raise_nothing_fits(plan, "3d")


def _plan_2d(plan: Plan, settings: Settings, data: DatasetFingerprint, precision: str) -> None:
    size = settings.data.image_size
    for batch in BATCHES_2D:
        peak = _fits(settings, "2d", (size, size), batch, precision, plan.budget_mib)
        if peak is not None:
            plan.memory_mib = peak
            plan.add("data.image_size", size, "128 x 128 slices: 3.5x cheaper than 240 x 240; resizing costs "
                                              "about 0.03 Dice at the tumour's boundary")
            plan.add("train.batch_size", batch, f"the largest batch up to 32 whose predicted peak "
                                                f"{peak / 1024:.1f} GB fits {plan.budget_mib / 1024:.1f} GB")
            plan.add("model.base_filters_2d", settings.model.base_filters_2d, _width_reason(
                settings.model.base_filters_2d, ModelSettings().base_filters_2d))
            slices = int(data.brain_extent["z"][1]) * max(1, round(data.cases * 0.7))
            plan.add("train.steps_per_epoch", 0, f"one pass over the training slices (about {slices} brain "
                                                f"slices / global batch)")
            return
    raise_nothing_fits(plan, "2d")


def _width_reason(width: int, default: int) -> str:
    return "the default width" if width == default else f"the width asked for (the default is {default})"


def raise_nothing_fits(plan: Plan, kind: str) -> None:
    raise UserError(f"plan: no {kind.upper()} configuration fits {plan.budget_mib / 1024:.1f} GB per rank (memory "
                    f"available less a {MARGIN:.0%} margin); use a node with more memory")


def plan_source(path: Path) -> Path | None:
    """The raw dataset folder a plan was made from (None for a plan that does not say)."""
    source = json.loads(read_regular_text(Path(path), f"--plan {path}", PLAN_READ_LIMIT)).get("source")
    return Path(source) if isinstance(source, str) and source else None


def load_plan(path: Path) -> dict[str, object]:
    """The settings a plan file sets (``train --plan``), checked: only keys a plan owns, and only
    those of the plan's own model."""
    try:
        data = json.loads(read_regular_text(Path(path), f"--plan {path}", PLAN_READ_LIMIT))
    except FileNotFoundError:
        raise UserError(f"--plan {path}: not found (write one with unet-train plan)") from None
    except ValueError as exc:
        raise UserError(f"--plan {path}: not a plan (invalid JSON: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT or not isinstance(data.get("settings"), dict):
        raise UserError(f"--plan {path}: not a plan of format {PLAN_FORMAT} (expected the JSON unet-train plan "
                        f"writes; make it again with unet-train plan)")
    values = data["settings"]
    foreign = [key for key in values if key not in PLAN_KEYS]
    if foreign:
        raise UserError(f"--plan {path}: {foreign[0]} is not a setting a plan may set (a plan sets only: "
                        f"{', '.join(PLAN_KEYS)})")
    model = values.get("train.model")
    if model not in MODEL_KEYS:
        raise UserError(f"--plan {path}: train.model must be 2d or 3d, got {model!r}")
    other = [key for key in values if key in PLAN_KEYS and key not in COMMON_KEYS + MODEL_KEYS[model]]
    if other:
        raise UserError(f"--plan {path}: {other[0]} is not read by the {model.upper()} model this plan trains")
    return values
