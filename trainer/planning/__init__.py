"""``unet-train plan``: from the dataset and the node to a configuration that fits and is fast.

fingerprint (the data), node (the machine), memory (peak RSS, checked before training
allocates), speed (calibrated steps, multi-node projection), planner (the choices and why).
"""
