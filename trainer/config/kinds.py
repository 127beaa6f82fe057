"""The model kinds as data: what the 2D (slices) and 3D (crops) UNets read from the settings.

One description per kind, shared by the model builder (trainer.models.unet), the memory model
(trainer.planning.memory), the planner, the predictor (trainer.inference.predictor) and the data
streams; nobody else asks a kind's name. A new kind is one more entry here plus its builder, its
streams and its predictor pass.
"""
from __future__ import annotations

from dataclasses import dataclass

from trainer.config.settings import ModelSettings, Settings
from trainer.config.shapes import context_planes


@dataclass(frozen=True)
class ModelKind:
    name: str                    # train.model
    slices: bool                 # True: trains on prepared 2D slices; False: on crops of whole volumes
    plan_keys: tuple[str, ...]   # the settings a plan chooses for this kind only

    def spatial(self, settings: Settings) -> tuple[int, ...]:
        """The per-sample spatial input: (S, S) slices or the (X, Y, Z) crop."""
        data = settings.data
        return (data.image_size,) * 2 if self.slices else tuple(data.crop_size)

    def planes(self, model: ModelSettings) -> int:
        """Slices of each modality a sample carries: 2k + 1 with context (2D), else 1."""
        return context_planes(model) if self.slices else 1

    def input_channels(self, settings: Settings) -> int:
        return len(settings.data.channels) * self.planes(settings.model)

    def base_filters(self, model: ModelSettings) -> int:
        return getattr(model, f"base_filters_{self.name}")

    def norm(self, model: ModelSettings) -> str:
        return getattr(model, f"norm_{self.name}")

    def describe_size(self, spatial: tuple[int, ...]) -> str:
        return f"{spatial[0]}^2" if self.slices else "x".join(map(str, spatial))

    def mirrorable(self, axes: tuple[int, ...]) -> tuple[int, ...]:
        """The test-time mirror axes that change a pass: a 2D model sees slices one by one, so
        flipping their order (axis 2) would only repeat one."""
        return tuple(a for a in axes if not (self.slices and a == 2))


KINDS: dict[str, ModelKind] = {
    "2d": ModelKind("2d", slices=True, plan_keys=("data.image_size", "model.base_filters_2d")),
    "3d": ModelKind("3d", slices=False, plan_keys=("data.crop_size", "model.base_filters_3d",
                                                   "data.val_crops_per_case")),
}


def kind_of(name: str) -> ModelKind:
    return KINDS[name]
