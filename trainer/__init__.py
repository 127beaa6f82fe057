"""unet-train: 2D/3D UNet training for brain-tumour segmentation (single, Horovod, PS)."""

__version__ = "0.1.0"
