"""Dataset layouts as registered objects: one module per on-disk layout, one list that knows them.

``detect(root)`` tells a dataset folder's layout by what it holds; ``named(name)`` finds a layout by
the name a manifest or ``--format`` gives. Every layout reads its cases to the same arrays
(trainer.data.layouts.base), so prepare, plan, training, evaluation and predict never ask which
layout they read. Adding a layout: one module here (a ``Layout`` subclass), one line below, its test.
"""
from __future__ import annotations

from trainer.data.layouts.base import InputCase, Layout, RawCase
from trainer.data.layouts.brats import BratsLayout
from trainer.data.layouts.decathlon import DecathlonLayout
from trainer.data.layouts.nnunet import NnUNetLayout
from trainer.data.layouts.base import detect, named, names, register, registered

# First match wins: BraTS case folders, nnU-Net channel files (CASE_0000 ...), then any NIfTI as 4D.
for _layout in (BratsLayout(), NnUNetLayout(), DecathlonLayout()):
    register(_layout)

LAYOUT_NAMES: tuple[str, ...] = names()  # --format's choices

__all__ = ["InputCase", "Layout", "RawCase", "LAYOUT_NAMES", "detect", "named", "names", "register", "registered"]
