"""Parameter-server mode: synchronous SGD over gRPC with TensorFlow's PS/worker cluster."""
