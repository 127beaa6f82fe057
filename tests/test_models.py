"""Model shapes and structure, importable without the CLI."""
import subprocess
import sys

import numpy as np
import pytest

from support.norm_layers import forward_and_gradients
from trainer.config.settings import ModelSettings
from trainer.models import UNet2D, UNet3D


def test_model_module_does_not_import_cli():
    code = ("import sys, trainer.models, trainer.models.losses, trainer.models.metrics; "
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
    import tensorflow as tf

    from trainer.models.batch_norm import VolumeBatchNormalization

    model = UNet3D(ModelSettings(base_filters_3d=4, batch_norm_momentum=0.8), 4, crop)
    assert model.output_shape == (None, *crop, 1)
    norms = [l for l in model.layers if isinstance(l, tf.keras.layers.BatchNormalization)]
    assert len(norms) == 2 * (2 * 4 + 1) and {l.momentum for l in norms} == {0.8}  # 2 per block, 9 blocks
    assert all(isinstance(l, VolumeBatchNormalization) for l in norms)


def test_unet3d_any_size_divisible_by_16_and_rejects_others():
    model = UNet3D(ModelSettings(base_filters_3d=4), 2)
    assert model(np.zeros((1, 16, 32, 48, 2), np.float32)).shape == (1, 16, 32, 48, 1)
    with pytest.raises(ValueError, match="divisible by 16"):
        UNet3D(ModelSettings(base_filters_3d=4), 2, (60, 64, 64))


@pytest.mark.parametrize("shape", [(3, 16, 12, 5), (2, 8, 6, 4, 3)])
def test_instance_norm_equals_keras_group_norm_with_a_group_per_channel(shape):
    """Same maths as GroupNormalization(groups=-1), per sample and channel over the spatial axes."""
    import tensorflow as tf

    from trainer.models.instance_norm import InstanceNormalization

    rng = np.random.default_rng(0)
    x = (rng.normal(size=shape) * rng.uniform(0.5, 4, size=shape[-1]) + rng.normal(size=shape[-1]) * 3)
    x = x.astype(np.float32)
    ours, keras = InstanceNormalization(epsilon=1e-5), tf.keras.layers.GroupNormalization(groups=-1, epsilon=1e-5)
    ours.build(shape), keras.build(shape)
    gamma, beta = rng.normal(size=shape[-1]).astype(np.float32), rng.normal(size=shape[-1]).astype(np.float32)
    for layer in (ours, keras):
        layer.gamma.assign(gamma), layer.beta.assign(beta)
    expected = keras(x).numpy()
    assert np.abs(ours(x).numpy() - expected).max() < 1e-4
    normalised = InstanceNormalization()(x).numpy()  # gamma 1, beta 0: zero mean, unit variance
    axes = tuple(range(1, len(shape) - 1))
    assert np.abs(normalised.mean(axis=axes)).max() < 1e-5 and np.abs(normalised.std(axis=axes) - 1).max() < 1e-3


def test_a_checkpoint_of_the_keras_group_norm_model_restores_into_the_instance_norm_model(tmp_path):
    """Runs trained before the layer was rewritten keep working: same variable names and shapes."""
    import tensorflow as tf

    from trainer.models.instance_norm import InstanceNormalization

    def model(norm):
        inputs = tf.keras.Input((16, 16, 2))
        x = tf.keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
        return tf.keras.Model(inputs, norm(epsilon=1e-5, name="enc0_in1")(x))

    old = model(lambda **kw: tf.keras.layers.GroupNormalization(groups=-1, **kw))
    old.get_layer("enc0_in1").gamma.assign(np.linspace(0.5, 2, 4, dtype=np.float32))
    old.get_layer("enc0_in1").beta.assign(np.linspace(-1, 1, 4, dtype=np.float32))
    path = tf.train.Checkpoint(model=old).save(str(tmp_path / "ckpt"))
    new = model(InstanceNormalization)
    tf.train.Checkpoint(model=new).restore(path).assert_existing_objects_matched()
    x = np.random.default_rng(1).normal(size=(2, 16, 16, 2)).astype(np.float32)
    assert np.abs(new(x).numpy() - old(x).numpy()).max() < 1e-4
    np.testing.assert_array_equal(new.get_layer("enc0_in1").beta.numpy(), np.linspace(-1, 1, 4, dtype=np.float32))


def test_instance_norm_keeps_float32_statistics_under_mixed_bfloat16():
    """A bfloat16 mean of activations around 5 is off by ~0.03: normalised values were 0.58 out."""
    import tensorflow as tf

    from trainer.models.instance_norm import InstanceNormalization

    x = (np.random.default_rng(0).normal(size=(4, 64, 64, 8)) * 3 + 5).astype(np.float32)
    exact = (x - x.mean(axis=(1, 2), keepdims=True)) / np.sqrt(x.var(axis=(1, 2), keepdims=True) + 1e-5)
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        layer = InstanceNormalization()
        out = layer(tf.cast(x, tf.bfloat16))
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert out.dtype == tf.bfloat16 and layer.gamma.dtype == tf.float32
    # bfloat16 keeps 8 significant bits: rounding the exact result alone costs up to 2^-8 of |x|.
    assert np.abs(tf.cast(out, tf.float32).numpy() - exact).max() < 0.04


def _instance_norm_training_path_under_policy(policy: str, x, upstream):
    """The layer's training path under a mixed-precision policy: output, d input, d gamma, d beta."""
    import tensorflow as tf

    from trainer.models.instance_norm import InstanceNormalization

    tf.keras.mixed_precision.set_global_policy(policy)
    try:
        layer = InstanceNormalization()
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.cast(upstream, tf.float32))
        return (y, *tape.gradient(loss, [x, layer.gamma, layer.beta]))
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("shape", [(3, 16, 12, 5), (2, 8, 6, 4, 3)])
@pytest.mark.parametrize("unknown_spatial_size", [False, True])
def test_instance_norm_training_gradient_equals_the_automatic_gradient_of_the_inference_formula(
        shape, unknown_spatial_size):
    """The hand-written backward pass (training=True) against TensorFlow's gradient of the
    formula that inference and exports use, for the input, gamma and beta."""
    import tensorflow as tf

    from trainer.models.instance_norm import InstanceNormalization

    rng = np.random.default_rng(2)
    x = (rng.normal(size=shape) * rng.uniform(0.5, 4, size=shape[-1]) + rng.normal(size=shape[-1]) * 3)
    x = tf.constant(x.astype(np.float32))
    upstream = tf.constant(rng.normal(size=shape).astype(np.float32))
    layer = InstanceNormalization(epsilon=1e-5)
    layer.build(shape)
    layer.gamma.assign(rng.uniform(0.5, 2, size=shape[-1]).astype(np.float32))
    layer.beta.assign(rng.normal(size=shape[-1]).astype(np.float32))
    signature = tf.TensorSpec((None, *[None] * (len(shape) - 2), shape[-1]), tf.float32) if unknown_spatial_size else None
    fast = forward_and_gradients(layer, x, upstream, True, signature)
    reference = forward_and_gradients(layer, x, upstream, False, signature)
    for name, ours, expected in zip(("output", "d input", "d gamma", "d beta"), fast, reference):
        scale = max(1.0, np.abs(expected).max())
        assert np.abs(ours - expected).max() < 1e-4 * scale, name


def test_instance_norm_training_path_under_mixed_bfloat16_matches_float32():
    """bf16 activations in and out, float32 statistics and weight gradients, within bf16 rounding."""
    import tensorflow as tf

    from trainer.models.instance_norm import InstanceNormalization

    rng = np.random.default_rng(3)
    shape = (2, 32, 32, 4)
    x = (rng.normal(size=shape) * 3 + 5).astype(np.float32)
    upstream = tf.constant(rng.normal(size=shape).astype(np.float32))
    exact = forward_and_gradients(InstanceNormalization(), tf.constant(x), upstream, False)
    y, dx, dgamma, dbeta = _instance_norm_training_path_under_policy("mixed_bfloat16", tf.cast(x, tf.bfloat16), upstream)
    assert y.dtype == tf.bfloat16 and dx.dtype == tf.bfloat16 and dgamma.dtype == tf.float32
    # the input itself is rounded to bf16 (2^-8 of |x| ~ 0.03 here, over a std of 3)
    assert np.abs(tf.cast(y, tf.float32).numpy() - exact[0]).max() < 0.05
    assert np.abs(tf.cast(dx, tf.float32).numpy() - exact[1]).max() < 0.02 * np.abs(exact[1]).max()
    for ours, expected in ((dgamma, exact[2]), (dbeta, exact[3])):
        assert np.abs(ours.numpy() - expected).max() < 0.02 * np.abs(expected).max()


def test_instance_norm_training_path_in_bfloat16_has_no_error_that_grows_with_mean_over_std():
    """Channels with a mean 100x their std, half way between two bf16 numbers: a mean rounded to
    bf16 would shift the normalised output by ~0.3 (0.014 / 0.05). Compared with float64 maths on
    the same bf16 input, the output may only carry its own two bf16 roundings (|y| < 4: 2 x 0.008)."""
    import tensorflow as tf

    rng = np.random.default_rng(4)
    shape = (2, 48, 40, 3)
    x = tf.cast(rng.normal(5.014, 0.05, size=shape).astype(np.float32), tf.bfloat16)
    upstream = tf.cast(rng.normal(size=shape).astype(np.float32), tf.bfloat16)
    exact_in = tf.cast(x, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(exact_in)
        mean, variance = tf.nn.moments(exact_in, [1, 2], keepdims=True)
        exact = (exact_in - mean) / tf.sqrt(variance + 1e-5)
        loss = tf.reduce_sum(exact * tf.cast(upstream, tf.float64))
    exact_dx = tape.gradient(loss, exact_in).numpy()
    y, dx, _, _ = _instance_norm_training_path_under_policy("mixed_bfloat16", x, upstream)
    y, dx = tf.cast(y, tf.float64).numpy(), tf.cast(dx, tf.float64).numpy()
    assert np.abs(y - exact.numpy()).max() < 0.03
    assert np.abs(dx - exact_dx).max() < 0.02 * np.abs(exact_dx).max()


def test_instance_norm_training_path_in_float16_does_not_overflow():
    """mixed_float16 (GPU nodes): sums of squares over 64x64 values of size ~30 pass float16's
    65504, so the full-size work runs in float32 there."""
    import tensorflow as tf

    from trainer.models.instance_norm import InstanceNormalization

    rng = np.random.default_rng(5)
    x = (rng.normal(size=(2, 64, 64, 3)) * 30 + 100).astype(np.float32)
    upstream = tf.constant(rng.normal(size=x.shape).astype(np.float32))
    exact = forward_and_gradients(InstanceNormalization(), tf.constant(x), upstream, False)
    y, dx, _, _ = _instance_norm_training_path_under_policy("mixed_float16", tf.cast(x, tf.float16), upstream)
    assert y.dtype == tf.float16 and dx.dtype == tf.float16
    assert np.abs(tf.cast(y, tf.float32).numpy() - exact[0]).max() < 0.01
    assert np.abs(tf.cast(dx, tf.float32).numpy() - exact[1]).max() < 0.01 * np.abs(exact[1]).max()
