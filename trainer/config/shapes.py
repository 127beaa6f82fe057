"""What the model settings make of the network's input, one rule for every reader: the model
(trainer.models.unet) and the memory model that sizes it before it exists (trainer.planning.memory)."""
from __future__ import annotations

from trainer.config.settings import ModelSettings


def context_planes(model: ModelSettings) -> int:
    """Slices the 2D model sees at once: its own and ``context_slices_2d`` on each side (2k + 1)."""
    return 2 * model.context_slices_2d + 1
