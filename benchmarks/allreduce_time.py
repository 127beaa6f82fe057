"""Allreduce cost per step: time Horovod's averaging of one step's gradients (tensors shaped
like the model's trainable variables), for the 2D and the 3D UNet. Run under horovodrun:

    horovodrun -np 2 -H localhost:2 --gloo python benchmarks/allreduce_time.py OUT.json
"""
from __future__ import annotations

import json
import sys
import time

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

from trainer.config.settings import ModelSettings
from trainer.models import UNet2D, UNet3D

hvd.init()
tf.config.threading.set_intra_op_parallelism_threads(1)
results = {}
for name, model in (("2d", UNet2D(ModelSettings(), 4)), ("3d", UNet3D(ModelSettings(), 4, (64, 64, 64)))):
    gradients = [tf.random.normal(v.shape) for v in model.trainable_variables]
    for _ in range(3):  # warm-up (negotiation, buffer allocation)
        hvd.grouped_allreduce(gradients, op=hvd.Average)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        out = hvd.grouped_allreduce(gradients, op=hvd.Average)
        _ = [o.numpy() for o in out[:1]]
        times.append(time.perf_counter() - start)
    results[name] = {"params": int(model.count_params()), "gradient_mib": sum(int(np.prod(g.shape)) for g in gradients) * 4 / 2 ** 20,
                     "allreduce_ms_median": 1000 * float(np.median(times)), "allreduce_ms_p90": 1000 * float(np.percentile(times, 90))}
if hvd.rank() == 0:
    with open(sys.argv[1], "w") as handle:
        json.dump({"ranks": hvd.size(), **results}, handle, indent=2)
