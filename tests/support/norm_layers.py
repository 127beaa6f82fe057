"""Shared by the normalisation-layer tests: one call of a layer and its gradients."""
from __future__ import annotations


def forward_and_gradients(layer, x, upstream, training, signature=None) -> list:
    """float32 numpy of the layer's output and the gradients of sum(output * upstream) with
    respect to the input, gamma and beta; with ``signature``, inside a tf.function of that
    signature (unknown spatial sizes, as the 3D model and sliding window trace)."""
    import tensorflow as tf

    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
        return (y, *tape.gradient(loss, [x, layer.gamma, layer.beta]))

    if signature is not None:
        run = tf.function(run, input_signature=[signature])
    return [tf.cast(t, tf.float32).numpy() for t in run(x)]
