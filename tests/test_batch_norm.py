"""The 3D UNet's batch norm: Keras's numbers, trained through a 4D view (oneDNN's kernels)."""
import numpy as np
import pytest

from support.norm_layers import forward_and_gradients

SHAPE = (2, 8, 6, 16, 5)  # N, D, H, W, C


def _layers(policy: str):
    """Keras's BatchNormalization and ours, built alike under ``policy``, with the same weights."""
    import tensorflow as tf

    from trainer.models.batch_norm import VolumeBatchNormalization

    tf.keras.mixed_precision.set_global_policy(policy)
    try:
        pair = [tf.keras.layers.BatchNormalization(momentum=0.8), VolumeBatchNormalization(momentum=0.8)]
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    rng = np.random.default_rng(7)
    weights = [rng.uniform(0.5, 2, SHAPE[-1]), rng.normal(size=SHAPE[-1]), rng.normal(size=SHAPE[-1]),
               rng.uniform(0.5, 2, SHAPE[-1])]  # gamma, beta, moving mean, moving variance
    for layer in pair:
        layer.build(SHAPE)
        layer.set_weights([w.astype(np.float32) for w in weights])
    return pair


def _train_once(layer, x, upstream, signature):
    """One training-mode call: output, d input, d gamma, d beta, and the updated moving statistics."""
    outputs = forward_and_gradients(layer, x, upstream, True, signature)
    return outputs + [layer.moving_mean.numpy(), layer.moving_variance.numpy()]


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("unknown_spatial_size", [False, True])
def test_training_matches_keras_batch_norm(policy, unknown_spatial_size):
    import tensorflow as tf

    rng = np.random.default_rng(8)
    dtype = tf.bfloat16 if policy == "mixed_bfloat16" else tf.float32
    x = tf.cast((rng.normal(size=SHAPE) * rng.uniform(0.5, 3, SHAPE[-1]) + rng.normal(size=SHAPE[-1]) * 2)
                .astype(np.float32), dtype)
    upstream = tf.constant(rng.normal(size=SHAPE).astype(np.float32))
    signature = tf.TensorSpec((None, None, None, None, SHAPE[-1]), dtype) if unknown_spatial_size else None
    keras, ours = (_train_once(layer, x, upstream, signature) for layer in _layers(policy))
    # bf16 outputs and input gradients carry one bf16 rounding (2^-8 relative) of two kernels' results
    tolerance = 1e-4 if dtype == tf.float32 else 1e-2
    names = ("output", "d input", "d gamma", "d beta", "moving mean", "moving variance")
    for name, got, expected in zip(names, ours, keras):
        assert got.shape == expected.shape, name
        assert np.abs(got - expected).max() <= tolerance * max(1.0, np.abs(expected).max()), name


def _fused_batch_norm_inputs(layer, training: bool, rank: int = 5):
    """(input rank, data_format) of every FusedBatchNormV3 in the traced call."""
    import tensorflow as tf

    graph = tf.function(lambda x: layer(x, training=training)).get_concrete_function(
        tf.TensorSpec((None, *[None] * (rank - 2), SHAPE[-1]), tf.float32)).graph
    return [(op.inputs[0].shape.rank, op.get_attr("data_format").decode())
            for op in graph.get_operations() if op.type == "FusedBatchNormV3"]


def test_training_runs_the_4d_kernel_and_inference_keeps_keras_graph():
    """TensorFlow hands FusedBatchNormV3 to oneDNN only in 4D: training must reach it through a
    4D NHWC view; inference (and so every serving signature) keeps Keras's own 5D op."""
    keras, ours = _layers("float32")
    assert _fused_batch_norm_inputs(ours, training=True) == [(4, "NHWC")]
    assert ours._data_format == "NDHWC"  # the 4D layout lasts one call
    assert _fused_batch_norm_inputs(keras, training=True) == [(5, "NDHWC")]
    assert _fused_batch_norm_inputs(ours, training=False) == [(5, "NDHWC")]


def test_the_layout_is_restored_when_the_call_fails(monkeypatch):
    import tensorflow as tf

    _, ours = _layers("float32")

    def fail(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(tf.keras.layers.BatchNormalization, "call", fail)
    with pytest.raises(RuntimeError, match="kernel failed"):
        ours(np.zeros(SHAPE, np.float32), training=True)
    assert ours._data_format == "NDHWC"


def test_a_frozen_layer_normalises_with_its_moving_statistics_as_keras_does():
    """trainable=False overrides training=True in Keras (fine-tuning): no batch statistics, no update."""
    keras, ours = _layers("float32")
    for layer in (keras, ours):
        layer.trainable = False
    x = np.random.default_rng(10).normal(size=SHAPE).astype(np.float32) * 2 + 1
    before = ours.moving_mean.numpy()
    np.testing.assert_allclose(ours(x, training=True).numpy(), keras(x, training=True).numpy(), atol=1e-5)
    np.testing.assert_array_equal(ours.moving_mean.numpy(), before)
    assert _fused_batch_norm_inputs(ours, training=True) == [(5, "NDHWC")]


def test_2d_input_is_keras_batch_norm_unchanged():
    import tensorflow as tf

    from trainer.models.batch_norm import VolumeBatchNormalization

    shape = (2, 16, 16, SHAPE[-1])
    layer, reference = VolumeBatchNormalization(), tf.keras.layers.BatchNormalization()
    rng = np.random.default_rng(11)
    weights = [rng.uniform(0.5, 2, SHAPE[-1]), rng.normal(size=SHAPE[-1]), np.zeros(SHAPE[-1]), np.ones(SHAPE[-1])]
    for norm in (layer, reference):
        norm.build(shape)
        norm.set_weights([w.astype(np.float32) for w in weights])
    assert _fused_batch_norm_inputs(layer, training=True, rank=4) == [(4, "NHWC")]
    x = tf.constant(rng.normal(size=shape).astype(np.float32) * 3 + 2)
    np.testing.assert_allclose(layer(x, training=True).numpy(), reference(x, training=True).numpy(), atol=1e-5)


def test_a_keras_batch_norm_checkpoint_restores_into_it(tmp_path):
    """Runs trained before the layer existed keep working: same variables, same names."""
    import tensorflow as tf

    keras, ours = _layers("float32")
    keras.moving_mean.assign(np.arange(SHAPE[-1], dtype=np.float32))
    path = tf.train.Checkpoint(norm=keras).save(str(tmp_path / "ckpt"))
    tf.train.Checkpoint(norm=ours).restore(path).assert_existing_objects_matched()
    np.testing.assert_array_equal(ours.moving_mean.numpy(), np.arange(SHAPE[-1], dtype=np.float32))
    x = np.random.default_rng(9).normal(size=SHAPE).astype(np.float32)
    np.testing.assert_allclose(ours(x, training=False).numpy(), keras(x, training=False).numpy(), atol=1e-5)
