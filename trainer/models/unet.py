"""2D and 3D UNets: one encoder-decoder definition, parameterised by dimensionality.

Four pooling levels; each level two (3x3 | 3x3x3) convolutions with ReLU, he_uniform
initialisation; instance (default) or batch normalisation (optional in 2D); spatial dropout on the two
deepest levels; transposed-convolution or upsampling decoder; a 1x1 sigmoid output with one
channel per tumour region (``model.regions``: WT, or WT/TC/ET), kept in float32 so that
mixed precision never changes the output dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

from trainer.config.settings import ModelSettings
from trainer.config.kinds import kind_of
from trainer.config.shapes import context_planes
from trainer.models.batch_norm import VolumeBatchNormalization
from trainer.models.instance_norm import InstanceNormalization

LEVELS = 4  # pooling levels


@dataclass(frozen=True)
class _Ops:
    conv: type
    conv_transpose: type
    pool: type
    upsample: type
    dropout: type
    kernel: tuple[int, ...]


_OPS = {
    2: _Ops(tf.keras.layers.Conv2D, tf.keras.layers.Conv2DTranspose, tf.keras.layers.MaxPool2D,
            tf.keras.layers.UpSampling2D, tf.keras.layers.SpatialDropout2D, (3, 3)),
    3: _Ops(tf.keras.layers.Conv3D, tf.keras.layers.Conv3DTranspose, tf.keras.layers.MaxPool3D,
            tf.keras.layers.UpSampling3D, tf.keras.layers.SpatialDropout3D, (3, 3, 3)),
}


def _norm(kind: str, name: str, bn_momentum: float):
    if kind == "batch":
        return VolumeBatchNormalization(momentum=bn_momentum, name=name)  # Keras' own, trained by oneDNN in 3D
    # Instance norm: per sample and channel over the spatial axes.
    return InstanceNormalization(epsilon=1e-5, name=name)


def _unet(input_shape: tuple[int, ...], base_filters: int, norm: str, dropout: float,
          upsampling: str, name: str, bn_momentum: float = 0.9, outputs: int = 1) -> tf.keras.Model:
    dims = len(input_shape) - 1
    ops = _OPS[dims]
    for edge in input_shape[:-1]:
        if edge is not None and edge % 2 ** LEVELS:
            raise ValueError(f"{name}: every spatial edge must be divisible by {2 ** LEVELS}, got {input_shape}")

    def block(x, filters, prefix, drop):
        for i in (1, 2):
            x = ops.conv(filters, ops.kernel, padding="same", use_bias=norm == "none",
                         kernel_initializer="he_uniform", name=f"{prefix}_conv{i}")(x)
            if norm != "none":
                x = _norm(norm, f"{prefix}_{'bn' if norm == 'batch' else 'in'}{i}", bn_momentum)(x)
            x = tf.keras.layers.Activation("relu", name=f"{prefix}_relu{i}")(x)
        if drop and dropout > 0:
            x = ops.dropout(dropout, name=f"{prefix}_dropout")(x)
        return x

    inputs = tf.keras.Input(shape=input_shape, name="image")
    x = inputs
    skips = []
    for level in range(LEVELS):
        x = block(x, base_filters * 2 ** level, f"enc{level}", drop=level == LEVELS - 1)
        skips.append(x)
        x = ops.pool(name=f"pool{level}")(x)
    x = block(x, base_filters * 2 ** LEVELS, "bottleneck", drop=True)
    for level in reversed(range(LEVELS)):
        filters = base_filters * 2 ** level
        if upsampling == "transposed":
            x = ops.conv_transpose(filters, (2,) * dims, strides=(2,) * dims, padding="same",
                                   kernel_initializer="he_uniform", name=f"up{level}")(x)
        else:
            x = ops.upsample(name=f"up{level}")(x)
        x = tf.keras.layers.Concatenate(name=f"concat{level}")([x, skips[level]])
        x = block(x, filters, f"dec{level}", drop=False)
    probabilities = ops.conv(outputs, (1,) * dims, activation="sigmoid", dtype="float32", name="mask")(x)
    return tf.keras.Model(inputs, probabilities, name=name)


def UNet2D(settings: ModelSettings, channels: int, image_size: int = 128) -> tf.keras.Model:
    """2D UNet for (image_size, image_size, channels) slices -> (.., .., regions) probabilities."""
    return _unet((image_size, image_size, channels), settings.base_filters_2d, settings.norm_2d,
                 settings.dropout, settings.upsampling, "unet2d", settings.batch_norm_momentum,
                 len(settings.regions))


def UNet3D(settings: ModelSettings, channels: int, crop: tuple[int, int, int] | None = None) -> tf.keras.Model:
    """3D UNet (always normalised); ``crop=None`` accepts any size divisible by 16 at run time."""
    spatial = tuple(crop) if crop is not None else (None, None, None)
    return _unet((*spatial, channels), settings.base_filters_3d, settings.norm_3d, settings.dropout,
                 settings.upsampling, "unet3d", settings.batch_norm_momentum, len(settings.regions))


def build_model(kind: str, model: ModelSettings, channels: int, image_size: int,
                crop: tuple[int, int, int] | None) -> tf.keras.Model:
    """The run's model for ``channels`` modalities (the 2D model's context slices multiply them)."""
    if kind_of(kind).slices:
        return UNet2D(model, channels * kind_of(kind).planes(model), image_size)
    return UNet3D(model, channels, crop)


def input_shape(kind: str, model: ModelSettings, channels: int, image_size: int,
                crop: tuple[int, int, int]) -> tuple[int, ...]:
    """The per-sample input a trained model takes: a 2D slice (with its context slices) of
    ``image_size``, or a 3D ``crop``."""
    if kind_of(kind).slices:
        return (image_size, image_size, channels * kind_of(kind).planes(model))
    return (*crop, channels)
