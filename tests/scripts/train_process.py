"""One training process: `python train_process.py CONFIG WORKDIR OUT.npz [--config.x=y ...]`.

Trains with trainer.train_and_evaluate and saves the final G and D parameters (flattened) to
OUT.npz. Multi-host runs pass --config.dist.* (the test starts two of these).
"""
import sys

import jax
import numpy as np
from flax import traverse_util

from cspgan_jax import config_lib, trainer

config_path, workdir, out = sys.argv[1:4]
config = config_lib.load_config(config_path, sys.argv[4:])
state = trainer.train_and_evaluate(config, workdir, progress=False)
flat = traverse_util.flatten_dict({"g": state.g.params, "d": state.d.params}, sep="/")
np.savez(out, step=np.asarray(state.step), process_index=jax.process_index(),
         process_count=jax.process_count(), device_count=jax.device_count(),
         **{k: np.asarray(v) for k, v in flat.items()})
