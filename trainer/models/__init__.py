"""UNet models (tf.keras, Keras 2.15). Importable without the CLI; built from typed settings."""
from trainer.models.unet import UNet2D, UNet3D, build_model, context_planes, input_shape

__all__ = ["UNet2D", "UNet3D", "build_model", "context_planes", "input_shape"]
