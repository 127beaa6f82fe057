"""Model shapes and structure, importable without the CLI."""
import subprocess
import sys

import numpy as np
import pytest

from trainer.config.settings import ModelSettings
from trainer.models import UNet2D, UNet3D


def test_model_module_does_not_import_cli():
    code = ("import sys, trainer.models, trainer.losses, trainer.metrics; "
            "bad = [m for m in ('trainer.cli', 'trainer.config.loader') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("channels", [1, 4])
def test_unet2d_shapes(channels):
    model = UNet2D(ModelSettings(base_filters_2d=8), channels)
    assert model.input_shape == (None, 128, 128, channels)
    assert model.output_shape == (None, 128, 128, 1)
    out = model(np.zeros((2, 128, 128, channels), np.float32)).numpy()
    assert out.shape == (2, 128, 128, 1) and ((out >= 0) & (out <= 1)).all()


def test_unet2d_default_size_and_levels():
    plain = UNet2D(ModelSettings(norm_2d="none"), 4)
    assert plain.count_params() == 7_760_385  # 4 poolings, 32 base filters, transposed decoder
    model = UNet2D(ModelSettings(), 4)  # instance norm: each of the 2,944 conv channels drops its bias, gains gamma and beta
    assert model.count_params() == 7_760_385 - 2_944 + 2 * 2_944
    assert len([l for l in model.layers if "pool" in l.name]) == 4


def test_unet2d_options_change_structure():
    plain = UNet2D(ModelSettings(base_filters_2d=8, upsampling="upsample", norm_2d="batch", dropout=0.0), 4)
    names = [l.name for l in plain.layers]
    assert any("bn" in n for n in names) and not any("dropout" in n for n in names)
    assert not any(type(l).__name__ == "Conv2DTranspose" for l in plain.layers)


@pytest.mark.parametrize("crop", [(64, 64, 64), (32, 48, 64)])
def test_unet3d_shapes(crop):
    model = UNet3D(ModelSettings(base_filters_3d=4, batch_norm_momentum=0.8), 4, crop)
    assert model.output_shape == (None, *crop, 1)
    norms = [l for l in model.layers if type(l).__name__ == "BatchNormalization"]
    assert len(norms) == 2 * (2 * 4 + 1) and {l.momentum for l in norms} == {0.8}  # 2 per block, 9 blocks


def test_unet3d_any_size_divisible_by_16_and_rejects_others():
    model = UNet3D(ModelSettings(base_filters_3d=4), 2)
    assert model(np.zeros((1, 16, 32, 48, 2), np.float32)).shape == (1, 16, 32, 48, 1)
    with pytest.raises(ValueError, match="divisible by 16"):
        UNet3D(ModelSettings(base_filters_3d=4), 2, (60, 64, 64))
