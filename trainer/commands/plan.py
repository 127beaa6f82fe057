"""``unet-train plan``: fingerprint, plan, predicted memory, calibrated speed, projection; JSON + table."""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from trainer.config.kinds import kind_of
from trainer.commands.calibration import predict_speed
from trainer.commands.settings import load_cli_settings, pin_dataset
from trainer.config.settings import Settings
from trainer.config.values import with_values
from trainer.data.datasets import RawDataset
from trainer.data.prepared import raw_source
from trainer.errors import ConfigError, DataError, UserError
from trainer.fsutil import write_json
from trainer.planning import speed
from trainer.planning.fingerprint import fingerprint
from trainer.planning.memory import ModelShape, predict_peak
from trainer.planning.node import probe_node
from trainer.planning.planner import PLAN_FORMAT, make_plan


@dataclass(frozen=True)
class PlanRequest:
    src: Path | None
    out: Path
    model: str | None = None
    nodes: int = 1
    network_gbps: float = 10.0
    calibrate: bool = True
    max_cases: int = 20


def cmd_plan(args: argparse.Namespace) -> int:
    settings = load_cli_settings(args, {"train.run_name": args.run_name, "data.dataset": args.data})
    settings = _planned_dataset(settings, args.src)
    request = PlanRequest(src=args.src, out=args.out or settings.run_path / "plan.json", model=args.model,
                          nodes=args.nodes, network_gbps=args.network_gbps, calibrate=not args.no_calibrate,
                          max_cases=args.max_cases)
    print(run_plan(settings, request, progress=not args.quiet)[1])
    return 0


def _planned_dataset(settings: Settings, src: Path | None) -> Settings:
    """The prepared dataset the plan trains on: --data, else (without --src) the last one prepared
    here. A plan of a raw --src alone names no dataset; train then takes its own --data or default."""
    if settings.data.dataset is not None or src is None:
        try:
            return pin_dataset(settings, check_model_data=False)  # the model is the plan's to choose
        except DataError as exc:
            if settings.data.dataset is not None:
                raise
            raise UserError(f"--src or --data: the dataset to plan for ({exc})") from None
    return settings


def run_plan(settings: Settings, request: PlanRequest, progress: bool = True) -> tuple[dict, str]:
    src = request.src or raw_source(settings)[1]
    dataset = RawDataset.open(src, settings.data.max_voxels)
    data = fingerprint(dataset, request.max_cases, progress)
    node = probe_node(settings.cpu.onednn, settings.cpu.memory_limit_gb)
    plan = make_plan(settings, data, node, request.model)
    planned = apply_plan(settings, plan.settings())
    shape = ModelShape.from_settings(planned, planned.train.precision)
    memory = predict_peak(shape)
    report = {"format": PLAN_FORMAT, "settings": plan.settings(), "source": str(Path(src).absolute()),
              "choices": [c.__dict__ for c in plan.choices], "dataset": data.as_dict(), "node": node.as_dict(),
              "memory": {**memory.as_dict(), "per_rank_budget_mib": plan.budget_mib,
                         "ranks_per_node": plan.ranks_per_node}}
    lines = _table("dataset", data.rows()) + _table("node", node.rows())
    lines += _table("plan", [(c.key, f"{_show(c.value)}  -- {c.reason}") for c in plan.choices])
    lines += [f"predicted peak memory: {memory.total_mib / 1024:.2f} GB per rank ({shape.describe()}), budget "
              f"{plan.budget_mib / 1024:.2f} GB"]
    if request.calibrate:
        measured = predict_speed(planned, src, planned.train.batch_size)
        epoch_steps = _epoch_steps(planned, data)
        per_node = measured["images_per_sec"] * plan.ranks_per_node
        report["speed"] = {**measured, "ranks_per_node": plan.ranks_per_node, "images_per_sec_per_node": per_node,
                           "steps_per_epoch": epoch_steps,
                           "epoch_s": epoch_steps * planned.train.batch_size * plan.ranks_per_node / per_node}
        projections = {mode: [speed.project(measured["step_s"], planned.train.batch_size * plan.ranks_per_node,
                                            measured["params"], n, plan.ranks_per_node, request.network_gbps,
                                            mode).as_dict() for n in _node_counts(request.nodes)]
                       for mode in ("horovod", "ps")}
        report["projection"] = {"network_gbps": request.network_gbps, **projections}
        lines += [f"calibrated: {measured['images_per_sec']:.2f} images/s per rank ({measured['precision']}), "
                  f"{per_node:.2f} per node; epoch of {epoch_steps} steps: {report['speed']['epoch_s'] / 60:.1f} min"]
        lines += _table(f"projection at {request.network_gbps:g} Gb/s (images/s, scaling efficiency)",
                        [(f"{p['nodes']} node(s)", f"horovod {p['images_per_sec']:.1f} ({p['efficiency']:.0%})   "
                                                   f"ps {q['images_per_sec']:.1f} ({q['efficiency']:.0%})")
                         for p, q in zip(projections["horovod"], projections["ps"])])
    if data.warnings:
        lines += ["warnings:"] + [f"  {w}" for w in data.warnings]
    write_json(request.out, report)
    lines.append(f"wrote {request.out}: {planned.train.model.upper()} model, regions "
                 f"{'/'.join(planned.model.regions)}, run {planned.train.run_name}; train with: unet-train train "
                 f"--plan {request.out}")
    return report, "\n".join(lines)


def apply_plan(settings: Settings, values: dict[str, object]) -> Settings:
    try:
        return with_values(settings, values)
    except Exception as exc:  # noqa: BLE001 - pydantic's error, in one line
        raise ConfigError(f"plan: invalid settings ({' '.join(str(exc).split())[:300]})") from None


def _epoch_steps(settings: Settings, data) -> int:
    if settings.train.steps_per_epoch:
        return settings.train.steps_per_epoch
    train_cases = max(1, round(data.cases * (1 - settings.data.split.val_fraction - settings.data.split.test_fraction)))
    samples = train_cases * (int(data.brain_extent["z"][1]) if kind_of(settings.train.model).slices else 1)
    return max(1, math.floor(samples / settings.train.batch_size))


def _node_counts(nodes: int) -> list[int]:
    counts = [1]
    while counts[-1] * 2 < nodes:
        counts.append(counts[-1] * 2)
    return counts + ([nodes] if nodes > 1 else [])


def _show(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _table(title: str, rows: list[tuple[str, str]]) -> list[str]:
    width = max((len(k) for k, _ in rows), default=0)
    return [f"{title}:"] + [f"  {key.ljust(width)}  {value}" for key, value in rows]
